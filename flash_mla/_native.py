"""Loader of the native library (placeholder until the build toolkit lands).

Contract used by the dispatch layer; the build-toolkit implementation keeps it:

- ``unavailable_reason(op, device, features=None) -> str | None``: None when the
  loaded library has a kernel for ``op`` on ``device`` supporting ``features``
  (a dict of feature name -> value, matched against the op's capability lists),
  else a sentence naming the reason.
- ``function(name)``: the exported tvm-ffi function; RuntimeError if unavailable.
- ``build_info() -> dict | None``: the library's build info, None if not loaded.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

_REASON = "no native library built (flash_mla/lib has no flash_mla_native library)"


def unavailable_reason(op: str, device: Any, features: Optional[dict] = None) -> Optional[str]:
    return _REASON


def function(name: str) -> Callable:
    raise RuntimeError(f"native function {name!r} is unavailable: {_REASON}")


def build_info() -> Optional[dict]:
    return None
