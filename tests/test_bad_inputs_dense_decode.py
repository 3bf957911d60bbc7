"""Bad inputs of dense MLA decode (flash_mla_with_kvcache without indices): each row
changes one argument of a valid call and names the exception and the whole message
(tests/_bad_inputs.py explains the harness)."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

import flash_mla
from flash_mla import FlashMLASchedMeta

from tests._bad_inputs import (BF16, FP16, FP32, I32, I64, U8, Case, cast, check_case, check_table,
                          const, ints, on_meta, setitem, strided_last)

ROUTER = "with_kvcache.flash_mla_with_kvcache|sched_meta.check_sched_meta_type"


def dense_args() -> Dict[str, Any]:
    # b 2, s_q 1, h_q 4, h_k 1; 3 pages of 64 tokens; batch 0 reads page 0, batch 1 pages 1, 2
    return dict(q=torch.randn(2, 1, 4, 576).to(BF16), k_cache=torch.randn(3, 64, 1, 576).to(BF16),
                block_table=ints([[0, 2], [1, 2]]), cache_seqlens=ints([10, 100]), head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), causal=False)


def _reused_meta(a: Dict[str, Any]) -> FlashMLASchedMeta:
    meta = FlashMLASchedMeta()
    flash_mla.flash_mla_with_kvcache(**{**a, "tile_scheduler_metadata": meta, "causal": True})
    return meta


ENTRIES = {"dense": (dense_args, lambda **kw: flash_mla.flash_mla_with_kvcache(**kw))}

T = "Tensor"
CASES = [
    # arguments dense decode does not take
    Case("sink-given", "dense", "attn_sink", const(torch.zeros(4)), ValueError,
         rf"attn_sink must be None for dense decode \(indices is None\), got {T}"),
    Case("extra-cache-given", "dense", "extra_k_cache", const(torch.zeros(1, 64, 1, 656, dtype=U8)), ValueError,
         rf"extra_k_cache must be None for dense decode \(indices is None\), got {T}"),
    Case("extra-indices-given", "dense", "extra_indices_in_kvcache", const(ints([[[0]], [[0]]])), ValueError,
         rf"extra_indices_in_kvcache must be None for dense decode \(indices is None\), got {T}"),
    Case("topk-length-given", "dense", "topk_length", const(ints([1, 1])), ValueError,
         rf"topk_length must be None for dense decode \(indices is None\), got {T}"),
    Case("extra-topk-length-given", "dense", "extra_topk_length", const(ints([1, 1])), ValueError,
         rf"extra_topk_length must be None for dense decode \(indices is None\), got {T}"),
    Case("block-table-none", "dense", "block_table", const(None), ValueError,
         r"block_table must be a tensor for dense decode \(indices is None\), got None"),
    Case("seqlens-none", "dense", "cache_seqlens", const(None), ValueError,
         r"cache_seqlens must be a tensor for dense decode \(indices is None\), got None"),
    # the router's own arguments
    Case("num-splits", "dense", "num_splits", const(ints([1])), ValueError,
         r"num_splits must be None \(the schedule lives in tile_scheduler_metadata\), got Tensor", ROUTER),
    Case("meta-none", "dense", "tile_scheduler_metadata", const(None), TypeError,
         r"tile_scheduler_metadata must be the FlashMLASchedMeta returned by get_mla_metadata\(\), "
         r"got NoneType", ROUTER),
    Case("meta-reused-other-config", "dense", "tile_scheduler_metadata", _reused_meta, ValueError,
         r"tile_scheduler_metadata was initialised with causal=True \(causal\) but this call has "
         r"causal=False; .*", "sched_meta.bind_or_check_config"),
    # Python types
    Case("q-list", "dense", "q", const([1.0]), TypeError, r"q must be a torch.Tensor, got list"),
    Case("cache-tuple", "dense", "k_cache", const((1, 2)), TypeError, r"k_cache must be a torch.Tensor, got tuple"),
    Case("block-table-list", "dense", "block_table", const([[0], [1]]), TypeError,
         r"block_table must be a torch.Tensor, got list"),
    Case("seqlens-int", "dense", "cache_seqlens", const(10), TypeError,
         r"cache_seqlens must be a torch.Tensor, got int"),
    Case("head-dim-v-str", "dense", "head_dim_v", const("512"), TypeError, r"head_dim_v must be an int, got str '512'"),
    Case("head-dim-v-float", "dense", "head_dim_v", const(512.0), TypeError,
         r"head_dim_v must be an int, got float 512.0"),
    Case("head-dim-v-bool", "dense", "head_dim_v", const(True), TypeError, r"head_dim_v must be an int, got bool True"),
    Case("scale-str", "dense", "softmax_scale", const("0.1"), TypeError,
         r"softmax_scale must be a float or None, got str '0.1'"),
    Case("scale-tensor", "dense", "softmax_scale", const(torch.tensor(0.1)), TypeError,
         r"softmax_scale must be a float or None, got Tensor tensor\(0.1000\)"),
    Case("causal-str", "dense", "causal", const("yes"), TypeError, r"causal must be a bool, got str 'yes'"),
    Case("causal-2", "dense", "causal", const(2), TypeError, r"causal must be a bool, got int 2"),
    Case("fp8-flag-str", "dense", "is_fp8_kvcache", const("no"), TypeError,
         r"is_fp8_kvcache must be a bool, got str 'no'"),
    Case("fp8-flag-true", "dense", "is_fp8_kvcache", const(True), ValueError,
         r"is_fp8_kvcache must be False for dense decode \(indices is None\): the FP8 cache is served "
         r"by sparse decode only, got True"),
    # dtypes
    Case("q-fp32", "dense", "q", cast("q", FP32), TypeError, r"q must have dtype bfloat16 or float16, got float32"),
    Case("q-int8", "dense", "q", cast("q", torch.int8), TypeError, r"q must have dtype bfloat16 or float16, got int8"),
    Case("cache-fp16", "dense", "k_cache", cast("k_cache", FP16), TypeError,
         r"k_cache must have the same dtype as q \(bfloat16\), got float16"),
    Case("cache-uint8", "dense", "k_cache", const(torch.zeros(3, 64, 1, 576, dtype=U8)), TypeError,
         r"k_cache must have the same dtype as q \(bfloat16\), got uint8"),
    Case("block-table-int64", "dense", "block_table", cast("block_table", I64), TypeError,
         r"block_table must have dtype int32, got int64"),
    Case("block-table-float", "dense", "block_table", cast("block_table", FP32), TypeError,
         r"block_table must have dtype int32, got float32"),
    Case("seqlens-int64", "dense", "cache_seqlens", cast("cache_seqlens", I64), TypeError,
         r"cache_seqlens must have dtype int32, got int64"),
    # devices
    Case("cache-device", "dense", "k_cache", on_meta("k_cache"), ValueError,
         r"k_cache must be on the same device as q \(cpu\), got meta"),
    Case("block-table-device", "dense", "block_table", on_meta("block_table"), ValueError,
         r"block_table must be on the same device as q \(cpu\), got meta"),
    Case("seqlens-device", "dense", "cache_seqlens", on_meta("cache_seqlens"), ValueError,
         r"cache_seqlens must be on the same device as q \(cpu\), got meta"),
    # layout
    Case("q-strided", "dense", "q", strided_last("q"), ValueError,
         r"q must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(4608, 4608, 1152, 2\) "
         r"for shape \(2, 1, 4, 576\)"),
    Case("cache-strided", "dense", "k_cache", strided_last("k_cache"), ValueError,
         r"k_cache must have a contiguous last dimension \(stride\(-1\) == 1\), got strides "
         r"\(73728, 1152, 1152, 2\) for shape \(3, 64, 1, 576\)"),
    Case("block-table-strided", "dense", "block_table", strided_last("block_table"), ValueError,
         r"block_table must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(4, 2\) "
         r"for shape \(2, 2\)"),
    # shapes
    Case("q-3d", "dense", "q", const(torch.zeros(2, 4, 576, dtype=BF16)), ValueError,
         r"q must have shape \[b, s_q, h_q, 576\] \(4-D\), got shape \(2, 4, 576\)"),
    Case("q-5d", "dense", "q", const(torch.zeros(2, 1, 1, 4, 576, dtype=BF16)), ValueError,
         r"q must have shape \[b, s_q, h_q, 576\] \(4-D\), got shape \(2, 1, 1, 4, 576\)"),
    Case("cache-3d", "dense", "k_cache", const(torch.zeros(192, 1, 576, dtype=BF16)), ValueError,
         r"k_cache must have shape \[num_blocks, 64, h_k, 576\] \(4-D\), got shape \(192, 1, 576\)"),
    Case("block-table-1d", "dense", "block_table", const(ints([0, 1])), ValueError,
         r"block_table must have shape \[b, max_blocks\] \(2-D\), got shape \(2,\)"),
    Case("q-d512", "dense", "q", const(torch.zeros(2, 1, 4, 512, dtype=BF16)), ValueError,
         r"q must have head dim \(last dim\) 576, got shape \(2, 1, 4, 512\)"),
    Case("page-32", "dense", "k_cache", const(torch.zeros(6, 32, 1, 576, dtype=BF16)), ValueError,
         r"k_cache must have page size 64, got shape \(6, 32, 1, 576\)"),
    Case("cache-d512", "dense", "k_cache", const(torch.zeros(3, 64, 1, 512, dtype=BF16)), ValueError,
         r"k_cache must have head dim \(last dim\) equal to q's 576, got shape \(3, 64, 1, 512\)"),
    Case("heads-3", "dense", "k_cache", const(torch.zeros(3, 64, 3, 576, dtype=BF16)), ValueError,
         r"k_cache heads \(dim 2\) must divide q's 4 heads, got shape \(3, 64, 3, 576\)"),
    Case("heads-0", "dense", "k_cache", const(torch.zeros(3, 64, 0, 576, dtype=BF16)), ValueError,
         r"k_cache heads \(dim 2\) must divide q's 4 heads, got shape \(3, 64, 0, 576\)"),
    Case("block-table-batch", "dense", "block_table", const(ints([[0], [1], [2]])), ValueError,
         r"block_table must have batch size \(dim 0\) equal to q's 2, got shape \(3, 1\)"),
    Case("seqlens-length", "dense", "cache_seqlens", const(ints([1, 2, 3])), ValueError,
         r"cache_seqlens must have length 2, got shape \(3,\)"),
    Case("seqlens-2d", "dense", "cache_seqlens", const(ints([[1, 2]])), ValueError,
         r"cache_seqlens must have shape \[b\] \(1-D\), got shape \(1, 2\)"),
    # values
    Case("head-dim-v-256", "dense", "head_dim_v", const(256), ValueError, r"head_dim_v must be 512, got 256"),
    Case("head-dim-v-576", "dense", "head_dim_v", const(576), ValueError, r"head_dim_v must be 512, got 576"),
    Case("scale-nan", "dense", "softmax_scale", const(float("nan")), ValueError,
         r"softmax_scale must be a finite positive float, got nan"),
    Case("scale-zero", "dense", "softmax_scale", const(0.0), ValueError,
         r"softmax_scale must be a finite positive float, got 0.0"),
    Case("scale-negative", "dense", "softmax_scale", const(-0.04), ValueError,
         r"softmax_scale must be a finite positive float, got -0.04"),
    Case("seqlen-negative", "dense", "cache_seqlens", const(ints([10, -1])), ValueError,
         r"cache_seqlens must be >= 0, got -1 at index 1"),
    Case("table-too-narrow", "dense", "cache_seqlens", const(ints([10, 129])), ValueError,
         r"block_table must have at least 3 columns for cache_seqlens\[1\] = 129 \(pages of 64 tokens\), "
         r"got shape \(2, 2\)"),
    Case("page-past-cache", "dense", "block_table", setitem("block_table", (1, 1), 3), ValueError,
         r"block_table\[1, :2\] must hold pages in \[0, 3\) \(k_cache blocks\), got values in \[1, 3\]"),
    Case("page-negative", "dense", "block_table", setitem("block_table", (0, 0), -1), ValueError,
         r"block_table\[0, :1\] must hold pages in \[0, 3\) \(k_cache blocks\), got values in \[-1, -1\]"),
]


def test_table():
    check_table(CASES, ENTRIES)


def test_valid_baseline_is_accepted():
    build, call = ENTRIES["dense"]
    out, lse = call(**build())
    assert out.shape == (2, 1, 4, 512) and lse.shape == (2, 4, 1)


def test_unread_block_table_entries_are_not_checked():
    # batch 0 has 10 tokens: only its first column is a page it reads
    args = dense_args()
    args["block_table"][0, 1] = -7
    ENTRIES["dense"][1](**args)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    check_case(case, ENTRIES, "dense_decode")
