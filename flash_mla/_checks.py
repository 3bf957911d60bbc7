"""Validation primitives shared by the op families' validation functions.

Each family module (mha_prefill, dense_decode, sparse_decode, sparse_prefill) has
one validation function that calls these in a fixed order: Python types, dtypes,
devices, layout, shapes, then values that can be read without a device sync.

Every check raises with a sentence that names the argument as the caller passed
it, what was expected and what it got: TypeError for a wrong Python type or dtype,
ValueError for a wrong device, layout, shape or value. The caller passes the name
(``cu_seqlens_qo``, ``cu_seqlens``, ``cu_seqlens_q``, ...), so one check serves
every public spelling of an argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch


def shape(t: torch.Tensor) -> Tuple[int, ...]:
    """The shape as plain ints (SymInts print as their hint)."""
    return tuple(int(s) for s in t.shape)


def strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.stride())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(dtype_name(d) for d in dtypes)


# Looked up once: decode's repeat path asks on every call (flash_mla._repeat_call).
_compiler_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def is_compiling() -> bool:
    """True while torch.compile traces the calling code (tensors are fake then)."""
    check = _compiler_is_compiling
    return bool(check()) if check is not None else False


# --------------------------------------------------------------------------- types

def tensors(pairs: Sequence[Tuple[str, Any]], optional: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """TypeError unless each value is a tensor (names in ``optional`` may be None).
    Returns the tensors given, by name, in order."""
    optional = set(optional)
    found: Dict[str, torch.Tensor] = {}
    for name, value in pairs:
        if value is None and name in optional:
            continue
        if not isinstance(value, torch.Tensor):
            what = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        found.setdefault(name, value)
    return found


def is_int(x: Any) -> bool:
    return (isinstance(x, numbers.Integral) and not isinstance(x, bool)) or isinstance(x, torch.SymInt)


def integer(x: Any, name: str) -> None:
    """TypeError unless ``x`` is an int (bool is not)."""
    if not is_int(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")


def boolean(x: Any, name: str) -> None:
    """TypeError unless ``x`` is a bool (0 and 1 pass: C-style callers send them)."""
    if isinstance(x, bool):
        return
    if isinstance(x, numbers.Integral) and x in (0, 1):
        return
    raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")


def real(x: Any, name: str, optional: bool = False) -> None:
    """TypeError unless ``x`` is a real number (or None when optional)."""
    if x is None and optional:
        return
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat)):
        what = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")


# --------------------------------------------------------------------------- dtypes, devices

def dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}, got {dtype_name(t.dtype)}")


def same_dtype(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the same dtype as {ref_name} ({dtype_name(ref.dtype)}), "
            f"got {dtype_name(t.dtype)}"
        )


def same_device(found: Dict[str, torch.Tensor]) -> None:
    """ValueError unless every tensor is on the first one's device."""
    if not found:
        return
    first_name, first = next(iter(found.items()))
    for name, t in found.items():
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}"
            )


# --------------------------------------------------------------------------- layout

def last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    # Kernels load rows with vector loads; a size-1 last dim has no stride to speak of.
    if t.dim() >= 1 and t.shape[-1] != 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride(-1) == 1), "
            f"got strides {strides(t)} for shape {shape(t)}"
        )


def contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {strides(t)} for shape {shape(t)}")


# --------------------------------------------------------------------------- shapes

def ndim(t: torch.Tensor, name: str, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must have shape {layout} ({n}-D), got shape {shape(t)}")


def dim_eq(t: torch.Tensor, name: str, dim: int, expected: Any, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} must have {what} {int(expected)}, got shape {shape(t)}")


def exact_shape(t: torch.Tensor, name: str, expected: Sequence[Any]) -> None:
    want = tuple(int(s) for s in expected)
    if shape(t) != want:
        raise ValueError(f"{name} must have shape {want}, got shape {shape(t)}")


def vector(t: torch.Tensor, name: str, length: Any, what: str) -> None:
    """A 1-D tensor of ``length`` entries ([what])."""
    ndim(t, name, 1, f"[{what}]")
    dim_eq(t, name, 0, length, "length")


# --------------------------------------------------------------------------- values

def at_least(x: Any, name: str, minimum: int) -> None:
    """ValueError unless the int ``x`` is >= minimum (SymInts are not compared:
    that would put a guard on the traced graph)."""
    if not isinstance(x, torch.SymInt) and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def positive_finite(x: Any, name: str) -> None:
    if not isinstance(x, torch.SymFloat) and not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite positive float, got {x!r}")


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync: a CPU tensor outside
    torch.compile tracing. Values of device tensors are never read by validation, so
    calls stay asynchronous and capturable in a CUDA graph."""
    return t.device.type == "cpu" and not is_compiling()


def cu_seqlens_values(cu: torch.Tensor, name: str, rows: int, rows_of: str) -> Optional[List[int]]:
    """Values of a cumulative sequence-length vector when readable without a sync
    (see host_readable): start 0, non-decreasing, end at most at ``rows`` (the
    number of rows of ``rows_of``). Returns the values, or None when not read."""
    if not host_readable(cu):
        return None
    values = [int(v) for v in cu.tolist()]
    if values[0] != 0:
        raise ValueError(f"{name} must start with 0, got {values[0]} (values {_head(values)})")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise ValueError(
                f"{name} must be non-decreasing, got {values[i]} then {values[i + 1]} at index {i} "
                f"(values {_head(values)})"
            )
    if values[-1] > rows:
        raise ValueError(
            f"{name} must end at most at {int(rows)} (the rows of {rows_of}), got {values[-1]}"
        )
    return values


def _head(values: List[int], n: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"
