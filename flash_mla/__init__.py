"""flash_mla: DeepSeek FlashMLA's API (MLA decode, sparse prefill, dense MHA
prefill) on consumer/workstation Blackwell, Hopper and datacenter Blackwell, on
Linux and Windows.

Importing the package is cheap: it neither imports torch nor loads the native
library. Each public function lives in its op family's module and is imported on
first use (PEP 562 module ``__getattr__``); that import registers the family's
torch.library ops. The native library is loaded on the first call that can use it.

    get_mla_metadata, flash_mla_with_kvcache   flash_mla.with_kvcache, which routes
                                               to flash_mla.dense_decode (no indices)
                                               or flash_mla.sparse_decode (indices)
    flash_mla_sparse_fwd                       flash_mla.sparse_prefill
    flash_attn_varlen_func (+ packed forms)    flash_mla.mha_prefill
    flash_mla.cuda.dense_prefill_fwd/bwd       flash_mla.mha_prefill, via flash_mla.cuda
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

# Public function -> the module that defines it.
_LAZY_FUNCTIONS = {
    "get_mla_metadata": "with_kvcache",
    "flash_mla_with_kvcache": "with_kvcache",
    "flash_mla_sparse_fwd": "sparse_prefill",
    "flash_attn_varlen_func": "mha_prefill",
    "flash_attn_varlen_qkvpacked_func": "mha_prefill",
    "flash_attn_varlen_kvpacked_func": "mha_prefill",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_FUNCTIONS.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'flash_mla' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
