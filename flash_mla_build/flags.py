"""Compiler and linker command lines for Linux (gcc/clang) and Windows (MSVC).

The one place flags are decided; the platform is a parameter so the Windows lines
are unit-tested on Linux (tests/test_build_flags.py pins them).

Public API:
- ``host_platform() -> "linux" | "windows"``.
- ``BuildOptions``: include dirs (overlay first), defines, release/debug.
- ``nvcc_compile_args(platform, opts, gencode) -> list[str]``: arguments after the
  nvcc executable, without input/output/depfile (ninja_file's rules add
  ``-MD -MF $out.d -c $in -o $out``, or ``/showIncludes`` for cl).
- ``cxx_compile_args(platform, opts) -> list[str]``: host compiler arguments for .cpp.
- ``nvcc_link_args(platform, output, lib_dirs, libs) -> list[str]``: the shared
  library link through nvcc (it adds the static cudart); objects go into a
  response file (``--options-file``), so the line stays short on Windows.
- ``LOUD_PTXAS``: the ptxas options every CUDA file gets (resources printed, spills loud).
- ``spilling_kernels(compiler_output) -> list[str]``: kernels ptxas reported with
  spills (a release build fails on any).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["host_platform", "BuildOptions", "nvcc_compile_args", "cxx_compile_args",
           "nvcc_link_args", "LOUD_PTXAS", "WINDOWS_DEFINES", "MSVC_FLAGS",
           "spilling_kernels", "library_filename", "object_suffix", "compiler_env"]

LINUX, WINDOWS = "linux", "windows"

LOUD_PTXAS = "--ptxas-options=-v,--warn-on-spills,--warn-on-local-memory-usage"

# Every nvcc and cl call on Windows needs these: /Zc:__cplusplus (else MSVC reports
# C++98 and CUTLASS drops its constexpr paths), /Zc:preprocessor (CCCL of CUDA 13.2+
# rejects the traditional one), /bigobj (C1128 on template-heavy files), /utf-8 (tvm-ffi's
# headers hold non-ASCII characters: C4819 or worse on CJK code pages otherwise).
MSVC_FLAGS = ("/Zc:__cplusplus", "/Zc:preprocessor", "/bigobj", "/utf-8", "/EHsc", "/MD")
WINDOWS_DEFINES = ("_USE_MATH_DEFINES", "NOMINMAX", "WIN32_LEAN_AND_MEAN")


def host_platform() -> str:
    return WINDOWS if sys.platform.startswith("win") else LINUX


def _check_platform(platform: str) -> None:
    if platform not in (LINUX, WINDOWS):
        raise ValueError(f"platform must be 'linux' or 'windows', got {platform!r}")


@dataclass
class BuildOptions:
    include_dirs: Sequence[str] = ()        # searched in this order (patch overlay first)
    defines: Sequence[str] = ()             # "NAME" or "NAME=VALUE"
    release: bool = True                    # -O3, NDEBUG; spills fail the build
    debug_info: bool = False                # -lineinfo and /Z7 (never /Zi: parallel builds)
    extra_nvcc: Sequence[str] = field(default_factory=tuple)


def library_filename(platform: str) -> str:
    _check_platform(platform)
    return "flash_mla_native.dll" if platform == WINDOWS else "libflash_mla_native.so"


def object_suffix(platform: str) -> str:
    _check_platform(platform)
    return ".obj" if platform == WINDOWS else ".o"


def compiler_env(platform: str) -> dict:
    """Environment additions for compiler processes (VSLANG=1033: English MSVC notes)."""
    _check_platform(platform)
    return {"VSLANG": "1033"} if platform == WINDOWS else {}


def nvcc_compile_args(platform: str, opts: BuildOptions, gencode: Sequence[str]) -> list:
    _check_platform(platform)
    args = ["-std=c++17", "-O3" if opts.release else "-O0"]
    if opts.release:
        args.append("-DNDEBUG")
    args += ["--expt-relaxed-constexpr", LOUD_PTXAS]
    if opts.debug_info:
        args.append("-lineinfo")
    if platform == WINDOWS:
        args += [f"-Xcompiler={f}" for f in MSVC_FLAGS]
        if opts.debug_info:
            args.append("-Xcompiler=/Z7")
        args += [f"-D{d}" for d in WINDOWS_DEFINES]
    else:
        args += ["-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden"]
    args += [f"-D{d}" for d in opts.defines]
    args += [f"-I{d}" for d in opts.include_dirs]
    args += list(gencode)
    args += list(opts.extra_nvcc)
    return args


def cxx_compile_args(platform: str, opts: BuildOptions) -> list:
    _check_platform(platform)
    if platform == WINDOWS:
        args = ["/nologo", "/std:c++17", "/O2" if opts.release else "/Od"]
        args += list(MSVC_FLAGS)
        if opts.debug_info:
            args.append("/Z7")
        if opts.release:
            args.append("/DNDEBUG")
        args += [f"/D{d}" for d in WINDOWS_DEFINES]
        args += [f"/D{d}" for d in opts.defines]
        args += [f"/I{d}" for d in opts.include_dirs]
        return args
    args = ["-std=c++17", "-O3" if opts.release else "-O0", "-fPIC", "-fvisibility=hidden"]
    if opts.debug_info:
        args.append("-g")
    if opts.release:
        args.append("-DNDEBUG")
    args += [f"-D{d}" for d in opts.defines]
    args += [f"-I{d}" for d in opts.include_dirs]
    return args


def nvcc_link_args(platform: str, output: str, lib_dirs: Sequence[str],
                   libs: Sequence[str]) -> list:
    """nvcc arguments that link the objects listed in the response file $out.rsp."""
    _check_platform(platform)
    args = ["-shared", "-cudart", "static", "-o", output, "--options-file", "$out.rsp"]
    args += [f"-L{d}" for d in lib_dirs]
    if platform == WINDOWS:
        # nvcc passes -l<name> to link.exe as <name>.lib.
        args += [f"-l{lib}" for lib in libs]
    else:
        args += [f"-l{lib}" for lib in libs]
        args += ["-Xlinker", "--no-undefined", "-Xlinker", "--as-needed"]
    return args


_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_FUNC_RE = re.compile(r"Function properties for (\S+)")
_COMPILE_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")


def spilling_kernels(compiler_output: str) -> list:
    """Kernels ptxas -v reported with non-zero spill stores or loads.

    Reads the "Function properties for X" / "N bytes spill stores, M bytes spill
    loads" pairs and the "Compiling entry function 'X' for 'sm_Y'" lines that
    name the target; returns "X (sm_Y): S B stores, L B loads" entries.
    """
    found = []
    current = None
    target = {}
    for line in compiler_output.splitlines():
        c = _COMPILE_RE.search(line)
        if c:
            target[c.group(1)] = c.group(2)
        f = _FUNC_RE.search(line)
        if f:
            current = f.group(1)
            continue
        s = _SPILL_RE.search(line)
        if s and current is not None:
            stores, loads = int(s.group(1)), int(s.group(2))
            if stores or loads:
                where = target.get(current, "?")
                found.append(f"{current} ({where}): {stores} B stores, {loads} B loads")
            current = None
    return found
