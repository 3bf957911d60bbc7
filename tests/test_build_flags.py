"""Compiler and linker command lines (flash_mla_build.flags); the Windows lines are
pinned exactly, since no Windows machine runs here."""
from __future__ import annotations

import pytest

from flash_mla_build import flags as F

OPTS = F.BuildOptions(include_dirs=["overlay", "C:/src/csrc"], defines=["FLASH_MLA_TARGETS=90a_120f"])
GENCODE = ["-gencode=arch=compute_120f,code=sm_120f"]


def test_windows_nvcc_line_pinned():
    assert F.nvcc_compile_args("windows", OPTS, GENCODE) == [
        "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
        "--ptxas-options=-v,--warn-on-spills,--warn-on-local-memory-usage",
        "-Xcompiler=/Zc:__cplusplus", "-Xcompiler=/Zc:preprocessor", "-Xcompiler=/bigobj",
        "-Xcompiler=/utf-8", "-Xcompiler=/EHsc", "-Xcompiler=/MD",
        "-D_USE_MATH_DEFINES", "-DNOMINMAX", "-DWIN32_LEAN_AND_MEAN",
        "-DFLASH_MLA_TARGETS=90a_120f", "-Ioverlay", "-IC:/src/csrc",
        "-gencode=arch=compute_120f,code=sm_120f",
    ]


def test_windows_debug_uses_z7_never_zi():
    dbg = F.BuildOptions(release=False, debug_info=True)
    nv = F.nvcc_compile_args("windows", dbg, [])
    cl = F.cxx_compile_args("windows", dbg)
    assert "-Xcompiler=/Z7" in nv and "/Z7" in cl
    assert not any("/Zi" in a for a in nv + cl)
    assert "-DNDEBUG" not in nv and "-O0" in nv


def test_windows_cl_line_pinned():
    assert F.cxx_compile_args("windows", OPTS) == [
        "/nologo", "/std:c++17", "/O2", "/Zc:__cplusplus", "/Zc:preprocessor", "/bigobj",
        "/utf-8", "/EHsc", "/MD", "/DNDEBUG", "/D_USE_MATH_DEFINES", "/DNOMINMAX",
        "/DWIN32_LEAN_AND_MEAN", "/DFLASH_MLA_TARGETS=90a_120f", "/Ioverlay", "/IC:/src/csrc",
    ]


def test_windows_link_line_pinned():
    assert F.nvcc_link_args("windows", "$out", ["C:/py/tvm_ffi/lib"], ["tvm_ffi"]) == [
        "-shared", "-cudart", "static", "-o", "$out", "--options-file", "$out.rsp",
        "-LC:/py/tvm_ffi/lib", "-ltvm_ffi",
    ]


def test_windows_environment_and_names():
    assert F.compiler_env("windows") == {"VSLANG": "1033"}
    assert F.library_filename("windows") == "flash_mla_native.dll"
    assert F.object_suffix("windows") == ".obj"


def test_linux_lines():
    nv = F.nvcc_compile_args("linux", OPTS, GENCODE)
    assert nv[:5] == ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", F.LOUD_PTXAS]
    assert "-Xcompiler=-fPIC" in nv and not any(a.startswith("-Xcompiler=/") for a in nv)
    assert F.cxx_compile_args("linux", OPTS)[:4] == ["-std=c++17", "-O3", "-fPIC",
                                                     "-fvisibility=hidden"]
    link = F.nvcc_link_args("linux", "$out", ["/x"], ["tvm_ffi"])
    assert link[:7] == ["-shared", "-cudart", "static", "-o", "$out", "--options-file",
                        "$out.rsp"]
    assert F.library_filename("linux") == "libflash_mla_native.so"


def test_unknown_platform_rejected():
    with pytest.raises(ValueError, match="platform must be 'linux' or 'windows', got 'darwin'"):
        F.nvcc_compile_args("darwin", OPTS, [])


PTXAS_SAMPLE = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_120f'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_120f'
ptxas info    : Function properties for _Z3barPf
    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_spilling_kernels_found_in_ptxas_output():
    assert F.spilling_kernels(PTXAS_SAMPLE) == ["_Z3barPf (sm_120f): 44 B stores, 40 B loads"]
    assert F.spilling_kernels(PTXAS_SAMPLE.split("ptxas info    : Compiling entry function "
                                                 "'_Z3barPf'")[0]) == []


def test_msvc_reads_every_source_as_utf8():
    # tvm-ffi's headers hold non-ASCII characters; without /utf-8 cl decodes them in the
    # system code page (C4819, or broken tokens on CJK code pages).
    assert "-Xcompiler=/utf-8" in F.nvcc_compile_args("windows", OPTS, GENCODE)
    assert "/utf-8" in F.cxx_compile_args("windows", OPTS)
    assert not any("utf-8" in a for a in F.nvcc_compile_args("linux", OPTS, GENCODE))
