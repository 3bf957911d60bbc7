"""Native split-KV combine against a float64 oracle, on a GPU.

Semantics (csrc/params.h, csrc/portable/decode/combine/kernel.cuh): batch b merges splits
[split_offsets[b], split_offsets[b+1]) (clamped to [0, num_splits]); partial LSEs
are log2, -inf marks an empty split whose partial output is never read (here it
holds NaN); the output lse is natural log and excludes the sink; with a sink,
out *= exp(lse) / (exp(lse) + exp(sink)); an empty row gives out 0, lse +inf.

Tolerances: out is one rounding of an fp32 result, so SPEC.md's dense-decode row
applies (bf16: abs 8e-4 / rel 2.01/128 / cos 5e-6; fp16 rel 2.01/1024); lse abs
1e-6 / rel 8.01/65536; +inf/-inf/NaN positions must match exactly.
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

gpu = pytest.mark.gpu

from flash_mla import _native  # noqa: E402

REL = {torch.bfloat16: 2.01 / 128, torch.float16: 2.01 / 1024}
OUT_ABS, COS_TOL = 8e-4, 5e-6
LSE_ABS, LSE_REL = 1e-6, 8.01 / 65536


def _combine():
    reason = _native.unavailable_reason("combine", "cuda")
    if reason is not None:
        pytest.fail(f"native combine unavailable on this GPU: {reason}")
    return _native.function("combine")


def oracle(o_accum, lse_accum, offsets, sink):
    """float64 reference: returns (out [b, s_q, h_q, d_v], lse [b, s_q, h_q])."""
    o = o_accum.double().cpu()
    l2 = lse_accum.double().cpu()
    offs = offsets.cpu().tolist()
    total, s_q, h_q, d_v = o.shape
    batch = len(offs) - 1
    out = torch.zeros(batch, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((batch, s_q, h_q), math.inf, dtype=torch.float64)
    for b in range(batch):
        start = min(max(offs[b], 0), total)
        end = min(max(offs[b + 1], start), total)
        if end == start:
            continue
        part = l2[start:end]                      # [n, s_q, h_q]
        m = part.max(dim=0).values
        safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        total_lse2 = safe_m + torch.log2(torch.exp2(part - safe_m).sum(dim=0))
        w = torch.exp2(part - total_lse2)         # 0 for -inf splits
        vals = torch.where(w[..., None] > 0, o[start:end], torch.zeros_like(o[start:end]))
        acc = (w[..., None] * vals).sum(dim=0)
        empty = torch.isinf(m) & (m < 0)
        lse_b = torch.where(empty, torch.full_like(m, math.inf), total_lse2 * math.log(2.0))
        if sink is not None:
            s = sink.double().cpu()[None, :].expand(s_q, h_q)
            scale = 1.0 / (1.0 + torch.exp(s - lse_b))
            acc = acc * scale[..., None]
        acc = torch.where(empty[..., None], torch.zeros_like(acc), acc)
        out[b] = acc
        lse[b] = lse_b
    return out, lse


def _check(name, got, ref, abs_tol, rel_tol, cos_tol=None):
    got = got.double().cpu()
    ref = ref.double().cpu()
    for label, fn in (("+inf", lambda t: torch.isposinf(t)), ("-inf", torch.isneginf),
                      ("NaN", torch.isnan)):
        mism = (fn(got) != fn(ref)).nonzero()
        assert mism.numel() == 0, f"{name}: {label} positions differ, first at {mism[0].tolist()}"
    finite = torch.isfinite(ref)
    g, r = got[finite], ref[finite]
    err = (g - r).abs()
    ok = (err < abs_tol) | (err / (r.abs() + 1e-6) < rel_tol)
    if not bool(ok.all()):
        idx = int((~ok).nonzero()[0])
        raise AssertionError(f"{name}: {int((~ok).sum())} elements out of tolerance; first: got "
                             f"{float(g[idx])}, expected {float(r[idx])}")
    if cos_tol is not None and r.numel():
        denom = float((g * g).sum() + (r * r).sum())
        if denom > 0:
            cos_diff = 1 - 2 * float((g * r).sum()) / denom
            assert cos_diff <= cos_tol, f"{name}: cos_diff {cos_diff} > {cos_tol}"


def _make(batch, s_q, h_q, d_v, seed, counts=None, neg_inf_frac=0.3, padded_out=False,
          dtype=torch.bfloat16, dev="cuda"):
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = torch.randint(0, 6, (batch,), generator=g).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    total = offsets[-1]
    o = torch.randn(total, s_q, h_q, d_v, generator=g)
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d_v", [512, 128, 260])
@pytest.mark.parametrize("sink_kind", list(SINKS))
def test_combine_matches_oracle(dtype, d_v, sink_kind):
    fn = _combine()
    batch, s_q, h_q = 5, 2, 16
    o, lse_acc, offs, out, lse = _make(batch, s_q, h_q, d_v, seed=d_v + len(sink_kind),
                                       dtype=dtype, padded_out=(sink_kind == "mixed"))
    sink = None if SINKS[sink_kind] is None else SINKS[sink_kind](h_q).cuda()
    fn(o, lse_acc, offs, sink, out, lse)
    torch.cuda.synchronize()
    ref_out, ref_lse = oracle(o, lse_acc, offs, sink)
    _check("out", out.float(), ref_out, OUT_ABS, REL[dtype], COS_TOL)
    _check("lse", lse, ref_lse, LSE_ABS, LSE_REL)


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
    ref_out, ref_lse = oracle(o, lse_acc, offs, None)
    assert torch.isposinf(lse[1]).all() and torch.isposinf(lse[2]).all()
    assert (out[1].float() == 0).all() and (out[2].float() == 0).all()
    _check("out", out.float(), ref_out, OUT_ABS, REL[torch.bfloat16], COS_TOL)
    _check("lse", lse, ref_lse, LSE_ABS, LSE_REL)


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
    ref_out, ref_lse = oracle(o, lse_acc, bad, None)
    _check("out", out.float(), ref_out, OUT_ABS, REL[torch.bfloat16], COS_TOL)
    _check("lse", lse, ref_lse, LSE_ABS, LSE_REL)


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
    """CPU: this file's float64 oracle and flash_mla.reference.combine (the library's
    fp32 reference) agree, including empty splits, clamped offsets and every sink kind."""
    reference = pytest.importorskip("flash_mla.reference")
    for sink_kind, maker in SINKS.items():
        o, lse_acc, offs, _, _ = _make(4, 2, 8, 64, seed=2, counts=[3, 0, 40, 2], dev="cpu")
        lse_acc[43:45] = -math.inf
        sink = None if maker is None else maker(8)
        for offsets in (offs, torch.tensor([-5, 4, 1, 1000, 45], dtype=torch.int32)):
            ref_out, ref_lse = reference.combine(o, lse_acc, offsets, sink)
            want_out, want_lse = oracle(o, lse_acc, offsets, sink)
            _check(f"out ({sink_kind})", ref_out, want_out, 1e-5, 1e-5)
            _check(f"lse ({sink_kind})", ref_lse, want_lse, 1e-5, 1e-6)
