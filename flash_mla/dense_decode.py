"""Dense MLA decode: ``flash_mla_with_kvcache`` without ``indices``.

The family in one module: its validation (one function, fixed order), its
dispatch (native kernel or the PyTorch reference, through flash_mla.dispatch), the
``flash_mla::dense_decode`` custom op that torch.compile traces, and ``decode``,
which flash_mla.with_kvcache calls for a call without indices.

Contract (the API's, not a kernel capability, so named here): q [b, s_q, h_q, 576]
bf16 or fp16; k_cache [num_blocks, 64, h_k, 576] of q's dtype, V being its first 512
dims; block_table int32 [b, max_blocks]; cache_seqlens int32 [b]; h_q % h_k == 0;
head_dim_v 512. Causal (s_q > 1) is bottom-right aligned. Returns out
[b, s_q, h_q, 512] in q's dtype and a contiguous fp32 lse [b, h_q, s_q].

Values of cache_seqlens and block_table are checked only where reading them costs
no device sync (CPU tensors): seqlens >= 0, enough table columns, pages inside the
cache. On a GPU they are the caller's responsibility, as upstream.

Native binding point: ``_run_native`` beside ``_run_reference``. This version has
no dense decode kernel, so ``flash_mla.dispatch`` reports that and every call runs
the reference. Binding one means: implement ``_run_native`` (same arguments and
outputs as ``_run_reference``), add "dense_decode" to the dispatch's bound ops, and
describe the kernel's capabilities under build_info()["ops"]["dense_decode"]
(``_features`` says which keys the dispatch asks about).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import _checks as C
from . import _custom_op
from . import dispatch as _dispatch
from .sched_meta import FlashMLASchedMeta, bind_or_check_config

OP = "dense_decode"

# The API contract of dense decode.
D_QK = 576
HEAD_DIM_V = 512
PAGE_SIZE = 64
DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_FEATURE = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Arguments of flash_mla_with_kvcache that only sparse decode takes.
_SPARSE_ONLY = ("attn_sink", "extra_k_cache", "extra_indices_in_kvcache", "topk_length",
                "extra_topk_length")


class Problem(NamedTuple):
    """Sizes derived by validation (a NamedTuple, so torch.compile traces it)."""
    b: int
    s_q: int
    h_q: int
    h_k: int
    page_size: int
    softmax_scale: float


# --------------------------------------------------------------------------- validation

def validate(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any, head_dim_v: Any,
             softmax_scale: Any, causal: Any, is_fp8_kvcache: Any, **sparse_only: Any) -> Problem:
    """All checks of a dense decode call, in order: arguments this family does not
    take, Python types, dtypes, devices, layout, shapes, values. ``sparse_only``
    holds the sparse-decode arguments by name; each must be None."""
    for name in _SPARSE_ONLY:
        value = sparse_only.get(name)
        if value is not None:
            raise ValueError(
                f"{name} must be None for dense decode (indices is None), got {type(value).__name__}"
            )
    for name, value in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if value is None:
            raise ValueError(f"{name} must be a tensor for dense decode (indices is None), got None")
    found = C.tensors([("q", q), ("k_cache", k_cache), ("block_table", block_table),
                       ("cache_seqlens", cache_seqlens)])
    C.integer(head_dim_v, "head_dim_v")
    C.real(softmax_scale, "softmax_scale", optional=True)
    C.boolean(causal, "causal")
    C.boolean(is_fp8_kvcache, "is_fp8_kvcache")
    if is_fp8_kvcache:
        raise ValueError(
            "is_fp8_kvcache must be False for dense decode (indices is None): the FP8 cache "
            "is served by sparse decode only, got True"
        )

    C.dtype(q, "q", DTYPES)
    C.same_dtype(k_cache, "k_cache", q, "q")
    C.dtype(block_table, "block_table", (torch.int32,))
    C.dtype(cache_seqlens, "cache_seqlens", (torch.int32,))
    C.same_device(found)

    for name, t in found.items():
        C.last_dim_contiguous(t, name)

    C.ndim(q, "q", 4, f"[b, s_q, h_q, {D_QK}]")
    C.ndim(k_cache, "k_cache", 4, f"[num_blocks, {PAGE_SIZE}, h_k, {D_QK}]")
    C.ndim(block_table, "block_table", 2, "[b, max_blocks]")
    b, s_q, h_q, _ = q.shape
    C.dim_eq(q, "q", 3, D_QK, "head dim (last dim)")
    C.dim_eq(k_cache, "k_cache", 1, PAGE_SIZE, "page size")
    C.dim_eq(k_cache, "k_cache", 3, D_QK, "head dim (last dim) equal to q's")
    h_k = k_cache.shape[2]
    if h_k < 1 or h_q % h_k != 0:
        raise ValueError(
            f"k_cache heads (dim 2) must divide q's {int(h_q)} heads, got shape {C.shape(k_cache)}"
        )
    C.dim_eq(block_table, "block_table", 0, b, "batch size (dim 0) equal to q's")
    C.vector(cache_seqlens, "cache_seqlens", b, "b")

    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = D_QK ** -0.5
    C.positive_finite(softmax_scale, "softmax_scale")
    _check_cache_values(k_cache, block_table, cache_seqlens)
    return Problem(b=int(b), s_q=int(s_q), h_q=int(h_q), h_k=int(h_k), page_size=PAGE_SIZE,
                   softmax_scale=float(softmax_scale))


def _check_cache_values(k_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor) -> None:
    """Sequence lengths and the pages they reach, where readable without a sync."""
    if not (C.host_readable(cache_seqlens) and C.host_readable(block_table)):
        return
    num_blocks, columns = int(k_cache.shape[0]), int(block_table.shape[1])
    for i, s_k in enumerate(int(s) for s in cache_seqlens.tolist()):
        if s_k < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {s_k} at index {i}")
        pages = -(-s_k // PAGE_SIZE)
        if pages > columns:
            raise ValueError(
                f"block_table must have at least {pages} columns for cache_seqlens[{i}] = {s_k} "
                f"(pages of {PAGE_SIZE} tokens), got shape {C.shape(block_table)}"
            )
        if pages:
            row = block_table[i, :pages]
            lo, hi = int(row.min()), int(row.max())
            if lo < 0 or hi >= num_blocks:
                raise ValueError(
                    f"block_table[{i}, :{pages}] must hold pages in [0, {num_blocks}) (k_cache "
                    f"blocks), got values in [{lo}, {hi}]"
                )


# --------------------------------------------------------------------------- dispatch

def _features(q: torch.Tensor) -> dict:
    """What the dispatch asks the library about (keys of build_info()["ops"][OP])."""
    return {"dtype": _DTYPE_FEATURE[q.dtype]}


def _run_native(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The native kernel (none in this version; the dispatch never picks it)."""
    raise NotImplementedError("flash_mla has no native dense decode kernel in this version")


def _run_reference(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                   causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import reference  # imported on the fallback path only

    out, lse = reference.dense_decode(
        q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
        head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)
    return out.to(q.dtype), lse.contiguous()


def _body(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
          cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
          causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense decode on validated inputs: (out [b, s_q, h_q, head_dim_v] in q's dtype,
    lse fp32 [b, h_q, s_q] contiguous)."""
    backend = _dispatch.choose(OP, q.device, _features(q))
    run = _run_native if backend == _dispatch.NATIVE else _run_reference
    return run(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


def _fake(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty((b, s_q, h_q, head_dim_v)),
            torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device))


_op = _custom_op.define(
    OP,
    "(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
    "float softmax_scale, bool causal) -> (Tensor, Tensor)",
    _body, _fake)


# --------------------------------------------------------------------------- entry

def decode(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any, head_dim_v: Any,
           tile_scheduler_metadata: FlashMLASchedMeta, softmax_scale: Any, causal: Any,
           is_fp8_kvcache: Any, **sparse_only: Optional[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` without indices (see flash_mla.with_kvcache):
    validate, record or check the schedule holder's configuration, run."""
    p = validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                 is_fp8_kvcache, **sparse_only)
    config = FlashMLASchedMeta.Config(p.b, p.s_q, p.h_q, p.page_size, p.h_k, bool(causal),
                                      False, None, None, None)
    bind_or_check_config(tile_scheduler_metadata, config)
    return _op(q, k_cache, block_table, cache_seqlens, int(head_dim_v), p.softmax_scale,
               bool(causal))
