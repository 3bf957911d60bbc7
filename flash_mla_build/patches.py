"""The patch layer: reviewed fixes for dependency headers that break under MSVC.

The build never edits an installed package. It writes patched copies of the
affected headers into an overlay include directory inside the build tree, which
is put first on every include path, so ``#include <cuda.h>`` finds the patched
copy and everything else falls through to the originals.

patches/manifest.json lists one entry per (patch, package version):

    {"id": "cuda-cutensormap-align64-msvc", "package": "cuda", "version": "13.0",
     "file": "cuda.h", "patch": "cuda-cutensormap-align64-msvc.diff",
     "detect": "<text present only in an unfixed file>",
     "sha256_before": "...", "sha256_after": "...",
     "upstream": ["https://..."], "why": "..."}

- package "cuda": the CUDA headers of the nvcc in use (root: <cuda>/include,
  version from CUDA_VERSION in cuda.h); "nvidia-cutlass": CUTLASS/CuTe headers of
  the nvidia-cutlass wheel (root: its include dir, version from its metadata).
- sha256 values are over the file with CRLF normalised to LF, so a Windows
  installer's line endings do not change them.
- The .diff is a unified diff; each hunk's old lines must occur exactly once.

Rules: an entry applies when package and version match and the file's sha256 is
sha256_before; the result must hash to sha256_after. A file that contains an
entry's ``detect`` text but whose version (or hash) no entry knows is refused
with a message, never patched blindly. Applying twice is a no-op.

Public API:
- ``patch_mode(env=None) -> "auto" | "always" | "never"`` (FLASH_MLA_PATCHES).
- ``patches_enabled(mode, host_compiler_kind) -> bool`` (auto: on for MSVC).
- ``load_manifest(patch_dir) -> list[PatchEntry]``.
- ``apply_patches(overlay_dir, package_roots, package_versions, patch_dir=None)
  -> list[AppliedPatch]``: writes the overlay, removes stale overlay files.
- ``package_roots_for_build(cuda_include, cutlass_include)`` and
  ``package_versions_for_build(cuda_include)``: the maps apply_patches takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["PatchError", "PatchEntry", "AppliedPatch", "PATCH_DIR", "patch_mode",
           "patches_enabled", "load_manifest", "apply_patches", "apply_unified_diff",
           "sha256_text", "cuda_header_version", "package_roots_for_build",
           "package_versions_for_build"]

PATCH_DIR = Path(__file__).resolve().parent.parent / "patches"
MODES = ("auto", "always", "never")


class PatchError(RuntimeError):
    """A patch cannot be applied safely (unknown version, unexpected file)."""


@dataclass(frozen=True)
class PatchEntry:
    id: str
    package: str
    version: str
    file: str
    patch: str
    detect: str
    sha256_before: str
    sha256_after: str
    upstream: tuple
    why: str


@dataclass(frozen=True)
class AppliedPatch:
    id: str
    package: str
    version: str
    file: str
    status: str   # "applied" or "unchanged" (overlay already current)


def patch_mode(env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    value = (env.get("FLASH_MLA_PATCHES") or "auto").strip().lower()
    if value not in MODES:
        raise PatchError(f"FLASH_MLA_PATCHES must be one of auto, always, never; got {value!r}")
    return value


def patches_enabled(mode: str, host_compiler_kind: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    return host_compiler_kind == "msvc"


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def sha256_text(text: str) -> str:
    return hashlib.sha256(_normalise(text).encode("utf-8", "surrogateescape")).hexdigest()


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")


def load_manifest(patch_dir: Optional[Path] = None) -> list:
    patch_dir = Path(patch_dir or PATCH_DIR)
    data = json.loads((patch_dir / "manifest.json").read_text(encoding="utf-8"))
    entries = []
    for raw in data["patches"]:
        entries.append(PatchEntry(
            id=raw["id"], package=raw["package"], version=raw["version"], file=raw["file"],
            patch=raw["patch"], detect=raw["detect"], sha256_before=raw["sha256_before"],
            sha256_after=raw["sha256_after"], upstream=tuple(raw["upstream"]), why=raw["why"]))
    return entries


_HUNK_RE = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@")


def _parse_hunks(diff_text: str) -> list:
    hunks, current = [], None
    for line in _normalise(diff_text).split("\n"):
        if _HUNK_RE.match(line):
            current = ([], [])
            hunks.append(current)
            continue
        if current is None or line.startswith(("--- ", "+++ ")):
            continue
        if line.startswith(" "):
            current[0].append(line[1:])
            current[1].append(line[1:])
        elif line.startswith("-"):
            current[0].append(line[1:])
        elif line.startswith("+"):
            current[1].append(line[1:])
        elif line == "":
            continue  # trailing newline of the diff file
        elif line.startswith("\\"):
            continue  # "\ No newline at end of file"
    if not hunks:
        raise PatchError("patch file has no hunks")
    return hunks


def apply_unified_diff(text: str, diff_text: str, name: str = "file") -> str:
    """Apply a unified diff by content: each hunk's old lines must occur exactly once."""
    lines = _normalise(text).split("\n")
    for old, new in _parse_hunks(diff_text):
        n = len(old)
        hits = [i for i in range(len(lines) - n + 1) if lines[i:i + n] == old]
        if len(hits) != 1:
            raise PatchError(f"patch hunk for {name} matches {len(hits)} places, expected exactly 1 "
                             f"(hunk starts {old[0]!r})")
        i = hits[0]
        lines[i:i + n] = new
    return "\n".join(lines)


def cuda_header_version(cuda_include: Path) -> Optional[str]:
    """'13.0' from CUDA_VERSION in <include>/cuda.h, None if there is no cuda.h."""
    header = Path(cuda_include) / "cuda.h"
    if not header.is_file():
        return None
    m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", _read(header))
    if not m:
        return None
    v = int(m.group(1))
    return f"{v // 1000}.{(v % 1000) // 10}"


def package_roots_for_build(cuda_include, cutlass_include) -> dict:
    roots = {}
    if cuda_include:
        roots["cuda"] = Path(cuda_include)
    if cutlass_include:
        roots["nvidia-cutlass"] = Path(cutlass_include)
    return roots


def package_versions_for_build(cuda_include) -> dict:
    versions = {}
    if cuda_include:
        v = cuda_header_version(Path(cuda_include))
        if v:
            versions["cuda"] = v
    try:
        from importlib.metadata import version

        versions["nvidia-cutlass"] = version("nvidia-cutlass")
    except Exception:  # noqa: BLE001 - not installed: no CUTLASS patch can apply
        pass
    return versions


def apply_patches(overlay_dir: Path, package_roots: Mapping[str, Path],
                  package_versions: Mapping[str, str], patch_dir: Optional[Path] = None) -> list:
    """Write patched copies under overlay_dir; return what was applied.

    Raises PatchError when a file shows a known defect (``detect``) in a version
    or with a hash that no entry covers.
    """
    patch_dir = Path(patch_dir or PATCH_DIR)
    overlay_dir = Path(overlay_dir)
    entries = load_manifest(patch_dir)
    results, wanted = [], set()
    by_target = {}
    for e in entries:
        by_target.setdefault((e.package, e.file), []).append(e)
    for (package, rel_file), group in sorted(by_target.items()):
        root = package_roots.get(package)
        if root is None:
            continue
        original = Path(root) / rel_file
        if not original.is_file():
            continue
        text = _read(original)
        digest = sha256_text(text)
        version = package_versions.get(package)
        known = [e for e in group if e.version == version]
        needs = [e for e in group if e.detect in _normalise(text)]
        if not needs and not any(e.sha256_after == digest for e in group):
            continue  # this version does not have the defect
        match = [e for e in known if e.sha256_before == digest]
        if not match:
            ids = sorted({e.id for e in group})
            have = sorted({e.version for e in group})
            if not known:
                raise PatchError(
                    f"{package} {version} header {rel_file} has the defect that patch "
                    f"{', '.join(ids)} fixes, but patches/manifest.json knows only versions "
                    f"{', '.join(have)}; review the file, add a manifest entry, or set "
                    "FLASH_MLA_PATCHES=never")
            raise PatchError(
                f"{package} {version} header {original} has sha256 {digest}, but patch "
                f"{known[0].id} expects {known[0].sha256_before}; the file differs from the "
                "reviewed release, so it is not patched (set FLASH_MLA_PATCHES=never to build "
                "without the patch)")
        for entry in match:
            diff_text = (patch_dir / entry.patch).read_text(encoding="utf-8")
            patched = apply_unified_diff(text, diff_text, rel_file)
            got = sha256_text(patched)
            if got != entry.sha256_after:
                raise PatchError(
                    f"patch {entry.id} on {package} {version} {rel_file} produced sha256 {got}, "
                    f"expected {entry.sha256_after}; the manifest or the .diff is inconsistent")
            target = overlay_dir / rel_file
            wanted.add(target.resolve())
            if target.is_file() and sha256_text(_read(target)) == entry.sha256_after:
                status = "unchanged"
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(patched.encode("utf-8", "surrogateescape"))
                os.replace(tmp, target)
                status = "applied"
            results.append(AppliedPatch(entry.id, package, version, rel_file, status))
            text = patched  # a second entry for the same file applies on top
    if overlay_dir.is_dir():
        for path in sorted(overlay_dir.rglob("*"), reverse=True):
            if path.is_file() and path.resolve() not in wanted:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return results
