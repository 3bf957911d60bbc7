"""One table of bad inputs across every public entry point and flash_mla.cuda.

Each row starts from a valid call, changes one thing, and asserts the exception type
and that the message names the argument and says what was expected (and, where it
helps, what was given). Validation runs before any computation, so the table is
fast; the tensors live on the CPU (a second device is the 'meta' device).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import flash_mla
import flash_mla.cuda
from flash_mla import FlashMLASchedMeta

BF16, FP16, FP32, I32, I64, U8 = torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64, torch.uint8


def _ints(values, dtype=I32):
    return torch.tensor(values, dtype=dtype)


def dense_args() -> Dict[str, Any]:
    return dict(q=torch.randn(2, 1, 4, 576).to(BF16), k_cache=torch.randn(2, 64, 1, 576).to(BF16),
                block_table=_ints([[0], [1]]), cache_seqlens=_ints([10, 64]), head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), causal=False)


def sparse_args() -> Dict[str, Any]:
    return dict(q=torch.randn(2, 1, 4, 576).to(BF16), k_cache=torch.zeros(2, 64, 1, 656, dtype=U8),
                block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=FlashMLASchedMeta(), is_fp8_kvcache=True,
                indices=torch.zeros(2, 1, 8, dtype=I32), topk_length=_ints([8, 3]))


def sprefill_args() -> Dict[str, Any]:
    return dict(q=torch.randn(4, 4, 576).to(BF16), kv=torch.randn(16, 1, 576).to(BF16),
                indices=torch.zeros(4, 1, 8, dtype=I32), sm_scale=0.04)


def mha_args() -> Dict[str, Any]:
    return dict(q=torch.randn(10, 4, 64).to(BF16), k=torch.randn(12, 2, 64).to(BF16),
                v=torch.randn(12, 2, 64).to(BF16), cu_seqlens_qo=_ints([0, 4, 10]),
                cu_seqlens_kv=_ints([0, 5, 12]), max_seqlen_qo=6, max_seqlen_kv=7)


def qkv_args() -> Dict[str, Any]:
    return dict(qkv=torch.randn(10, 4, 192).to(BF16), cu_seqlens=_ints([0, 4, 10]), max_seqlen=6,
                head_dim_qk=64)


def kv_args() -> Dict[str, Any]:
    return dict(q=torch.randn(10, 4, 64).to(BF16), kv=torch.randn(12, 2, 128).to(BF16),
                cu_seqlens_qo=_ints([0, 4, 10]), cu_seqlens_kv=_ints([0, 5, 12]), max_seqlen_qo=6,
                max_seqlen_kv=7, head_dim_qk=64)


def low_fwd_args() -> Dict[str, Any]:
    a = mha_args()
    return dict(workspace=torch.empty(16, dtype=U8), q=a["q"], k=a["k"], v=a["v"],
                cu_seqlens_q=a["cu_seqlens_qo"], cu_seqlens_kv=a["cu_seqlens_kv"],
                out=torch.empty(10, 4, 64, dtype=BF16), lse=torch.empty(4, 10).t(),
                mask_mode_code=1, softmax_scale=0.125, max_seqlen_q=6, max_seqlen_kv=7,
                is_varlen=True)


def low_bwd_args() -> Dict[str, Any]:
    f = low_fwd_args()
    return dict(workspace=f["workspace"], dout=torch.randn(10, 4, 64).to(BF16), q=f["q"], k=f["k"],
                v=f["v"], out=f["out"], lse=f["lse"], cu_seqlens_q=f["cu_seqlens_q"],
                cu_seqlens_kv=f["cu_seqlens_kv"], dq=torch.empty(10, 4, 64, dtype=BF16),
                dk=torch.empty(12, 2, 64, dtype=BF16), dv=torch.empty(12, 2, 64, dtype=BF16),
                mask_mode_code=0, softmax_scale=0.125, max_seqlen_q=6, max_seqlen_kv=7,
                is_varlen=True)


OPS: Dict[str, Tuple[Callable[[], Dict[str, Any]], Callable[..., Any]]] = {
    "dense": (dense_args, lambda **kw: flash_mla.flash_mla_with_kvcache(**kw)),
    "sparse": (sparse_args, lambda **kw: flash_mla.flash_mla_with_kvcache(**kw)),
    "sprefill": (sprefill_args, lambda **kw: flash_mla.flash_mla_sparse_fwd(**kw)),
    "mha": (mha_args, lambda **kw: flash_mla.flash_attn_varlen_func(**kw)),
    "qkv": (qkv_args, lambda **kw: flash_mla.flash_attn_varlen_qkvpacked_func(**kw)),
    "kv": (kv_args, lambda **kw: flash_mla.flash_attn_varlen_kvpacked_func(**kw)),
    "low_fwd": (low_fwd_args, lambda **kw: flash_mla.cuda.dense_prefill_fwd(*kw.values())),
    "low_bwd": (low_bwd_args, lambda **kw: flash_mla.cuda.dense_prefill_bwd(*kw.values())),
}


def noncontig_last(shape, dtype):
    """A view whose last dim has stride 2."""
    return torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)[..., ::2]


def on_meta(name):
    return lambda a: a[name].to("meta")


def cast(name, dtype):
    return lambda a: a[name].to(dtype)


def const(value):
    return lambda a: value


# (id, op, argument, new value (callable of the valid args), exception, fragments of the message)
CASES: List[Tuple[str, str, str, Callable[[Dict[str, Any]], Any], type, List[str]]] = [
    # ---- dense decode
    ("dense-q-not-tensor", "dense", "q", const([1.0]), TypeError, ["q must be a torch.Tensor", "list"]),
    ("dense-k-device", "dense", "k_cache", on_meta("k_cache"), ValueError, ["k_cache must be on the same device as q", "meta"]),
    ("dense-q-fp32", "dense", "q", cast("q", FP32), TypeError, ["q must have dtype bfloat16 or float16", "got float32"]),
    ("dense-k-dtype-mismatch", "dense", "k_cache", cast("k_cache", FP16), TypeError, ["k_cache must have the same dtype as q", "float16"]),
    ("dense-block-table-int64", "dense", "block_table", cast("block_table", I64), TypeError, ["block_table must have dtype int32", "int64"]),
    ("dense-seqlens-int64", "dense", "cache_seqlens", cast("cache_seqlens", I64), TypeError, ["cache_seqlens must have dtype int32", "int64"]),
    ("dense-q-noncontig", "dense", "q", const(noncontig_last((2, 1, 4, 576), BF16)), ValueError, ["q must have a contiguous last dimension", "stride"]),
    ("dense-q-3d", "dense", "q", const(torch.zeros(2, 4, 576, dtype=BF16)), ValueError, ["q must have shape [b, s_q, h_q, 576] (4-D)", "(2, 4, 576)"]),
    ("dense-q-d512", "dense", "q", const(torch.zeros(2, 1, 4, 512, dtype=BF16)), ValueError, ["q must have head dim (last dim) 576", "(2, 1, 4, 512)"]),
    ("dense-page-32", "dense", "k_cache", const(torch.zeros(12, 32, 1, 576, dtype=BF16)), ValueError, ["k_cache must have page size 64, got shape (12, 32, 1, 576)"]),
    ("dense-gqa-ratio", "dense", "k_cache", const(torch.zeros(2, 64, 3, 576, dtype=BF16)), ValueError, ["k_cache heads (dim 2) must divide q's 4 heads", "(2, 64, 3, 576)"]),
    ("dense-block-table-batch", "dense", "block_table", const(_ints([[0], [1], [0]])), ValueError, ["block_table must have batch size (dim 0) equal to q's 2", "(3, 1)"]),
    ("dense-seqlens-length", "dense", "cache_seqlens", const(_ints([1, 2, 3])), ValueError, ["cache_seqlens must have length 2", "(3,)"]),
    ("dense-head-dim-v", "dense", "head_dim_v", const(256), ValueError, ["head_dim_v must be 512, got 256"]),
    ("dense-num-splits", "dense", "num_splits", const(_ints([1])), ValueError, ["num_splits must be None", "Tensor"]),
    ("dense-meta-type", "dense", "tile_scheduler_metadata", const(None), TypeError, ["tile_scheduler_metadata must be the FlashMLASchedMeta", "NoneType"]),
    ("dense-sink-given", "dense", "attn_sink", const(torch.zeros(4)), ValueError, ["attn_sink must be None for dense decode"]),
    ("dense-fp8-flag", "dense", "is_fp8_kvcache", const(True), ValueError, ["is_fp8_kvcache must be False for dense decode", "got True"]),
    ("dense-scale-str", "dense", "softmax_scale", const("0.1"), TypeError, ["softmax_scale must be a float", "str"]),
    ("dense-scale-nan", "dense", "softmax_scale", const(float("nan")), ValueError, ["softmax_scale must be a finite positive float", "nan"]),
    ("dense-causal-str", "dense", "causal", const("yes"), TypeError, ["causal must be a bool", "'yes'"]),
    ("dense-block-table-none", "dense", "block_table", const(None), ValueError, ["block_table must be a tensor for dense decode", "None"]),
    # ---- sparse decode
    ("sparse-fp8-false", "sparse", "is_fp8_kvcache", const(False), ValueError, ["is_fp8_kvcache must be True for sparse decode", "got False"]),
    ("sparse-causal", "sparse", "causal", const(True), ValueError, ["causal must be False for sparse decode", "got True"]),
    ("sparse-q-fp16", "sparse", "q", cast("q", FP16), TypeError, ["q must have dtype bfloat16, got float16"]),
    ("sparse-cache-bf16", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 656, dtype=BF16)), TypeError, ["k_cache must have dtype uint8 or int8 or float8_e4m3fn", "bfloat16"]),
    ("sparse-indices-int64", "sparse", "indices", cast("indices", I64), TypeError, ["indices must have dtype int32", "int64"]),
    ("sparse-topk-length-int64", "sparse", "topk_length", cast("topk_length", I64), TypeError, ["topk_length must have dtype int32", "int64"]),
    ("sparse-sink-bf16", "sparse", "attn_sink", const(torch.zeros(4, dtype=BF16)), TypeError, ["attn_sink must have dtype float32", "bfloat16"]),
    ("sparse-sink-length", "sparse", "attn_sink", const(torch.zeros(3)), ValueError, ["attn_sink must have length 4", "(3,)"]),
    ("sparse-q-d128", "sparse", "q", const(torch.zeros(2, 1, 4, 128, dtype=BF16)), ValueError, ["q must have head dim (last dim) 576 (V3.2 cache) or 512 (MODEL1 cache)", "(2, 1, 4, 128)"]),
    ("sparse-bytes-per-token", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 576, dtype=U8)), ValueError, ["k_cache must have 656 bytes per token", "(2, 64, 1, 576)"]),
    ("sparse-model1-bytes", "sparse", "q", const(torch.zeros(2, 1, 4, 512, dtype=BF16)), ValueError, ["k_cache must have 584 bytes per token (last dim) for d_qk 512"]),
    ("sparse-cache-stride", "sparse", "k_cache", const(torch.zeros(2, 64, 1, 700, dtype=U8)[..., :656]), ValueError, ["k_cache must have stride(1) == 656", "700"]),
    ("sparse-cache-heads", "sparse", "k_cache", const(torch.zeros(2, 64, 2, 656, dtype=U8)), ValueError, ["k_cache must have one kv head (dim 2)", "(2, 64, 2, 656)"]),
    ("sparse-indices-shape", "sparse", "indices", const(torch.zeros(2, 2, 8, dtype=I32)), ValueError, ["indices must have shape [b, s_q, topk] = [2, 1, topk]", "(2, 2, 8)"]),
    ("sparse-topk-length-length", "sparse", "topk_length", const(_ints([8])), ValueError, ["topk_length must have length 2", "(1,)"]),
    ("sparse-extra-half", "sparse", "extra_k_cache", const(torch.zeros(2, 64, 1, 656, dtype=U8)), ValueError, ["extra_indices_in_kvcache must be given together with extra_k_cache"]),
    ("sparse-extra-length-alone", "sparse", "extra_topk_length", const(_ints([1, 1])), ValueError, ["extra_topk_length must be None when extra_k_cache is None"]),
    ("sparse-indices-noncontig", "sparse", "indices", const(noncontig_last((2, 1, 8), I32)), ValueError, ["indices must have a contiguous last dimension"]),
    # ---- sparse prefill
    ("sprefill-q-fp16", "sprefill", "q", cast("q", FP16), TypeError, ["q must have dtype bfloat16, got float16"]),
    ("sprefill-kv-heads", "sprefill", "kv", const(torch.zeros(16, 2, 576, dtype=BF16)), ValueError, ["kv must have one kv head (dim 1)", "(16, 2, 576)"]),
    ("sprefill-kv-dim", "sprefill", "kv", const(torch.zeros(16, 1, 512, dtype=BF16)), ValueError, ["kv must have head dim (last dim) equal to q's 576", "(16, 1, 512)"]),
    ("sprefill-indices-shape", "sprefill", "indices", const(torch.zeros(4, 2, 8, dtype=I32)), ValueError, ["indices must have shape [s_q, 1, topk] = [4, 1, topk]", "(4, 2, 8)"]),
    ("sprefill-dv", "sprefill", "d_v", const(256), ValueError, ["d_v must be 512, got 256"]),
    ("sprefill-topk-length", "sprefill", "topk_length", const(_ints([1, 2, 3])), ValueError, ["topk_length must have length 4", "(3,)"]),
    ("sprefill-scale-none", "sprefill", "sm_scale", const(None), TypeError, ["sm_scale must be a float", "NoneType"]),
    ("sprefill-indices-int64", "sprefill", "indices", cast("indices", I64), TypeError, ["indices must have dtype int32", "int64"]),
    ("sprefill-kv-device", "sprefill", "kv", on_meta("kv"), ValueError, ["kv must be on the same device as q"]),
    # ---- MHA prefill
    ("mha-dropout", "mha", "dropout_p", const(0.1), ValueError, ["dropout_p must be 0.0", "0.1"]),
    ("mha-q-fp32", "mha", "q", cast("q", FP32), TypeError, ["q must have dtype bfloat16 or float16, got float32"]),
    ("mha-v-dtype", "mha", "v", cast("v", FP16), TypeError, ["v must have the same dtype as q (bfloat16), got float16"]),
    ("mha-cu-int64", "mha", "cu_seqlens_qo", cast("cu_seqlens_qo", I64), TypeError, ["cu_seqlens_qo must have dtype int32", "int64"]),
    ("mha-head-dims-96", "mha", "q", const(torch.zeros(10, 4, 96, dtype=BF16)), ValueError, ["k must have head dim (last dim) equal to q's 96"]),
    ("mha-head-dims-pair", "mha", "v", const(torch.zeros(12, 2, 128, dtype=BF16)), ValueError, ["(d_qk, d_v) must be one of", "got (64, 128)"]),
    ("mha-k-v-heads", "mha", "k", const(torch.zeros(12, 3, 64, dtype=BF16)), ValueError, ["v must have the rows and heads of k, [12, 3, d_v]"]),
    ("mha-v-none", "mha", "v", lambda a: None, TypeError, ["v must be a torch.Tensor", "NoneType"]),
    ("mha-cu-length", "mha", "cu_seqlens_kv", const(_ints([0, 5, 6, 12])), ValueError, ["cu_seqlens_kv must have the length of cu_seqlens_qo (3)", "(4,)"]),
    ("mha-cu-2d", "mha", "cu_seqlens_qo", const(_ints([[0, 4, 10]])), ValueError, ["cu_seqlens_qo must have shape [batch + 1] (1-D)", "(1, 3)"]),
    ("mha-cu-short", "mha", "cu_seqlens_qo", const(_ints([0])), ValueError, ["cu_seqlens_qo must have at least 2 entries", "(1,)"]),
    ("mha-max-negative", "mha", "max_seqlen_qo", const(-1), ValueError, ["max_seqlen_qo must be >= 0, got -1"]),
    ("mha-max-float", "mha", "max_seqlen_kv", const(7.5), TypeError, ["max_seqlen_kv must be an int", "7.5"]),
    ("mha-v-rows", "mha", "v", const(torch.zeros(11, 2, 64, dtype=BF16)), ValueError, ["v must have the rows and heads of k, [12, 2, d_v]", "(11, 2, 64)"]),
    ("mha-k-noncontig", "mha", "k", const(noncontig_last((12, 2, 64), BF16)), ValueError, ["k must have a contiguous last dimension"]),
    ("mha-heads-divide", "mha", "q", const(torch.zeros(10, 3, 64, dtype=BF16)), ValueError, ["k heads (dim 1) must divide q's 3 heads", "(12, 2, 64)"]),
    ("mha-deterministic-str", "mha", "deterministic", const("no"), TypeError, ["deterministic must be a bool"]),
    ("mha-cu-device", "mha", "cu_seqlens_kv", on_meta("cu_seqlens_kv"), ValueError, ["cu_seqlens_kv must be on the same device as q"]),
    ("mha-scale-negative", "mha", "softmax_scale", const(-0.1), ValueError, ["softmax_scale must be a finite positive float", "-0.1"]),
    ("mha-scale-inf", "mha", "softmax_scale", const(float("inf")), ValueError, ["softmax_scale must be a finite positive float", "inf"]),
    ("mha-causal-2", "mha", "causal", const(2), TypeError, ["causal must be a bool", "2"]),
    ("mha-dropout-bool", "mha", "dropout_p", const(False), TypeError, ["dropout_p must be a float", "False"]),
    ("mha-max-bool", "mha", "max_seqlen_qo", const(True), TypeError, ["max_seqlen_qo must be an int", "True"]),
    # ---- packed forms
    ("qkv-too-narrow", "qkv", "qkv", const(torch.zeros(10, 4, 128, dtype=BF16)), ValueError, ["qkv must have a last dim larger than 2 * head_dim_qk = 128", "(10, 4, 128)"]),
    ("qkv-not-tensor", "qkv", "qkv", const((1, 2)), TypeError, ["qkv must be a torch.Tensor", "tuple"]),
    ("kv-head-dim-str", "kv", "head_dim_qk", const("64"), TypeError, ["head_dim_qk must be an int", "'64'"]),
    ("kv-2d", "kv", "kv", const(torch.zeros(12, 128, dtype=BF16)), ValueError, ["kv must have shape [total, h, 1 * head_dim_qk + d_v] (3-D)", "(12, 128)"]),
    # ---- flash_mla.cuda low-level entries
    ("low-fwd-lse-layout", "low_fwd", "lse", const(torch.empty(10, 4)), ValueError, ["lse must be the [total_q, h_q] transpose of a contiguous [h_q, total_q] buffer (stride(0) == 1)", "(4, 1)"]),
    ("low-fwd-lse-shape", "low_fwd", "lse", const(torch.empty(4, 9).t()), ValueError, ["lse must have shape (10, 4), got shape (9, 4)"]),
    ("low-fwd-lse-dtype", "low_fwd", "lse", const(torch.empty(4, 10, dtype=FP16).t()), TypeError, ["lse must have dtype float32", "float16"]),
    ("low-fwd-mask-code", "low_fwd", "mask_mode_code", const(2), ValueError, ["mask_mode_code must be 0 (no mask) or 1 (causal), got 2"]),
    ("low-fwd-out-shape", "low_fwd", "out", const(torch.empty(10, 4, 32, dtype=BF16)), ValueError, ["out must have shape (10, 4, 64), got shape (10, 4, 32)"]),
    ("low-fwd-out-dtype", "low_fwd", "out", const(torch.empty(10, 4, 64, dtype=FP16)), TypeError, ["out must have the same dtype as q (bfloat16), got float16"]),
    ("low-fwd-workspace-dtype", "low_fwd", "workspace", const(torch.empty(4, dtype=I32)), TypeError, ["workspace must have dtype uint8", "int32"]),
    ("low-fwd-scale-none", "low_fwd", "softmax_scale", const(None), TypeError, ["softmax_scale must be a float", "NoneType"]),
    ("low-fwd-is-varlen", "low_fwd", "is_varlen", const(None), TypeError, ["is_varlen must be a bool", "NoneType"]),
    ("low-bwd-dk-shape", "low_bwd", "dk", const(torch.empty(12, 4, 64, dtype=BF16)), ValueError, ["dk must have shape (12, 2, 64), got shape (12, 4, 64)"]),
    ("low-bwd-dout-dtype", "low_bwd", "dout", const(torch.empty(10, 4, 64, dtype=FP32)), TypeError, ["dout must have the same dtype as q (bfloat16), got float32"]),
    ("low-bwd-dq-device", "low_bwd", "dq", on_meta("dq"), ValueError, ["dq must be on the same device as q"]),
    ("low-bwd-dv-noncontig", "low_bwd", "dv", const(noncontig_last((12, 2, 64), BF16)), ValueError, ["dv must have a contiguous last dimension"]),
]


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 45
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,op,arg,value,exc,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, op, arg, value, exc, fragments):
    build, call = OPS[op]
    args = build()
    args[arg] = value(args)
    with pytest.raises(exc) as info:
        call(**args)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # The message names an argument of the call (its first word).
    first = message.split(" ")[0]
    assert first in args or first in ("block_table", "cache_seqlens", "extra_indices_in_kvcache",
                                      "head_dim_qk"), message


@pytest.mark.parametrize("op", sorted(OPS))
def test_valid_baseline_passes_validation(op, monkeypatch):
    # The table is meaningful only if the unmodified call is accepted: run it
    # (all on the CPU reference; small shapes).
    build, call = OPS[op]
    call(**build())


MHA_CALL_ORDER = ("q", "k", "v", "cu_seqlens_qo", "cu_seqlens_kv", "max_seqlen_qo", "max_seqlen_kv",
                  "dropout_p", "softmax_scale", "causal", "deterministic", "is_varlen")
MHA_DEFAULTS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "deterministic": False,
                "is_varlen": True}


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "mha"], ids=lambda c: c[0])
def test_mha_fast_path_declines_every_bad_case(case):
    # validate_mha_prefill's fast path must never accept what the full checks reject.
    from flash_mla.validation import _mha_fast
    _, _, arg, value, _, _ = case
    args = {**MHA_DEFAULTS, **mha_args()}
    args[arg] = value(args)
    assert _mha_fast(*(args[name] for name in MHA_CALL_ORDER)) is None


def test_mha_fast_path_agrees_with_full_checks_on_valid_calls():
    from flash_mla import validation
    args = {**MHA_DEFAULTS, **mha_args()}
    fast = validation._mha_fast(*(args[name] for name in MHA_CALL_ORDER))
    full = validation._mha_shapes(args["q"], args["k"], args["v"], args["cu_seqlens_qo"],
                                  args["cu_seqlens_kv"], "cu_seqlens_qo", "cu_seqlens_kv")
    assert fast is not None and tuple(fast) == tuple(full) == (2, 10, 12, 4, 2, 64, 64)
