"""The header patch layer (flash_mla_build.patches, patches/manifest.json):
applies on copies into an overlay, idempotent, refuses unknown versions and
unexpected files, and a real build with FLASH_MLA_PATCHES=always compiles and loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flash_mla_build import patches as P

REPO = Path(__file__).resolve().parent.parent
HEADER = "struct S {\n#if X\n    alignas(128)\n#endif\n  int v;\n};\n"
DIFF = """--- a/h.h
+++ b/h.h
@@ -1,4 +1,6 @@
 struct S {
 #if X
+#ifdef _MSC_VER
+    alignas(64)
+#else
     alignas(128)
+#endif
 #endif
"""


def _fixture(tmp_path: Path, version="1.0", header=HEADER):
    pkg = tmp_path / "pkg" / "include"
    pkg.mkdir(parents=True)
    (pkg / "h.h").write_text(header)
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "fix.diff").write_text(DIFF)
    after = P.apply_unified_diff(HEADER, DIFF)
    manifest = {"format": 1, "patches": [{
        "id": "fix", "package": "demo", "version": version, "file": "h.h", "patch": "fix.diff",
        "detect": "#if X\n    alignas(128)\n", "sha256_before": P.sha256_text(HEADER),
        "sha256_after": P.sha256_text(after), "upstream": ["https://example.invalid/1"],
        "why": "test"}]}
    (pdir / "manifest.json").write_text(json.dumps(manifest))
    return pkg, pdir, after


def test_applies_into_overlay_without_touching_original(tmp_path):
    pkg, pdir, after = _fixture(tmp_path)
    overlay = tmp_path / "overlay"
    res = P.apply_patches(overlay, {"demo": pkg}, {"demo": "1.0"}, pdir)
    assert [(r.id, r.status) for r in res] == [("fix", "applied")]
    assert (overlay / "h.h").read_text() == after
    assert (pkg / "h.h").read_text() == HEADER


def test_idempotent(tmp_path):
    pkg, pdir, after = _fixture(tmp_path)
    overlay = tmp_path / "overlay"
    P.apply_patches(overlay, {"demo": pkg}, {"demo": "1.0"}, pdir)
    mtime = (overlay / "h.h").stat().st_mtime_ns
    res = P.apply_patches(overlay, {"demo": pkg}, {"demo": "1.0"}, pdir)
    assert [r.status for r in res] == ["unchanged"]
    assert (overlay / "h.h").stat().st_mtime_ns == mtime


def test_crlf_original_hashes_the_same(tmp_path):
    pkg, pdir, after = _fixture(tmp_path, header=HEADER.replace("\n", "\r\n"))
    res = P.apply_patches(tmp_path / "overlay", {"demo": pkg}, {"demo": "1.0"}, pdir)
    assert [r.status for r in res] == ["applied"]


def test_refuses_unknown_version_with_the_defect(tmp_path):
    pkg, pdir, _ = _fixture(tmp_path)
    with pytest.raises(P.PatchError, match="demo 2.0 header h.h has the defect that patch fix "
                                           "fixes, but patches/manifest.json knows only "
                                           "versions 1.0"):
        P.apply_patches(tmp_path / "overlay", {"demo": pkg}, {"demo": "2.0"}, pdir)


def test_refuses_modified_file_of_known_version(tmp_path):
    pkg, pdir, _ = _fixture(tmp_path)
    (pkg / "h.h").write_text(HEADER + "// local edit\n")
    with pytest.raises(P.PatchError, match="differs from the reviewed release"):
        P.apply_patches(tmp_path / "overlay", {"demo": pkg}, {"demo": "1.0"}, pdir)


def test_fixed_version_needs_nothing_and_stale_overlay_is_removed(tmp_path):
    pkg, pdir, _ = _fixture(tmp_path)
    overlay = tmp_path / "overlay"
    P.apply_patches(overlay, {"demo": pkg}, {"demo": "1.0"}, pdir)
    (pkg / "h.h").write_text("struct S {\n#if X\n    alignas(64)\n#endif\n};\n")
    assert P.apply_patches(overlay, {"demo": pkg}, {"demo": "3.0"}, pdir) == []
    assert not (overlay / "h.h").exists()


def test_modes():
    assert P.patch_mode({}) == "auto"
    assert P.patch_mode({"FLASH_MLA_PATCHES": "Always"}) == "always"
    with pytest.raises(P.PatchError, match="must be one of auto, always, never; got 'yes'"):
        P.patch_mode({"FLASH_MLA_PATCHES": "yes"})
    assert P.patches_enabled("auto", "msvc") and not P.patches_enabled("auto", "gcc")
    assert P.patches_enabled("always", "gcc") and not P.patches_enabled("never", "msvc")


def test_real_manifest_is_consistent():
    entries = P.load_manifest()
    assert entries, "patches/manifest.json lists no patch"
    for e in entries:
        assert (P.PATCH_DIR / e.patch).is_file(), e.patch
        assert e.upstream and e.why and len(e.sha256_before) == 64 and len(e.sha256_after) == 64
    versions = {e.version for e in entries if e.id == "cuda-cutensormap-align64-msvc"}
    assert {"13.0", "13.1", "13.2"} <= versions


def _cuda_include():
    from flash_mla_build.toolchain import ToolchainError, find_cuda

    try:
        cuda = find_cuda()
    except ToolchainError:
        return None
    for d in cuda.include_dirs:
        if (Path(d) / "cuda.h").is_file():
            return Path(d)
    return None


def test_real_cuda_header_patch(tmp_path):
    inc = _cuda_include()
    if inc is None or P.cuda_header_version(inc) not in {e.version for e in P.load_manifest()}:
        pytest.skip("no CUDA 13.x cuda.h that the manifest covers on this machine")
    res = P.apply_patches(tmp_path / "ov", {"cuda": inc}, {"cuda": P.cuda_header_version(inc)})
    assert [r.id for r in res] == ["cuda-cutensormap-align64-msvc"]
    text = (tmp_path / "ov" / "cuda.h").read_text()
    assert "#if defined(_MSC_VER)\n" in text and "    alignas(64)\n" in text


@pytest.mark.slow
def test_build_with_patches_always_compiles_and_loads(combine_library):
    """FLASH_MLA_PATCHES=always, combine kernels, one target (the shared build of
    conftest.combine_library): the overlay cuda.h is what build_info.cpp includes, and
    the library loads (build_info without a GPU)."""
    build_dir, lib, stdout = combine_library
    assert "PATCHES ['cuda-cutensormap-align64-msvc']" in stdout
    from flash_mla_build.toolchain import find_ninja

    deps = subprocess.run([find_ninja(), "-C", str(build_dir), "-t", "deps",
                           "obj/api/build_info.cpp.o"], capture_output=True, text=True)
    overlay_header = build_dir / "overlay" / "cuda.h"
    assert "overlay/cuda.h" in deps.stdout, deps.stdout[:2000]
    assert "MSC_VER" in overlay_header.read_text()
    check = ("import sys, json, tvm_ffi; m = tvm_ffi.load_module(sys.argv[1]); "
             "i = json.loads(m.build_info()); print(i['targets'], sorted(i['ops']))")
    loaded = subprocess.run([sys.executable, "-c", check, str(lib)], capture_output=True,
                            text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "['80'] ['combine']"
