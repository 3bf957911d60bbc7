"""Bad inputs of dense MHA prefill: flash_attn_varlen_func, its packed forms and
flash_mla.cuda.dense_prefill_fwd/bwd. Each row changes one argument of a valid call
and names the exception and the whole message, with the argument as that entry's
caller spells it (cu_seqlens_qo, cu_seqlens, cu_seqlens_q; qkv, kv)
(tests/_bad_inputs.py explains the harness)."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

import flash_mla
import flash_mla.cuda
from flash_mla import mha_prefill

from tests._bad_inputs import (BF16, FP16, FP32, I32, I64, U8, Case, cast, check_case, check_table,
                               const, ints, on_meta, setitem, strided_last)


def mha_args() -> Dict[str, Any]:
    return dict(q=torch.randn(10, 4, 64).to(BF16), k=torch.randn(12, 2, 64).to(BF16),
                v=torch.randn(12, 2, 64).to(BF16), cu_seqlens_qo=ints([0, 4, 10]),
                cu_seqlens_kv=ints([0, 5, 12]), max_seqlen_qo=6, max_seqlen_kv=7)


def qkv_args() -> Dict[str, Any]:
    return dict(qkv=torch.randn(10, 4, 192).to(BF16), cu_seqlens=ints([0, 4, 10]), max_seqlen=6,
                head_dim_qk=64)


def kv_args() -> Dict[str, Any]:
    return dict(q=torch.randn(10, 4, 64).to(BF16), kv=torch.randn(12, 2, 128).to(BF16),
                cu_seqlens_qo=ints([0, 4, 10]), cu_seqlens_kv=ints([0, 5, 12]), max_seqlen_qo=6,
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


ENTRIES = {
    "mha": (mha_args, lambda **kw: flash_mla.flash_attn_varlen_func(**kw)),
    "qkv": (qkv_args, lambda **kw: flash_mla.flash_attn_varlen_qkvpacked_func(**kw)),
    "kv": (kv_args, lambda **kw: flash_mla.flash_attn_varlen_kvpacked_func(**kw)),
    # positional, as upstream's compiled module is called
    "low_fwd": (low_fwd_args, lambda **kw: flash_mla.cuda.dense_prefill_fwd(*kw.values())),
    "low_bwd": (low_bwd_args, lambda **kw: flash_mla.cuda.dense_prefill_bwd(*kw.values())),
}

CASES = [
    # ---- flash_attn_varlen_func: Python types
    Case("mha-q-none", "mha", "q", const(None), TypeError, r"q must be a torch.Tensor, got NoneType"),
    Case("mha-v-list", "mha", "v", const([0.0]), TypeError, r"v must be a torch.Tensor, got list"),
    Case("mha-cu-list", "mha", "cu_seqlens_qo", const([0, 4, 10]), TypeError,
         r"cu_seqlens_qo must be a torch.Tensor, got list"),
    Case("mha-max-float", "mha", "max_seqlen_kv", const(7.5), TypeError, r"max_seqlen_kv must be an int, got float 7.5"),
    Case("mha-max-bool", "mha", "max_seqlen_qo", const(True), TypeError, r"max_seqlen_qo must be an int, got bool True"),
    Case("mha-dropout-str", "mha", "dropout_p", const("0"), TypeError, r"dropout_p must be a float, got str '0'"),
    Case("mha-dropout-bool", "mha", "dropout_p", const(False), TypeError, r"dropout_p must be a float, got bool False"),
    Case("mha-scale-str", "mha", "softmax_scale", const("0.1"), TypeError,
         r"softmax_scale must be a float or None, got str '0.1'"),
    Case("mha-causal-2", "mha", "causal", const(2), TypeError, r"causal must be a bool, got int 2"),
    Case("mha-deterministic-str", "mha", "deterministic", const("no"), TypeError,
         r"deterministic must be a bool, got str 'no'"),
    Case("mha-is-varlen-none", "mha", "is_varlen", const(None), TypeError, r"is_varlen must be a bool, got NoneType None"),
    # dtypes
    Case("mha-q-fp32", "mha", "q", cast("q", FP32), TypeError, r"q must have dtype bfloat16 or float16, got float32"),
    Case("mha-k-fp16", "mha", "k", cast("k", FP16), TypeError, r"k must have the same dtype as q \(bfloat16\), got float16"),
    Case("mha-v-fp16", "mha", "v", cast("v", FP16), TypeError, r"v must have the same dtype as q \(bfloat16\), got float16"),
    Case("mha-cu-q-int64", "mha", "cu_seqlens_qo", cast("cu_seqlens_qo", I64), TypeError,
         r"cu_seqlens_qo must have dtype int32, got int64"),
    Case("mha-cu-k-int64", "mha", "cu_seqlens_kv", cast("cu_seqlens_kv", I64), TypeError,
         r"cu_seqlens_kv must have dtype int32, got int64"),
    # devices
    Case("mha-k-device", "mha", "k", on_meta("k"), ValueError, r"k must be on the same device as q \(cpu\), got meta"),
    Case("mha-cu-device", "mha", "cu_seqlens_kv", on_meta("cu_seqlens_kv"), ValueError,
         r"cu_seqlens_kv must be on the same device as q \(cpu\), got meta"),
    # layout
    Case("mha-k-strided", "mha", "k", strided_last("k"), ValueError,
         r"k must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(256, 128, 2\) "
         r"for shape \(12, 2, 64\)"),
    Case("mha-cu-strided", "mha", "cu_seqlens_qo", strided_last("cu_seqlens_qo"), ValueError,
         r"cu_seqlens_qo must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(2,\) "
         r"for shape \(3,\)"),
    # shapes
    Case("mha-q-2d", "mha", "q", const(torch.zeros(10, 64, dtype=BF16)), ValueError,
         r"q must have shape \[total_q, h_q, d_qk\] \(3-D\), got shape \(10, 64\)"),
    Case("mha-k-dim", "mha", "q", const(torch.zeros(10, 4, 96, dtype=BF16)), ValueError,
         r"k must have head dim \(last dim\) equal to q's 96, got shape \(12, 2, 64\)"),
    Case("mha-v-rows", "mha", "v", const(torch.zeros(11, 2, 64, dtype=BF16)), ValueError,
         r"v must have the rows and heads of k, \[12, 2, d_v\], got shape \(11, 2, 64\)"),
    Case("mha-v-heads", "mha", "k", const(torch.zeros(12, 4, 64, dtype=BF16)), ValueError,
         r"v must have the rows and heads of k, \[12, 4, d_v\], got shape \(12, 2, 64\)"),
    Case("mha-v-d0", "mha", "v", const(torch.zeros(12, 2, 0, dtype=BF16)), ValueError,
         r"v must have a head dim \(last dim\) >= 1, got shape \(12, 2, 0\)"),
    Case("mha-heads-divide", "mha", "q", const(torch.zeros(10, 3, 64, dtype=BF16)), ValueError,
         r"k heads \(dim 1\) must divide q's 3 heads, got shape \(12, 2, 64\)"),
    Case("mha-cu-2d", "mha", "cu_seqlens_qo", const(ints([[0, 4, 10]])), ValueError,
         r"cu_seqlens_qo must have shape \[batch \+ 1\] \(1-D\), got shape \(1, 3\)"),
    Case("mha-cu-short", "mha", "cu_seqlens_qo", const(ints([0])), ValueError,
         r"cu_seqlens_qo must have at least 2 entries \(one sequence\), got shape \(1,\)"),
    Case("mha-cu-length", "mha", "cu_seqlens_kv", const(ints([0, 5, 6, 12])), ValueError,
         r"cu_seqlens_kv must have the length of cu_seqlens_qo \(3\), got shape \(4,\)"),
    # values
    Case("mha-max-negative", "mha", "max_seqlen_qo", const(-1), ValueError, r"max_seqlen_qo must be >= 0, got -1"),
    Case("mha-dropout", "mha", "dropout_p", const(0.1), ValueError,
         r"dropout_p must be 0.0 \(dropout is not implemented\), got 0.1"),
    Case("mha-scale-negative", "mha", "softmax_scale", const(-0.1), ValueError,
         r"softmax_scale must be a finite positive float, got -0.1"),
    Case("mha-scale-inf", "mha", "softmax_scale", const(float("inf")), ValueError,
         r"softmax_scale must be a finite positive float, got inf"),
    Case("mha-cu-q-start", "mha", "cu_seqlens_qo", const(ints([1, 4, 10])), ValueError,
         r"cu_seqlens_qo must start with 0, got 1 \(values \[1, 4, 10\]\)"),
    Case("mha-cu-q-decreasing", "mha", "cu_seqlens_qo", const(ints([0, 6, 4])), ValueError,
         r"cu_seqlens_qo must be non-decreasing, got 6 then 4 at index 1 \(values \[0, 6, 4\]\)"),
    Case("mha-cu-q-past-rows", "mha", "cu_seqlens_qo", const(ints([0, 4, 11])), ValueError,
         r"cu_seqlens_qo must end at most at 10 \(the rows of q\), got 11"),
    Case("mha-cu-k-past-rows", "mha", "cu_seqlens_kv", setitem("cu_seqlens_kv", 2, 13), ValueError,
         r"cu_seqlens_kv must end at most at 12 \(the rows of k\), got 13"),
    Case("mha-cu-k-decreasing", "mha", "cu_seqlens_kv", setitem("cu_seqlens_kv", 1, -2), ValueError,
         r"cu_seqlens_kv must be non-decreasing, got 0 then -2 at index 0 \(values \[0, -2, 12\]\)"),
    # ---- qkvpacked: messages name qkv, cu_seqlens, max_seqlen
    Case("qkv-tuple", "qkv", "qkv", const((1, 2)), TypeError, r"qkv must be a torch.Tensor, got tuple"),
    Case("qkv-head-dim-str", "qkv", "head_dim_qk", const("64"), TypeError, r"head_dim_qk must be an int, got str '64'"),
    Case("qkv-max-float", "qkv", "max_seqlen", const(6.0), TypeError, r"max_seqlen must be an int, got float 6.0"),
    Case("qkv-fp32", "qkv", "qkv", cast("qkv", FP32), TypeError, r"qkv must have dtype bfloat16 or float16, got float32"),
    Case("qkv-cu-int64", "qkv", "cu_seqlens", cast("cu_seqlens", I64), TypeError,
         r"cu_seqlens must have dtype int32, got int64"),
    Case("qkv-cu-device", "qkv", "cu_seqlens", on_meta("cu_seqlens"), ValueError,
         r"cu_seqlens must be on the same device as qkv \(cpu\), got meta"),
    Case("qkv-strided", "qkv", "qkv", strided_last("qkv"), ValueError,
         r"qkv must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(1536, 384, 2\) "
         r"for shape \(10, 4, 192\)"),
    Case("qkv-2d", "qkv", "qkv", const(torch.zeros(10, 192, dtype=BF16)), ValueError,
         r"qkv must have shape \[total, h, 2 \* head_dim_qk \+ d_v\] \(3-D\), got shape \(10, 192\)"),
    Case("qkv-too-narrow", "qkv", "qkv", const(torch.zeros(10, 4, 128, dtype=BF16)), ValueError,
         r"qkv must have a last dim larger than 2 \* head_dim_qk = 128 \(the rest is v\), got shape \(10, 4, 128\)"),
    Case("qkv-head-dim-0", "qkv", "head_dim_qk", const(0), ValueError, r"head_dim_qk must be >= 1, got 0"),
    Case("qkv-cu-short", "qkv", "cu_seqlens", const(ints([0])), ValueError,
         r"cu_seqlens must have at least 2 entries \(one sequence\), got shape \(1,\)"),
    Case("qkv-cu-past-rows", "qkv", "cu_seqlens", const(ints([0, 4, 12])), ValueError,
         r"cu_seqlens must end at most at 10 \(the rows of qkv\), got 12"),
    Case("qkv-cu-decreasing", "qkv", "cu_seqlens", const(ints([0, 5, 3])), ValueError,
         r"cu_seqlens must be non-decreasing, got 5 then 3 at index 1 \(values \[0, 5, 3\]\)"),
    Case("qkv-max-negative", "qkv", "max_seqlen", const(-6), ValueError, r"max_seqlen must be >= 0, got -6"),
    # ---- kvpacked: messages name kv
    Case("kv-list", "kv", "kv", const([0.0]), TypeError, r"kv must be a torch.Tensor, got list"),
    Case("kv-fp16", "kv", "kv", cast("kv", FP16), TypeError, r"kv must have the same dtype as q \(bfloat16\), got float16"),
    Case("kv-device", "kv", "kv", on_meta("kv"), ValueError, r"kv must be on the same device as q \(cpu\), got meta"),
    Case("kv-2d", "kv", "kv", const(torch.zeros(12, 128, dtype=BF16)), ValueError,
         r"kv must have shape \[total, h, 1 \* head_dim_qk \+ d_v\] \(3-D\), got shape \(12, 128\)"),
    Case("kv-too-narrow", "kv", "kv", const(torch.zeros(12, 2, 64, dtype=BF16)), ValueError,
         r"kv must have a last dim larger than 1 \* head_dim_qk = 64 \(the rest is v\), got shape \(12, 2, 64\)"),
    Case("kv-q-head-dim", "kv", "head_dim_qk", const(32), ValueError,
         r"q must have head dim \(last dim\) equal to head_dim_qk 32, got shape \(10, 4, 64\)"),
    Case("kv-heads-divide", "kv", "kv", const(torch.zeros(12, 3, 128, dtype=BF16)), ValueError,
         r"kv heads \(dim 1\) must divide q's 4 heads, got shape \(12, 3, 64\)"),
    Case("kv-cu-past-rows", "kv", "cu_seqlens_kv", const(ints([0, 5, 20])), ValueError,
         r"cu_seqlens_kv must end at most at 12 \(the rows of kv\), got 20"),
    # ---- flash_mla.cuda.dense_prefill_fwd: messages name cu_seqlens_q, max_seqlen_q
    Case("low-fwd-workspace-dtype", "low_fwd", "workspace", const(torch.empty(4, dtype=I32)), TypeError,
         r"workspace must have dtype uint8, got int32"),
    Case("low-fwd-workspace-strided", "low_fwd", "workspace", const(torch.empty(32, dtype=U8)[::2]), ValueError,
         r"workspace must be contiguous, got strides \(2,\) for shape \(16,\)"),
    Case("low-fwd-out-dtype", "low_fwd", "out", const(torch.empty(10, 4, 64, dtype=FP16)), TypeError,
         r"out must have the same dtype as q \(bfloat16\), got float16"),
    Case("low-fwd-out-shape", "low_fwd", "out", const(torch.empty(10, 4, 32, dtype=BF16)), ValueError,
         r"out must have shape \(10, 4, 64\), got shape \(10, 4, 32\)"),
    Case("low-fwd-out-device", "low_fwd", "out", on_meta("out"), ValueError,
         r"out must be on the same device as q \(cpu\), got meta"),
    Case("low-fwd-lse-dtype", "low_fwd", "lse", const(torch.empty(4, 10, dtype=FP16).t()), TypeError,
         r"lse must have dtype float32, got float16"),
    Case("low-fwd-lse-layout", "low_fwd", "lse", const(torch.empty(10, 4)), ValueError,
         r"lse must be the \[total_q, h_q\] transpose of a contiguous \[h_q, total_q\] buffer "
         r"\(stride\(0\) == 1\), got strides \(4, 1\)"),
    Case("low-fwd-lse-shape", "low_fwd", "lse", const(torch.empty(4, 9).t()), ValueError,
         r"lse must have shape \(10, 4\), got shape \(9, 4\)"),
    Case("low-fwd-mask-code", "low_fwd", "mask_mode_code", const(2), ValueError,
         r"mask_mode_code must be 0 \(no mask\) or 1 \(causal\), got 2"),
    Case("low-fwd-mask-code-str", "low_fwd", "mask_mode_code", const("causal"), TypeError,
         r"mask_mode_code must be an int, got str 'causal'"),
    Case("low-fwd-scale-none", "low_fwd", "softmax_scale", const(None), TypeError,
         r"softmax_scale must be a float, got NoneType None"),
    Case("low-fwd-is-varlen", "low_fwd", "is_varlen", const(None), TypeError, r"is_varlen must be a bool, got NoneType None"),
    Case("low-fwd-cu-int64", "low_fwd", "cu_seqlens_q", cast("cu_seqlens_q", I64), TypeError,
         r"cu_seqlens_q must have dtype int32, got int64"),
    Case("low-fwd-cu-past-rows", "low_fwd", "cu_seqlens_q", const(ints([0, 4, 11])), ValueError,
         r"cu_seqlens_q must end at most at 10 \(the rows of q\), got 11"),
    Case("low-fwd-cu-length", "low_fwd", "cu_seqlens_kv", const(ints([0, 12])), ValueError,
         r"cu_seqlens_kv must have the length of cu_seqlens_q \(3\), got shape \(2,\)"),
    Case("low-fwd-max-negative", "low_fwd", "max_seqlen_q", const(-1), ValueError, r"max_seqlen_q must be >= 0, got -1"),
    # ---- flash_mla.cuda.dense_prefill_bwd
    Case("low-bwd-dout-dtype", "low_bwd", "dout", const(torch.empty(10, 4, 64, dtype=FP32)), TypeError,
         r"dout must have the same dtype as q \(bfloat16\), got float32"),
    Case("low-bwd-dout-shape", "low_bwd", "dout", const(torch.empty(10, 4, 65, dtype=BF16)), ValueError,
         r"dout must have shape \(10, 4, 64\), got shape \(10, 4, 65\)"),
    Case("low-bwd-dq-device", "low_bwd", "dq", on_meta("dq"), ValueError,
         r"dq must be on the same device as q \(cpu\), got meta"),
    Case("low-bwd-dq-shape", "low_bwd", "dq", const(torch.empty(10, 2, 64, dtype=BF16)), ValueError,
         r"dq must have shape \(10, 4, 64\), got shape \(10, 2, 64\)"),
    Case("low-bwd-dk-shape", "low_bwd", "dk", const(torch.empty(12, 4, 64, dtype=BF16)), ValueError,
         r"dk must have shape \(12, 2, 64\), got shape \(12, 4, 64\)"),
    Case("low-bwd-dv-strided", "low_bwd", "dv", strided_last("dv"), ValueError,
         r"dv must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(256, 128, 2\) "
         r"for shape \(12, 2, 64\)"),
    Case("low-bwd-lse-none", "low_bwd", "lse", const(None), TypeError, r"lse must be a torch.Tensor, got NoneType"),
    Case("low-bwd-out-dtype", "low_bwd", "out", const(torch.empty(10, 4, 64, dtype=FP32)), TypeError,
         r"out must have the same dtype as q \(bfloat16\), got float32"),
    Case("low-bwd-cu-k-decreasing", "low_bwd", "cu_seqlens_kv", const(ints([0, 5, 4])), ValueError,
         r"cu_seqlens_kv must be non-decreasing, got 5 then 4 at index 1 \(values \[0, 5, 4\]\)"),
]


def test_table():
    check_table(CASES, ENTRIES)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_valid_baseline_is_accepted(entry):
    build, call = ENTRIES[entry]
    call(**build())


def test_head_dims_beyond_the_native_kernels_are_accepted():
    # Head dims are a kernel capability: validation accepts any positive pair, and the
    # dispatch runs a pair the library lacks on the reference (here, the CPU).
    q = torch.randn(7, 2, 96).to(BF16)
    v = torch.randn(5, 1, 48).to(BF16)
    out, lse = flash_mla.flash_attn_varlen_func(q, torch.randn(5, 1, 96).to(BF16), v, ints([0, 7]),
                                                ints([0, 5]), 7, 5)
    assert out.shape == (7, 2, 48) and lse.shape == (7, 2)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    check_case(case, ENTRIES, "mha_prefill")


# --------------------------------------------------------------------------- the fast path

MHA_CALL_ORDER = ("q", "k", "v", "cu_seqlens_qo", "cu_seqlens_kv", "max_seqlen_qo", "max_seqlen_kv",
                  "dropout_p", "softmax_scale", "causal", "deterministic", "is_varlen")
MHA_DEFAULTS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "deterministic": False,
                "is_varlen": True}
# Rows the fast path accepts on purpose: their error is in cu_seqlens values, which
# validate() checks after the fast path as after the full checks.
VALUE_ROWS = {"mha-cu-q-start", "mha-cu-q-decreasing", "mha-cu-q-past-rows", "mha-cu-k-past-rows",
              "mha-cu-k-decreasing"}


@pytest.mark.parametrize("case", [c for c in CASES if c.entry == "mha" and c.id not in VALUE_ROWS],
                         ids=lambda c: c.id)
def test_fast_path_declines_every_bad_case(case):
    # validate()'s fast path must never accept what the full checks reject.
    args = {**MHA_DEFAULTS, **mha_args()}
    args[case.arg] = case.value(args)
    assert mha_prefill._fast(*(args[name] for name in MHA_CALL_ORDER)) is None


def test_fast_path_agrees_with_full_checks_on_valid_calls():
    args = {**MHA_DEFAULTS, **mha_args()}
    fast = mha_prefill._fast(*(args[name] for name in MHA_CALL_ORDER))
    full, *_ = mha_prefill.validate(
        mha_prefill.KVPACKED._replace(k="k", v="v", packed=0), args["q"], args["k"], args["v"],
        args["cu_seqlens_qo"], args["cu_seqlens_kv"], 6, 7, None,
        flags=(("causal", False), ("deterministic", False), ("is_varlen", True)))
    assert fast is not None and tuple(fast) == tuple(full) == (2, 10, 12, 4, 2, 64, 64)
