"""flash_mla: DeepSeek FlashMLA's API (MLA decode, sparse prefill, dense MHA
prefill) on consumer/workstation Blackwell, Hopper and datacenter Blackwell, on
Linux and Windows.

Importing the package is cheap: it neither imports torch nor loads the native
library. The public functions live in ``flash_mla.interface`` and are imported on
first use (PEP 562 module ``__getattr__``); that import registers the torch.library
ops. The native library is loaded on the first call that can use it.
"""
from __future__ import annotations

from typing import Any, List

from ._version import __version__
from .sched_meta import FlashMLASchedMeta

__all__ = [
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "FlashMLASchedMeta",
    "__version__",
]

_LAZY_FUNCTIONS = frozenset(__all__) - {"FlashMLASchedMeta", "__version__"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_FUNCTIONS:
        from . import interface

        value = getattr(interface, name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'flash_mla' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
