"""The project documents itself: no tracked file names the private planning documents
that never ship with it (their names are built below, so this file does not match
itself). BUILD_WINDOWS.md is ours and must not count as one of them."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_STEMS = ("SPEC", "DESIGN", "STYLE", "SM120", "WINDOWS")
# A name is a reference unless it is the tail of a longer word (BUILD_WINDOWS.md).
PATTERN = re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(_STEMS) + r")\." + "md", re.IGNORECASE)


def _tracked_files() -> list:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, cannot list tracked files: {exc}")
    return [name for name in out.decode("utf-8", "replace").split("\0") if name]


def test_pattern_matches_the_names_and_not_build_windows():
    for stem in _STEMS:
        assert PATTERN.search(f"see {stem}." + "md for details")
        assert PATTERN.search(f"(../shared/{stem}." + "md)")
    assert not PATTERN.search("BUILD_WINDOWS." + "md")
    assert not PATTERN.search("docs/numerics.md")


def test_no_tracked_file_names_a_private_document():
    hits = []
    for name in _tracked_files():
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        if PATTERN.search(name):
            hits.append(f"{name}: the file's own name")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (PNG, wheel): holds no prose
        for lineno, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert not hits, "files point at documents outside the repository:\n" + "\n".join(hits)
