"""``get_mla_metadata`` and ``flash_mla_with_kvcache``: the decode entry, which
routes a call to its family, dense decode (``indices is None``,
flash_mla.dense_decode) or sparse decode (flash_mla.sparse_decode).

It checks only its own two arguments, which belong to neither family
(``tile_scheduler_metadata`` and ``num_splits``); each family validates the rest,
records or checks the schedule holder's configuration (flash_mla.sched_meta) and
runs. Choices the upstream API leaves open, made here:

- ``tile_scheduler_metadata`` on the reference path records the configuration
  only: its ``tile_scheduler_metadata``/``num_splits`` fields stay None.
- ``softmax_scale`` None means ``q.shape[-1] ** -0.5`` (576 ** -0.5 for the V32
  cache also in sparse mode).
- ``kv_format`` / ``extra_kv_format`` (trailing keywords of the newer generation's
  serving forks) name the sparse caches' formats; dense decode has no format and
  refuses a non-None one here, before its own validation.
- With ``indices``, a byte cache is FP8 whatever ``is_fp8_kvcache`` says (the newer
  generation defaults the flag to True; ours keeps False for dense decode).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import dense_decode, sparse_decode
from .sched_meta import FlashMLASchedMeta, check_sched_meta_type

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]


def get_mla_metadata(*args: Any, **kwargs: Any) -> Tuple[FlashMLASchedMeta, None]:
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
    enable_batch_invariant: bool = False,
    kv_format: Optional[str] = None,
    extra_kv_format: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged KV cache: dense (``indices is None``) or sparse FP8.

    Dense: q [b, s_q, h_q, 576] bf16/fp16; k_cache [num_blocks, 64, h_k, 576] same
    dtype (V = k_cache[..., :512]); block_table int32 [b, max_blocks]; cache_seqlens
    int32 [b]; h_q % h_k == 0; causal (s_q > 1) is bottom-right aligned.
    Sparse: causal=False; q bf16 [b, s_q, h_q, d_qk]; k_cache uint8/int8/
    float8_e4m3fn [num_blocks, page_size, 1, bytes_per_token] in ``kv_format``
    ("V32" 656 B d_qk 576; "V32_NO_ROPE" 528 B, "V4" 584 B, "V41" 528 B, "V41_FP4"
    288 B, d_qk 512; None = detected from the last dim: 656 V32, 584 V4, 528 V41,
    288 V41_FP4), FP8 whether or not is_fp8_kvcache is True; indices int32
    [b, s_q, topk] (block * page_size + offset; a negative index or one past the
    cache is invalid and never read); topk_length int32 [b]; attn_sink fp32 [h_q];
    optional extra pool (extra_k_cache in ``extra_kv_format``, same rule,
    extra_indices_in_kvcache, extra_topk_length) joining the same softmax. Each
    pool's format must have q's d_qk. block_table and cache_seqlens are unused and
    may be None.

    ``num_splits`` must be None. ``softmax_scale`` defaults to q.shape[-1] ** -0.5.
    ``enable_batch_invariant=True`` makes each request's out/lse bit-identical
    whatever the batch it is in: its split-KV pieces depend only on its own length.
    ``kv_format`` and ``extra_kv_format`` must be None for dense decode.

    Returns (out [b, s_q, h_q, 512] in q's dtype, lse fp32 [b, h_q, s_q] natural
    log). For sparse decode lse is the transposed view of a contiguous
    [b, s_q, h_q] buffer (as upstream); for dense decode it is contiguous. A row
    with nothing to attend to gives out 0 and lse +inf.
    """
    # A call that repeats the holder's first native one takes the family's repeat path
    # (flash_mla._repeat_call); dense decode's needs the sparse-only arguments all None, as
    # its validation would. block_table and cache_seqlens are not sparse decode's.
    if indices is None:
        record = dense_decode.repeat_record(tile_scheduler_metadata)
        if (record is not None and num_splits is None and attn_sink is None
                and extra_k_cache is None and extra_indices_in_kvcache is None
                and topk_length is None and extra_topk_length is None and kv_format is None
                and extra_kv_format is None):
            result = record(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                            causal, is_fp8_kvcache, enable_batch_invariant)
            if result is not None:
                return result
    else:
        record = sparse_decode.repeat_record(tile_scheduler_metadata)
        if record is not None and num_splits is None:
            result = record(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                            extra_indices_in_kvcache, extra_topk_length, head_dim_v,
                            softmax_scale, causal, is_fp8_kvcache, kv_format, extra_kv_format,
                            enable_batch_invariant)
            if result is not None:
                return result
    check_sched_meta_type(tile_scheduler_metadata)
    if num_splits is not None:
        raise ValueError(
            f"num_splits must be None (the schedule lives in tile_scheduler_metadata), "
            f"got {type(num_splits).__name__}"
        )
    if indices is None:
        for name, value in (("kv_format", kv_format), ("extra_kv_format", extra_kv_format)):
            if value is not None:
                raise ValueError(
                    f"{name} must be None for dense decode (indices None): dense caches have no "
                    f"byte format, got {value!r}"
                )
        return dense_decode.decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
            softmax_scale, causal, is_fp8_kvcache, enable_batch_invariant, attn_sink=attn_sink,
            extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
            topk_length=topk_length, extra_topk_length=extra_topk_length)
    return sparse_decode.decode(
        q, k_cache, indices, topk_length, head_dim_v, tile_scheduler_metadata, softmax_scale,
        causal, is_fp8_kvcache, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, extra_topk_length=extra_topk_length,
        kv_format=kv_format, extra_kv_format=extra_kv_format,
        enable_batch_invariant=enable_batch_invariant)
