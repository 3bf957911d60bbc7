"""Locating the external test tools that scripts/test.sh installs (requirements/test.txt),
and running a host C++ program against csrc/ (run_host_program)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional, Tuple

import pytest


def require_tool(name: str, min_python: Optional[Tuple[int, int]] = None) -> str:
    """Path of a tool installed by scripts/test.sh. Missing: a failure under CI (CI=true;
    the test script installs it), else a skip that names the fix. ``min_python`` mirrors a
    requirement marker: below it the tool is not installed anywhere, so it is always a skip."""
    scripts_dir = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts_dir / name, scripts_dir / f"{name}.exe"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed; scripts/test.sh installs it (requirements/test.txt)"
    installable = min_python is None or sys.version_info >= min_python
    if os.environ.get("CI") and installable:
        pytest.fail(message)
    pytest.skip(message)


def run_host_program(source: str, work_dir: Path, name: str) -> str:
    """Compile ``source`` (C++17, -Wall -Werror, csrc/ on the include path) with the host
    C++ compiler in ``work_dir``, run it and return its stdout: how the tests check plain
    C++ headers (CTA choices, capabilities) without a GPU. No compiler on PATH: a skip."""
    cxx = next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++ or clang++) on PATH")
    root = Path(__file__).resolve().parents[1]
    src = work_dir / f"{name}.cpp"
    src.write_text(source)
    exe = work_dir / (f"{name}.exe" if os.name == "nt" else name)
    built = subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", f"-I{root / 'csrc'}", str(src),
                            "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
