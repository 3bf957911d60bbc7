"""Which sources under csrc/ are compiled, for which targets and kernel families.

Every ``.cu`` and ``.cpp`` file under csrc/ is picked up automatically; the first
matching rule of ``SOURCE_RULES`` (fnmatch on the path relative to the repository
root, with '/' separators; '*' also matches '/') decides:

- ``family``: the kernel family the file belongs to. FLASH_MLA_KERNELS ("all", or
  a list such as "combine" or "combine;dense_prefill") selects families; "core"
  is always built; ``None`` excludes the file from every build.
- ``arch``: None = portable (built for every selected target, PTX included), or
  the set of target names the file may be built for (e.g. {"90a"} for csrc/sm90/);
  arch-specific files get no PTX, since 'a'/'f' PTX cannot JIT elsewhere.

Public API:
- ``KERNEL_FAMILIES``: the families FLASH_MLA_KERNELS may name.
- ``select_kernel_families(request) -> frozenset[str]``.
- ``discover_sources(repo_root, targets, families) -> list[Source]``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .archs import Target

__all__ = ["SourceRule", "SOURCE_RULES", "KERNEL_FAMILIES", "Source", "KernelsError",
           "select_kernel_families", "discover_sources", "rule_for"]


class KernelsError(ValueError):
    """A FLASH_MLA_KERNELS value naming an unknown family."""


@dataclass(frozen=True)
class SourceRule:
    pattern: str
    family: Optional[str]
    arch: Optional[frozenset] = None


KERNEL_FAMILIES = ("combine", "decode", "sparse_prefill", "dense_prefill")

SOURCE_RULES = (
    # Scratch and disabled files never build.
    SourceRule("csrc/*.disabled.*", None),
    SourceRule("csrc/*/tests/*", None),
    # The library's spine: registry, build_info, shared helpers.
    SourceRule("csrc/common/*", "core"),
    SourceRule("csrc/api/build_info.cpp", "core"),
    # Arch-specific fast paths: built only for their own targets.
    SourceRule("csrc/sm90/*", "decode", frozenset({"90a"})),
    SourceRule("csrc/sm100/*", "decode", frozenset({"100a", "100f", "103a", "103f"})),
    SourceRule("csrc/sm120/*", "decode", frozenset({"120a", "120f", "121a", "121f"})),
    # Portable kernel families and their API entry points.
    SourceRule("csrc/portable/decode/combine/*", "combine"),
    SourceRule("csrc/api/combine.*", "combine"),
    SourceRule("csrc/portable/prefill/*", "dense_prefill"),
    SourceRule("csrc/api/dense_prefill*", "dense_prefill"),
    SourceRule("csrc/*sparse_prefill*", "sparse_prefill"),
    SourceRule("csrc/*decode*", "decode"),
    SourceRule("csrc/smxx/schedule/*", "decode"),
    SourceRule("csrc/api/*schedule*", "decode"),
)
# A file no rule names is built only with FLASH_MLA_KERNELS=all (family "other").
_FALLBACK = SourceRule("csrc/*", "other")

SOURCE_SUFFIXES = (".cu", ".cpp")


@dataclass(frozen=True)
class Source:
    path: Path            # absolute
    rel: str              # relative to the repository root, '/' separators
    family: str
    is_cuda: bool         # .cu: nvcc with device targets; .cpp: host compiler
    targets: tuple        # Targets this file is built for (empty for .cpp)
    ptx: bool             # embed PTX of the newest target


def rule_for(rel: str) -> SourceRule:
    for rule in SOURCE_RULES:
        if fnmatch.fnmatchcase(rel, rule.pattern):
            return rule
    return _FALLBACK


def select_kernel_families(request: Optional[str]) -> frozenset:
    """FLASH_MLA_KERNELS -> the set of families to build ("core" always included)."""
    text = (request or "all").strip().lower()
    if text == "all":
        return frozenset(KERNEL_FAMILIES) | {"core", "other"}
    names = [p for p in re.split(r"[;,\s]+", text) if p]
    unknown = [n for n in names if n not in KERNEL_FAMILIES]
    if unknown or not names:
        raise KernelsError(
            f"FLASH_MLA_KERNELS={request!r} names unknown kernel families {unknown}; expected "
            f"'all' or a list of {', '.join(KERNEL_FAMILIES)}")
    return frozenset(names) | {"core"}


def discover_sources(repo_root: Path, targets: Sequence[Target], families) -> list:
    """All sources to compile, sorted by path, each with its own target list.

    A CUDA file whose arch rule leaves none of the selected targets is skipped
    (e.g. csrc/sm90/ in a build for 120f only).
    """
    repo_root = Path(repo_root)
    found = []
    for path in sorted((repo_root / "csrc").rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(repo_root).as_posix()
        rule = rule_for(rel)
        if rule.family is None or rule.family not in families:
            continue
        is_cuda = path.suffix == ".cu"
        if not is_cuda:
            found.append(Source(path, rel, rule.family, False, (), False))
            continue
        if rule.arch is None:
            chosen = tuple(sorted(targets))
            ptx = True
        else:
            chosen = tuple(t for t in sorted(targets) if t.name in rule.arch)
            ptx = False
        if chosen:
            found.append(Source(path, rel, rule.family, True, chosen, ptx))
    return found
