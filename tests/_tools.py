"""Locating the external test tools that scripts/test.sh installs (requirements/test.txt)."""
from __future__ import annotations

import os
import shutil
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
