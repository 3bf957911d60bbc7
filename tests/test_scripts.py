"""scripts/ and ci/ shell scripts: every .ps1 parses with a real PowerShell grammar
(tree-sitter-powershell), every .sh passes shellcheck, the .sh/.ps1 twins call the same
subcommand, and the .sh wrappers find Python the way they promise."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flash_mla_build.__main__ import COMMANDS
from tests._tools import require_tool

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PS1_FILES = sorted(list(SCRIPTS.glob("*.ps1")) + list((REPO / "ci").glob("*.ps1")))
SH_FILES = sorted(list(SCRIPTS.glob("*.sh")) + list((REPO / "ci").glob("*.sh")))
# wrapper stem -> the flash_mla_build subcommand it must call
WRAPPERS = {"check_env": "check-env", "build": "build", "smoke": "smoke", "test": "test"}


def powershell_parser():
    try:
        import tree_sitter
        import tree_sitter_powershell
    except ImportError:
        message = ("tree-sitter / tree-sitter-powershell are not installed; scripts/test.sh "
                   "installs them")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))


def parse_problems(parser, source: bytes) -> list:
    """(row, column, kind) of every ERROR or MISSING node of the parse tree."""
    problems = []
    stack = [parser.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            problems.append((node.start_point[0] + 1, node.start_point[1] + 1,
                             "MISSING " + node.type if node.is_missing else "ERROR"))
        stack.extend(node.children)
    return sorted(problems)


def test_the_expected_scripts_exist():
    for stem in WRAPPERS:
        assert (SCRIPTS / f"{stem}.sh").is_file()
        assert (SCRIPTS / f"{stem}.ps1").is_file()
    assert (SCRIPTS / "_python.sh").is_file() and (SCRIPTS / "_python.ps1").is_file()
    assert len(PS1_FILES) >= 6 and len(SH_FILES) >= 6


@pytest.mark.parametrize("path", PS1_FILES, ids=[p.name for p in PS1_FILES])
def test_ps1_parses_with_powershell_grammar(path):
    parser = powershell_parser()
    source = path.read_bytes()
    assert parse_problems(parser, source) == [], f"{path.name} does not parse"
    # Windows PowerShell 5.1 reads BOM-less files as the ANSI code page: keep them ASCII.
    assert all(b < 128 for b in source), f"{path.name} has non-ASCII bytes"


BROKEN_PS1 = [
    "function Find-It {\n    if ($x -eq 1 {\n        'a'\n    }\n",     # unclosed paren and brace
    "$items = @(1, 2\nWrite-Host $items\n",                              # unclosed array
    "param([string]$Name\nWrite-Host $Name\n",                            # unclosed param block
]


@pytest.mark.parametrize("source", BROKEN_PS1)
def test_broken_ps1_is_caught(source, tmp_path):
    parser = powershell_parser()
    planted = tmp_path / "broken.ps1"
    planted.write_text(source, encoding="ascii")
    assert parse_problems(parser, planted.read_bytes()) != []


@pytest.mark.parametrize("path", SH_FILES, ids=[p.name for p in SH_FILES])
def test_sh_passes_shellcheck(path):
    shellcheck = require_tool("shellcheck")
    proc = subprocess.run([shellcheck, "-x", str(path)], capture_output=True, text=True,
                          cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_catches_a_planted_problem(tmp_path):
    shellcheck = require_tool("shellcheck")
    planted = tmp_path / "bad.sh"
    planted.write_text("#!/usr/bin/env bash\nrm -rf $1/build\n", encoding="utf-8")
    proc = subprocess.run([shellcheck, str(planted)], capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


@pytest.mark.parametrize("stem,command", sorted(WRAPPERS.items()))
def test_twins_call_the_same_subcommand_and_stay_thin(stem, command):
    sh = (SCRIPTS / f"{stem}.sh").read_text(encoding="utf-8")
    ps1 = (SCRIPTS / f"{stem}.ps1").read_text(encoding="utf-8")
    sh_calls = re.findall(r"^flash_mla_run\s+(\S+)\s+\"\$@\"\s*$", sh, re.M)
    ps1_calls = re.findall(r"^Invoke-FlashMlaBuild\s+-Command\s+'([^']+)'\s+-Arguments\s+\$args\s*$",
                           ps1, re.M)
    assert sh_calls == [command] and ps1_calls == [command]
    assert command in COMMANDS
    # Thin: only comments, the helper include and the one call.
    for text in (sh, ps1):
        code = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        assert len(code) <= 3, code


def _fake_bin(tmp_path: Path) -> Path:
    """A PATH folder with only what the wrappers need besides Python (bash builtins
    aside): dirname."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    return bin_dir


@pytest.mark.skipif(sys.platform.startswith("win"), reason="bash wrappers are run on POSIX")
class TestShWrappers:
    def test_check_env_json_runs_from_another_folder(self, tmp_path):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHON")}
        env["PYTHON"] = sys.executable
        proc = subprocess.run(["bash", str(SCRIPTS / "check_env.sh"), "--json"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=300)
        data = json.loads(proc.stdout)
        assert proc.returncode == (0 if data["ready"] else 1)
        assert data["facts"]["python"]["executable"]

    def test_python_candidates_and_arguments_pass_through(self, tmp_path):
        bin_dir = _fake_bin(tmp_path)
        # python3 is too old (fails the version check); python is fine and records argv.
        log = tmp_path / "argv.txt"
        (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        (bin_dir / "python").write_text(
            "#!/bin/sh\n"
            "case \"$1\" in -c) exit 0;; esac\n"
            f"printf '%s\\n' \"$PYTHONPATH\" \"$@\" > '{log}'\n"
            "exit 7\n", encoding="utf-8")
        for f in ("python3", "python"):
            (bin_dir / f).chmod(0o755)
        env = {"PATH": str(bin_dir), "PYTHONPATH": "/elsewhere"}
        proc = subprocess.run(["/bin/bash", str(SCRIPTS / "build.sh"), "--no-smoke", "a b"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
        assert proc.returncode == 7, proc.stderr
        lines = log.read_text(encoding="utf-8").splitlines()
        assert lines[0] == f"{REPO}:/elsewhere"
        assert lines[1:] == ["-m", "flash_mla_build", "build", "--no-smoke", "a b"]

    def test_PYTHON_variable_wins(self, tmp_path):
        bin_dir = _fake_bin(tmp_path)
        chosen = tmp_path / "mypython"
        chosen.write_text("#!/bin/sh\ncase \"$1\" in -c) exit 0;; esac\nexit 5\n", encoding="utf-8")
        chosen.chmod(0o755)
        env = {"PATH": str(bin_dir), "PYTHON": str(chosen)}
        proc = subprocess.run(["/bin/bash", str(SCRIPTS / "smoke.sh")], cwd=tmp_path,
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 5

    def test_no_python_is_exit_2_with_the_fix(self, tmp_path):
        bin_dir = _fake_bin(tmp_path)
        env = {"PATH": str(bin_dir), "PYTHON": str(tmp_path / "missing-python")}
        proc = subprocess.run(["/bin/bash", str(SCRIPTS / "test.sh")], cwd=tmp_path,
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 2
        assert "no Python >= 3.9 found" in proc.stderr and "PYTHON=" in proc.stderr


def test_ps1_helper_tries_the_documented_candidates_in_order():
    text = (SCRIPTS / "_python.ps1").read_text(encoding="ascii")
    order = [text.index(s) for s in ("$env:PYTHON", "@('python')", "@('python3')", "@('py', '-3')")]
    assert order == sorted(order)
    assert "sys.version_info >= (3, 9)" in text
    assert "-m flash_mla_build $Command @Arguments" in text
    assert "exit $code" in text
