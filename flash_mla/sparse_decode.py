"""Sparse MLA decode: ``flash_mla_with_kvcache`` with ``indices``, over an FP8 cache.

The family in one module: its validation (one function, fixed order), its
dispatch (native kernel or the PyTorch reference, through flash_mla.dispatch), the
``flash_mla::sparse_decode`` custom op that torch.compile traces, and ``decode``,
which flash_mla.with_kvcache calls for a call with indices.

Contract: q bf16 [b, s_q, h_q, d_qk]; the cache format follows from d_qk (see
flash_mla.quant): 576 -> V3.2, 656 bytes per token; 512 -> V4 (MODEL1), 584 bytes.
k_cache uint8/int8/float8_e4m3fn [num_blocks, page_size, 1, bytes_per_token], any
page size, tokens of a page back to back (stride(1) == bytes_per_token). indices
int32 [b, s_q, topk], value block * page_size + offset; a negative index or one
past the cache is invalid and never read, so index values need no check (and none
is made: that would need a device sync). topk_length int32 [b]: only the first
topk_length[i] indices count. attn_sink fp32 [h_q]. An optional extra pool
(extra_k_cache, extra_indices_in_kvcache [b, s_q, extra_topk], extra_topk_length
[b]) joins the same softmax. is_fp8_kvcache True, causal False, head_dim_v 512.
Returns out [b, s_q, h_q, 512] bf16 and lse fp32 [b, h_q, s_q], the transposed
view of a contiguous [b, s_q, h_q] buffer (as upstream).

Native binding point: ``_run_native`` beside ``_run_reference``; this version has
no sparse decode kernel, so every call runs the reference (the dispatch says so).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import _checks as C
from . import _custom_op
from . import dispatch as _dispatch
from . import quant
from .sched_meta import FlashMLASchedMeta, bind_or_check_config

OP = "sparse_decode"

HEAD_DIM_V = 512
# d_qk -> (format name, bytes per token); the byte layouts live in flash_mla.quant.
FORMATS = {
    quant.V32_D_QK: ("V3.2", quant.V32_BYTES_PER_TOKEN),
    quant.MODEL1_D_QK: ("V4", quant.MODEL1_BYTES_PER_TOKEN),
}
CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
Q_DTYPES = (torch.bfloat16,)

_OPTIONAL = ("topk_length", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
             "extra_topk_length")


class Problem(NamedTuple):
    """Sizes derived by validation (a NamedTuple, so torch.compile traces it)."""
    b: int
    s_q: int
    h_q: int
    page_size: int
    topk: int
    extra_page_size: Optional[int]
    extra_topk: Optional[int]
    softmax_scale: float


# --------------------------------------------------------------------------- validation

def _cache_shape(t: torch.Tensor, name: str, d_qk: int) -> None:
    """[num_blocks, page_size, 1, bytes_per_token] with tokens of a page back to back."""
    fmt, bpt = FORMATS[d_qk]
    C.ndim(t, name, 4, f"[num_blocks, page_size, 1, {bpt}]")
    if t.shape[3] != bpt:
        raise ValueError(
            f"{name} must have {bpt} bytes per token (last dim) for q's head dim {d_qk} "
            f"({fmt} format), got shape {C.shape(t)}"
        )
    C.dim_eq(t, name, 2, 1, "kv heads (dim 2) equal to")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have page size (dim 1) >= 1, got shape {C.shape(t)}")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != bpt:
        raise ValueError(
            f"{name} must have stride(1) == {bpt} (tokens of a page back to back), "
            f"got strides {C.strides(t)} for shape {C.shape(t)}"
        )


def _batch_indices(t: torch.Tensor, name: str, b: int, s_q: int, topk: str) -> None:
    C.ndim(t, name, 3, f"[b, s_q, {topk}]")
    if C.shape(t)[:2] != (int(b), int(s_q)):
        raise ValueError(
            f"{name} must have shape [b, s_q, {topk}] = [{int(b)}, {int(s_q)}, {topk}] matching q, "
            f"got shape {C.shape(t)}"
        )


def validate(q: Any, k_cache: Any, indices: Any, topk_length: Any, head_dim_v: Any,
             softmax_scale: Any, causal: Any, is_fp8_kvcache: Any, attn_sink: Any = None,
             extra_k_cache: Any = None, extra_indices_in_kvcache: Any = None,
             extra_topk_length: Any = None) -> Problem:
    """All checks of a sparse decode call, in order: which arguments go together,
    Python types, dtypes, devices, layout, shapes, values (Python scalars only).
    block_table and cache_seqlens are unused by sparse decode and not checked."""
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        given, missing = (("extra_k_cache", "extra_indices_in_kvcache") if extra_k_cache is not None
                          else ("extra_indices_in_kvcache", "extra_k_cache"))
        raise ValueError(f"{missing} must be given together with {given}, got None")
    if extra_topk_length is not None and extra_k_cache is None:
        raise ValueError(
            "extra_topk_length must be None when extra_k_cache is None, "
            f"got {type(extra_topk_length).__name__}"
        )
    found = C.tensors(
        [("q", q), ("k_cache", k_cache), ("indices", indices), ("topk_length", topk_length),
         ("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
         ("extra_indices_in_kvcache", extra_indices_in_kvcache),
         ("extra_topk_length", extra_topk_length)],
        optional=_OPTIONAL)
    C.integer(head_dim_v, "head_dim_v")
    C.real(softmax_scale, "softmax_scale", optional=True)
    C.boolean(is_fp8_kvcache, "is_fp8_kvcache")
    C.boolean(causal, "causal")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True for sparse decode (indices given), got False")
    if causal:
        raise ValueError("causal must be False for sparse decode (indices given), got True")

    C.dtype(q, "q", Q_DTYPES)
    C.dtype(k_cache, "k_cache", CACHE_DTYPES)
    C.dtype(indices, "indices", (torch.int32,))
    if extra_k_cache is not None:
        C.dtype(extra_k_cache, "extra_k_cache", CACHE_DTYPES)
        C.dtype(extra_indices_in_kvcache, "extra_indices_in_kvcache", (torch.int32,))
    for name, t in (("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
        if t is not None:
            C.dtype(t, name, (torch.int32,))
    if attn_sink is not None:
        C.dtype(attn_sink, "attn_sink", (torch.float32,))
    C.same_device(found)

    for name, t in found.items():
        C.last_dim_contiguous(t, name)

    C.ndim(q, "q", 4, "[b, s_q, h_q, d_qk]")
    b, s_q, h_q, d_qk = q.shape
    if d_qk not in FORMATS:
        raise ValueError(
            f"q must have head dim (last dim) 576 (V3.2 cache) or 512 (V4 cache), "
            f"got shape {C.shape(q)}"
        )
    _cache_shape(k_cache, "k_cache", d_qk)
    _batch_indices(indices, "indices", b, s_q, "topk")
    if topk_length is not None:
        C.vector(topk_length, "topk_length", b, "b")
    if attn_sink is not None:
        C.vector(attn_sink, "attn_sink", h_q, "h_q")
    extra_topk = extra_page_size = None
    if extra_k_cache is not None:
        _cache_shape(extra_k_cache, "extra_k_cache", d_qk)
        _batch_indices(extra_indices_in_kvcache, "extra_indices_in_kvcache", b, s_q, "extra_topk")
        extra_topk = int(extra_indices_in_kvcache.shape[2])
        extra_page_size = int(extra_k_cache.shape[1])
    if extra_topk_length is not None:
        C.vector(extra_topk_length, "extra_topk_length", b, "b")

    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    C.positive_finite(softmax_scale, "softmax_scale")
    return Problem(b=int(b), s_q=int(s_q), h_q=int(h_q), page_size=int(k_cache.shape[1]),
                   topk=int(indices.shape[2]),
                   extra_page_size=extra_page_size, extra_topk=extra_topk,
                   softmax_scale=float(softmax_scale))


# --------------------------------------------------------------------------- dispatch

def _features(q: torch.Tensor) -> dict:
    """What the dispatch asks the library about (keys of build_info()["ops"][OP])."""
    return {"dtype": "bf16", "d_qk": int(q.shape[-1])}


def _run_native(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                extra_topk_length, head_dim_v, softmax_scale):
    """The native kernel (none in this version; the dispatch never picks it)."""
    raise NotImplementedError("flash_mla has no native sparse decode kernel in this version")


def _run_reference(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                   extra_topk_length, head_dim_v, softmax_scale):
    from . import reference  # imported on the fallback path only

    out, lse = reference.sparse_decode(
        q=q, k_cache=k_cache, indices=indices, topk_length=topk_length,
        softmax_scale=softmax_scale, d_v=head_dim_v, attn_sink=attn_sink,
        extra_k_cache=extra_k_cache, extra_indices=extra_indices,
        extra_topk_length=extra_topk_length)
    return out.to(q.dtype), lse.contiguous().transpose(1, 2)


def _body(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
          topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
          extra_k_cache: Optional[torch.Tensor], extra_indices: Optional[torch.Tensor],
          extra_topk_length: Optional[torch.Tensor], head_dim_v: int,
          softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode on validated inputs: (out [b, s_q, h_q, head_dim_v] in q's dtype,
    lse fp32 [b, h_q, s_q] as the transposed view of a contiguous [b, s_q, h_q] buffer)."""
    backend = _dispatch.choose(OP, q.device, _features(q))
    run = _run_native if backend == _dispatch.NATIVE else _run_reference
    return run(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
               extra_topk_length, head_dim_v, softmax_scale)


def _fake(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
          extra_topk_length, head_dim_v, softmax_scale):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty((b, s_q, h_q, head_dim_v)),
            torch.empty((b, s_q, h_q), dtype=torch.float32, device=q.device).transpose(1, 2))


_op = _custom_op.define(
    OP,
    "(Tensor q, Tensor k_cache, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
    "Tensor? extra_k_cache, Tensor? extra_indices, Tensor? extra_topk_length, int head_dim_v, "
    "float softmax_scale) -> (Tensor, Tensor)",
    _body, _fake)


# --------------------------------------------------------------------------- entry

def decode(q: Any, k_cache: Any, indices: Any, topk_length: Any, head_dim_v: Any,
           tile_scheduler_metadata: FlashMLASchedMeta, softmax_scale: Any, causal: Any,
           is_fp8_kvcache: Any, attn_sink: Any = None, extra_k_cache: Any = None,
           extra_indices_in_kvcache: Any = None,
           extra_topk_length: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` with indices (see flash_mla.with_kvcache): validate,
    record or check the schedule holder's configuration, run."""
    p = validate(q, k_cache, indices, topk_length, head_dim_v, softmax_scale, causal,
                 is_fp8_kvcache, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
                 extra_indices_in_kvcache=extra_indices_in_kvcache,
                 extra_topk_length=extra_topk_length)
    config = FlashMLASchedMeta.Config(p.b, p.s_q, p.h_q, p.page_size, 1, bool(causal),
                                      bool(is_fp8_kvcache), p.topk, p.extra_page_size,
                                      p.extra_topk)
    bind_or_check_config(tile_scheduler_metadata, config)
    return _op(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
               extra_indices_in_kvcache, extra_topk_length, int(head_dim_v), p.softmax_scale)
