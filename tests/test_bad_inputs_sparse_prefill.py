"""Bad inputs of sparse MLA prefill (flash_mla_sparse_fwd): each row changes one
argument of a valid call and names the exception and the whole message
(tests/_bad_inputs.py explains the harness)."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

import flash_mla

from tests._bad_inputs import (BF16, FP16, FP32, I32, I64, Case, cast, check_case, check_table, const,
                               ints, on_meta, strided_last)


def prefill_args() -> Dict[str, Any]:
    # s_q 4, h_q 4, d_qk 576, s_kv 16, topk 8, with sinks and per-query lengths
    return dict(q=torch.randn(4, 4, 576).to(BF16), kv=torch.randn(16, 1, 576).to(BF16),
                indices=torch.zeros(4, 1, 8, dtype=I32), sm_scale=0.04, attn_sink=torch.zeros(4),
                topk_length=ints([8, 3, 0, 1]))


ENTRIES = {"sprefill": (prefill_args, lambda **kw: flash_mla.flash_mla_sparse_fwd(**kw))}

CASES = [
    # Python types
    Case("q-list", "sprefill", "q", const([0.0]), TypeError, r"q must be a torch.Tensor, got list"),
    Case("q-none", "sprefill", "q", const(None), TypeError, r"q must be a torch.Tensor, got NoneType"),
    Case("kv-tuple", "sprefill", "kv", const((0,)), TypeError, r"kv must be a torch.Tensor, got tuple"),
    Case("indices-none", "sprefill", "indices", const(None), TypeError, r"indices must be a torch.Tensor, got NoneType"),
    Case("sink-list", "sprefill", "attn_sink", const([0.0] * 4), TypeError,
         r"attn_sink must be a torch.Tensor or None, got list"),
    Case("topk-length-int", "sprefill", "topk_length", const(8), TypeError,
         r"topk_length must be a torch.Tensor or None, got int"),
    Case("scale-none", "sprefill", "sm_scale", const(None), TypeError, r"sm_scale must be a float, got NoneType None"),
    Case("scale-str", "sprefill", "sm_scale", const("0.04"), TypeError, r"sm_scale must be a float, got str '0.04'"),
    Case("scale-bool", "sprefill", "sm_scale", const(True), TypeError, r"sm_scale must be a float, got bool True"),
    Case("dv-str", "sprefill", "d_v", const("512"), TypeError, r"d_v must be an int, got str '512'"),
    Case("dv-float", "sprefill", "d_v", const(512.0), TypeError, r"d_v must be an int, got float 512.0"),
    Case("dv-none", "sprefill", "d_v", const(None), TypeError, r"d_v must be an int, got NoneType None"),
    # dtypes
    Case("q-fp16", "sprefill", "q", cast("q", FP16), TypeError, r"q must have dtype bfloat16, got float16"),
    Case("q-fp32", "sprefill", "q", cast("q", FP32), TypeError, r"q must have dtype bfloat16, got float32"),
    Case("kv-fp16", "sprefill", "kv", cast("kv", FP16), TypeError,
         r"kv must have the same dtype as q \(bfloat16\), got float16"),
    Case("kv-uint8", "sprefill", "kv", const(torch.zeros(16, 1, 576, dtype=torch.uint8)), TypeError,
         r"kv must have the same dtype as q \(bfloat16\), got uint8"),
    Case("indices-int64", "sprefill", "indices", cast("indices", I64), TypeError,
         r"indices must have dtype int32, got int64"),
    Case("indices-float", "sprefill", "indices", cast("indices", FP32), TypeError,
         r"indices must have dtype int32, got float32"),
    Case("sink-bf16", "sprefill", "attn_sink", cast("attn_sink", BF16), TypeError,
         r"attn_sink must have dtype float32, got bfloat16"),
    Case("topk-length-int64", "sprefill", "topk_length", cast("topk_length", I64), TypeError,
         r"topk_length must have dtype int32, got int64"),
    # devices
    Case("kv-device", "sprefill", "kv", on_meta("kv"), ValueError,
         r"kv must be on the same device as q \(cpu\), got meta"),
    Case("indices-device", "sprefill", "indices", on_meta("indices"), ValueError,
         r"indices must be on the same device as q \(cpu\), got meta"),
    Case("sink-device", "sprefill", "attn_sink", on_meta("attn_sink"), ValueError,
         r"attn_sink must be on the same device as q \(cpu\), got meta"),
    Case("topk-length-device", "sprefill", "topk_length", on_meta("topk_length"), ValueError,
         r"topk_length must be on the same device as q \(cpu\), got meta"),
    # layout
    Case("q-strided", "sprefill", "q", strided_last("q"), ValueError,
         r"q must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(4608, 1152, 2\) "
         r"for shape \(4, 4, 576\)"),
    Case("kv-strided", "sprefill", "kv", strided_last("kv"), ValueError,
         r"kv must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(1152, 1152, 2\) "
         r"for shape \(16, 1, 576\)"),
    Case("indices-strided", "sprefill", "indices", strided_last("indices"), ValueError,
         r"indices must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(16, 16, 2\) "
         r"for shape \(4, 1, 8\)"),
    Case("sink-strided", "sprefill", "attn_sink", strided_last("attn_sink"), ValueError,
         r"attn_sink must have a contiguous last dimension \(stride\(-1\) == 1\), got strides \(2,\) "
         r"for shape \(4,\)"),
    # shapes
    Case("q-2d", "sprefill", "q", const(torch.zeros(4, 576, dtype=BF16)), ValueError,
         r"q must have shape \[s_q, h_q, d_qk\] \(3-D\), got shape \(4, 576\)"),
    Case("q-4d", "sprefill", "q", const(torch.zeros(1, 4, 4, 576, dtype=BF16)), ValueError,
         r"q must have shape \[s_q, h_q, d_qk\] \(3-D\), got shape \(1, 4, 4, 576\)"),
    Case("q-d128", "sprefill", "q", const(torch.zeros(4, 4, 128, dtype=BF16)), ValueError,
         r"q must have head dim \(last dim\) 576 or 512, got shape \(4, 4, 128\)"),
    Case("kv-2d", "sprefill", "kv", const(torch.zeros(16, 576, dtype=BF16)), ValueError,
         r"kv must have shape \[s_kv, 1, d_qk\] \(3-D\), got shape \(16, 576\)"),
    Case("kv-heads", "sprefill", "kv", const(torch.zeros(16, 2, 576, dtype=BF16)), ValueError,
         r"kv must have kv heads \(dim 1\) equal to 1, got shape \(16, 2, 576\)"),
    Case("kv-dim", "sprefill", "kv", const(torch.zeros(16, 1, 512, dtype=BF16)), ValueError,
         r"kv must have head dim \(last dim\) equal to q's 576, got shape \(16, 1, 512\)"),
    Case("indices-2d", "sprefill", "indices", const(torch.zeros(4, 8, dtype=I32)), ValueError,
         r"indices must have shape \[s_q, 1, topk\] \(3-D\), got shape \(4, 8\)"),
    Case("indices-s-q", "sprefill", "indices", const(torch.zeros(5, 1, 8, dtype=I32)), ValueError,
         r"indices must have shape \[s_q, 1, topk\] = \[4, 1, topk\] matching q, got shape \(5, 1, 8\)"),
    Case("indices-dim1", "sprefill", "indices", const(torch.zeros(4, 2, 8, dtype=I32)), ValueError,
         r"indices must have shape \[s_q, 1, topk\] = \[4, 1, topk\] matching q, got shape \(4, 2, 8\)"),
    Case("sink-length", "sprefill", "attn_sink", const(torch.zeros(3)), ValueError,
         r"attn_sink must have length 4, got shape \(3,\)"),
    Case("sink-2d", "sprefill", "attn_sink", const(torch.zeros(1, 4)), ValueError,
         r"attn_sink must have shape \[h_q\] \(1-D\), got shape \(1, 4\)"),
    Case("topk-length-length", "sprefill", "topk_length", const(ints([1, 2, 3])), ValueError,
         r"topk_length must have length 4, got shape \(3,\)"),
    Case("topk-length-2d", "sprefill", "topk_length", const(ints([[1, 2, 3, 4]])), ValueError,
         r"topk_length must have shape \[s_q\] \(1-D\), got shape \(1, 4\)"),
    # values
    Case("scale-nan", "sprefill", "sm_scale", const(float("nan")), ValueError,
         r"sm_scale must be a finite positive float, got nan"),
    Case("scale-zero", "sprefill", "sm_scale", const(0), ValueError,
         r"sm_scale must be a finite positive float, got 0"),
    Case("scale-negative", "sprefill", "sm_scale", const(-0.04), ValueError,
         r"sm_scale must be a finite positive float, got -0.04"),
    Case("dv-256", "sprefill", "d_v", const(256), ValueError, r"d_v must be 512, got 256"),
    Case("dv-576", "sprefill", "d_v", const(576), ValueError, r"d_v must be 512, got 576"),
]


def test_table():
    check_table(CASES, ENTRIES)


def test_valid_baseline_is_accepted():
    build, call = ENTRIES["sprefill"]
    out, max_logits, lse = call(**build())
    assert out.shape == (4, 4, 512) and max_logits.shape == lse.shape == (4, 4)


def test_index_values_are_not_checked():
    # Out-of-range indices are invalid by contract (skipped), never an error.
    args = prefill_args()
    args["indices"] = torch.tensor([[[-3, 16, 2 ** 31 - 1, 0, 15, -1, 5, 99]]] * 4, dtype=I32)
    out, _, _ = ENTRIES["sprefill"][1](**args)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    check_case(case, ENTRIES, "sparse_prefill")
