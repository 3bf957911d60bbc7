"""Low-level compatibility module: ``flash_mla.cuda`` as upstream FlashMLA's compiled
extension exposed it, for scripts that call it directly.

Two functions, with upstream's positional signatures, writing into preallocated
outputs and returning None:

    dense_prefill_fwd(workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
                      mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv,
                      is_varlen)
    dense_prefill_bwd(workspace, dout, q, k, v, out, lse, cu_seqlens_q,
                      cu_seqlens_kv, dq, dk, dv, mask_mode_code, softmax_scale,
                      max_seqlen_q, max_seqlen_kv, is_varlen)

Both belong to the dense MHA prefill family (flash_mla.mha_prefill), which
validates them (messages use the names above) and runs them.

Conventions: mask_mode_code 0 = none, 1 = causal (bottom-right aligned per
sequence); lse is the fp32 [total_q, h_q] view with stride(0) == 1 (the transpose
of a contiguous [h_q, total_q] buffer), natural log; out/dq/dk/dv in q's dtype.
Choices the upstream API leaves open, made here:

- ``workspace``: a contiguous uint8 tensor on q's device. Upstream sized it with its
  own formula (32 MiB for the forward); our kernels need what the library's
  ``dense_prefill_{fwd,bwd}_workspace_bytes`` says. When the given workspace is
  smaller, a large-enough one is allocated for this call (through torch's caching
  allocator, on the current stream) instead of failing, so upstream-sized buffers
  keep working. The reference backend needs no workspace and ignores it.
- ``is_varlen``: passed to the native kernel; both backends read cu_seqlens in every
  case (False does not switch to a fixed-length layout).
- ``max_seqlen_*``: upper bounds used to size the native grid; the reference ignores
  them. Values of cu_seqlens on a GPU are not validated (that would need a host sync).
- Backend: native when the library serves the call (see flash_mla.dispatch), else
  the PyTorch reference (fp32 math), whose results are copied into the outputs.
"""
from __future__ import annotations

from typing import Any

from . import mha_prefill as _family

__all__ = ["dense_prefill_fwd", "dense_prefill_bwd"]


def dense_prefill_fwd(workspace: Any, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any,
                      out: Any, lse: Any, mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
                      max_seqlen_kv: Any, is_varlen: Any) -> None:
    """Dense MHA prefill forward into ``out`` [total_q, h_q, d_v] and ``lse`` (the
    [total_q, h_q] transpose view of a contiguous fp32 [h_q, total_q] buffer).
    See the module docstring for workspace and is_varlen."""
    _family.dense_prefill_fwd(workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
                              mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)


def dense_prefill_bwd(workspace: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
                      cu_seqlens_q: Any, cu_seqlens_kv: Any, dq: Any, dk: Any, dv: Any,
                      mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
                      max_seqlen_kv: Any, is_varlen: Any) -> None:
    """Dense MHA prefill backward into ``dq``, ``dk``, ``dv`` (q's dtype), from the
    forward's ``out`` and ``lse``. GQA (h_q a multiple of h_k) is supported: dk/dv
    sum over the query heads sharing a kv head. See the module docstring."""
    _family.dense_prefill_bwd(workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv,
                              dq, dk, dv, mask_mode_code, softmax_scale, max_seqlen_q,
                              max_seqlen_kv, is_varlen)
