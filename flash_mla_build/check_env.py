"""Environment report: everything the build and the smoke test depend on, each
problem with the fix to apply (``python -m flash_mla_build check-env [--json]``).

Two halves, so that the rules can be tested without the machine they describe:
``gather_facts()`` looks at this machine and returns plain JSON-able data;
``evaluate(facts)`` turns facts into checks, each ``ok``/``info``/``warn``/``blocker``.
The exit code is 1 only when a blocker makes the build impossible (no nvcc and no
PyPI toolchain for this platform, no host compiler, a requested target the nvcc
cannot build, a Visual Studio the CUDA refuses, no disk); warnings never fail it.

Facts about the CUDA toolchain, the host compiler, targets and CUTLASS come from
flash_mla_build.toolchain / archs, the same code setup.py uses, so the report and
the build cannot disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["Check", "gather_facts", "evaluate", "gather_preflight_facts", "evaluate_preflight",
           "render_table", "summary", "main"]

OK, INFO, WARN, BLOCKER = "ok", "info", "warn", "blocker"
REPO_ROOT = Path(__file__).resolve().parent.parent
WSL_LIB_DIR = "/usr/lib/wsl/lib"
# Targets the report asks the nvcc about (the default set plus the other Blackwell ones).
PROBE_TARGETS = ("80", "86", "89", "90a", "100f", "103f", "120", "120f", "121f")
# Free space for two venvs (torch ~ 1-3 GB), the build tree and the wheel.
DISK_BLOCKER_GIB = 2.0
DISK_WARN_GIB = 10.0
# MSVC 19.50 is Visual Studio 2026; CUDA 13.1 and older refuse it in host_config.h.
MSVC_VS2026 = (19, 50)
# The longest file name a build venv gets below site-packages (nvidia-cutlass 4.2.0.0:
# cutlass_library/source/examples/68_hopper_.../..._with_sparse_groups.cu).
DEEPEST_BUILD_FILE = 187
# Windows' MAX_PATH (260) less the terminating NUL, and a venv's Lib\site-packages\.
WINDOWS_MAX_PATH = 259
VENV_SITE_PACKAGES = len("\\Lib\\site-packages\\")
X64_PROMPT_FIX = ("open the 'x64 Native Tools Command Prompt for VS 2022' (not the x86 'Developer "
                  "PowerShell'), or in PowerShell: Enter-VsDevShell ... -DevCmdArguments "
                  "'-arch=amd64 -host_arch=amd64'; CUDA builds only 64-bit code")
LONG_PATHS_FIX = ('as administrator: reg add HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem '
                  '/v LongPathsEnabled /t REG_DWORD /d 1 /f  (then sign out and in), and keep the '
                  'checkout in a short folder such as C:\\src\\flash_mla')


@dataclass
class Check:
    name: str
    status: str   # ok, info, warn, blocker
    found: str    # what was found, one line
    fix: str = ""  # what to do about it (empty for ok)


# ----------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------
def _run(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 60) -> tuple:
    """(returncode, stdout, stderr) decoded as UTF-8 with replacement; (None, '', error)
    when the program cannot start. Non-English compilers never crash the report."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, timeout=timeout, check=False,
                              env=dict(env) if env is not None else None)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "", str(exc)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def _version_tuple(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _os_facts() -> dict:
    return {"system": _platform.system(), "release": _platform.release(),
            "machine": _platform.machine(), "platform": "windows" if sys.platform.startswith("win")
            else ("linux" if sys.platform.startswith("linux") else sys.platform)}


def _wsl_facts() -> dict:
    facts = {"is_wsl": False, "is_wsl2": False, "lib_dir": WSL_LIB_DIR, "libcuda": False,
             "lib_dir_on_loader_path": False}
    if not sys.platform.startswith("linux"):
        return facts
    try:
        release = Path("/proc/sys/kernel/osrelease").read_text(encoding="utf-8", errors="replace")
    except OSError:
        release = _platform.release()
    if "microsoft" not in release.lower() and not os.environ.get("WSL_DISTRO_NAME"):
        return facts
    facts["is_wsl"] = True
    # WSL1 kernels say "Microsoft"; WSL2 kernels say "microsoft-standard-WSL2".
    facts["is_wsl2"] = "wsl2" in release.lower() or "Microsoft" not in release
    lib_dir = Path(WSL_LIB_DIR)
    facts["libcuda"] = any(lib_dir.glob("libcuda.so*")) if lib_dir.is_dir() else False
    ld_path = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    conf = Path("/etc/ld.so.conf.d")
    in_conf = False
    if conf.is_dir():
        for f in conf.glob("*.conf"):
            try:
                in_conf = in_conf or WSL_LIB_DIR in f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                pass
    facts["lib_dir_on_loader_path"] = WSL_LIB_DIR in ld_path or in_conf
    return facts


def _python_facts() -> dict:
    return {"version": _platform.python_version(), "executable": sys.executable,
            "bits": struct.calcsize("P") * 8, "in_venv": sys.prefix != sys.base_prefix}


def _torch_facts() -> dict:
    facts: Dict[str, Any] = {"installed": False, "version": None, "cuda": None,
                             "cuda_available": False, "devices": [], "error": None}
    try:
        import torch  # optional: the build needs no torch
    except ImportError:
        return facts
    except Exception as exc:  # noqa: BLE001 - e.g. a DLL that fails to load on Windows
        facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
    facts.update(installed=True, version=str(torch.__version__), cuda=torch.version.cuda)
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                facts["devices"].append({"name": torch.cuda.get_device_name(i),
                                         "compute_capability": f"{major}.{minor}"})
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the report
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def _gpu_facts(torch_facts: dict) -> dict:
    smi = shutil.which("nvidia-smi")
    if smi is None and sys.platform.startswith("linux") and Path(WSL_LIB_DIR, "nvidia-smi").is_file():
        smi = str(Path(WSL_LIB_DIR, "nvidia-smi"))
    gpus: List[dict] = []
    error = None
    if smi:
        code, out, err = _run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                               "--format=csv,noheader,nounits"])
        if code == 0:
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 4:
                    gpus.append({"name": parts[0], "compute_capability": parts[1],
                                 "driver": parts[2], "memory_mib": parts[3], "source": "nvidia-smi"})
        else:
            error = (err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {code}"
    if not gpus:
        for dev in torch_facts.get("devices", []):
            gpus.append({**dev, "driver": None, "memory_mib": None, "source": "torch"})
    return {"nvidia_smi": smi, "gpus": gpus, "error": error}


def _cuda_facts(env: Mapping[str, str]) -> dict:
    from . import archs as A
    from . import toolchain as T

    facts: Dict[str, Any] = {"found": False, "nvcc": None, "version": None, "source": None,
                             "error": None, "buildable": [], "not_buildable": {},
                             "requested": env.get("FLASH_MLA_CUDA_ARCHS") or "all",
                             "selected": [], "arch_error": None, "cuobjdump": None,
                             "pypi_hint": T.PYPI_CUDA_HINT}
    try:
        cuda = T.find_cuda(env)
    except T.ToolchainError as exc:
        facts["error"] = str(exc)
        facts["cuobjdump"] = T.find_cuobjdump(None)
        return facts
    version = tuple(cuda.version)
    facts.update(found=True, nvcc=str(cuda.nvcc), version=cuda.version_text, source=cuda.source,
                 cuobjdump=T.find_cuobjdump(cuda))
    for name in PROBE_TARGETS:
        try:
            A.check_target(A.Target.parse(name), version)
            facts["buildable"].append(name)
        except A.ArchError as exc:
            facts["not_buildable"][name] = str(exc)
    try:
        facts["selected"] = [t.name for t in A.select_targets(facts["requested"], version)]
    except A.ArchError as exc:
        facts["arch_error"] = str(exc)
    return facts


def _pypi_cuda_available(os_facts: dict) -> bool:
    """Whether `pip install cuda-toolkit[nvcc,...]` has an nvcc for this platform: NVIDIA
    publishes it for Linux x86_64/aarch64 and Windows x64 (checked on Linux)."""
    machine = os_facts["machine"].lower()
    if os_facts["platform"] == "linux":
        return machine in ("x86_64", "amd64", "aarch64", "arm64")
    if os_facts["platform"] == "windows":
        return machine in ("amd64", "x86_64")
    return False


def _vswhere_installs() -> List[dict]:
    from . import toolchain as T

    installs = []
    for entry in T.vswhere_installs():
        toolsets = [t.version for t in T.msvc_toolsets([entry])]
        installs.append({**entry, "msvc_toolsets": toolsets})
    return installs


def _host_compiler_facts(platform_name: str) -> dict:
    from . import toolchain as T

    facts: Dict[str, Any] = {"found": False, "kind": None, "path": None, "version": None,
                             "error": None}
    if platform_name == "windows":
        facts.update(dev_shell=bool(os.environ.get("VSCMD_VER")),
                     target_arch=os.environ.get("VSCMD_ARG_TGT_ARCH"),
                     host_arch=os.environ.get("VSCMD_ARG_HOST_ARCH"),
                     distutils_use_sdk=os.environ.get("DISTUTILS_USE_SDK"),
                     vc_tools_version=os.environ.get("VCToolsVersion"),
                     visual_studio=_vswhere_installs())
    try:
        cuda = T.find_cuda()
        cuda_version = tuple(cuda.version)
    except T.ToolchainError:
        cuda_version = None
    try:
        compiler = T.find_host_compiler(platform_name if platform_name == "windows" else "linux",
                                        cuda_version=cuda_version)
    except T.ToolchainError as exc:
        facts["error"] = str(exc)
        return facts
    facts.update(found=True, kind=compiler.kind, path=compiler.path)
    run_env = {**os.environ, **compiler.env} if compiler.env else None
    if compiler.kind == "msvc":
        # cl prints its banner ("... Version 19.44.35207 for x64") on stderr.
        _, out, err = _run([compiler.path], env=run_env)
        m = re.search(r"(\d{2})\.(\d{2})\.(\d{4,5})", err + out)
        facts["version"] = m.group(0) if m else None
    else:
        code, out, _ = _run([compiler.path, "--version"], env=run_env)
        first = out.strip().splitlines()[0] if code == 0 and out.strip() else ""
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", first)
        facts["version"] = m.group(1) if m else None
        facts["banner"] = first
    return facts


def _cutlass_facts() -> dict:
    from . import toolchain as T

    facts: Dict[str, Any] = {"version": None, "pinned": T.PINNED_CUTLASS, "include": None,
                             "error": None}
    try:
        from importlib import metadata
        facts["version"] = metadata.version("nvidia-cutlass")
    except Exception:  # noqa: BLE001 - PackageNotFoundError and broken metadata alike
        pass
    try:
        facts["include"] = str(T.cutlass_include_dir())
    except T.ToolchainError as exc:
        facts["error"] = str(exc)
    return facts


def _long_paths_facts(platform_name: str) -> dict:
    facts: Dict[str, Any] = {"checked": False, "enabled": None}
    if platform_name != "windows":
        return facts
    try:
        import winreg  # Windows only
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,
                            r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            value, _ = winreg.QueryValueEx(key, "LongPathsEnabled")
        facts.update(checked=True, enabled=bool(value))
    except (ImportError, OSError):
        facts.update(checked=True, enabled=False)  # absent value = disabled
    return facts


def _disk_facts(path: Path) -> dict:
    try:
        usage = shutil.disk_usage(str(path))
    except OSError as exc:
        return {"path": str(path), "free_gib": None, "error": str(exc)}
    return {"path": str(path), "free_gib": round(usage.free / 2**30, 1), "error": None}


def _ninja_facts() -> Optional[str]:
    from . import toolchain as T

    try:
        return T.find_ninja()
    except T.ToolchainError:
        return None


def gather_facts(env: Optional[Mapping[str, str]] = None) -> dict:
    """Look at this machine. Never raises for a missing tool: absence is a fact."""
    env = dict(os.environ if env is None else env)
    os_facts = _os_facts()
    torch_facts = _torch_facts()
    return {
        "os": os_facts,
        "wsl": _wsl_facts(),
        "python": _python_facts(),
        "torch": torch_facts,
        "gpu": _gpu_facts(torch_facts),
        "cuda": _cuda_facts(env),
        "pypi_cuda_available": _pypi_cuda_available(os_facts),
        "host_compiler": _host_compiler_facts(os_facts["platform"]),
        "cutlass": _cutlass_facts(),
        "long_paths": _long_paths_facts(os_facts["platform"]),
        "disk": _disk_facts(REPO_ROOT),
        "ninja": _ninja_facts(),
    }


# ----------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------
def _cap_number(text: str) -> Optional[int]:
    m = re.match(r"^\s*(\d+)\.(\d+)\s*$", str(text or ""))
    return int(m.group(1)) * 10 + int(m.group(2)) if m else None


def _covers(target: str, cap: int) -> bool:
    """Whether a cubin for `target` runs on compute capability `cap` (e.g. 120)."""
    m = re.match(r"^(\d+)([af]?)$", target)
    if not m:
        return False
    number, suffix = int(m.group(1)), m.group(2)
    if suffix == "a":
        return cap == number
    if suffix == "f":
        return cap // 10 == number // 10 and cap >= number
    return cap // 10 == number // 10 and cap >= number


def _check_os(facts: dict) -> List[Check]:
    o = facts["os"]
    checks = [Check("OS", OK if o["platform"] in ("linux", "windows") else WARN,
                    f"{o['system']} {o['release']} ({o['machine']})",
                    "" if o["platform"] in ("linux", "windows") else
                    "only Linux (incl. WSL2) and Windows are supported build hosts")]
    w = facts["wsl"]
    if w["is_wsl"] and not w["is_wsl2"]:
        checks.append(Check("WSL", WARN, "WSL1", "CUDA needs WSL2: wsl --set-version <distro> 2"))
    elif w["is_wsl2"]:
        if w["libcuda"]:
            checks.append(Check("WSL2 driver", OK, f"{w['lib_dir']}/libcuda.so* present"))
        else:
            checks.append(Check(
                "WSL2 driver", WARN, f"no libcuda.so in {w['lib_dir']}",
                "install or update the NVIDIA driver on Windows (not inside WSL); it provides "
                f"{w['lib_dir']}. The build works without it, running kernels does not"))
    return checks


def _check_python(facts: dict) -> List[Check]:
    p = facts["python"]
    version = tuple(int(x) for x in p["version"].split(".")[:2])
    if version < (3, 9):
        return [Check("Python", BLOCKER, p["version"], "install Python 3.9 or newer")]
    if p["bits"] != 64:
        return [Check("Python", BLOCKER, f"{p['version']} ({p['bits']}-bit)",
                      "install a 64-bit Python: CUDA libraries are 64-bit only")]
    return [Check("Python", OK, f"{p['version']} at {p['executable']}")]


def _check_torch_and_gpus(facts: dict) -> List[Check]:
    t, g = facts["torch"], facts["gpu"]
    checks = []
    if t.get("error") and not t["installed"]:
        checks.append(Check("torch", WARN, f"import failed: {t['error']}",
                            "reinstall torch; the build does not need it, the smoke test does"))
    elif not t["installed"]:
        checks.append(Check("torch", INFO, "not installed",
                            "not needed to build; the build installs torch==2.13.0 into this "
                            "Python for the smoke test (CPU-only on Windows: install a CUDA torch "
                            "from pytorch.org first to run the kernels)"))
    else:
        flavour = f"CUDA {t['cuda']}" if t["cuda"] else "CPU-only build"
        checks.append(Check("torch", OK, f"{t['version']} ({flavour})"))
    gpus = g["gpus"]
    if not gpus:
        why = f" ({g['error']})" if g.get("error") else ""
        checks.append(Check("GPU", WARN, "no NVIDIA GPU visible" + why,
                            "the wheel still builds; running the kernels needs a GPU and driver "
                            "(nvidia-smi should list it)"))
        return checks
    for i, gpu in enumerate(gpus):
        driver = f", driver {gpu['driver']}" if gpu.get("driver") else ""
        checks.append(Check(f"GPU {i}", OK, f"{gpu['name']} (sm_{gpu['compute_capability']}"
                            .replace(".", "") + f"){driver}"))
    if t["installed"] and not t["cuda"]:
        checks.append(Check("torch CUDA", WARN, f"torch {t['version']} has no CUDA but a GPU is present",
                            "install a CUDA build of torch (pytorch.org selector) into this "
                            "Python before the build: the smoke test runs the kernels through it"))
    selected = facts["cuda"].get("selected") or []
    if selected:
        for gpu in gpus:
            cap = _cap_number(gpu.get("compute_capability"))
            if cap is not None and not any(_covers(s, cap) for s in selected):
                checks.append(Check(
                    "targets vs GPU", WARN,
                    f"{gpu['name']} is sm_{cap}, the build targets {';'.join(selected)} do not "
                    "cover it",
                    "set FLASH_MLA_CUDA_ARCHS=native (or add its target) before building"))
    return checks


def _check_cuda(facts: dict) -> List[Check]:
    c = facts["cuda"]
    checks = []
    if not c["found"]:
        if facts["pypi_cuda_available"]:
            checks.append(Check("nvcc", WARN, "not found (CUDA_HOME, CUDA_PATH, PATH, PyPI)",
                                "the build step installs the PyPI toolkit into its venv; or install "
                                f"CUDA 12.8+ and set CUDA_HOME; by hand: {c['pypi_hint']}"))
        else:
            checks.append(Check("nvcc", BLOCKER, "not found, and PyPI has no nvcc for this "
                                f"platform ({facts['os']['system']} {facts['os']['machine']})",
                                "install the CUDA Toolkit 12.8 or newer and set CUDA_HOME"))
        return checks
    checks.append(Check("nvcc", OK, f"CUDA {c['version']} at {c['nvcc']} ({c['source']})"))
    version = _version_tuple(c["version"]) or (0, 0)
    if "120" not in c["buildable"]:
        checks.append(Check("sm_120", WARN, f"CUDA {c['version']} cannot build sm_120",
                            "install CUDA 12.8 or newer (12.9+ for 120f, which also covers 12.1)"))
    checks.append(Check("targets", OK, "buildable: " + ";".join(c["buildable"])))
    if c["arch_error"]:
        checks.append(Check("FLASH_MLA_CUDA_ARCHS", BLOCKER, f"{c['requested']}: {c['arch_error']}",
                            "change FLASH_MLA_CUDA_ARCHS or install a newer CUDA"))
    else:
        checks.append(Check("FLASH_MLA_CUDA_ARCHS", OK,
                            f"{c['requested']} -> {';'.join(c['selected'])}"))
    if facts["os"]["platform"] == "windows" and version >= (13, 0):
        checks.append(Check("CUtensorMap", INFO,
                            f"CUDA {c['version']} declares CUtensorMap 128-byte aligned (MSVC C2719)",
                            "the patch layer applies the reviewed fix (FLASH_MLA_PATCHES=auto) to "
                            "the cuda.h versions it knows (13.0 to 13.5); CUDA 12.8/12.9 need none"))
    if c.get("cuobjdump"):
        checks.append(Check("cuobjdump", OK, c["cuobjdump"]))
    else:
        checks.append(Check("cuobjdump", INFO, "not found",
                            "the wheel's cubin check is skipped; it comes with the CUDA Toolkit"))
    return checks


def _check_dev_shell_arch(h: dict) -> List[Check]:
    """An activated developer shell must target x64 (VSCMD_ARG_TGT_ARCH): the Start menu's
    'Developer PowerShell' targets x86, and nvcc then gets a 32-bit cl.exe."""
    target, host = h.get("target_arch"), h.get("host_arch")
    if target and target.lower() != "x64":
        return [Check("developer shell", BLOCKER, f"targets {target} (VSCMD_ARG_TGT_ARCH)",
                      X64_PROMPT_FIX)]
    if target and host and host.lower() != "x64":
        return [Check("developer shell", WARN, f"x64 compiler hosted on {host} "
                      "(VSCMD_ARG_HOST_ARCH)", "works, with less memory per compiler process; "
                      + X64_PROMPT_FIX)]
    if target:
        return [Check("developer shell", OK, f"targets {target}, hosted on {host or '?'}")]
    return []


def _check_host_compiler(facts: dict) -> List[Check]:
    h = facts["host_compiler"]
    platform_name = facts["os"]["platform"]
    checks = []
    if platform_name == "windows" and not h["found"]:
        arch = _check_dev_shell_arch(h)
        if arch and arch[0].status == BLOCKER:
            return arch
    if not h["found"]:
        if platform_name == "windows":
            fix = ("install Visual Studio 2022 Build Tools (17.x, MSVC 14.3x-14.44) with 'Desktop "
                   "development with C++', then run from an 'x64 Native Tools Command Prompt for "
                   "VS 2022' with DISTUTILS_USE_SDK=1")
        else:
            fix = "install g++ (apt-get install g++ / dnf install gcc-c++) or set CXX"
        return [Check("host compiler", BLOCKER, h.get("error") or "not found", fix)]
    found = f"{h['kind']} {h['version'] or '(version unknown)'} at {h['path']}"
    checks.append(Check("host compiler", OK, found))
    if platform_name == "windows":
        checks += _check_dev_shell_arch(h)
        msvc = _version_tuple(h.get("version"))
        cuda = _version_tuple(facts["cuda"].get("version"))
        if msvc and msvc >= MSVC_VS2026 and (cuda is None or cuda <= (13, 1)):
            checks[-1] = Check(
                "host compiler", BLOCKER if cuda else WARN,
                found + " (Visual Studio 2026)",
                "CUDA 13.1 and older refuse MSVC 19.50+ ('unsupported Microsoft Visual Studio "
                "version'): install VS 2022 Build Tools (toolset 14.44) and use its x64 Native "
                "Tools prompt, or CUDA 13.2+")
        vs = h.get("visual_studio") or []
        if vs:
            names = ", ".join(f"{v['name']} {v['version']} (x64 MSVC "
                              f"{', '.join(v['msvc_toolsets']) or '-'})"
                              for v in vs)
            checks.append(Check("Visual Studio", OK, names))
        if not h.get("dev_shell") and h.get("distutils_use_sdk") != "1":
            checks.append(Check("MSVC environment", INFO,
                                "no activated developer shell; found the way setuptools finds it",
                                "optional: run from 'x64 Native Tools Command Prompt for VS 2022' "
                                "with DISTUTILS_USE_SDK=1 to pick the toolset yourself"))
    return checks


def _check_rest(facts: dict) -> List[Check]:
    checks = []
    cut = facts["cutlass"]
    if cut["version"] is None:
        checks.append(Check("CUTLASS", INFO, "nvidia-cutlass not installed here",
                            f"the build venv installs nvidia-cutlass=={cut['pinned']} from "
                            "pyproject's build requirements"))
    elif cut["version"] != cut["pinned"]:
        checks.append(Check("CUTLASS", WARN, f"nvidia-cutlass {cut['version']} (pinned {cut['pinned']})",
                            f"pip install nvidia-cutlass=={cut['pinned']}; the patch layer refuses "
                            "versions it does not know"))
    elif cut["error"]:
        checks.append(Check("CUTLASS", WARN, cut["error"],
                            f"pip install --force-reinstall nvidia-cutlass=={cut['pinned']}"))
    else:
        checks.append(Check("CUTLASS", OK, f"{cut['version']} ({cut['include']})"))
    checks += _check_long_paths_for_venv(facts)
    d = facts["disk"]
    free = d.get("free_gib")
    if free is None:
        checks.append(Check("disk", WARN, f"cannot read free space: {d.get('error')}", ""))
    elif free < DISK_BLOCKER_GIB:
        checks.append(Check("disk", BLOCKER, f"{free} GiB free at {d['path']}",
                            f"free at least {DISK_WARN_GIB:.0f} GiB (venvs with torch, build tree)"))
    elif free < DISK_WARN_GIB:
        checks.append(Check("disk", WARN, f"{free} GiB free at {d['path']}",
                            f"{DISK_WARN_GIB:.0f} GiB or more is comfortable (venvs with torch)"))
    else:
        checks.append(Check("disk", OK, f"{free} GiB free at {d['path']}"))
    if facts.get("ninja"):
        checks.append(Check("ninja", OK, facts["ninja"]))
    else:
        checks.append(Check("ninja", INFO, "not found", "the build venv installs the ninja package"))
    return checks


# ----------------------------------------------------------------------------------
# Preflight: what must hold before the build installs anything (stdlib only)
# ----------------------------------------------------------------------------------
def gather_preflight_facts(venv: Optional[str] = None,
                           env: Optional[Mapping[str, str]] = None) -> dict:
    env = os.environ if env is None else env
    os_facts = _os_facts()
    return {
        "os": os_facts,
        "python": _python_facts(),
        "long_paths": _long_paths_facts(os_facts["platform"]),
        "venv": str(Path(venv).resolve()) if venv else None,
        "dev_shell": {"target_arch": env.get("VSCMD_ARG_TGT_ARCH"),
                      "host_arch": env.get("VSCMD_ARG_HOST_ARCH")},
        "disk": _disk_facts(REPO_ROOT),
    }


def _check_long_paths_for_venv(facts: dict) -> List[Check]:
    lp, venv = facts["long_paths"], facts.get("venv")
    if not lp["checked"] or lp["enabled"]:
        return [Check("LongPathsEnabled", OK, "1")] if lp["checked"] else []
    if venv is None:
        return [Check("LongPathsEnabled", WARN, "0 (paths limited to 260 characters)",
                      LONG_PATHS_FIX)]
    longest = len(venv) + VENV_SITE_PACKAGES + DEEPEST_BUILD_FILE
    if longest > WINDOWS_MAX_PATH:
        return [Check("LongPathsEnabled", BLOCKER,
                      f"0, and the build venv {venv} ({len(venv)} characters) would hold a "
                      f"{longest}-character path (nvidia-cutlass's deepest file), over Windows' "
                      f"{WINDOWS_MAX_PATH}",
                      LONG_PATHS_FIX + "; or pass --venv with a path of at most "
                      f"{WINDOWS_MAX_PATH - VENV_SITE_PACKAGES - DEEPEST_BUILD_FILE} characters")]
    return [Check("LongPathsEnabled", WARN,
                  f"0; the build venv's deepest path is {longest} characters, within "
                  f"{WINDOWS_MAX_PATH}", LONG_PATHS_FIX)]


def evaluate_preflight(facts: dict) -> List[Check]:
    checks = _check_os(dict(facts, wsl={"is_wsl": False, "is_wsl2": False}))
    checks += _check_python(facts) + _check_long_paths_for_venv(facts)
    if facts["os"]["platform"] == "windows":
        checks += _check_dev_shell_arch(facts["dev_shell"])
    return checks


def evaluate(facts: dict) -> List[Check]:
    """Turn facts (as gather_facts returns them) into checks, in display order."""
    return (_check_os(facts) + _check_python(facts) + _check_cuda(facts)
            + _check_host_compiler(facts) + _check_torch_and_gpus(facts) + _check_rest(facts))


def summary(checks: Sequence[Check]) -> dict:
    blockers = sum(c.status == BLOCKER for c in checks)
    warnings = sum(c.status == WARN for c in checks)
    return {"blockers": blockers, "warnings": warnings, "ready": blockers == 0}


def render_table(checks: Sequence[Check]) -> str:
    labels = {OK: "ok", INFO: "info", WARN: "WARN", BLOCKER: "BLOCKER"}
    width = max([len(c.name) for c in checks] + [5])
    lines = [f"{'check':<{width}}  {'status':<7}  found", f"{'-' * width}  -------  -----"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {labels[c.status]:<7}  {c.found}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<{width}}  {'':<7}  fix: {c.fix}")
    s = summary(checks)
    verdict = ("ready to build" if s["ready"] else
               "cannot build until the BLOCKER lines are fixed")
    lines.append("")
    lines.append(f"{s['blockers']} blocker(s), {s['warnings']} warning(s): {verdict}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flash_mla_build check-env",
        description="Report what the flash_mla build needs and what this machine has.")
    parser.add_argument("--json", action="store_true", help="print facts and checks as JSON")
    parser.add_argument("--preflight", action="store_true",
                        help="only what must hold before anything is installed (Python, Windows "
                        "long paths against --venv, the developer shell's target arch)")
    parser.add_argument("--venv", default=None, help="with --preflight: the build venv's path")
    args = parser.parse_args(argv)
    if args.preflight:
        facts = gather_preflight_facts(args.venv)
        checks = evaluate_preflight(facts)
    else:
        facts = gather_facts()
        checks = evaluate(facts)
    s = summary(checks)
    if args.json:
        print(json.dumps({"facts": facts, "checks": [asdict(c) for c in checks], **s}, indent=2))
    else:
        print(render_table(checks))
    return 0 if s["ready"] else 1


if __name__ == "__main__":
    sys.exit(main())
