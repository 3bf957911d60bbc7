"""The repeat-call path of ``flash_mla_with_kvcache``: what lets a decode call that
repeats the holder's first one skip the Python work that cannot change its outcome.

A serving engine calls decode once per layer per step with one FlashMLASchedMeta
holder: the same shapes, strides, dtypes, device and scalar arguments every time,
only the data differs. The first call that runs natively is validated in full; the
family then stores a record in the holder (``RECORD_ATTR``) with that call's
layout key (``layout_key``), its scalar arguments and what it resolved (schedule,
buffer shapes, the native function). A later call whose key and scalars compare
equal, under the same ``FLASH_MLA_BACKEND`` value and outside torch.compile
tracing, goes straight to the native entry, which checks every tensor again in
C++. Dense decode lets the library compare the layouts too (dense_decode_fwd_repeat
returns None on a difference), which is cheaper than building the key here. Anything that differs takes the full path, so every error a full call raises,
the same call raises on a repeat, with the same message. The measurement behind it
is in docs/dense_decode.md ("Host time of an eager call").
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch

from . import dispatch as _dispatch
from .dispatch import ENV_VAR

# The holder attribute where a family stores the record of its first native call.
RECORD_ATTR = "_repeat_record"

_Tensor = torch.Tensor


def layout_key(*tensors: Any) -> Optional[Tuple[Any, ...]]:
    """(shape, strides, dtype, device) of each tensor, flattened (a None argument, an
    optional tensor left out, adds one None), or None when an argument is neither None nor
    exactly a torch.Tensor (subclasses and fakes always take the full path). Data pointers
    are not part of it: the checks that read one (a cache's alignment) are redone per
    call."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif type(t) is _Tensor:
            key += (t.shape, t.stride(), t.dtype, t.device)
        else:
            return None
    return tuple(key)


class Record:
    """What every family's record keeps of the holder's first native call: its layout key,
    the scale it was given, enable_batch_invariant, the FLASH_MLA_BACKEND value, the
    dispatch choice to report, the stored schedule and the validated scale."""

    __slots__ = ("key", "scale_arg", "invariant", "backend", "choice", "metadata",
                 "num_splits", "scale")

    def __init__(self, key: Tuple[Any, ...], softmax_scale: Optional[float], invariant: bool,
                 device: Any, scale: float, metadata: Any, num_splits: Any) -> None:
        self.key = key
        self.scale_arg = softmax_scale
        self.invariant = invariant
        self.backend = backend_env()
        self.choice = (_dispatch.NATIVE, str(device))
        self.metadata = metadata
        self.num_splits = num_splits
        self.scale = scale

    def same_scale(self, softmax_scale: Any) -> bool:
        """Whether a call's softmax_scale is the recorded one: the same object, or an equal
        float (an int or other real type takes the full path)."""
        return softmax_scale is self.scale_arg or (type(softmax_scale) is float
                                                   and softmax_scale == self.scale_arg)


def record_of(holder: Any, record_type: type) -> Any:
    """The holder's record if it is of ``record_type`` (the family asking), else None (no
    native call yet, or another family's record)."""
    record = getattr(holder, RECORD_ATTR, None)
    return record if type(record) is record_type else None


def _environ_key(name: str) -> Any:
    """``name`` as os.environ stores it internally (CPython's os._Environ encodes keys;
    on Windows it also upper-cases them), or None where os.environ has no such method."""
    encode = getattr(os.environ, "encodekey", None)
    return encode(name) if encode is not None else None


_ENV_KEY = _environ_key(ENV_VAR)


def backend_env() -> Any:
    """The raw FLASH_MLA_BACKEND value a record was made under, read per call (a changed
    value must reach the dispatch again). It reads os.environ's own mapping, which every
    os.environ assignment updates: os.environ.get costs about 0.6 us more per call,
    because it encodes the key and decodes the value each time. Only equality with the
    recorded value matters, so the raw stored value (bytes on POSIX) is returned; a
    replaced os.environ without that mapping takes os.environ.get."""
    try:
        return os.environ._data.get(_ENV_KEY)  # type: ignore[attr-defined]
    except AttributeError:
        return os.environ.get(ENV_VAR)
