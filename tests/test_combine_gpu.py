"""Native split-KV combine against the float64 oracle (flash_mla.oracle.combine), on a GPU.

Semantics (csrc/params.h, csrc/portable/decode/combine/): batch b merges splits
[split_offsets[b], split_offsets[b+1]) (clamped to [0, num_splits]); partial LSEs
are log2, -inf marks an empty split whose partial output is never read (here it
holds NaN); the output lse is natural log and excludes the sink; with a sink,
out *= exp(lse) / (exp(lse) + exp(sink)); an empty row gives out 0, lse +inf.

Numerics (flash_mla.testing; combine belongs to decode, so the dense-decode row): partial
outputs ~ N(0, 1) with LSEs ~ 8 N(0, 1) are hostile inputs, checked by the plain-math rule
(max error at most 2x that of the merge in plain fp32 PyTorch rounded once,
oracle.plain_combine) plus the cos bound and the exact inf/NaN pattern; partial outputs ~
randn/10 are upstream-style, checked by the element rule (abs 8e-4 OR rel 2.01/128, cos
5e-6). lse (fp32) always by the element rule (abs 1e-6 OR rel 8.01/65536).
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from flash_mla import oracle  # noqa: E402
from flash_mla.testing import check_close, check_op_close, check_plain_rule  # noqa: E402
from tests.gpu_native import native_function  # noqa: E402

gpu = pytest.mark.gpu
HOSTILE, UPSTREAM = "hostile", "upstream"


def _combine():
    return native_function("combine")


def _check(o, lse_acc, offs, sink, out, lse, style=HOSTILE):
    """The rule ``style`` calls for on out; the element rule on lse."""
    exact_out, exact_lse = oracle.combine(o, lse_acc, offs, sink)
    if style == UPSTREAM:
        check_op_close("dense_decode", "out", out, exact_out, name="combine.out")
    else:
        plain = oracle.plain_combine(o, lse_acc, offs, sink, out.dtype)
        check_plain_rule(out, exact_out, plain, "dense_decode", "out", name="combine.out")
    check_op_close("dense_decode", "lse", lse, exact_lse, name="combine.lse")


def _make(batch, s_q, h_q, d_v, seed, counts=None, neg_inf_frac=0.3, padded_out=False,
          dtype=torch.bfloat16, dev="cuda", std=1.0):
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = torch.randint(0, 6, (batch,), generator=g).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    total = offsets[-1]
    o = torch.randn(total, s_q, h_q, d_v, generator=g) * std
    lse = torch.randn(total, s_q, h_q, generator=g) * 8
    drop = torch.rand(total, s_q, h_q, generator=g) < neg_inf_frac
    lse[drop] = -math.inf
    o[drop] = math.nan  # an empty split's partial output must never be read
    out_shape = (batch, s_q, h_q, d_v)
    if padded_out:
        # Non-contiguous output: pad every dim, keep the last one contiguous.
        big = torch.full((batch + 1, s_q + 1, h_q + 1, d_v + 128), 7.0, dtype=dtype, device=dev)
        out = big[:batch, :s_q, :h_q, :d_v]
    else:
        out = torch.full(out_shape, 7.0, dtype=dtype, device=dev)
    lse_out = torch.full((batch, s_q, h_q), 7.0, device=dev)
    return (o.to(dev), lse.to(dev), torch.tensor(offsets, dtype=torch.int32, device=dev),
            out, lse_out)


SINKS = {
    "none": None,
    "finite": lambda h: torch.randn(h, generator=torch.Generator().manual_seed(3)) * 3,
    "posinf": lambda h: torch.full((h,), math.inf),
    "neginf": lambda h: torch.full((h,), -math.inf),
    "mixed": lambda h: torch.tensor([math.inf, -math.inf, 0.5, -2.0] * (h // 4 + 1))[:h],
}


@gpu
@pytest.mark.parametrize("style", [HOSTILE, UPSTREAM])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d_v", [512, 128, 260])
@pytest.mark.parametrize("sink_kind", list(SINKS))
def test_combine_matches_oracle(dtype, d_v, sink_kind, style):
    fn = _combine()
    batch, s_q, h_q = 5, 2, 16
    o, lse_acc, offs, out, lse = _make(batch, s_q, h_q, d_v, seed=d_v + len(sink_kind),
                                       dtype=dtype, padded_out=(sink_kind == "mixed"),
                                       std=1.0 if style == HOSTILE else 0.1)
    sink = None if SINKS[sink_kind] is None else SINKS[sink_kind](h_q).cuda()
    fn(o, lse_acc, offs, sink, out, lse)
    torch.cuda.synchronize()
    _check(o, lse_acc, offs, sink, out, lse, style)


@gpu
def test_combine_many_splits_and_empty_rows():
    """Over 32 splits (lanes loop), a zero-split batch, an all -inf batch."""
    fn = _combine()
    batch, s_q, h_q, d_v = 4, 1, 8, 512
    o, lse_acc, offs, out, lse = _make(batch, s_q, h_q, d_v, seed=7, counts=[70, 0, 3, 33],
                                       neg_inf_frac=0.1)
    lse_acc[70:73] = -math.inf  # batch 2: every split empty
    fn(o, lse_acc, offs, None, out, lse)
    torch.cuda.synchronize()
    assert torch.isposinf(lse[1]).all() and torch.isposinf(lse[2]).all()
    assert (out[1].float() == 0).all() and (out[2].float() == 0).all()
    _check(o, lse_acc, offs, None, out, lse)


@gpu
def test_combine_clamps_bad_offsets():
    """Offsets past the end or decreasing never read out of bounds (sanitizer run)."""
    fn = _combine()
    batch, s_q, h_q, d_v = 3, 1, 4, 128
    o, lse_acc, _, out, lse = _make(batch, s_q, h_q, d_v, seed=11, counts=[2, 2, 2],
                                    neg_inf_frac=0.0)
    bad = torch.tensor([-5, 4, 1, 1000], dtype=torch.int32, device="cuda")
    fn(o, lse_acc, bad, None, out, lse)
    torch.cuda.synchronize()
    _check(o, lse_acc, bad, None, out, lse)


@gpu
def test_combine_is_deterministic():
    fn = _combine()
    o, lse_acc, offs, out, lse = _make(6, 2, 32, 512, seed=5)
    fn(o, lse_acc, offs, None, out, lse)
    first = out.clone(), lse.clone()
    for _ in range(3):
        fn(o, lse_acc, offs, None, out, lse)
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


@gpu
def test_combine_validation_errors():
    fn = _combine()
    o, lse_acc, offs, out, lse = _make(2, 1, 4, 128, seed=1, counts=[1, 2])
    with pytest.raises(ValueError, match="lse_accum must have shape"):
        fn(o, lse_acc[:, :, :2].contiguous(), offs, None, out, lse)
    with pytest.raises(ValueError, match="split_offsets must have shape"):
        fn(o, lse_acc, offs[:2], None, out, lse)
    with pytest.raises(TypeError, match="out must have dtype bfloat16 or float16, got float32"):
        fn(o, lse_acc, offs, None, out.float(), lse)
    with pytest.raises(TypeError, match="split_offsets must have dtype int32"):
        fn(o, lse_acc, offs.long(), None, out, lse)
    with pytest.raises(ValueError, match="attn_sink must have shape"):
        fn(o, lse_acc, offs, torch.zeros(3, device="cuda"), out, lse)
    with pytest.raises(ValueError, match="o_accum must be a CUDA tensor"):
        fn(o.cpu(), lse_acc, offs, None, out, lse)
    with pytest.raises(ValueError, match="d_v must be a multiple of 4"):
        o2 = torch.zeros(3, 1, 4, 6, device="cuda")
        fn(o2, lse_acc, offs, None, torch.zeros(2, 1, 4, 6, dtype=torch.bfloat16,
                                                device="cuda"), lse)
    with pytest.raises(ValueError, match="o_accum must be contiguous"):
        fn(o.transpose(0, 2), lse_acc, offs, None, out, lse)


def test_oracle_agrees_with_reference_combine():
    """CPU: the float64 oracle and flash_mla.reference.combine (the library's fp32
    reference) agree, including empty splits, clamped offsets and every sink kind."""
    reference = pytest.importorskip("flash_mla.reference")
    for sink_kind, maker in SINKS.items():
        o, lse_acc, offs, _, _ = _make(4, 2, 8, 64, seed=2, counts=[3, 0, 40, 2], dev="cpu")
        lse_acc[43:45] = -math.inf
        sink = None if maker is None else maker(8)
        for offsets in (offs, torch.tensor([-5, 4, 1, 1000, 45], dtype=torch.int32)):
            ref_out, ref_lse = reference.combine(o, lse_acc, offsets, sink)
            want_out, want_lse = oracle.combine(o, lse_acc, offsets, sink)
            check_close(ref_out, want_out, abs_tol=1e-5, rel_tol=1e-5, name=f"out ({sink_kind})")
            check_close(ref_lse, want_lse, abs_tol=1e-5, rel_tol=1e-6, name=f"lse ({sink_kind})")
