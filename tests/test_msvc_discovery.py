"""Choosing the MSVC toolset on Windows (flash_mla_build/toolchain.py), on planted
Visual Studio trees: the newest x64-hosted, x64-targeting toolset that the nvcc
accepts, across several installs; an activated shell that targets x86 is refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from flash_mla_build import toolchain as T


def make_install(root: Path, name: str, toolsets: dict) -> dict:
    """toolsets: version -> list of (host, target) pairs that have a cl.exe."""
    install = root / name
    for version, pairs in toolsets.items():
        for host, target in pairs:
            cl = install / "VC" / "Tools" / "MSVC" / version / "bin" / f"Host{host}" / target / "cl.exe"
            cl.parent.mkdir(parents=True, exist_ok=True)
            cl.write_bytes(b"")
    return {"name": name, "version": "17", "path": str(install)}


@pytest.fixture
def installs(tmp_path):
    both = [("x64", "x64"), ("x86", "x64"), ("x64", "x86")]
    return [
        make_install(tmp_path, "BuildTools2022", {"14.38.33130": both, "14.44.35207": both}),
        make_install(tmp_path, "VS2026", {"14.50.35717": both}),
        # An x86-hosted-only toolset never counts, however new.
        make_install(tmp_path, "Odd", {"14.51.1": [("x86", "x64")]}),
    ]


def test_only_x64_hosted_x64_targeting_toolsets_are_listed(installs):
    found = T.msvc_toolsets(installs)
    assert sorted(t.version for t in found) == ["14.38.33130", "14.44.35207", "14.50.35717"]
    assert all(t.cl.parts[-3:] == ("Hostx64", "x64", "cl.exe") for t in found)


@pytest.mark.parametrize("cuda,expected", [
    ((12, 9), "14.44.35207"), ((13, 0), "14.44.35207"), ((13, 1), "14.44.35207"),
    ((13, 2), "14.50.35717"), (None, "14.44.35207"),
])
def test_newest_toolset_the_nvcc_accepts(installs, cuda, expected):
    # CUDA 13.1 and older refuse cl 19.50 (Visual Studio 2026); unknown CUDA plays safe.
    chosen = T.choose_msvc(T.msvc_toolsets(installs), cuda)
    assert chosen.version == expected
    assert chosen.vcvarsall == Path(chosen.install) / "VC" / "Auxiliary" / "Build" / "vcvarsall.bat"


def test_no_acceptable_toolset(tmp_path):
    only_2026 = [make_install(tmp_path, "VS2026", {"14.50.35717": [("x64", "x64")]})]
    assert T.choose_msvc(T.msvc_toolsets(only_2026), (13, 0)) is None


def test_vcvars_command_asks_for_x64_and_the_exact_toolset(installs):
    chosen = T.choose_msvc(T.msvc_toolsets(installs), (13, 0))
    cmd = T.vcvars_command(chosen)
    assert isinstance(cmd, str)  # cmd.exe's quoting, not the C runtime's
    assert f'""{chosen.vcvarsall}" x64 -vcvars_ver=14.44.35207 ' in cmd and cmd.endswith('set"')


def test_parse_set_output():
    env = T.parse_set_output("Path=C:\\a;C:\\b\r\nINCLUDE=C:\\inc\r\nweird line\r\n=C:=C:\\\r\n")
    assert env == {"PATH": "C:\\a;C:\\b", "INCLUDE": "C:\\inc"}


def test_activated_shell_targeting_x86_is_refused():
    env = {"PATH": "", "VSCMD_ARG_TGT_ARCH": "x86", "DISTUTILS_USE_SDK": "1"}
    with pytest.raises(T.ToolchainError) as err:
        T.find_host_compiler("windows", env=env)
    assert "x64 Native Tools" in str(err.value) and "-arch=amd64" in str(err.value)
    assert "targets x86" in str(err.value)
