"""Find the build toolchain: nvcc (and its CUDA version), host compiler, ninja,
CUTLASS headers, tvm-ffi headers and library, cuobjdump.

Public API (setup.py via build.py, scripts/check_env, wheel_verify):
- ``find_cuda(env=None) -> CudaToolchain``: nvcc from CUDA_HOME, CUDA_PATH, nvcc on
  PATH, else the PyPI CUDA toolkit (``pip install "cuda-toolkit[nvcc,cudart,cccl,
  crt,nvvm]==13.*"``, installed under site-packages/nvidia/cu13); raises
  ``ToolchainError`` saying what was searched and how to get one.
- ``nvcc_version(nvcc) -> (major, minor)``.
- ``find_host_compiler(platform, cuda_version=None) -> HostCompiler``: gcc/g++ or
  clang on Linux (CXX honoured), MSVC cl.exe on Windows: an activated x64 developer
  shell (cl on PATH; DISTUTILS_USE_SDK=1 says to trust it; a shell targeting x86 is
  refused), else the newest x64-hosted, x64-targeting toolset of any Visual Studio
  install (vswhere) that the nvcc accepts, with vcvarsall's environment, else the way
  setuptools finds one.
- ``find_ninja() -> str``: ninja on PATH or from the ninja PyPI package.
- ``cutlass_include_dir() -> Path``: CuTe/CUTLASS headers of the pinned nvidia-cutlass.
- ``tvm_ffi_dirs() -> TvmFfiDirs``: include dirs, the library dir and link name.
- ``find_cuobjdump(cuda=None) -> str | None``: the CUDA toolkit's, the
  nvidia-cuda-cuobjdump wheel's, or Triton's bundled one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["ToolchainError", "CudaToolchain", "HostCompiler", "TvmFfiDirs", "find_cuda",
           "nvcc_version", "find_host_compiler", "find_ninja", "cutlass_include_dir",
           "tvm_ffi_dirs", "find_cuobjdump", "pypi_cuda_roots", "MsvcToolset",
           "max_msvc_for_cuda", "vswhere_installs", "msvc_toolsets", "choose_msvc",
           "vcvars_command", "parse_set_output"]

PINNED_CUTLASS = "4.2.0.0"
PYPI_CUDA_HINT = 'pip install "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]==13.*"'


class ToolchainError(RuntimeError):
    """A build tool could not be found or does not work."""


def _exe(name: str) -> str:
    return name + ".exe" if sys.platform.startswith("win") else name


@dataclass
class CudaToolchain:
    nvcc: Path
    root: Path                   # nvcc's TOP (the folder holding bin/nvcc)
    version: tuple               # (major, minor)
    source: str                  # "CUDA_HOME", "CUDA_PATH", "PATH" or "PyPI"
    include_dirs: list = field(default_factory=list)  # nvcc's own -I dirs (cuda_runtime.h)

    @property
    def version_text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


def nvcc_version(nvcc) -> tuple:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, timeout=60,
                             check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolchainError(f"nvcc at {nvcc} could not run: {exc}") from exc
    text = out.stdout.decode("utf-8", "replace")
    m = re.search(r"release (\d+)\.(\d+)", text)
    if not m:
        raise ToolchainError(f"nvcc at {nvcc} printed no 'release X.Y' version: {text.strip()!r}")
    return int(m.group(1)), int(m.group(2))


def pypi_cuda_roots() -> list:
    """Folders of pip-installed CUDA toolkits (nvidia/cu13, nvidia/cu12 layouts)."""
    roots = []
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return roots
    for base in getattr(nvidia, "__path__", []):
        for name in ("cu13", "cu12", "cuda_nvcc"):
            root = Path(base) / name
            if (root / "bin" / _exe("nvcc")).is_file():
                roots.append(root)
    return roots


def _nvcc_layout(nvcc: Path) -> tuple:
    """(root, include dirs) as nvcc itself resolves them (its TOP and INCLUDES).

    Wrapper scripts (/usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) and the
    PyPI layout (nvidia/cu13/include) are both handled by asking nvcc, not guessing.
    """
    try:
        out = subprocess.run([str(nvcc), "-dryrun", "-c", "flash_mla_probe.cu"],
                             capture_output=True, timeout=60, check=False)
        text = (out.stdout + out.stderr).decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        text = ""
    top = re.search(r"^#\$ TOP=(.*)$", text, re.M)
    root = Path(os.path.normpath(top.group(1).strip())) if top else nvcc.parent.parent
    includes = []
    inc = re.search(r"^#\$ INCLUDES=(.*)$", text, re.M)
    if inc:
        for m in re.finditer(r'"-I([^"]+)"|-I(\S+)', inc.group(1)):
            includes.append(os.path.normpath(m.group(1) or m.group(2)))
    if not includes and (root / "include").is_dir():
        includes.append(str(root / "include"))
    return root, [d for d in includes if Path(d).is_dir()]


def _toolchain(nvcc: Path, source: str) -> CudaToolchain:
    root, includes = _nvcc_layout(nvcc)
    return CudaToolchain(nvcc, root, nvcc_version(nvcc), source, includes)


def find_cuda(env: Optional[Mapping[str, str]] = None) -> CudaToolchain:
    env = os.environ if env is None else env
    tried = []
    if env.get("FLASH_MLA_CUDA_FROM_PYPI") == "1":
        # The build was asked to use the PyPI toolkit it installed into its venv, even
        # where another nvcc is installed (the no-toolkit path, reproduced on purpose).
        for root in pypi_cuda_roots():
            return _toolchain(root / "bin" / _exe("nvcc"), "PyPI")
        raise ToolchainError("FLASH_MLA_CUDA_FROM_PYPI=1 but this Python has no PyPI CUDA "
                             f"toolkit under site-packages/nvidia; run: {PYPI_CUDA_HINT}")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = env.get(var)
        if value:
            nvcc = Path(value) / "bin" / _exe("nvcc")
            if nvcc.is_file():
                return _toolchain(nvcc, var)
            tried.append(f"{var}={value} (no bin/{_exe('nvcc')})")
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        return _toolchain(Path(on_path), "PATH")
    tried.append("nvcc on PATH (none)")
    for root in pypi_cuda_roots():
        return _toolchain(root / "bin" / _exe("nvcc"), "PyPI")
    tried.append("the PyPI CUDA toolkit under site-packages/nvidia (none)")
    raise ToolchainError(
        "no CUDA compiler (nvcc) found; looked at " + "; ".join(tried) +
        f". Install the CUDA Toolkit and set CUDA_HOME, or run: {PYPI_CUDA_HINT}")


@dataclass
class HostCompiler:
    kind: str       # "gcc", "clang" or "msvc"
    path: str
    env: dict = field(default_factory=dict)  # environment to run it with (MSVC: the dev shell)


def _msvc_env_from_setuptools() -> Optional[dict]:
    """The Visual Studio x64 environment (PATH, INCLUDE, LIB), found the way
    setuptools finds it: ``setuptools.msvc.msvc14_get_vc_env`` where it still exists
    (setuptools < 74), else the MSVC compiler class setuptools' distutils provides
    (public attributes only: cc, include_dirs, library_dirs)."""
    try:
        from setuptools import msvc

        getter = getattr(msvc, "msvc14_get_vc_env", None)
        if getter is not None:
            return {k.upper(): v for k, v in getter("x64").items()}
    except Exception:  # noqa: BLE001 - no Visual Studio: fall through
        pass
    try:
        from distutils.ccompiler import new_compiler  # setuptools' vendored distutils

        cc = new_compiler(compiler="msvc")
        cc.initialize("win-amd64")
        cl = Path(cc.cc)
        if not cl.is_absolute():
            return None
        return {"PATH": os.pathsep.join([str(cl.parent), os.environ.get("PATH", "")]),
                "INCLUDE": os.pathsep.join(cc.include_dirs),
                "LIB": os.pathsep.join(cc.library_dirs)}
    except Exception:  # noqa: BLE001 - distutils raises several kinds when no VS is found
        return None


# ----------------------------------------------------------------------------------
# Visual Studio discovery (Windows): several installs side by side are common (2022
# Build Tools next to 2026, say), and the newest one is not always one the CUDA accepts.
# ----------------------------------------------------------------------------------
X64_SHELL_FIX = ("open the 'x64 Native Tools Command Prompt for VS 2022', or in PowerShell: "
                 "Enter-VsDevShell ... -DevCmdArguments '-arch=amd64 -host_arch=amd64'")


@dataclass(frozen=True)
class MsvcToolset:
    install: Path      # the Visual Studio installation folder
    version: str       # toolset folder name under VC/Tools/MSVC, e.g. "14.44.35207"
    cl: Path           # its x64-hosted, x64-targeting cl.exe

    @property
    def cl_version(self) -> tuple:
        """(19, minor): toolset 14.xx ships cl 19.xx (14.44 -> 19.44, 14.50 -> 19.50)."""
        parts = self.version.split(".")
        return 19, int(parts[1])

    @property
    def vcvarsall(self) -> Path:
        return self.install / "VC" / "Auxiliary" / "Build" / "vcvarsall.bat"


def max_msvc_for_cuda(cuda_version: Optional[tuple]) -> Optional[tuple]:
    """The newest cl the nvcc accepts: CUDA 13.1 and older refuse Visual Studio 2026
    (cl 19.50) in their host_config.h; None = no known cap."""
    if cuda_version is None or tuple(cuda_version) <= (13, 1):
        return 19, 49
    return None


def vswhere_installs(env: Optional[Mapping[str, str]] = None) -> list:
    """Visual Studio installations as vswhere lists them: [{name, version, path}]."""
    env = os.environ if env is None else env
    root = env.get("ProgramFiles(x86)") or env.get("ProgramFiles") or ""
    vswhere = Path(root, "Microsoft Visual Studio", "Installer", "vswhere.exe") if root else None
    if vswhere is None or not vswhere.is_file():
        return []
    try:
        out = subprocess.run([str(vswhere), "-all", "-products", "*", "-format", "json", "-utf8"],
                             capture_output=True, timeout=60, check=False)
        entries = json.loads(out.stdout.decode("utf-8", "replace") or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [{"name": e.get("displayName"), "version": e.get("installationVersion"),
             "path": e.get("installationPath", "")} for e in entries]


def msvc_toolsets(installs) -> list:
    """Every toolset of ``installs`` that has an x64-hosted, x64-targeting cl.exe."""
    found = []
    for entry in installs:
        install = Path(entry["path"])
        tools = install / "VC" / "Tools" / "MSVC"
        if not tools.is_dir():
            continue
        for folder in sorted(tools.iterdir()):
            if not re.fullmatch(r"14\.\d+\.\d+", folder.name):
                continue
            cl = folder / "bin" / "Hostx64" / "x64" / "cl.exe"
            if cl.is_file():
                found.append(MsvcToolset(install, folder.name, cl))
    return found


def choose_msvc(toolsets, cuda_version: Optional[tuple]) -> Optional[MsvcToolset]:
    """The newest toolset the nvcc accepts (by cl version, then full toolset version)."""
    cap = max_msvc_for_cuda(cuda_version)
    usable = [t for t in toolsets if cap is None or t.cl_version <= cap]
    if not usable:
        return None
    return max(usable, key=lambda t: tuple(int(p) for p in t.version.split(".")))


def vcvars_command(toolset: MsvcToolset) -> str:
    """The cmd.exe command line printing vcvarsall's environment for an x64-hosted,
    x64-targeting toolset. A string, not a list: cmd's /s /c quoting rules differ from
    the C runtime's that subprocess applies to a list."""
    return (f'cmd.exe /s /c ""{toolset.vcvarsall}" x64 -vcvars_ver={toolset.version} '
            '>nul 2>&1 && set"')


def parse_set_output(text: str) -> dict:
    """``set``'s NAME=value lines as a dict with upper-case names (Windows variables
    are case-insensitive)."""
    env = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name and not name.startswith(" "):
            env[name.upper()] = value
    return env


def _msvc_env_for(toolset: MsvcToolset) -> Optional[dict]:
    try:
        out = subprocess.run(vcvars_command(toolset), capture_output=True, timeout=120,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    env = parse_set_output(out.stdout.decode("utf-8", "replace"))
    return env if out.returncode == 0 and "INCLUDE" in env else None


def find_host_compiler(platform: str, env: Optional[Mapping[str, str]] = None,
                       cuda_version: Optional[tuple] = None) -> HostCompiler:
    env = dict(os.environ if env is None else env)
    if platform == "windows":
        cl = shutil.which("cl", path=env.get("PATH"))
        target = env.get("VSCMD_ARG_TGT_ARCH")
        if target and target.lower() != "x64":
            raise ToolchainError(f"the activated Visual Studio developer shell targets {target} "
                                 f"(VSCMD_ARG_TGT_ARCH); CUDA needs x64: {X64_SHELL_FIX}")
        if cl and (env.get("DISTUTILS_USE_SDK") == "1" or target):
            return HostCompiler("msvc", cl, {})
        chosen = choose_msvc(msvc_toolsets(vswhere_installs(env)), cuda_version)
        if chosen is not None:
            vc_env = _msvc_env_for(chosen)
            if vc_env:
                return HostCompiler("msvc", str(chosen.cl), vc_env)
        vc_env = _msvc_env_from_setuptools()
        if vc_env:
            found = shutil.which("cl", path=vc_env.get("PATH", ""))
            if found:
                return HostCompiler("msvc", found, vc_env)
        if cl:
            return HostCompiler("msvc", cl, {})
        raise ToolchainError(
            "no MSVC compiler (cl.exe) found: open an 'x64 Native Tools' developer shell and set "
            "DISTUTILS_USE_SDK=1, or install Visual Studio 2022 Build Tools with the 'Desktop "
            "development with C++' workload")
    wanted = env.get("CXX")
    candidates = [wanted] if wanted else ["g++", "clang++", "c++"]
    for name in candidates:
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            kind = "clang" if "clang" in Path(found).name else "gcc"
            return HostCompiler(kind, found, {})
    raise ToolchainError(
        f"no C++ host compiler found (tried {', '.join(candidates)}); install g++ "
        "(e.g. apt-get install g++) or set CXX")


def find_ninja() -> str:
    on_path = shutil.which("ninja")
    if on_path:
        return on_path
    try:
        import ninja  # the PyPI package ships the binary

        candidate = Path(ninja.BIN_DIR) / _exe("ninja")
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    raise ToolchainError("ninja not found: pip install ninja")


def cutlass_include_dir() -> Path:
    try:
        import cutlass_library
    except ImportError as exc:
        raise ToolchainError(
            f"CUTLASS headers not found: pip install nvidia-cutlass=={PINNED_CUTLASS}") from exc
    include = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (include / "cute").is_dir():
        raise ToolchainError(f"nvidia-cutlass is installed but {include} has no cute/ headers")
    return include


@dataclass
class TvmFfiDirs:
    include_dirs: list
    lib_dir: str
    lib_name: str   # for -l: "tvm_ffi"


def tvm_ffi_dirs() -> TvmFfiDirs:
    try:
        import tvm_ffi.libinfo as libinfo
    except ImportError as exc:
        raise ToolchainError("apache-tvm-ffi is not installed: pip install "
                             "'apache-tvm-ffi>=0.1.15,<0.2'") from exc
    includes = [libinfo.find_include_path(), libinfo.find_dlpack_include_path()]
    includes = list(dict.fromkeys(str(p) for p in includes))
    if sys.platform.startswith("win"):
        implib = Path(libinfo.find_windows_implib())
        return TvmFfiDirs(includes, str(implib.parent), implib.stem)
    lib = Path(libinfo.find_libtvm_ffi())
    return TvmFfiDirs(includes, str(lib.parent), "tvm_ffi")


def find_cuobjdump(cuda: Optional[CudaToolchain] = None) -> Optional[str]:
    """cuobjdump from the toolkit, PATH, the nvidia-cuda-cuobjdump wheel or Triton."""
    candidates = []
    if cuda is not None:
        candidates.append(cuda.root / "bin" / _exe("cuobjdump"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / _exe("cuobjdump"))
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13", "cu12", "cuda_cuobjdump"):
                candidates.append(Path(base) / sub / "bin" / _exe("cuobjdump"))
    except ImportError:
        pass
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" /
                          _exe("cuobjdump"))
    except Exception:  # noqa: BLE001 - a broken triton install must not stop us
        pass
    for c in candidates:
        if c.is_file():
            return str(c)
    return None
