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

Conventions (SPEC.md): mask_mode_code 0 = none, 1 = causal (bottom-right aligned
per sequence); lse is the fp32 [total_q, h_q] view with stride(0) == 1, natural log;
out/dq/dk/dv in q's dtype. Choices SPEC leaves open, made here:

- ``workspace``: a contiguous uint8 tensor on q's device. Upstream sized it with its
  own formula (32 MiB for the forward); our kernels need what the library's
  ``dense_prefill_{fwd,bwd}_workspace_bytes`` says. When the given workspace is
  smaller, a large-enough one is allocated for this call (through torch's caching
  allocator, on the current stream) instead of failing, so upstream-sized buffers
  keep working. The reference backend needs no workspace and ignores it.
- ``is_varlen``: passed to the native kernel; both backends read cu_seqlens in every
  case (False does not switch to a fixed-length layout).
- ``max_seqlen_*``: upper bounds used to size the native grid; the reference ignores
  them. Values of cu_seqlens are not validated (that would need a host sync).
- Backend: native when the library serves the call (see flash_mla.dispatch), else
  the PyTorch reference (fp32 math), whose results are copied into the outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import _native, dispatch, validation

__all__ = ["dense_prefill_fwd", "dense_prefill_bwd"]

_DTYPE_FEATURE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _features(q: torch.Tensor, d_qk: int, d_v: int) -> dict:
    return {"dtype": _DTYPE_FEATURE.get(q.dtype, str(q.dtype)), "head_dims": [int(d_qk), int(d_v)]}


# Native functions by name, and workspace sizes by problem size: both are fixed for
# the process, and looking them up costs microseconds per call. The caches belong to
# the loader function they were filled from; a replaced loader (tests) empties them.
_functions: Dict[str, Callable] = {}
_workspace_bytes: Dict[Tuple[str, Tuple[int, ...]], int] = {}
_cache_owner: list = [None]
_WORKSPACE_CACHE_LIMIT = 4096


def _sync_caches() -> None:
    if _cache_owner[0] is not _native.function:
        _functions.clear()
        _workspace_bytes.clear()
        _cache_owner[0] = _native.function


def _function(name: str) -> Callable:
    _sync_caches()
    fn = _functions.get(name)
    if fn is None:
        fn = _functions[name] = _native.function(name)
    return fn


def _needed_bytes(name: str, dims: Tuple[int, ...]) -> int:
    _sync_caches()
    needed = _workspace_bytes.get((name, dims))
    if needed is None:
        if len(_workspace_bytes) >= _WORKSPACE_CACHE_LIMIT:
            _workspace_bytes.clear()  # varlen training sees many sizes; stay bounded
        needed = _workspace_bytes[(name, dims)] = int(_function(name)(*dims))
    return needed


def _workspace_for(workspace: Optional[torch.Tensor], needed: int, device: torch.device) -> torch.Tensor:
    if workspace is not None and workspace.numel() >= needed:
        return workspace
    # Never hand the kernel a zero-byte buffer (its pointer may be null).
    return torch.empty(max(int(needed), 1), dtype=torch.uint8, device=device)


def _reference():
    # Imported lazily: the reference module is only needed on the fallback path.
    from . import reference
    return reference


def run_fwd_into(workspace: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, causal: bool, softmax_scale: float, max_seqlen_q: int,
                 max_seqlen_kv: int, is_varlen: bool) -> str:
    """Forward into validated, preallocated out/lse. Returns the backend used."""
    total_q, h_q, d_qk = q.shape
    total_k, h_k, d_v = v.shape
    backend = dispatch.choose("dense_prefill_fwd", q.device, _features(q, d_qk, d_v))
    if backend == dispatch.NATIVE:
        dims = (int(cu_seqlens_q.shape[0]) - 1, int(total_q), int(total_k), int(h_q), int(h_k),
                int(d_qk), int(d_v))
        ws = _workspace_for(workspace, _needed_bytes("dense_prefill_fwd_workspace_bytes", dims),
                            q.device)
        _function("dense_prefill_fwd")(
            ws, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, 1 if causal else 0,
            float(softmax_scale), int(max_seqlen_q), int(max_seqlen_kv), bool(is_varlen))
        return backend
    ref_out, ref_lse = _reference().mha_prefill_fwd(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_kv,
        softmax_scale=float(softmax_scale), causal=bool(causal))
    out.copy_(ref_out)
    lse.copy_(ref_lse)
    return backend


def run_bwd_into(workspace: Optional[torch.Tensor], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_kv: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                 causal: bool, softmax_scale: float, max_seqlen_q: int, max_seqlen_kv: int,
                 is_varlen: bool, deterministic: bool = False) -> str:
    """Backward into validated, preallocated dq/dk/dv. Returns the backend used.
    deterministic: the native kernel that adds dq in key-block order (bit-identical dq;
    the reference is deterministic anyway)."""
    total_q, h_q, d_qk = q.shape
    total_k, h_k, d_v = v.shape
    backend = dispatch.choose("dense_prefill_bwd", q.device, _features(q, d_qk, d_v))
    if backend == dispatch.NATIVE:
        dims = (int(cu_seqlens_q.shape[0]) - 1, int(total_q), int(total_k), int(h_q), int(h_k),
                int(d_qk), int(d_v))
        ws = _workspace_for(workspace, _needed_bytes("dense_prefill_bwd_workspace_bytes", dims),
                            q.device)
        name = "dense_prefill_bwd_deterministic" if deterministic else "dense_prefill_bwd"
        _function(name)(
            ws, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
            1 if causal else 0, float(softmax_scale), int(max_seqlen_q), int(max_seqlen_kv),
            bool(is_varlen))
        return backend
    ref_dq, ref_dk, ref_dv = _reference().mha_prefill_bwd(
        dout=dout, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_kv, softmax_scale=float(softmax_scale), causal=bool(causal))
    dq.copy_(ref_dq)
    dk.copy_(ref_dk)
    dv.copy_(ref_dv)
    return backend


def dense_prefill_fwd(workspace: Any, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any,
                      out: Any, lse: Any, mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
                      max_seqlen_kv: Any, is_varlen: Any) -> None:
    """Dense MHA prefill forward into ``out`` [total_q, h_q, d_v] and ``lse`` (the
    [total_q, h_q] transpose view of a contiguous fp32 [h_q, total_q] buffer).
    See the module docstring for workspace and is_varlen."""
    validation.validate_dense_prefill_fwd(
        workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, mask_mode_code,
        softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)
    run_fwd_into(workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
                 mask_mode_code == 1, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)


def dense_prefill_bwd(workspace: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
                      cu_seqlens_q: Any, cu_seqlens_kv: Any, dq: Any, dk: Any, dv: Any,
                      mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
                      max_seqlen_kv: Any, is_varlen: Any) -> None:
    """Dense MHA prefill backward into ``dq``, ``dk``, ``dv`` (q's dtype), from the
    forward's ``out`` and ``lse``. GQA (h_q a multiple of h_k) is supported: dk/dv
    sum over the query heads sharing a kv head. See the module docstring."""
    validation.validate_dense_prefill_bwd(
        workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
        mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)
    run_bwd_into(workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
                 mask_mode_code == 1, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)
