"""Choose, per call, between the native kernels and the PyTorch reference.

``choose(op, device, features)`` returns ``"native"`` or ``"reference"``:

- tensors on a non-CUDA device always run the reference (it is the only
  implementation there; no warning, whatever FLASH_MLA_BACKEND says);
- ``FLASH_MLA_BACKEND`` (read at every call, so tests and users can flip it):
  ``auto`` (default): native when ``flash_mla._native.unavailable_reason`` says the
  loaded library serves ``op`` on ``device`` with ``features``, else the reference,
  with one warning per (op, device, reason) naming the reason;
  ``native``: the native kernel or RuntimeError with the reason (no fallback);
  ``reference``: always the reference, silently.
  Any other value raises ValueError naming the variable.

Some ops have no native binding in the Python layer yet (the library exports no
entry point for them in this version): for those, the reason says so.

State (warnings already given, last backend per op, and the loader's answer per
(op, device, features)) lives in dicts keyed by op and device, never in a
process-wide flag: one process may drive several GPUs, each with its own answer. The
loader's answer is cached because it cannot change within a process (the library is
loaded once; a device's compute capability is fixed) and asking costs tens of
microseconds per call; ``reset_state()`` forgets it.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

from . import _native

ENV_VAR = "FLASH_MLA_BACKEND"
BACKENDS = ("auto", "native", "reference")

NATIVE = "native"
REFERENCE = "reference"

OPS = (
    "dense_decode",
    "sparse_decode",
    "sparse_prefill",
    "dense_prefill_fwd",
    "dense_prefill_bwd",
    "combine",
)

# Ops whose family module binds a native entry point (its _run_native calls the
# csrc/api export).
_NATIVE_BOUND_OPS = frozenset({"dense_prefill_fwd", "dense_prefill_bwd", "dense_decode",
                               "sparse_prefill", "sparse_decode"})


class FlashMLAFallbackWarning(UserWarning):
    """Issued once per (op, device, reason) when ``auto`` falls back to the reference."""


# (op, device string, reason) -> True once warned.
_warned: Dict[Tuple[str, str, str], bool] = {}
# op -> (backend, device string) of the most recent choice.
_last: Dict[str, Tuple[str, str]] = {}
# (op, device string, features key) -> reason or None, as the loader answered; owned
# by the loader function that answered (a replaced one, in tests, empties it).
_reasons: Dict[Tuple[str, str, Any], Optional[str]] = {}
_reasons_owner: list = [None]


def backend_setting() -> str:
    """The FLASH_MLA_BACKEND value (lower-cased), validated; ``auto`` when unset."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {raw!r}"
        )
    return value


def _device_key(device: Any) -> str:
    return str(device)


def _device_type(device: Any) -> str:
    kind = getattr(device, "type", None)
    if kind is None:
        kind = str(device).split(":", 1)[0]
    return kind


def _features_key(features: Optional[dict]) -> Any:
    if not features:
        return None
    return tuple(sorted((name, tuple(value) if isinstance(value, list) else value)
                        for name, value in features.items()))


def native_unavailable_reason(op: str, device: Any, features: Optional[dict] = None) -> Optional[str]:
    """Why ``op`` cannot run natively on ``device`` (None when it can)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if _device_type(device) != "cuda":
        return f"tensors are on {_device_key(device)}, and native kernels need a CUDA device"
    if op not in _NATIVE_BOUND_OPS:
        # First: the library's answer ("not in this native build; rebuild with ...") would
        # send the user to rebuild for a kernel that no build of this version has.
        return f"this version of flash_mla has no native {op} entry point to call"
    return _native.unavailable_reason(op, device, features)


def choose(op: str, device: Any, features: Optional[dict] = None) -> str:
    """Pick the backend for one call of ``op`` on ``device`` (see module docstring)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    key = _device_key(device)
    if _device_type(device) != "cuda":
        _last[op] = (REFERENCE, key)
        return REFERENCE
    setting = backend_setting()
    if setting == REFERENCE:
        _last[op] = (REFERENCE, key)
        return REFERENCE
    if _reasons_owner[0] is not _native.unavailable_reason:
        _reasons.clear()
        _reasons_owner[0] = _native.unavailable_reason
    cache_key = (op, key, _features_key(features))
    if cache_key in _reasons:
        reason = _reasons[cache_key]
    else:
        reason = native_unavailable_reason(op, device, features)
        _reasons[cache_key] = reason
    if reason is None:
        _last[op] = (NATIVE, key)
        return NATIVE
    if setting == NATIVE:
        raise RuntimeError(
            f"{ENV_VAR}=native but {op} cannot run natively on {key}: {reason}"
        )
    warn_key = (op, key, reason)
    if warn_key not in _warned:
        _warned[warn_key] = True
        warnings.warn(
            f"flash_mla: {op} on {key} runs on the PyTorch reference (slow): {reason}. "
            f"Set {ENV_VAR}=reference to silence this or {ENV_VAR}=native to make it an error.",
            FlashMLAFallbackWarning,
            stacklevel=3,
        )
    _last[op] = (REFERENCE, key)
    return REFERENCE


def record_choice(op: str, choice: Tuple[str, str]) -> None:
    """Note (backend, device) as ``op``'s latest choice for a call that repeats one
    ``choose`` already answered (flash_mla._repeat_call), so last_backend stays true."""
    _last[op] = choice


def last_backend(op: str) -> Optional[str]:
    """Backend of the most recent ``choose(op, ...)`` in this process, or None."""
    entry = _last.get(op)
    return None if entry is None else entry[0]


def last_choice(op: str) -> Optional[Tuple[str, str]]:
    """(backend, device) of the most recent ``choose(op, ...)``, or None."""
    return _last.get(op)


def reset_state() -> None:
    """Forget the warnings given and the last choices (for tests)."""
    _warned.clear()
    _last.clear()
    _reasons.clear()
