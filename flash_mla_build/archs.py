"""Compile targets: what FLASH_MLA_CUDA_ARCHS asks for, what the nvcc can build,
and the -gencode flags for a list of targets.

Public API (used by setup.py through build.py, and by scripts/check_env):

- ``Target``: one compile target, e.g. ``Target.parse("120f")``; ``.name`` is the
  spelling used everywhere ("80", "90a", "100f", "120f"), ``.min_cuda`` the CUDA
  version nvcc needs for it, ``.gencode()`` its -gencode flag.
- ``DEFAULT_TARGETS``: the set "all" draws from: 80, 86, 89, 90a, 100f, 120f.
- ``select_targets(request, nvcc_version, native_capabilities=None) -> list[Target]``:
  resolves a FLASH_MLA_CUDA_ARCHS value ("all", "native", or a list such as
  "80;90a;100f;120f") against the nvcc version; raises ``ArchError`` with a
  sentence naming the CUDA version a target needs.
- ``native_capabilities() -> list[tuple[int, int]]``: compute capabilities of the
  GPUs on this machine (nvidia-smi, else torch), empty when none is found.
- ``gencode_flags(targets, ptx=True) -> list[str]``: -gencode flags, with PTX of the
  newest target (plain compute_XY) embedded for forward compatibility.
- ``target_for_capability(major, minor, nvcc_version) -> Target``: the target
  "native" picks for one GPU.
- ``check_target(target, nvcc_version)``: raises ArchError if the nvcc cannot build it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

__all__ = [
    "ArchError",
    "Target",
    "DEFAULT_TARGETS",
    "select_targets",
    "native_capabilities",
    "gencode_flags",
    "target_for_capability",
    "ptx_target",
    "check_target",
]


class ArchError(ValueError):
    """A FLASH_MLA_CUDA_ARCHS request the toolchain cannot satisfy."""


# CUDA version each target first appears in (nvcc --list-gpu-code history).
# Arch-specific 'a' targets need the same release as the plain one except where
# listed; family-specific 'f' targets arrived with CUDA 12.9.
_MIN_CUDA = {
    "75": (10, 0), "80": (11, 0), "86": (11, 1), "87": (11, 4), "89": (11, 8),
    "90": (12, 0), "90a": (12, 0),
    "100": (12, 8), "100a": (12, 8), "100f": (12, 9),
    "101": (12, 8), "101a": (12, 8),
    "103": (12, 9), "103a": (12, 9), "103f": (12, 9),
    "110": (13, 0), "110a": (13, 0), "110f": (13, 0),
    "120": (12, 8), "120a": (12, 8), "120f": (12, 9),
    "121": (12, 9), "121a": (12, 9), "121f": (12, 9),
}
# CUDA 13 removed every target below sm_75.
_MAX_CUDA_MAJOR_FOR_OLD = {"50": 12, "52": 12, "53": 12, "60": 12, "61": 12, "62": 12,
                           "70": 12, "72": 12}

_TARGET_RE = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([af]?)$")


@dataclass(frozen=True, order=True)
class Target:
    """One compile target: compute capability digits plus an optional suffix.

    suffix "" = plain cubin (runs on the same major, minor >= this one),
    "a" = arch-specific (runs on exactly this capability),
    "f" = family-specific (runs on the family, e.g. 120f on 12.0 and 12.1).
    """

    number: int  # 120 for sm_120f
    suffix: str  # "", "a" or "f"

    @staticmethod
    def parse(text: str) -> "Target":
        m = _TARGET_RE.match(text.strip().lower())
        if not m:
            raise ArchError(
                f"FLASH_MLA_CUDA_ARCHS entry {text!r} is not a CUDA target; expected digits with an "
                "optional 'a' or 'f' suffix such as 80, 90a, 100f or 120f")
        return Target(int(m.group(1)), m.group(2))

    @property
    def name(self) -> str:
        return f"{self.number}{self.suffix}"

    @property
    def major(self) -> int:
        return self.number // 10

    @property
    def minor(self) -> int:
        return self.number % 10

    @property
    def min_cuda(self) -> Optional[tuple]:
        return _MIN_CUDA.get(self.name)

    def gencode(self) -> str:
        return f"-gencode=arch=compute_{self.name},code=sm_{self.name}"

    def __str__(self) -> str:
        return self.name


DEFAULT_TARGETS = tuple(Target.parse(t) for t in ("80", "86", "89", "90a", "100f", "120f"))


def _fmt(version: Sequence[int]) -> str:
    return f"{version[0]}.{version[1]}"


def check_target(target: Target, nvcc_version: Sequence[int]) -> None:
    """Raise ArchError when this nvcc cannot build the target."""
    need = target.min_cuda
    if need is None:
        old_max = _MAX_CUDA_MAJOR_FOR_OLD.get(target.name)
        if old_max is not None and nvcc_version[0] > old_max:
            raise ArchError(
                f"target {target.name} is not supported by CUDA {_fmt(nvcc_version)}: CUDA "
                f"{old_max + 1} removed every target below sm_75")
        if old_max is None:
            raise ArchError(
                f"target {target.name} is not a known CUDA target (known: "
                f"{', '.join(sorted(_MIN_CUDA, key=lambda n: (int(re.sub('[af]', '', n)), n)))})")
        return
    if tuple(nvcc_version[:2]) < need:
        raise ArchError(
            f"target {target.name} needs CUDA {_fmt(need)} or newer, but the nvcc found is CUDA "
            f"{_fmt(nvcc_version)}; install a newer CUDA toolkit or drop {target.name} from "
            "FLASH_MLA_CUDA_ARCHS")


def target_for_capability(major: int, minor: int, nvcc_version: Sequence[int]) -> Target:
    """The target that "native" builds for a GPU of this compute capability.

    Hopper gets 90a (the arch-specific fast paths need it), Blackwell gets the
    family target when nvcc has it (one cubin for 10.0/10.3 or 12.0/12.1), else
    the plain one; everything else the plain cubin.
    """
    number = major * 10 + minor
    if number == 90:
        return Target(90, "a")
    if major in (10, 12):
        family = Target(major * 10, "f")
        if number in (100, 103, 120, 121) and tuple(nvcc_version[:2]) >= (12, 9):
            return family
    return Target(number, "")


def native_capabilities() -> list:
    """Compute capabilities of the local GPUs as (major, minor) pairs, sorted, unique.

    Asks nvidia-smi first (no torch needed at build time), then torch if it is
    installed; returns [] when neither finds a GPU.
    """
    found = set()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, timeout=30, check=False)
            for line in out.stdout.decode("utf-8", "replace").splitlines():
                m = re.match(r"^\s*(\d+)\.(\d+)\s*$", line)
                if m:
                    found.add((int(m.group(1)), int(m.group(2))))
        except (OSError, subprocess.SubprocessError):
            pass
    if not found:
        try:
            import torch  # optional; never required at build time

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    found.add(tuple(torch.cuda.get_device_capability(i)))
        except Exception:  # noqa: BLE001 - any torch failure means "no GPU seen"
            pass
    return sorted(found)


def select_targets(request: Optional[str], nvcc_version: Sequence[int],
                   native_capabilities_override: Optional[Iterable] = None) -> list:
    """Resolve FLASH_MLA_CUDA_ARCHS into a sorted list of Targets.

    request: None or "" or "all" = every DEFAULT_TARGETS entry this nvcc can build
    (at least one must remain); "native" = one target per local GPU; otherwise a
    list separated by ';', ',' or spaces, each entry checked against the nvcc.
    native_capabilities_override: (major, minor) pairs to use instead of probing
    the machine (tests, cross builds).
    """
    text = (request or "all").strip().lower()
    if text == "all":
        chosen = []
        for target in DEFAULT_TARGETS:
            try:
                check_target(target, nvcc_version)
            except ArchError:
                continue
            chosen.append(target)
        if not chosen:
            raise ArchError(
                f"CUDA {_fmt(nvcc_version)} can build none of the default targets "
                f"({', '.join(t.name for t in DEFAULT_TARGETS)}); CUDA 12.8 or newer is needed")
        return chosen
    if text == "native":
        caps = (list(native_capabilities_override) if native_capabilities_override is not None
                else native_capabilities())
        if not caps:
            raise ArchError(
                "FLASH_MLA_CUDA_ARCHS=native found no GPU (nvidia-smi and torch see none); "
                "name the targets instead, e.g. FLASH_MLA_CUDA_ARCHS=120f")
        targets = sorted({target_for_capability(int(a), int(b), nvcc_version) for a, b in caps})
    else:
        parts = [p for p in re.split(r"[;,\s]+", text) if p]
        if not parts:
            raise ArchError(f"FLASH_MLA_CUDA_ARCHS={request!r} names no target")
        targets = sorted({Target.parse(p) for p in parts})
    for target in targets:
        check_target(target, nvcc_version)
    return targets


def ptx_target(targets: Sequence[Target]) -> Optional[Target]:
    """The plain (suffix-free) target whose PTX is embedded: the newest one built.

    'a' and 'f' PTX only JIT onto their own arch or family, so the embedded PTX
    is the plain compute_XY of the newest target, which a future GPU can JIT.
    """
    if not targets:
        return None
    newest = max(targets, key=lambda t: (t.number, t.suffix))
    return Target(newest.number, "")


def gencode_flags(targets: Sequence[Target], ptx: bool = True) -> list:
    """-gencode flags for the targets, plus PTX of the newest one when ptx is True."""
    flags = [t.gencode() for t in sorted(targets)]
    if ptx and targets:
        p = ptx_target(targets)
        flags.append(f"-gencode=arch=compute_{p.name},code=compute_{p.name}")
    return flags
