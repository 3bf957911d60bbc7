"""Bad inputs of sparse MLA decode (flash_mla_with_kvcache with indices): each row
changes one argument of a valid call and names the exception and the whole message
(tests/_bad_inputs.py explains the harness)."""
from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch

import flash_mla
from flash_mla import FlashMLASchedMeta

from tests._bad_inputs import (BF16, FP16, FP32, I32, I64, U8, Case, cast, check_case, check_table,
                               const, ints, on_meta, strided_last)

ROUTER = "with_kvcache.flash_mla_with_kvcache|sched_meta.check_sched_meta_type"


def sparse_args() -> Dict[str, Any]:
    # V3.2 cache (d_qk 576, 656 bytes per token): b 2, s_q 1, h_q 4, topk 8, 2 pages of 64
    return dict(q=torch.randn(2, 1, 4, 576).to(BF16), k_cache=torch.zeros(2, 64, 1, 656, dtype=U8),
                block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), is_fp8_kvcache=True,
                indices=torch.zeros(2, 1, 8, dtype=I32), topk_length=ints([8, 3]))


def extra_args() -> Dict[str, Any]:
    # V4 cache (d_qk 512, 584 bytes per token) with an extra pool and sinks
    return dict(q=torch.randn(2, 1, 4, 512).to(BF16), k_cache=torch.zeros(2, 16, 1, 584, dtype=U8),
                block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), is_fp8_kvcache=True,
                indices=torch.zeros(2, 1, 8, dtype=I32), attn_sink=torch.zeros(4),
                extra_k_cache=torch.zeros(1, 32, 1, 584, dtype=U8),
                extra_indices_in_kvcache=torch.zeros(2, 1, 4, dtype=I32),
                extra_topk_length=ints([4, 0]))


def v41_args() -> Dict[str, Any]:
    # V41 cache (528 bytes, named) with a V41_FP4 extra pool (288 bytes, named): upstream's pairing
    return dict(q=torch.randn(2, 1, 4, 512).to(BF16), k_cache=torch.zeros(3, 2, 1, 528, dtype=U8),
                block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), indices=torch.zeros(2, 1, 8, dtype=I32),
                extra_k_cache=torch.zeros(2, 64, 1, 288, dtype=U8),
                extra_indices_in_kvcache=torch.zeros(2, 1, 4, dtype=I32),
                kv_format="V41", extra_kv_format="V41_FP4")


def dense_args() -> Dict[str, Any]:
    # dense decode (no indices): the router refuses the sparse-only format keywords
    return dict(q=torch.randn(2, 1, 4, 576).to(BF16), k_cache=torch.zeros(1, 64, 1, 576, dtype=BF16),
                block_table=torch.zeros(2, 1, dtype=I32), cache_seqlens=ints([3, 0]), head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta())


def _call(**kw):
    return flash_mla.flash_mla_with_kvcache(**kw)


def _misaligned_start(shape, offset: int) -> Callable[[Dict[str, Any]], Any]:
    """A contiguous byte cache of ``shape`` that starts ``offset`` bytes past an aligned allocation."""
    def make(a: Dict[str, Any]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return torch.zeros(n + 64, dtype=U8)[offset:offset + n].view(*shape)
    return make


def _block_stride(shape, stride0: int) -> Callable[[Dict[str, Any]], Any]:
    """A byte cache of ``shape`` whose blocks lie ``stride0`` bytes apart (pages contiguous)."""
    def make(a: Dict[str, Any]) -> torch.Tensor:
        blocks, per_block = shape[0], shape[1] * shape[2] * shape[3]
        return torch.zeros(blocks, stride0, dtype=U8)[:, :per_block].view(*shape)
    return make


ENTRIES = {"sparse": (sparse_args, _call), "extra": (extra_args, _call), "v41": (v41_args, _call),
           "dense": (dense_args, _call)}
FORMATS_RE = r"'V32', 'V32_NO_ROPE', 'V4', 'V41', 'V41_FP4' or None"
DETECTION_RE = (r"656 \(V32\), 584 \(V4\), 528 \(V41; V32_NO_ROPE has the same size and must be named\) "
                r"or 288 \(V41_FP4\)")
ALIGN_WHY = r"the kernel copies 16-byte chunks; {} format"

CASES = [
    # which arguments go together
    Case("extra-format-alone", "sparse", "extra_kv_format", const("V41_FP4"), ValueError,
         r"extra_kv_format must be None when extra_k_cache is None, got 'V41_FP4'"),
    Case("dense-kv-format", "dense", "kv_format", const("V32"), ValueError,
         r"kv_format must be None for dense decode \(indices None\): dense caches have no byte format, "
         r"got 'V32'", ROUTER),
    Case("dense-extra-kv-format", "dense", "extra_kv_format", const("V41_FP4"), ValueError,
         r"extra_kv_format must be None for dense decode \(indices None\): dense caches have no byte "
         r"format, got 'V41_FP4'", ROUTER),
    Case("causal-true", "sparse", "causal", const(True), ValueError,
         r"causal must be False for sparse decode \(indices given\), got True"),
    Case("extra-cache-alone", "sparse", "extra_k_cache", const(torch.zeros(1, 64, 1, 656, dtype=U8)), ValueError,
         r"extra_indices_in_kvcache must be given together with extra_k_cache, got None"),
    Case("extra-indices-alone", "sparse", "extra_indices_in_kvcache", const(torch.zeros(2, 1, 4, dtype=I32)),
         ValueError, r"extra_k_cache must be given together with extra_indices_in_kvcache, got None"),
    Case("extra-length-alone", "sparse", "extra_topk_length", const(ints([1, 1])), ValueError,
         r"extra_topk_length must be None when extra_k_cache is None, got Tensor"),
    # the router's own arguments
    Case("num-splits", "sparse", "num_splits", const(1), ValueError,
         r"num_splits must be None \(the schedule lives in tile_scheduler_metadata\), got int", ROUTER),
    Case("meta-tuple", "sparse", "tile_scheduler_metadata", const((None, None)), TypeError,
         r"tile_scheduler_metadata must be the FlashMLASchedMeta returned by get_mla_metadata\(\), "
         r"got tuple", ROUTER),
    # Python types
    Case("q-list", "sparse", "q", const([0.0]), TypeError, r"q must be a torch.Tensor, got list"),
    Case("cache-bytes", "sparse", "k_cache", const(b"\x00" * 656), TypeError,
         r"k_cache must be a torch.Tensor, got bytes"),
    Case("indices-list", "sparse", "indices", const([[[0]]]), TypeError, r"indices must be a torch.Tensor, got list"),
    Case("topk-length-list", "sparse", "topk_length", const([8, 3]), TypeError,
         r"topk_length must be a torch.Tensor or None, got list"),
    Case("sink-float", "extra", "attn_sink", const(0.5), TypeError,
         r"attn_sink must be a torch.Tensor or None, got float"),
    Case("extra-cache-list", "extra", "extra_k_cache", const([0]), TypeError,
         r"extra_k_cache must be a torch.Tensor or None, got list"),
    Case("head-dim-v-str", "sparse", "head_dim_v", const("512"), TypeError, r"head_dim_v must be an int, got str '512'"),
    Case("scale-str", "sparse", "softmax_scale", const("auto"), TypeError,
         r"softmax_scale must be a float or None, got str 'auto'"),
    Case("fp8-flag-none", "sparse", "is_fp8_kvcache", const(None), TypeError,
         r"is_fp8_kvcache must be a bool, got NoneType None"),
    Case("causal-float", "sparse", "causal", const(0.0), TypeError, r"causal must be a bool, got float 0.0"),
    Case("batch-invariant-int", "sparse", "enable_batch_invariant", const(2), TypeError,
         r"enable_batch_invariant must be a bool, got int 2"),
    Case("kv-format-int", "sparse", "kv_format", const(656), TypeError, r"kv_format must be a str or None, got int 656"),
    Case("extra-kv-format-bytes", "v41", "extra_kv_format", const(b"V41_FP4"), TypeError,
         r"extra_kv_format must be a str or None, got bytes b'V41_FP4'"),
    # format names
    Case("kv-format-unknown", "sparse", "kv_format", const("V5"), ValueError,
         rf"kv_format must be one of {FORMATS_RE}, got 'V5'"),
    Case("kv-format-lower-case", "v41", "kv_format", const("v41"), ValueError,
         rf"kv_format must be one of {FORMATS_RE}, got 'v41'"),
    Case("extra-kv-format-unknown", "v41", "extra_kv_format", const("MODEL1"), ValueError,
         rf"extra_kv_format must be one of {FORMATS_RE}, got 'MODEL1'"),
    # dtypes
    Case("q-fp16", "sparse", "q", cast("q", FP16), TypeError, r"q must have dtype bfloat16, got float16"),
    Case("q-fp32", "sparse", "q", cast("q", FP32), TypeError, r"q must have dtype bfloat16, got float32"),
    Case("cache-bf16", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 576, dtype=BF16)), ValueError,
         r"k_cache must have dtype uint8 or int8 or float8_e4m3fn for sparse decode \(indices given\), "
         r"got bfloat16 \(a bfloat16 cache is dense decode's: indices None\)"),
    Case("cache-fp16-flag-false", "v41", "k_cache", const(torch.zeros(3, 2, 1, 528, dtype=FP16)), ValueError,
         r"k_cache must have dtype uint8 or int8 or float8_e4m3fn for sparse decode \(indices given\), "
         r"got float16 \(a float16 cache is dense decode's: indices None\)"),
    Case("cache-int32", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 164, dtype=I32)), TypeError,
         r"k_cache must have dtype uint8 or int8 or float8_e4m3fn, got int32"),
    Case("indices-int64", "sparse", "indices", cast("indices", I64), TypeError, r"indices must have dtype int32, got int64"),
    Case("topk-length-int64", "sparse", "topk_length", cast("topk_length", I64), TypeError,
         r"topk_length must have dtype int32, got int64"),
    Case("sink-bf16", "extra", "attn_sink", cast("attn_sink", BF16), TypeError,
         r"attn_sink must have dtype float32, got bfloat16"),
    Case("extra-cache-fp16", "extra", "extra_k_cache", const(torch.zeros(1, 32, 1, 584, dtype=FP16)), TypeError,
         r"extra_k_cache must have dtype uint8 or int8 or float8_e4m3fn, got float16"),
    Case("extra-indices-int64", "extra", "extra_indices_in_kvcache", cast("extra_indices_in_kvcache", I64),
         TypeError, r"extra_indices_in_kvcache must have dtype int32, got int64"),
    Case("extra-length-int64", "extra", "extra_topk_length", cast("extra_topk_length", I64), TypeError,
         r"extra_topk_length must have dtype int32, got int64"),
    # devices
    Case("cache-device", "sparse", "k_cache", on_meta("k_cache"), ValueError,
         r"k_cache must be on the same device as q \(cpu\), got meta"),
    Case("indices-device", "sparse", "indices", on_meta("indices"), ValueError,
         r"indices must be on the same device as q \(cpu\), got meta"),
    Case("sink-device", "extra", "attn_sink", on_meta("attn_sink"), ValueError,
         r"attn_sink must be on the same device as q \(cpu\), got meta"),
    Case("extra-length-device", "extra", "extra_topk_length", on_meta("extra_topk_length"), ValueError,
         r"extra_topk_length must be on the same device as q \(cpu\), got meta"),
    # layout
    Case("indices-strided", "sparse", "indices", strided_last("indices"), ValueError,
         r"indices must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(16, 16, 2\) "
         r"for shape \(2, 1, 8\)"),
    Case("q-strided", "sparse", "q", strided_last("q"), ValueError,
         r"q must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(4608, 4608, 1152, 2\) "
         r"for shape \(2, 1, 4, 576\)"),
    Case("cache-page-stride", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 700, dtype=U8)[..., :656]),
         ValueError, r"k_cache must have stride\(1\) == 656 \(tokens of a page back to back\), got strides "
                     r"\(44800, 700, 700, 1\) for shape \(2, 64, 1, 656\)"),
    Case("extra-cache-page-stride", "extra", "extra_k_cache",
         const(torch.zeros(1, 32, 1, 600, dtype=U8)[..., :584]), ValueError,
         r"extra_k_cache must have stride\(1\) == 584 \(tokens of a page back to back\), got strides "
         r"\(19200, 600, 600, 1\) for shape \(1, 32, 1, 584\)"),
    # alignment (the kernel copies 16-byte chunks; V4 rows are 8-aligned)
    Case("cache-start-misaligned", "sparse", "k_cache", _misaligned_start((2, 64, 1, 656), 8), ValueError,
         r"k_cache must start at a 16-byte aligned address \(" + ALIGN_WHY.format("V32")
         + r"\), got data_ptr\(\) % 16 == 8"),
    Case("cache-block-stride-misaligned", "v41", "k_cache", _block_stride((3, 2, 1, 528), 1064), ValueError,
         r"k_cache must have stride\(0\) a multiple of 16 bytes \(" + ALIGN_WHY.format("V41")
         + r"\), got strides \(1064, 528, 528, 1\) for shape \(3, 2, 1, 528\)"),
    Case("v4-cache-start-misaligned", "extra", "k_cache", _misaligned_start((2, 16, 1, 584), 4), ValueError,
         r"k_cache must start at a 8-byte aligned address \(" + ALIGN_WHY.format("V4")
         + r"\), got data_ptr\(\) % 8 == 4"),
    Case("v4-extra-block-stride-misaligned", "extra", "extra_k_cache", _block_stride((2, 32, 1, 584), 18692),
         ValueError, r"extra_k_cache must have stride\(0\) a multiple of 8 bytes \(" + ALIGN_WHY.format("V4")
         + r"\), got strides \(18692, 584, 584, 1\) for shape \(2, 32, 1, 584\)"),
    Case("fp4-extra-start-misaligned", "v41", "extra_k_cache", _misaligned_start((2, 64, 1, 288), 1),
         ValueError, r"extra_k_cache must start at a 16-byte aligned address \(" + ALIGN_WHY.format("V41_FP4")
         + r"\), got data_ptr\(\) % 16 == 1"),
    # shapes
    Case("q-3d", "sparse", "q", const(torch.zeros(2, 4, 576, dtype=BF16)), ValueError,
         r"q must have shape \[b, s_q, h_q, d_qk\] \(4-D\), got shape \(2, 4, 576\)"),
    Case("q-d128", "sparse", "q", const(torch.zeros(2, 1, 4, 128, dtype=BF16)), ValueError,
         r"q must have head dim \(last dim\) 576 for kv_format=None, which reads k_cache's 656 bytes per "
         r"token as V32, got shape \(2, 1, 4, 128\)"),
    Case("cache-576-bytes", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 576, dtype=U8)), ValueError,
         rf"k_cache must have {DETECTION_RE} bytes per token \(last dim\) when kv_format is None, "
         r"got shape \(2, 64, 1, 576\)"),
    Case("q-512-with-v32-cache", "sparse", "q", const(torch.zeros(2, 1, 4, 512, dtype=BF16)), ValueError,
         r"q must have head dim \(last dim\) 576 for kv_format=None, which reads k_cache's 656 bytes per "
         r"token as V32, got shape \(2, 1, 4, 512\)"),
    Case("kv-format-bytes-mismatch", "sparse", "kv_format", const("V41"), ValueError,
         r"k_cache must have 528 bytes per token \(last dim\) for kv_format='V41', got shape \(2, 64, 1, 656\)"),
    Case("kv-format-v4-bytes-mismatch", "v41", "kv_format", const("V4"), ValueError,
         r"k_cache must have 584 bytes per token \(last dim\) for kv_format='V4', got shape \(3, 2, 1, 528\)"),
    Case("q-576-with-v41", "v41", "q", const(torch.zeros(2, 1, 4, 576, dtype=BF16)), ValueError,
         r"q must have head dim \(last dim\) 512 for kv_format='V41', got shape \(2, 1, 4, 576\)"),
    Case("q-576-with-named-v32-no-rope", "v41", "kv_format", const("V32"), ValueError,
         r"k_cache must have 656 bytes per token \(last dim\) for kv_format='V32', got shape \(3, 2, 1, 528\)"),
    Case("extra-format-bytes-mismatch", "v41", "extra_kv_format", const("V41"), ValueError,
         r"extra_k_cache must have 528 bytes per token \(last dim\) for extra_kv_format='V41', "
         r"got shape \(2, 64, 1, 288\)"),
    Case("extra-cache-unknown-bytes", "extra", "extra_k_cache", const(torch.zeros(1, 32, 1, 600, dtype=U8)),
         ValueError, rf"extra_k_cache must have {DETECTION_RE} bytes per token \(last dim\) when "
                     r"extra_kv_format is None, got shape \(1, 32, 1, 600\)"),
    Case("cache-3d", "sparse", "k_cache", const(torch.zeros(128, 1, 656, dtype=U8)), ValueError,
         r"k_cache must have shape \[num_blocks, page_size, 1, bytes_per_token\] \(4-D\), got shape \(128, 1, 656\)"),
    Case("cache-heads", "sparse", "k_cache", const(torch.zeros(2, 64, 2, 656, dtype=U8)), ValueError,
         r"k_cache must have kv heads \(dim 2\) equal to 1, got shape \(2, 64, 2, 656\)"),
    Case("cache-page-0", "sparse", "k_cache", const(torch.zeros(2, 0, 1, 656, dtype=U8)), ValueError,
         r"k_cache must have page size \(dim 1\) >= 1, got shape \(2, 0, 1, 656\)"),
    Case("indices-2d", "sparse", "indices", const(torch.zeros(2, 8, dtype=I32)), ValueError,
         r"indices must have shape \[b, s_q, topk\] \(3-D\), got shape \(2, 8\)"),
    Case("indices-s-q", "sparse", "indices", const(torch.zeros(2, 2, 8, dtype=I32)), ValueError,
         r"indices must have shape \[b, s_q, topk\] = \[2, 1, topk\] matching q, got shape \(2, 2, 8\)"),
    Case("indices-batch", "sparse", "indices", const(torch.zeros(3, 1, 8, dtype=I32)), ValueError,
         r"indices must have shape \[b, s_q, topk\] = \[2, 1, topk\] matching q, got shape \(3, 1, 8\)"),
    Case("topk-length-length", "sparse", "topk_length", const(ints([8])), ValueError,
         r"topk_length must have length 2, got shape \(1,\)"),
    Case("topk-length-2d", "sparse", "topk_length", const(ints([[8, 3]])), ValueError,
         r"topk_length must have shape \[b\] \(1-D\), got shape \(1, 2\)"),
    Case("sink-length", "extra", "attn_sink", const(torch.zeros(3)), ValueError,
         r"attn_sink must have length 4, got shape \(3,\)"),
    Case("extra-cache-v32-bytes", "extra", "extra_k_cache", const(torch.zeros(1, 32, 1, 656, dtype=U8)),
         ValueError, r"q must have head dim \(last dim\) 576 for extra_kv_format=None, which reads "
                     r"extra_k_cache's 656 bytes per token as V32, got shape \(2, 1, 4, 512\)"),
    Case("extra-indices-shape", "extra", "extra_indices_in_kvcache", const(torch.zeros(2, 4, dtype=I32)),
         ValueError, r"extra_indices_in_kvcache must have shape \[b, s_q, extra_topk\] \(3-D\), got shape \(2, 4\)"),
    Case("extra-indices-batch", "extra", "extra_indices_in_kvcache", const(torch.zeros(1, 1, 4, dtype=I32)),
         ValueError, r"extra_indices_in_kvcache must have shape \[b, s_q, extra_topk\] = \[2, 1, extra_topk\] "
                     r"matching q, got shape \(1, 1, 4\)"),
    Case("extra-length-length", "extra", "extra_topk_length", const(ints([4, 0, 1])), ValueError,
         r"extra_topk_length must have length 2, got shape \(3,\)"),
    # values
    Case("head-dim-v-576", "sparse", "head_dim_v", const(576), ValueError, r"head_dim_v must be 512, got 576"),
    Case("scale-inf", "sparse", "softmax_scale", const(float("inf")), ValueError,
         r"softmax_scale must be a finite positive float, got inf"),
    Case("scale-negative", "extra", "softmax_scale", const(-1.0), ValueError,
         r"softmax_scale must be a finite positive float, got -1.0"),
]


def test_table():
    check_table(CASES, ENTRIES)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_valid_baseline_is_accepted(entry):
    build, call = ENTRIES[entry]
    out, lse = call(**build())
    assert out.shape == (2, 1, 4, 512) and lse.shape == (2, 4, 1)


def test_index_values_are_not_checked():
    # A negative index or one past the cache is invalid by contract, never an error.
    args = sparse_args()
    args["indices"] = torch.tensor([[[-5, 128, 2 ** 31 - 1, 0, -1, 7, 127, 1]]] * 2, dtype=I32)
    out, lse = ENTRIES["sparse"][1](**args)
    assert torch.isfinite(out).all()


def _filled_v41_call() -> Dict[str, Any]:
    """v41_args with real quantised caches and valid indices (some past topk invalid)."""
    from flash_mla import quant
    g = torch.Generator().manual_seed(3)
    args = v41_args()
    args["q"] = torch.randn(2, 1, 4, 512, generator=g).to(BF16)
    args["k_cache"] = quant.quantize_kv(torch.randn(3, 2, 1, 512, generator=g), "V41")
    args["extra_k_cache"] = quant.quantize_kv(torch.randn(2, 64, 1, 512, generator=g), "V41_FP4")
    args["indices"] = torch.randint(-1, 6, (2, 1, 8), generator=g, dtype=I32)
    args["extra_indices_in_kvcache"] = torch.randint(0, 128, (2, 1, 4), generator=g, dtype=I32)
    return args


def test_byte_cache_with_indices_is_fp8_whatever_the_flag_says():
    outs = []
    for flag in (False, True, None):
        args = _filled_v41_call()
        if flag is not None:
            args["is_fp8_kvcache"] = flag
        outs.append(_call(**args))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    assert torch.isfinite(outs[0][0]).all() and (outs[0][0] != 0).any()


def test_named_and_detected_formats_agree_and_v32_no_rope_is_read_only_when_named():
    from flash_mla import quant
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 2, 512, generator=g).to(BF16)
    indices = torch.tensor([[[0, 3, 5, -1]]], dtype=I32)
    for name in ("V4", "V41", "V41_FP4", "V32_NO_ROPE"):
        cache = quant.quantize_kv(torch.randn(2, 3, 1, 512, generator=g), name)
        named = _call(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                      tile_scheduler_metadata=FlashMLASchedMeta(), indices=indices, kv_format=name)
        detected = _call(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                         tile_scheduler_metadata=FlashMLASchedMeta(), indices=indices)
        same = torch.equal(named[0], detected[0])
        # 528 bytes are read as V41 unless V32_NO_ROPE is named: its fp32 scale bytes are not ue8m0
        assert same == (name != "V32_NO_ROPE"), name


def test_v4_blocks_need_only_8_byte_alignment():
    from flash_mla import quant
    g = torch.Generator().manual_seed(5)
    cache = quant.quantize_kv(torch.randn(4, 1, 1, 512, generator=g), "V4")  # page size 1: stride(0) 584
    assert cache.stride(0) % 16 == 8
    shifted = torch.zeros(cache.numel() + 16, dtype=U8)[8:8 + cache.numel()].view(cache.shape)
    shifted.copy_(cache)
    assert shifted.data_ptr() % 16 == 8
    q = torch.randn(1, 1, 2, 512, generator=g).to(BF16)
    indices = torch.tensor([[[0, 3, 2]]], dtype=I32)
    outs = [_call(q=q, k_cache=c, block_table=None, cache_seqlens=None, head_dim_v=512,
                  tile_scheduler_metadata=FlashMLASchedMeta(), indices=indices) for c in (cache, shifted)]
    assert torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    check_case(case, ENTRIES, "sparse_decode")
