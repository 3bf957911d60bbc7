"""ci/cibuildwheel.toml and .github/workflows/wheels.yml: actionlint accepts the
workflow, cibuildwheel selects exactly one identifier per OS, and the settings the
design depends on (repair exclusions, runner image, explicit targets) are there."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests._tools import require_tool

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "wheels.yml"
CIBW_CONFIG = REPO / "ci" / "cibuildwheel.toml"


def load_config() -> dict:
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli", reason="reading TOML needs Python 3.11+ or tomli")
    return tomllib.loads(CIBW_CONFIG.read_text(encoding="utf-8"))["tool"]["cibuildwheel"]


def jobs() -> dict:
    """Job name -> its text block in the workflow (top-level keys under 'jobs:')."""
    text = WORKFLOW.read_text(encoding="utf-8")
    body = text.split("\njobs:\n", 1)[1]
    parts = re.split(r"^  ([A-Za-z0-9_-]+):\n", body, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# ----------------------------------------------------------------------------------
# actionlint
# ----------------------------------------------------------------------------------
def test_actionlint_accepts_the_workflow():
    actionlint = require_tool("actionlint")
    proc = subprocess.run([actionlint, "-no-color", str(WORKFLOW)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_rejects_a_planted_mistake(tmp_path):
    actionlint = require_tool("actionlint")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    text = WORKFLOW.read_text(encoding="utf-8").replace("${{ matrix.cuda }}",
                                                        "${{ matrix.cudaa }}", 1)
    bad.write_text(text, encoding="utf-8")
    proc = subprocess.run([actionlint, "-no-color", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "cudaa" in proc.stdout


# ----------------------------------------------------------------------------------
# cibuildwheel
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("platform,expected", [("linux", "cp312-manylinux_x86_64"),
                                               ("windows", "cp312-win_amd64")])
def test_cibuildwheel_builds_exactly_one_identifier(platform, expected):
    cibuildwheel = require_tool("cibuildwheel", min_python=(3, 11))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    proc = subprocess.run([cibuildwheel, "--print-build-identifiers", "--platform", platform,
                           "--config-file", str(CIBW_CONFIG), str(REPO)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [expected]


def test_repair_commands_exclude_driver_and_tvm_ffi():
    cfg = load_config()
    linux = cfg["linux"]["repair-wheel-command"]
    windows = cfg["windows"]["repair-wheel-command"]
    assert linux.startswith("auditwheel repair ")
    assert "--exclude 'libcuda.so*'" in linux and "--exclude libtvm_ffi.so" in linux
    assert windows.startswith("delvewheel repair ")
    assert '--exclude "nvcuda.dll;tvm_ffi.dll"' in windows
    for command in (linux, windows):
        assert "-w {dest_dir} {wheel}" in command


def test_linux_image_cuda_install_and_passed_variables():
    linux = load_config()["linux"]
    assert linux["manylinux-x86_64-image"] == "manylinux_2_28"
    script = re.search(r"\{project\}/(\S+)", linux["before-all"]).group(1)
    assert (REPO / script).is_file()
    assert {"FLASH_MLA_CI_CUDA", "FLASH_MLA_CUDA_ARCHS"} <= set(linux["environment-pass"])
    assert linux["environment"]["CUDA_HOME"] == "/usr/local/cuda"


def test_windows_uses_the_activated_msvc_environment():
    windows = load_config()["windows"]
    assert windows["environment"]["DISTUTILS_USE_SDK"] == "1"
    assert windows["archs"] == ["AMD64"]


def test_wheel_is_smoke_tested_with_cpu_torch_installed_first():
    cfg = load_config()
    assert "download.pytorch.org/whl/cpu" in cfg["before-test"]
    assert cfg["test-command"].startswith("python -m flash_mla.smoke")


# ----------------------------------------------------------------------------------
# The workflow's shape
# ----------------------------------------------------------------------------------
def test_workflow_has_the_four_jobs():
    assert set(jobs()) == {"cpu-tests", "linux-wheel", "windows-wheel", "smoke"}


def test_cpu_job_runs_the_test_script():
    assert "bash scripts/test.sh" in jobs()["cpu-tests"]


def test_build_jobs_set_targets_explicitly_per_cuda_major():
    for name in ("linux-wheel", "windows-wheel"):
        block = jobs()[name]
        assert "FLASH_MLA_CUDA_ARCHS: ${{ matrix.archs }}" in block
        archs = re.findall(r'archs: "([^"]+)"', block)
        cudas = re.findall(r'- cuda: "(\d+)\.', block)
        assert archs and all("native" not in a and "120f" in a for a in archs)
        assert sorted(cudas) == ["12", "13"], "one build per CUDA major"
        assert f"--platform {name.split('-')[0]} --config-file ci/cibuildwheel.toml" in block


def test_windows_job_runner_cuda_and_msvc():
    block = jobs()["windows-wheel"]
    assert re.search(r"^    runs-on: windows-2022$", block, re.M)
    assert "ci/install_cuda_windows.ps1" in block and (REPO / "ci" / "install_cuda_windows.ps1").is_file()
    assert "ilammy/msvc-dev-cmd" in block
    assert 'DISTUTILS_USE_SDK: "1"' in block


def test_smoke_job_installs_each_wheel_on_a_fresh_runner():
    block = jobs()["smoke"]
    assert "needs: [linux-wheel, windows-wheel]" in block
    assert "bash scripts/smoke.sh --wheel" in block
    assert "scripts\\smoke.ps1 --wheel" in block
    artifacts = set(re.findall(r"artifact: (\S+)", block))
    built = set()
    for name, os_name in (("linux-wheel", "linux"), ("windows-wheel", "windows")):
        for cuda in re.findall(r'- cuda: "([\d.]+)"', jobs()[name]):
            built.add(f"wheel-{os_name}-cuda{cuda}")
    assert artifacts == built
