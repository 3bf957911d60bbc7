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


def workflow() -> dict:
    import yaml

    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def jobs() -> dict:
    return workflow()["jobs"]


def steps_using(job: dict, action: str) -> list:
    return [s for s in job["steps"] if str(s.get("uses", "")).split("@")[0] == action]


def run_steps(job: dict) -> list:
    return [s for s in job["steps"] if "run" in s]


def matrix_rows(job: dict) -> list:
    matrix = job["strategy"]["matrix"]
    if "include" in matrix:
        return matrix["include"]
    (key, values), = matrix.items()
    return [{key: v} for v in values]


def expand(template: str, row: dict) -> str:
    return re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(row[m.group(1)]), template)


def python_version(job: dict) -> tuple:
    (setup,) = steps_using(job, "actions/setup-python")
    return tuple(int(x) for x in str(setup["with"]["python-version"]).split("."))


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
# The workflow's shape, read as YAML
# ----------------------------------------------------------------------------------
SMOKE_FOR = {"smoke-linux": "linux-wheel", "smoke-windows": "windows-wheel"}


def test_workflow_jobs():
    assert set(jobs()) == {"cpu-tests", "linux-wheel", "windows-wheel", *SMOKE_FOR}


def test_cpu_job_runs_the_test_script_on_a_python_torch_supports():
    job = jobs()["cpu-tests"]
    assert any(s["run"].strip() == "bash scripts/test.sh" for s in run_steps(job))
    assert python_version(job) >= (3, 10)  # torch 2.13 needs 3.10+


def test_build_jobs_set_targets_explicitly_one_leg_per_cuda_major():
    for name in ("linux-wheel", "windows-wheel"):
        job = jobs()[name]
        assert job["strategy"]["fail-fast"] is False
        rows = matrix_rows(job)
        assert sorted(str(r["cuda"]).split(".")[0] for r in rows) == ["12", "13"]
        for row in rows:
            assert "native" not in row["archs"] and "120f" in row["archs"].split(";")
        (build,) = [s for s in run_steps(job) if "cibuildwheel --platform" in s["run"]]
        assert build["env"]["FLASH_MLA_CUDA_ARCHS"] == "${{ matrix.archs }}"
        assert f"--platform {name.split('-')[0]} --config-file ci/cibuildwheel.toml" in build["run"]


def test_windows_job_runner_cuda_and_x64_msvc():
    job = jobs()["windows-wheel"]
    assert job["runs-on"] == "windows-2022"  # windows-2025 carries VS 2026
    (install,) = [s for s in run_steps(job) if "install_cuda_windows.ps1" in s["run"]]
    assert '-Version "${{ matrix.cuda }}"' in install["run"]
    assert (REPO / "ci" / "install_cuda_windows.ps1").is_file()
    (msvc,) = steps_using(job, "ilammy/msvc-dev-cmd")
    assert msvc["with"]["arch"] == "x64"
    order = [job["steps"].index(s) for s in (install, msvc)]
    (build,) = [s for s in run_steps(job) if "cibuildwheel --platform" in s["run"]]
    assert build["env"]["DISTUTILS_USE_SDK"] == "1"
    assert order == sorted(order) and job["steps"].index(build) > max(order)


@pytest.mark.parametrize("smoke,build", sorted(SMOKE_FOR.items()))
def test_each_leg_is_smoke_tested_even_when_another_leg_fails(smoke, build):
    job, built = jobs()[smoke], jobs()[build]
    # Only its own OS's builds, and still run when one of them failed.
    assert job["needs"] == [build]
    assert "!cancelled()" in job["if"]
    assert job["strategy"]["fail-fast"] is False
    (upload,) = steps_using(built, "actions/upload-artifact")
    uploaded = {expand(upload["with"]["name"], row) for row in matrix_rows(built)}
    assert {row["artifact"] for row in matrix_rows(job)} == uploaded
    assert python_version(job) >= (3, 10)
    (download,) = steps_using(job, "actions/download-artifact")
    assert download["with"]["name"] == "${{ matrix.artifact }}"
    (script,) = [s for s in run_steps(job) if "smoke." in s["run"]]
    # A clean venv with CPU torch: the wheel alone decides what is installed.
    assert "--isolated" in script["run"] and "--wheel" in script["run"]
    assert "download.pytorch.org/whl/cpu" in script["run"]
