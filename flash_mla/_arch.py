"""Which compiled target of the native library runs on a GPU of a given compute capability.

A cubin for target sm_XY runs on (CUDA's compatibility rules):
- plain "XY": the same major, minor >= Y (sm_80 on 8.0, 8.6, 8.9);
- "XYa" (arch-specific): exactly X.Y (sm_90a only on 9.0; sm_120a not on 12.1);
- "XYf" (family-specific): the family, same major and minor >= Y (100f on 10.0 and
  10.3; 120f on 12.0 and 12.1).
Embedded PTX (plain compute_XY) is JIT-compiled by the driver on any GPU of
capability >= X.Y.

No torch import here: callers pass (major, minor).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Tuple

__all__ = ["parse_target", "target_runs_on", "runnable_target", "sm_name"]

_RE = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([af]?)$")


def parse_target(name: str) -> Tuple[int, int, str]:
    """'120f' -> (12, 0, 'f'); raises ValueError on anything else."""
    m = _RE.match(str(name).strip().lower())
    if not m:
        raise ValueError(f"target must look like 80, 90a or 120f, got {name!r}")
    number = int(m.group(1))
    return number // 10, number % 10, m.group(2)


def sm_name(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"


def target_runs_on(target: str, major: int, minor: int) -> bool:
    t_major, t_minor, suffix = parse_target(target)
    if suffix == "a":
        return (major, minor) == (t_major, t_minor)
    return major == t_major and minor >= t_minor


def runnable_target(targets: Iterable[str], ptx: Optional[str], major: int,
                    minor: int) -> Optional[str]:
    """The compiled target a GPU of capability major.minor would run, else None.

    Prefers a cubin (exact arch first, then family, then plain); falls back to
    'ptx:<XY>' when only the embedded PTX can be JIT-compiled for the device.
    """
    cubins = [t for t in targets if target_runs_on(t, major, minor)]
    if cubins:
        order = {"a": 0, "f": 1, "": 2}
        return min(cubins, key=lambda t: (order[parse_target(t)[2]], -int(re.sub("[af]", "", t))))
    if ptx:
        p_major, p_minor, _ = parse_target(ptx)
        if (major, minor) >= (p_major, p_minor):
            return f"ptx:{ptx}"
    return None
