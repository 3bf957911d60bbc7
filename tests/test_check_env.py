"""The environment report (flash_mla_build/check_env.py): it runs here, its JSON has
the documented fields, and the blocker/warning rules hold on planted facts for Linux,
WSL2 and Windows (which cannot be looked at from here)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flash_mla_build import check_env as CE

REPO = Path(__file__).resolve().parent.parent


def linux_facts() -> dict:
    """A healthy Linux build machine with an RTX 5090."""
    return {
        "os": {"system": "Linux", "release": "6.8.0", "machine": "x86_64", "platform": "linux"},
        "wsl": {"is_wsl": False, "is_wsl2": False, "lib_dir": CE.WSL_LIB_DIR, "libcuda": False,
                "lib_dir_on_loader_path": False},
        "python": {"version": "3.11.7", "executable": "/usr/bin/python3", "bits": 64,
                   "in_venv": False},
        "torch": {"installed": True, "version": "2.13.0+cu130", "cuda": "13.0",
                  "cuda_available": True, "devices": [], "error": None},
        "gpu": {"nvidia_smi": "/usr/bin/nvidia-smi", "error": None,
                "gpus": [{"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0",
                          "driver": "580.65", "memory_mib": "32607", "source": "nvidia-smi"}]},
        "cuda": {"found": True, "nvcc": "/usr/local/cuda/bin/nvcc", "version": "12.9",
                 "source": "CUDA_HOME", "error": None,
                 "buildable": ["80", "86", "89", "90a", "100f", "103f", "120", "120f", "121f"],
                 "not_buildable": {}, "requested": "all",
                 "selected": ["80", "86", "89", "90a", "100f", "120f"], "arch_error": None,
                 "cuobjdump": "/usr/local/cuda/bin/cuobjdump", "pypi_hint": "pip install x"},
        "pypi_cuda_available": True,
        "host_compiler": {"found": True, "kind": "gcc", "path": "/usr/bin/g++", "version": "13.2.0",
                          "error": None, "banner": "g++ (Ubuntu 13.2.0) 13.2.0"},
        "cutlass": {"version": "4.2.0.0", "pinned": "4.2.0.0", "include": "/x/include", "error": None},
        "long_paths": {"checked": False, "enabled": None},
        "disk": {"path": "/src", "free_gib": 120.0, "error": None},
        "ninja": "/usr/bin/ninja",
    }


def windows_facts() -> dict:
    facts = linux_facts()
    facts["os"] = {"system": "Windows", "release": "11", "machine": "AMD64", "platform": "windows"}
    facts["host_compiler"] = {
        "found": True, "kind": "msvc", "path": r"C:\VS\bin\cl.exe", "version": "19.44.35207",
        "error": None, "dev_shell": True, "distutils_use_sdk": "1", "vc_tools_version": "14.44.35207",
        "visual_studio": [{"name": "Visual Studio Build Tools 2022", "version": "17.14.36310.24",
                           "path": r"C:\VS", "msvc_toolsets": ["14.44.35207"]}]}
    facts["long_paths"] = {"checked": True, "enabled": True}
    return facts


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def statuses(facts) -> dict:
    return {c.name: c.status for c in CE.evaluate(facts)}


def test_healthy_machines_have_no_blockers_or_warnings():
    for facts in (linux_facts(), windows_facts()):
        checks = CE.evaluate(facts)
        assert CE.summary(checks) == {"blockers": 0, "warnings": 0, "ready": True}, \
            [c for c in checks if c.status != CE.OK]


def test_no_nvcc_is_a_warning_where_pypi_has_one_and_a_blocker_elsewhere():
    facts = linux_facts()
    facts["cuda"].update(found=False, nvcc=None, version=None, selected=[], buildable=[])
    check = by_name(CE.evaluate(facts))["nvcc"]
    assert check.status == CE.WARN and "PyPI" in check.fix
    facts["pypi_cuda_available"] = False
    facts["os"]["machine"] = "ppc64le"
    check = by_name(CE.evaluate(facts))["nvcc"]
    assert check.status == CE.BLOCKER and "CUDA_HOME" in check.fix


@pytest.mark.parametrize("make,needle", [(linux_facts, "g++"), (windows_facts, "Visual Studio 2022")])
def test_no_host_compiler_is_a_blocker_with_the_platform_fix(make, needle):
    facts = make()
    facts["host_compiler"].update(found=False, kind=None, path=None, version=None,
                                  error="no compiler found")
    check = by_name(CE.evaluate(facts))["host compiler"]
    assert check.status == CE.BLOCKER and needle in check.fix


@pytest.mark.parametrize("cuda,status", [("13.1", CE.BLOCKER), ("12.9", CE.BLOCKER),
                                         ("13.2", CE.OK)])
def test_visual_studio_2026_with_old_cuda(cuda, status):
    facts = windows_facts()
    facts["host_compiler"]["version"] = "19.50.35717"
    facts["cuda"]["version"] = cuda
    check = by_name(CE.evaluate(facts))["host compiler"]
    assert check.status == status
    if status == CE.BLOCKER:
        assert "14.44" in check.fix and "Visual Studio 2026" in check.found


def test_requested_target_the_nvcc_cannot_build_is_a_blocker():
    facts = linux_facts()
    facts["cuda"].update(requested="120f", selected=[],
                         arch_error="target 120f needs CUDA 12.9 or newer, but the nvcc found is CUDA 12.8")
    check = by_name(CE.evaluate(facts))["FLASH_MLA_CUDA_ARCHS"]
    assert check.status == CE.BLOCKER and "12.9" in check.found


def test_old_cuda_warns_about_sm120():
    facts = linux_facts()
    facts["cuda"].update(version="12.6", buildable=["80", "86", "89", "90a"],
                         selected=["80", "86", "89", "90a"])
    checks = by_name(CE.evaluate(facts))
    assert checks["sm_120"].status == CE.WARN and "12.8" in checks["sm_120"].fix
    # ...and the RTX 5090 is then not covered by the targets.
    assert checks["targets vs GPU"].status == CE.WARN


@pytest.mark.parametrize("cap,selected,covered", [
    ("12.1", ["120f"], True),     # family target covers GB10
    ("12.1", ["120a"], False),    # arch-specific 120a does not run on 12.1
    ("9.0", ["90a"], True),
    ("8.9", ["80", "86"], True),  # plain sm_86 cubin runs on 8.9
    ("10.3", ["100f"], True),
    ("12.0", ["100f"], False),
])
def test_gpu_coverage_by_targets(cap, selected, covered):
    facts = linux_facts()
    facts["gpu"]["gpus"][0]["compute_capability"] = cap
    facts["cuda"]["selected"] = selected
    assert ("targets vs GPU" not in statuses(facts)) == covered


@pytest.mark.parametrize("free,status", [(1.5, CE.BLOCKER), (5.0, CE.WARN), (50.0, CE.OK)])
def test_disk_space(free, status):
    facts = linux_facts()
    facts["disk"]["free_gib"] = free
    assert statuses(facts)["disk"] == status


def test_long_paths_disabled_is_a_warning_with_the_registry_fix():
    facts = windows_facts()
    facts["long_paths"]["enabled"] = False
    check = by_name(CE.evaluate(facts))["LongPathsEnabled"]
    assert check.status == CE.WARN and "LongPathsEnabled /t REG_DWORD /d 1" in check.fix
    assert "LongPathsEnabled" not in statuses(linux_facts())  # only reported on Windows


def test_windows_cuda_13_0_notes_the_patch_layer():
    facts = windows_facts()
    facts["cuda"]["version"] = "13.0"
    check = by_name(CE.evaluate(facts))["CUtensorMap"]
    assert check.status == CE.INFO and "patch layer" in check.fix
    assert "CUtensorMap" not in statuses(windows_facts())  # 12.9 needs no patch


def test_wsl2_without_driver_library():
    facts = linux_facts()
    facts["wsl"].update(is_wsl=True, is_wsl2=True, libcuda=False)
    check = by_name(CE.evaluate(facts))["WSL2 driver"]
    assert check.status == CE.WARN and "on Windows" in check.fix and CE.WSL_LIB_DIR in check.found
    facts["wsl"]["libcuda"] = True
    assert statuses(facts)["WSL2 driver"] == CE.OK


def test_no_gpu_and_cpu_torch_are_warnings_not_blockers():
    facts = linux_facts()
    facts["gpu"]["gpus"] = []
    facts["torch"].update(version="2.13.0+cpu", cuda=None, cuda_available=False)
    checks = CE.evaluate(facts)
    assert by_name(checks)["GPU"].status == CE.WARN
    assert CE.summary(checks)["ready"] is True
    facts = linux_facts()
    facts["torch"].update(version="2.13.0+cpu", cuda=None)
    assert statuses(facts)["torch CUDA"] == CE.WARN


def test_old_or_32bit_python_is_a_blocker():
    facts = linux_facts()
    facts["python"]["version"] = "3.8.18"
    assert statuses(facts)["Python"] == CE.BLOCKER
    facts = windows_facts()
    facts["python"]["bits"] = 32
    assert statuses(facts)["Python"] == CE.BLOCKER


def test_cutlass_version_mismatch_warns():
    facts = linux_facts()
    facts["cutlass"]["version"] = "4.1.0"
    assert statuses(facts)["CUTLASS"] == CE.WARN


def test_table_shows_fixes_and_verdict():
    facts = linux_facts()
    facts["host_compiler"].update(found=False, error="none")
    text = CE.render_table(CE.evaluate(facts))
    assert "BLOCKER" in text and "fix: install g++" in text
    assert text.splitlines()[-1].startswith("1 blocker(s), 0 warning(s): cannot build")


def test_main_exit_code_follows_blockers(monkeypatch, capsys):
    facts = linux_facts()
    monkeypatch.setattr(CE, "gather_facts", lambda env=None: copy.deepcopy(facts))
    assert CE.main([]) == 0
    assert "ready to build" in capsys.readouterr().out
    facts["host_compiler"].update(found=False, error="none")
    assert CE.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["blockers"] == 1 and data["ready"] is False


def test_json_output_of_the_real_machine():
    proc = subprocess.run([sys.executable, "-m", "flash_mla_build", "check-env", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    data = json.loads(proc.stdout)
    assert set(data) == {"facts", "checks", "blockers", "warnings", "ready"}
    assert set(data["facts"]) == {"os", "wsl", "python", "torch", "gpu", "cuda",
                                  "pypi_cuda_available", "host_compiler", "cutlass",
                                  "long_paths", "disk", "ninja"}
    for check in data["checks"]:
        assert set(check) == {"name", "status", "found", "fix"}
        assert check["status"] in (CE.OK, CE.INFO, CE.WARN, CE.BLOCKER)
    assert proc.returncode == (0 if data["ready"] else 1)
    assert data["blockers"] == sum(c["status"] == CE.BLOCKER for c in data["checks"])
    assert data["facts"]["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    names = [c["name"] for c in data["checks"]]
    assert {"OS", "Python", "nvcc", "host compiler", "torch", "CUTLASS", "disk"} <= set(names)


def test_table_output_of_the_real_machine():
    proc = subprocess.run([sys.executable, "-m", "flash_mla_build", "check-env"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "found"]
    assert "blocker(s)" in lines[-1]


def test_undecodable_tool_output_does_not_crash():
    code, out, _ = CE._run([sys.executable, "-c",
                            "import sys; sys.stdout.buffer.write(b'caf\\xe9 \\xff ok')"])
    assert code == 0 and out.endswith(" ok") and "\ufffd" in out
    code, out, err = CE._run(["/nonexistent/tool-xyz"])
    assert code is None and err


# ----------------------------------------------------------------------------------
# Windows defects found in review, each with the rule that catches it
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", ["13.0", "13.3", "13.5"])
def test_every_cuda_13_cuda_h_is_noted_as_128_byte_aligned(cuda):
    # CUDA 13.0 through 13.5 all declare CUtensorMap alignas(128) (checked in the runtime
    # wheels' cuda.h); the report once claimed 13.3+ needed no patch.
    facts = windows_facts()
    facts["cuda"]["version"] = cuda
    check = by_name(CE.evaluate(facts))["CUtensorMap"]
    assert "13.0 to 13.5" in check.fix and "13.3+" not in check.fix


def test_developer_shell_targeting_x86_is_a_blocker_naming_the_x64_prompt():
    facts = windows_facts()
    facts["host_compiler"].update(target_arch="x86", host_arch="x86")
    check = by_name(CE.evaluate(facts))["developer shell"]
    assert check.status == CE.BLOCKER
    assert "x64 Native Tools" in check.fix and "-arch=amd64" in check.fix
    facts["host_compiler"].update(found=False, error="cl not usable")
    assert by_name(CE.evaluate(facts))["developer shell"].status == CE.BLOCKER
    facts = windows_facts()
    facts["host_compiler"].update(target_arch="x64", host_arch="x64")
    assert by_name(CE.evaluate(facts))["developer shell"].status == CE.OK


def preflight_facts(venv: str, long_paths: bool) -> dict:
    return {"os": {"system": "Windows", "release": "11", "machine": "AMD64",
                   "platform": "windows"},
            "python": {"version": "3.12.1", "executable": "C:\\py\\python.exe", "bits": 64,
                       "in_venv": False},
            "long_paths": {"checked": True, "enabled": long_paths}, "venv": venv,
            "dev_shell": {"target_arch": None, "host_arch": None},
            "disk": {"path": "C:\\src", "free_gib": 100.0, "error": None}}


def test_preflight_long_paths_blocks_a_venv_too_deep_for_cutlass():
    # The deepest nvidia-cutlass file is 187 characters below site-packages: a venv path
    # longer than 259 - 19 - 187 = 53 characters fails pip's first install.
    short = "C:\\src\\flash_mla\\.venv-build"
    deep = "C:\\Users\\someone\\Downloads\\flash_mla-main\\flash_mla-main\\.venv-build"
    assert by_name(CE.evaluate_preflight(preflight_facts(short, False)))[
        "LongPathsEnabled"].status == CE.WARN
    check = by_name(CE.evaluate_preflight(preflight_facts(deep, False)))["LongPathsEnabled"]
    assert check.status == CE.BLOCKER and "--venv" in check.fix and "reg add" in check.fix
    assert by_name(CE.evaluate_preflight(preflight_facts(deep, True)))[
        "LongPathsEnabled"].status == CE.OK


def test_preflight_runs_without_build_packages(tmp_path):
    # It runs before anything is installed: a Python with only the standard library.
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('torch', 'cutlass_library', 'tvm_ffi', 'ninja'):\n"
            "        raise ImportError('preflight imported ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from flash_mla_build import check_env\n"
            "sys.exit(check_env.main(['--preflight', '--venv', sys.argv[1]]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v")], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Python" in out.stdout and "ready to build" in out.stdout
