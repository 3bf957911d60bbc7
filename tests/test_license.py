"""The license travels with the code: LICENSE (MIT) at the root, declared in pyproject.toml
so the wheel carries it in .dist-info/licenses/, listed in MANIFEST.in so the sdist does,
and a THIRD_PARTY_NOTICES.md whose claims match what the build compiles and links (CPU;
builds nothing)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flash_mla_build import flags

REPO = Path(__file__).resolve().parent.parent
LICENSE = REPO / "LICENSE"
NOTICES = REPO / "THIRD_PARTY_NOTICES.md"
SHIPPED = ("LICENSE", "THIRD_PARTY_NOTICES.md")


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli", reason="reading TOML needs Python 3.11+ or tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _manifest_lines() -> list:
    lines = (REPO / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_license_file_is_mit_with_our_copyright():
    text = LICENSE.read_text(encoding="utf-8")
    assert text.startswith("MIT License"), text[:80]
    assert "Copyright (c) 2026 the flash_mla authors" in text
    # The permission grant and the warranty disclaimer of the MIT text.
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_pyproject_declares_mit_and_ships_the_license_files():
    project = _pyproject()["project"]
    assert project.get("license") == "MIT", project.get("license")
    declared = project.get("license-files")
    assert isinstance(declared, list), f"[project] license-files must be a list, got {declared!r}"
    for name in SHIPPED:
        assert name in declared, f"{name} missing from [project] license-files {declared}"
        assert (REPO / name).is_file(), f"{name} is declared but does not exist"
    # The PEP 639 fields need a setuptools that understands them.
    requires = " ".join(_pyproject()["build-system"]["requires"])
    match = re.search(r"setuptools\s*>=\s*(\d+)", requires)
    assert match and int(match.group(1)) >= 77, requires


def test_manifest_puts_the_license_files_in_the_sdist():
    included = set()
    for words in _manifest_lines():
        if words[0] == "include":
            included.update(words[1:])
    for name in SHIPPED:
        assert name in included, f"MANIFEST.in has no 'include' line naming {name}"
    # Nothing later drops them again.
    for words in _manifest_lines():
        if words[0] in ("exclude", "global-exclude", "prune"):
            for pattern in words[1:]:
                for name in SHIPPED:
                    assert not Path(name).match(pattern), (
                        f"MANIFEST.in line {' '.join(words)!r} drops {name}")


def test_notices_match_how_the_library_is_linked():
    notices = NOTICES.read_text(encoding="utf-8")
    link = flags.nvcc_link_args("linux", "lib.so", ["/tvm/lib"], ["tvm_ffi"])
    # Static cudart is inside our library: its license terms must be named.
    if "-cudart" in link and link[link.index("-cudart") + 1] == "static":
        assert "CUDA Runtime" in notices and "docs.nvidia.com/cuda/eula" in notices
    # tvm-ffi headers are compiled in (Apache-2.0, with its NOTICE text).
    assert "Apache TVM FFI" in notices and "Apache License, Version 2.0" in notices
    assert "-ltvm_ffi" in link and "not bundled" in notices


def test_notices_claim_about_cutlass_holds():
    """The notice says no CUTLASS/CuTe code is compiled in; that stays true only while no
    source includes those headers. Whoever adds such an include updates the notice."""
    notices = NOTICES.read_text(encoding="utf-8")
    include = re.compile(r'#\s*include\s*[<"](cute|cutlass)/')
    users = [str(p.relative_to(REPO)) for p in (REPO / "csrc").rglob("*")
             if p.suffix in (".h", ".cuh", ".cu", ".cpp") and include.search(
                 p.read_text(encoding="utf-8", errors="replace"))]
    claims_unused = "none of their code is compiled into the library" in notices
    assert "CUTLASS" in notices
    assert not (users and claims_unused), (
        f"{users} include CUTLASS/CuTe headers: THIRD_PARTY_NOTICES.md must list CUTLASS "
        "(BSD-3-Clause) as compiled in")


def test_ci_wheels_do_not_bundle_libtvm_ffi():
    """The notice says libtvm_ffi comes from the apache-tvm-ffi dependency, not the wheel:
    the CI repair steps must keep excluding it (and the driver library)."""
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli", reason="reading TOML needs Python 3.11+ or tomli")
    config = tomllib.loads((REPO / "ci" / "cibuildwheel.toml").read_text(encoding="utf-8"))
    cibw = config["tool"]["cibuildwheel"]
    linux = cibw["linux"]["repair-wheel-command"]
    windows = cibw["windows"]["repair-wheel-command"]
    assert "--exclude libtvm_ffi.so" in linux and "libcuda.so" in linux, linux
    assert "tvm_ffi.dll" in windows and "nvcuda.dll" in windows, windows
