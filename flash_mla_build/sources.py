"""Which sources under csrc/ are compiled, for which targets and kernel families.

Every ``.cu`` and ``.cpp`` file under csrc/ must be claimed by exactly one family of
``FAMILIES``; a family names its files explicitly, as folders (ending in '/', which
claim every file below them) and single files, relative to the repository root. There
are no path globs: a glob such as ``csrc/portable/prefill/*`` would silently file a new
``csrc/portable/prefill/sparse/`` kernel under the dense prefill. A source file that no
family claims, or that two families claim, stops the build with a ``SourcesError`` that
names the file, so adding a kernel folder always means adding it to its family here.
Files whose name contains ``.disabled.`` (e.g. ``old.disabled.cu``) are never built and
need no claim.

- ``Family.name``: what FLASH_MLA_KERNELS ("all", or a list such as "combine" or
  "combine;dense_prefill") selects. "core" (registry, build_info) is always built.
- ``Family.paths``: portable sources, built for every selected target with PTX.
- ``Family.arch_paths``: (path, target names) pairs for arch-specific fast paths (e.g.
  a csrc/sm90/ folder for {"90a"}); built only for those targets and without PTX,
  since 'a'/'f' PTX cannot JIT elsewhere.
- ``Family.requires``: families whose kernels this one launches, selected with it
  (the decode families launch the split-KV combine).

Public API:
- ``FAMILIES``, ``KERNEL_FAMILIES`` (the names FLASH_MLA_KERNELS may use).
- ``select_kernel_families(request) -> frozenset[str]``.
- ``family_for(rel) -> (Family, arch or None) | None``: the claim on one path.
- ``discover_sources(repo_root, targets, families) -> list[Source]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

from .archs import Target

__all__ = ["Family", "FAMILIES", "KERNEL_FAMILIES", "Source", "SourcesError", "KernelsError",
           "select_kernel_families", "family_for", "discover_sources", "SOURCE_SUFFIXES"]


class SourcesError(ValueError):
    """A source file under csrc/ that no family (or more than one) claims."""


class KernelsError(ValueError):
    """A FLASH_MLA_KERNELS value naming an unknown family."""


@dataclass(frozen=True)
class Family:
    name: str
    paths: Tuple[str, ...]
    arch_paths: Tuple[Tuple[str, FrozenSet[str]], ...] = ()
    requires: Tuple[str, ...] = ()


# One entry per kernel family: its API file(s) under csrc/api/ and its kernel folder(s).
# The op names (Python op, tvm-ffi entry, registry id) are the API file names.
FAMILIES: Tuple[Family, ...] = (
    Family("core", ("csrc/common/", "csrc/api/build_info.cpp")),
    Family("combine", ("csrc/api/combine.cu", "csrc/portable/decode/combine/")),
    Family("dense_decode", ("csrc/api/dense_decode.cu", "csrc/api/decode_schedule.cu",
                            "csrc/portable/decode/dense/", "csrc/portable/decode/schedule/"),
           requires=("combine",)),
    # Sparse decode runs the dense decode's split-KV schedule kernel over its key-list
    # lengths, and the combine.
    Family("sparse_decode", ("csrc/api/sparse_decode.cu", "csrc/portable/decode/sparse/"),
           requires=("combine", "dense_decode")),
    Family("sparse_prefill", ("csrc/api/sparse_prefill.cu", "csrc/portable/prefill/sparse/")),
    Family("dense_prefill", ("csrc/api/dense_prefill_fwd.cu", "csrc/api/dense_prefill_bwd.cu",
                             "csrc/portable/prefill/dense_fwd/",
                             "csrc/portable/prefill/dense_bwd/")),
)

KERNEL_FAMILIES = tuple(f.name for f in FAMILIES if f.name != "core")

SOURCE_SUFFIXES = (".cu", ".cpp")
_DISABLED_MARK = ".disabled."


@dataclass(frozen=True)
class Source:
    path: Path            # absolute
    rel: str              # relative to the repository root, '/' separators
    family: str
    is_cuda: bool         # .cu: nvcc with device targets; .cpp: host compiler
    targets: tuple        # Targets this file is built for (empty for .cpp)
    ptx: bool             # embed PTX of the newest target


def _claims(claim: str, rel: str) -> bool:
    return rel.startswith(claim) if claim.endswith("/") else rel == claim


def _all_claims(rel: str, table: Sequence[Family]) -> List[Tuple[Family, Optional[FrozenSet[str]]]]:
    found = []
    for family in table:
        for claim in family.paths:
            if _claims(claim, rel):
                found.append((family, None))
        for claim, arch in family.arch_paths:
            if _claims(claim, rel):
                found.append((family, frozenset(arch)))
    return found


def family_for(rel: str, table: Sequence[Family] = FAMILIES
               ) -> Optional[Tuple[Family, Optional[FrozenSet[str]]]]:
    """The family that claims ``rel`` (repository-relative, '/' separators) and the
    target names it is limited to (None = portable); None when no family claims it.
    Raises SourcesError when two claims match."""
    found = _all_claims(rel, table)
    if len(found) > 1:
        names = ", ".join(f.name for f, _ in found)
        raise SourcesError(f"{rel} is claimed by several kernel families ({names}); each source "
                           "file must belong to exactly one (flash_mla_build/sources.py)")
    return found[0] if found else None


def _family_names(table: Sequence[Family]) -> Tuple[str, ...]:
    return tuple(f.name for f in table if f.name != "core")


def select_kernel_families(request: Optional[str],
                           table: Sequence[Family] = FAMILIES) -> frozenset:
    """FLASH_MLA_KERNELS -> the set of families to build: "core" always, and every family
    a selected one requires."""
    known = _family_names(table)
    text = (request or "all").strip().lower()
    if text == "all":
        return frozenset(known) | {"core"}
    names = [p for p in re.split(r"[;,\s]+", text) if p]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise KernelsError(
            f"FLASH_MLA_KERNELS={request!r} names unknown kernel families {unknown}; expected "
            f"'all' or a list of {', '.join(known)}")
    by_name = {f.name: f for f in table}
    selected = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in selected:
            selected.add(name)
            pending.extend(by_name[name].requires)
    return frozenset(selected) | {"core"}


def _source_files(repo_root: Path) -> Iterable[Tuple[Path, str]]:
    for path in sorted((repo_root / "csrc").rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES or not path.is_file():
            continue
        if _DISABLED_MARK in path.name:
            continue
        yield path, path.relative_to(repo_root).as_posix()


def discover_sources(repo_root: Path, targets: Sequence[Target], families,
                     table: Sequence[Family] = FAMILIES) -> list:
    """All sources to compile, sorted by path, each with its own target list.

    Every source under csrc/ is checked against the table, selected or not, so an
    unclaimed file fails every build, not only FLASH_MLA_KERNELS=all. A CUDA file whose
    arch claim leaves none of the selected targets is skipped (e.g. an sm90 folder in a
    build for 120f only).
    """
    repo_root = Path(repo_root)
    found = []
    unclaimed = []
    for path, rel in _source_files(repo_root):
        claim = family_for(rel, table)
        if claim is None:
            unclaimed.append(rel)
            continue
        family, arch = claim
        if family.name not in families:
            continue
        is_cuda = path.suffix == ".cu"
        if not is_cuda:
            found.append(Source(path, rel, family.name, False, (), False))
            continue
        if arch is None:
            chosen = tuple(sorted(targets))
            ptx = True
        else:
            chosen = tuple(t for t in sorted(targets) if t.name in arch)
            ptx = False
        if chosen:
            found.append(Source(path, rel, family.name, True, chosen, ptx))
    if unclaimed:
        raise SourcesError(
            f"no kernel family claims {', '.join(unclaimed)}: add the file or its folder to "
            "a family in flash_mla_build/sources.py (FAMILIES), or rename it *.disabled.* "
            "to keep it out of the build")
    return found
