"""Public functions, with upstream FlashMLA's names, parameters and defaults.

Every function validates its arguments (flash_mla.validation: TypeError/ValueError
naming the argument), then runs the native kernel when the installed library
serves the call on this device, else the PyTorch reference (flash_mla.dispatch
decides and warns once). Outputs are in q's dtype; LSEs are fp32, natural log.

Choices SPEC.md leaves open, made here:
- Decode and sparse prefill have no native kernel in this version; on a GPU they run
  the reference (with the one-time warning), which is exact fp32 math but slow,
  allocates O(b * s_q * h_q * s_k) temporaries and reads sequence lengths on the
  host, so it is not capturable in a CUDA graph.
- ``tile_scheduler_metadata`` on the reference path records the configuration only:
  ``tile_scheduler_metadata``/``num_splits`` fields stay None (no schedule needed).
- Tensor values (cu_seqlens, cache_seqlens, indices, block_table) are never read on
  the host for validation: that would synchronise and break CUDA-graph capture.
- Dense decode takes bf16/fp16 caches only; ``is_fp8_kvcache=True`` without
  ``indices`` is rejected (the FP8 cache is a sparse-decode format).
- Under torch.compile every op is a torch.library custom op (flash_mla.ops), so
  ``fullgraph=True`` traces; eager calls skip that layer (it costs ~100 us).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops, validation
from .sched_meta import FlashMLASchedMeta, bind_or_check_config, check_sched_meta_type

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """Return ``(FlashMLASchedMeta(), None)``.

    The arguments are ignored; they are accepted so that callers of the older API
    (``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, ...)``) keep working.
    The schedule is computed by the first ``flash_mla_with_kvcache`` call that
    receives the holder; later calls must have the same configuration.
    """
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged KV cache: dense (``indices is None``) or sparse FP8.

    Dense: q [b, s_q, h_q, 576] bf16/fp16; k_cache [num_blocks, 64, h_k, 576] same
    dtype (V = k_cache[..., :512]); block_table int32 [b, max_blocks]; cache_seqlens
    int32 [b]; h_q % h_k == 0; causal (s_q > 1) is bottom-right aligned.
    Sparse: is_fp8_kvcache=True, causal=False; q bf16 [b, s_q, h_q, 576 or 512];
    k_cache uint8/int8/float8_e4m3fn [num_blocks, page_size, 1, 656 or 584];
    indices int32 [b, s_q, topk] (block * page_size + offset, -1 invalid);
    topk_length int32 [b]; attn_sink fp32 [h_q]; optional extra pool
    (extra_k_cache, extra_indices_in_kvcache, extra_topk_length) joining the same
    softmax. block_table and cache_seqlens are unused and may be None.

    ``num_splits`` must be None. ``softmax_scale`` defaults to q.shape[-1] ** -0.5
    (576 ** -0.5 for the V3.2 format, also in sparse mode).

    Returns (out [b, s_q, h_q, 512] in q's dtype, lse fp32 [b, h_q, s_q] natural
    log). For sparse decode lse is the transposed view of a contiguous
    [b, s_q, h_q] buffer (as upstream); for dense decode it is contiguous. A row
    with nothing to attend to gives out 0 and lse +inf.
    """
    check_sched_meta_type(tile_scheduler_metadata)
    if num_splits is not None:
        raise ValueError(
            f"num_splits must be None (the schedule lives in tile_scheduler_metadata), "
            f"got {type(num_splits).__name__}"
        )
    if softmax_scale is None and isinstance(q, torch.Tensor):
        softmax_scale = q.shape[-1] ** (-0.5)

    if indices is None:
        sizes = validation.validate_dense_decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
            is_fp8_kvcache, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
            extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
            extra_topk_length=extra_topk_length)
        config = FlashMLASchedMeta.Config(
            sizes.b, sizes.s_q, sizes.h_q, sizes.page_size, sizes.h_k,
            bool(causal), bool(is_fp8_kvcache), None, None, None)
        op = "dense_decode"
    else:
        sizes = validation.validate_sparse_decode(
            q, k_cache, indices, topk_length, head_dim_v, softmax_scale, causal,
            is_fp8_kvcache, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
            extra_indices_in_kvcache=extra_indices_in_kvcache,
            extra_topk_length=extra_topk_length)
        config = FlashMLASchedMeta.Config(
            sizes.b, sizes.s_q, sizes.h_q, sizes.page_size, sizes.h_k,
            bool(causal), bool(is_fp8_kvcache), sizes.topk, sizes.extra_page_size,
            sizes.extra_topk)
        op = "sparse_decode"
    bind_or_check_config(tile_scheduler_metadata, config)

    if op == "dense_decode":
        return ops.dense_decode(q, k_cache, block_table, cache_seqlens, int(head_dim_v),
                                float(softmax_scale), bool(causal))
    return ops.sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                             extra_indices_in_kvcache, extra_topk_length, int(head_dim_v),
                             float(softmax_scale))


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill: each query attends to its own ``topk`` tokens of kv.

    q bf16 [s_q, h_q, d_qk] (d_qk 576 or 512); kv bf16 [s_kv, 1, d_qk]; indices
    int32 [s_q, 1, topk], an index < 0 or >= s_kv is invalid (skipped); topk_length
    int32 [s_q]: only the first topk_length[i] indices of query i count; attn_sink
    fp32 [h_q] scales out by exp(lse) / (exp(lse) + exp(sink)) and leaves lse and
    max_logits unchanged. ``sm_scale`` has no default (as upstream).

    Returns (out bf16 [s_q, h_q, d_v], max_logits fp32 [s_q, h_q], lse fp32
    [s_q, h_q]), natural log; an empty row gives out 0, max_logits -inf, lse +inf.
    """
    validation.validate_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink=attn_sink,
                                       topk_length=topk_length)
    return ops.sparse_prefill(q, kv, indices, float(sm_scale), int(d_v), attn_sink, topk_length)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_qo: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MHA prefill over packed variable-length sequences, with autograd.

    q [total_q, h_q, d_qk], k [total_k, h_k, d_qk], v [total_k, h_k, d_v], bf16 (fp16
    also accepted), last dim contiguous; (d_qk, d_v) in {(64, 64), (128, 128),
    (192, 128)}; h_q % h_k == 0 (GQA/MQA, forward and backward). Sequence i covers
    rows [cu_seqlens_qo[i], cu_seqlens_qo[i+1]) of q and [cu_seqlens_kv[i],
    cu_seqlens_kv[i+1]) of k/v (int32, same length); zero-length sequences are
    allowed. Causal is bottom-right aligned per sequence.

    ``dropout_p`` must be 0. ``softmax_scale`` defaults to d_qk ** -0.5.
    ``deterministic``: out, lse, dk and dv are bit-identical across runs either way;
    dq is summed over key blocks with fp32 atomics, so by default its last bits can
    differ between runs. ``deterministic=True`` makes dq bit-identical too: the key
    blocks add into each query block's dq in a fixed order (the 8-warp backward CTA,
    taking turns through counters in the workspace), at about 0.6x the default
    backward's speed on an H100 (docs/mha_bwd.md). Upstream rejected True;
    flash-attn's meaning is kept.
    ``is_varlen`` is passed to the native kernel; cu_seqlens are read either way.
    ``max_seqlen_*`` are upper bounds for the native grid; they are not checked
    against cu_seqlens (that would need a host sync).

    Returns (out [total_q, h_q, d_v] in q's dtype, lse fp32 [total_q, h_q] with
    stride(0) == 1, natural log; +inf for a row that sees no key). Backward
    computes dq, dk, dv; the gradient of lse is ignored.
    """
    sizes = validation.validate_mha_prefill(
        q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv, dropout_p,
        softmax_scale, causal, deterministic, is_varlen)
    if softmax_scale is None:
        softmax_scale = sizes.d_qk ** (-0.5)
    return ops.mha_prefill(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
                           softmax_scale, causal, is_varlen, deterministic)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn_varlen_func`` on one packed tensor qkv [total, h, 2 * d_qk + d_v]:
    q = qkv[..., :d_qk], k = qkv[..., d_qk:2 * d_qk], v = the rest (views, no copy;
    gradients flow back into qkv). q and k/v share cu_seqlens, max_seqlen and h."""
    validation.validate_packed_split(qkv, "qkv", head_dim_qk, 2)
    q = qkv[:, :, :head_dim_qk]
    k = qkv[:, :, head_dim_qk:2 * head_dim_qk]
    v = qkv[:, :, 2 * head_dim_qk:]
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic, is_varlen=is_varlen)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_qo: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn_varlen_func`` with k and v packed in kv [total_k, h_k, d_qk + d_v]:
    k = kv[..., :d_qk], v = kv[..., d_qk:] (views; gradients flow back into kv)."""
    validation.validate_packed_split(kv, "kv", head_dim_qk, 1)
    k = kv[:, :, :head_dim_qk]
    v = kv[:, :, head_dim_qk:]
    return flash_attn_varlen_func(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo,
                                  max_seqlen_kv, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                  causal=causal, deterministic=deterministic, is_varlen=is_varlen)
