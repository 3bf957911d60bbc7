"""flash_mla.oracle on the CPU: the float64 functions against autograd and against their own
byte-level and unchunked forms, and the plain functions against their definition (plain
PyTorch at the input precision, gradients by autograd)."""
from __future__ import annotations

import math

import pytest
import torch

from flash_mla import oracle, quant
from flash_mla.testing import check_close

EXACT = dict(abs_tol=1e-12, rel_tol=1e-10, cos_tol=1e-15)
LENS_Q, LENS_K = [5, 0, 7, 1, 27], [9, 3, 7, 0, 30]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _mha(seed=0, h_q=4, h_k=2, d=16, d_v=8, dtype=torch.bfloat16, pad=2):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = torch.randn(tq + pad, h_q, d, generator=g).to(dtype)
    k = torch.randn(tk, h_k, d, generator=g).to(dtype)
    v = torch.randn(tk, h_k, d_v, generator=g).to(dtype)
    dout = torch.randn(tq + pad, h_q, d_v, generator=g).to(dtype)
    q[tq:] = float("nan")  # rows outside every sequence: never read
    dout[tq:] = float("nan")
    return q, k, v, dout, _cu(LENS_Q), _cu(LENS_K)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_bwd_is_autograd_of_mha_fwd(causal):
    q, k, v, dout, cu_q, cu_k = _mha()
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out, lse = oracle.mha_fwd(*leaves, cu_q, cu_k, 0.3, causal)
    tq = sum(LENS_Q)
    assert torch.isposinf(lse[tq:]).all() and (out[tq:] == 0).all()
    no_keys = sum(LENS_Q[:3])  # sequence 3: one query, no keys
    assert torch.isposinf(lse[no_keys]).all() and (out[no_keys] == 0).all()
    out[:tq].backward(dout[:tq].double())
    for given_out in (None, out.detach()):  # the true gradient either way
        grads = oracle.mha_bwd(dout, q, k, v, given_out, cu_q, cu_k, 0.3, causal)
        for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
            want = torch.nan_to_num(leaf.grad, nan=0.0)
            check_close(got, want, **EXACT, name=f"{name} given {'no' if given_out is None else 'exact'} out")
    # A rounded out moves delta, hence dq and dk, but not dv = P^T dO.
    rounded = oracle.mha_bwd(dout, q, k, v, out.detach().to(torch.bfloat16), cu_q, cu_k, 0.3, causal)
    check_close(rounded[2], leaves[2].grad, **EXACT, name="dv given a rounded out")
    assert not torch.equal(rounded[0][:tq], leaves[0].grad[:tq])


def test_mha_chunking_is_exact(monkeypatch):
    q, k, v, dout, cu_q, cu_k = _mha(seed=1)
    whole_fwd = oracle.mha_fwd(q, k, v, cu_q, cu_k, 0.2, True)
    whole_bwd = oracle.mha_bwd(dout, q, k, v, whole_fwd[0], cu_q, cu_k, 0.2, True)
    whole_plain = oracle.plain_mha_bwd(dout, q, k, v, cu_q, cu_k, 0.2, True)
    monkeypatch.setattr(oracle, "_MAX_CHUNK_ELEMENTS", 4 * 30 * 3)  # 3 rows per chunk
    chunked_fwd = oracle.mha_fwd(q, k, v, cu_q, cu_k, 0.2, True)
    chunked_bwd = oracle.mha_bwd(dout, q, k, v, whole_fwd[0], cu_q, cu_k, 0.2, True)
    for a, b in zip(whole_fwd + whole_bwd, chunked_fwd + chunked_bwd):
        check_close(a, b, **EXACT, name="chunked")
    # plain: dq exact per chunk; dk / dv summed over chunks in fp32 and rounded once
    chunked_plain = oracle.plain_mha_bwd(dout, q, k, v, cu_q, cu_k, 0.2, True)
    assert torch.equal(chunked_plain[0], whole_plain[0])
    for a, b in zip(whole_plain[1:], chunked_plain[1:]):
        check_close(a, b, abs_tol=0.02, rel_tol=2.01 / 128, name="chunked plain")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_mha_is_plain_pytorch_at_the_input_precision(dtype):
    q, k, v, dout, cu_q, cu_k = _mha(seed=2, dtype=dtype, pad=0)
    out = oracle.plain_mha_fwd(q, k, v, cu_q, cu_k, 0.25, True)
    dq, dk, dv = oracle.plain_mha_bwd(dout, q, k, v, cu_q, cu_k, 0.25, True)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    # The definition written out for sequence 4 (s_q 27, s_k 30), GQA group 2.
    q0, k0 = sum(LENS_Q[:4]), sum(LENS_K[:4])
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q[q0:q0 + 27], k[k0:], v[k0:]))
    kh, vh = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", qs.float(), kh.float()) * 0.25
    mask = torch.arange(30)[None, :] <= torch.arange(27)[:, None] + 3
    p = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    want = torch.einsum("hmn,nhd->mhd", p.to(dtype), vh)
    want.backward(dout[q0:q0 + 27])
    assert torch.equal(out[q0:q0 + 27], want)
    assert torch.equal(dq[q0:q0 + 27], qs.grad)
    check_close(dk[k0:], ks.grad, abs_tol=1e-2, rel_tol=2.01 / 128, cos_tol=1e-5, name="dk")
    check_close(dv[k0:], vs.grad, abs_tol=1e-2, rel_tol=2.01 / 128, cos_tol=1e-5, name="dv")
    # The plain error is real (bf16/fp16 P) and the exact answer differs from it.
    exact = oracle.mha_fwd(q, k, v, cu_q, cu_k, 0.25, True)[0]
    assert float((out.double() - exact).abs().max()) > 0
    # A row that sees no key (sequence 3: s_q 1, s_k 0): out 0, no gradient.
    row = sum(LENS_Q[:3])
    assert (out[row] == 0).all() and (dq[row] == 0).all()


@pytest.mark.parametrize("d_qk", [576, 512])
def test_decode_fp8_tokens_matches_bytewise_and_quant(d_qk):
    g = torch.Generator().manual_seed(d_qk)
    blocks, page = 3, 5
    x = torch.randn(blocks, page, 1, d_qk, generator=g)
    packed = quant.quantize_kv_v32(x) if d_qk == 576 else quant.quantize_kv_model1(x)
    ids = [0, 4, 7, 14, 9]
    many = oracle.decode_fp8_tokens(packed, d_qk, ids)
    one_by_one = torch.stack([oracle.decode_fp8_token(packed, d_qk, i) for i in ids])
    assert torch.equal(many, one_by_one)
    dequant = quant.dequantize_kv_cache(packed, d_qk).reshape(blocks * page, d_qk).double()
    check_close(many, dequant[ids], abs_tol=1e-6, rel_tol=1e-6, name="vs quant")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 15\), got \[0, 15\]"):
        oracle.decode_fp8_tokens(packed, d_qk, [0, 15])


@pytest.mark.parametrize("fmt", ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"])
def test_decode_fp8_tokens_of_every_format_matches_bytewise_and_quant(fmt):
    g = torch.Generator().manual_seed(len(fmt))
    blocks, page = 3, 5
    d_qk = oracle.FORMAT_SIZES[fmt][1]
    packed = quant.quantize_kv(torch.randn(blocks, page, 1, d_qk, generator=g) * 4, fmt)
    ids = [0, 4, 7, 14, 9, 9]
    many = oracle.decode_fp8_tokens(packed, fmt, ids)
    assert many.dtype == torch.float64 and many.shape == (6, d_qk)
    assert torch.equal(many, torch.stack([oracle.decode_fp8_token(packed, fmt, i) for i in ids]))
    # the writers' scales make every product exact, so quant's fp32 values are the same numbers
    assert torch.equal(many, quant.dequantize_kv(packed, fmt).reshape(blocks * page, d_qk).double()[ids])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 15\), got \[-1, 9\]"):
        oracle.decode_fp8_tokens(packed, fmt, [9, -1])
    with pytest.raises(ValueError, match=r"kv_format must be one of .*got 'V5'"):
        oracle.decode_fp8_tokens(packed, "V5", [0])


def _decode_pool(fmt, g, blocks=2, page=3):
    d_qk = oracle.FORMAT_SIZES[fmt][1]
    return quant.quantize_kv(torch.randn(blocks, page, 1, d_qk, generator=g), fmt), d_qk


def test_sparse_decode_skips_every_out_of_range_index_and_takes_old_pools():
    g = torch.Generator().manual_seed(8)
    cache, d_qk = _decode_pool("V4", g)  # 6 slots
    q = torch.randn(1, 2, 3, d_qk, generator=g).to(torch.bfloat16)
    odd = torch.tensor([[[0, -2, 6, 5, -(2 ** 31), 2 ** 31 - 1, 114514], [3, 3, -1, 6, 7, 1, 0]]], dtype=torch.int32)
    clean = [torch.tensor([[[0, 5]]], dtype=torch.int32),  # what each row really reads
             torch.tensor([[[3, 3, 1, 0]]], dtype=torch.int32)]
    out, lse = oracle.sparse_decode(q, [(cache, odd, None, "V4")], 0.1, 512)
    old_out, old_lse = oracle.sparse_decode(q, [(cache, odd, None)], 0.1, 512)  # format from d_qk 512
    assert torch.equal(out, old_out) and torch.equal(lse, old_lse)
    for j in range(2):
        want, want_lse = oracle.sparse_decode(q[:, j:j + 1], [(cache, clean[j], None, "V4")], 0.1, 512)
        assert torch.equal(out[:, j:j + 1], want) and torch.equal(lse[:, j:j + 1], want_lse)
    with pytest.raises(ValueError, match=r"pools\[0\] has kv_format 'V32' \(d_qk 576\), but q has head dim 512"):
        oracle.sparse_decode(q, [(cache, odd, None, "V32")], 0.1, 512)


def test_sparse_decode_pools_of_different_formats_join_one_softmax():
    g = torch.Generator().manual_seed(9)
    main, d_qk = _decode_pool("V41", g)
    extra, _ = _decode_pool("V41_FP4", g, blocks=3, page=2)
    q = torch.randn(1, 1, 2, d_qk, generator=g).to(torch.bfloat16)
    idx, extra_idx = torch.tensor([[[1, 4]]], dtype=torch.int32), torch.tensor([[[5, 0, 2]]], dtype=torch.int32)
    out, lse = oracle.sparse_decode(q, [(main, idx, [1], "V41"), (extra, extra_idx, [2], "V41_FP4")], 0.2, 512)
    keys = torch.cat([oracle.decode_fp8_tokens(main, "V41", [1]), oracle.decode_fp8_tokens(extra, "V41_FP4", [5, 0])])
    logits = q[0, 0].double() @ keys.T * 0.2
    check_close(out[0, 0], torch.softmax(logits, -1) @ keys[:, :512], name="out", **EXACT)
    check_close(lse[0, 0], torch.logsumexp(logits, -1), name="lse", **EXACT)


def test_plain_sparse_decode_is_plain_pytorch_at_the_input_precision():
    g = torch.Generator().manual_seed(10)
    cache, d_qk = _decode_pool("V32", g, blocks=4, page=5)
    extra, _ = _decode_pool("V32", g, blocks=2, page=2)
    b, s_q, h_q = 2, 2, 3
    q = torch.randn(b, s_q, h_q, d_qk, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, 20, (b, s_q, 7), generator=g, dtype=torch.int32)
    idx[1, 1] = -1
    extra_idx = torch.randint(0, 4, (b, s_q, 3), generator=g, dtype=torch.int32)
    sink = torch.tensor([0.3, math.inf, -math.inf])
    pools = [(cache, idx, [7, 5], "V32"), (extra, extra_idx, [3, 0], "V32")]
    plain = oracle.plain_sparse_decode(q, pools, 0.05, 512, sink)
    assert plain.dtype == torch.bfloat16 and plain.shape == (b, s_q, h_q, 512)
    assert (plain[1, 1] == 0).all() and (plain[:, :, 1] == 0).all()  # empty row; +inf sink
    # row (0, 1) by definition: fp32 scores and softmax, P in bf16, P.V in bf16, sink in fp32
    ids = [t for t in idx[0, 1].tolist() if t >= 0]
    keys = torch.cat([oracle.decode_fp8_tokens(cache, "V32", ids),
                      oracle.decode_fp8_tokens(extra, "V32", extra_idx[0, 1].tolist())]).to(torch.bfloat16)
    scores = q[0, 1].float() @ keys.float().T * 0.05
    o = (torch.softmax(scores, -1).to(torch.bfloat16) @ keys[:, :512]).float()
    o = o * (1 / (1 + torch.exp(sink - torch.logsumexp(scores, -1)))).unsqueeze(-1)
    assert torch.equal(plain[0, 1], o.to(torch.bfloat16))
    exact, _ = oracle.sparse_decode(q, pools, 0.05, 512, sink)
    check_close(plain, exact, abs_tol=1e-2, rel_tol=2.01 / 128, cos_tol=1e-4, name="plain vs exact")


def test_attend_ignores_nan_in_keys_no_row_sees():
    q = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 2, dtype=torch.float64)
    k[2], v[2] = float("nan"), float("nan")
    visible = torch.tensor([[True, True, False], [False, False, False]])
    out, lse, peak = oracle.attend(q, k, v, visible, 0.5)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert float(lse[1].detach()) == math.inf and float(peak[1].detach()) == -math.inf
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1] == 0).all()


def test_combine_and_plain_combine_agree_up_to_one_rounding():
    g = torch.Generator().manual_seed(4)
    o = torch.randn(7, 2, 4, 16, generator=g)
    lse = torch.randn(7, 2, 4, generator=g) * 8
    lse[torch.rand(7, 2, 4, generator=g) < 0.3] = -math.inf
    o[torch.isneginf(lse)] = float("nan")
    sink = torch.tensor([math.inf, -math.inf, 0.5, -2.0])
    out, merged = oracle.combine(o, lse, [0, 3, 3, 7, 100], sink)
    assert out.shape == (4, 2, 4, 16) and torch.isposinf(merged[1]).all() and (out[1] == 0).all()
    assert (out[:, :, 0] == 0).all()  # a +inf sink takes everything
    plain = oracle.plain_combine(o, lse, [0, 3, 3, 7, 100], sink, torch.bfloat16)
    check_close(plain, out, abs_tol=1e-5, rel_tol=2.01 / 256, name="plain combine")
