"""flash_mla.reference against the independent float64 oracle (flash_mla.oracle),
on small hostile inputs (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from flash_mla import quant, reference
from flash_mla.testing import TOLERANCES, check_close, compare, invalid_prefill_indices, make_noncontiguous, make_paged_kv_cache
from flash_mla import oracle as f64

# fp32 reference vs float64 oracle: fp32 rounding over dot products of a few hundred terms.
FP32_TOL = dict(abs_tol=2e-5, rel_tol=2e-4, cos_tol=1e-9)
INF = float("inf")


def _close(actual, expected, name, **tol):
    assert actual.dtype == torch.float32, f"{name} must be fp32, got {actual.dtype}"
    check_close(actual, expected, name=name, **{**FP32_TOL, **tol})


def _finite_where_expected(t: torch.Tensor, name: str):
    assert not torch.isnan(t).any(), f"{name} has NaN"


# ---------------------------------------------------------------------------
# dense decode
# ---------------------------------------------------------------------------
DENSE_CASES = [
    # seqlens, s_q, h_q, h_k, causal, page_size
    ([0, 1, 70, 130], 1, 4, 1, False, 64),
    ([5, 64, 129, 2], 3, 4, 2, True, 64),   # seqlen 2 < s_q 3: first query sees no key
    ([33, 0, 17], 2, 6, 3, True, 16),
    ([40, 9], 2, 2, 2, False, 7),
]


@pytest.mark.parametrize("seqlens,s_q,h_q,h_k,causal,page_size", DENSE_CASES)
def test_dense_decode_matches_float64(seqlens, s_q, h_q, h_k, causal, page_size):
    gen = torch.Generator().manual_seed(sum(seqlens) + s_q)
    cache = make_paged_kv_cache(seqlens, page_size=page_size, h_k=h_k, d=576, generator=gen)
    q = make_noncontiguous(torch.randn(len(seqlens), s_q, h_q, 576, generator=gen).to(torch.bfloat16))
    k_cache = make_noncontiguous(cache.k_cache)
    table = make_noncontiguous(cache.block_table)
    scale = 576 ** -0.5
    out, lse = reference.dense_decode(q, k_cache, table, cache.cache_seqlens, head_dim_v=512,
                                      softmax_scale=scale, causal=causal)
    assert out.shape == (len(seqlens), s_q, h_q, 512) and lse.shape == (len(seqlens), h_q, s_q)
    exp_out, exp_lse = f64.dense_decode(q, cache.k_cache, cache.block_table, seqlens, 512, scale, causal)
    _finite_where_expected(out, "out")
    _close(out, exp_out, "dense_decode.out")
    _close(lse, exp_lse, "dense_decode.lse")
    for i, s in enumerate(seqlens):
        if s == 0:
            assert (out[i] == 0).all() and (lse[i] == INF).all()


def test_dense_decode_causal_empty_row_and_default_scale():
    gen = torch.Generator().manual_seed(3)
    cache = make_paged_kv_cache([2], page_size=64, d=576, generator=gen)
    q = torch.randn(1, 4, 2, 576, generator=gen, dtype=torch.float32)
    out, lse = reference.dense_decode(q, cache.k_cache, cache.block_table, cache.cache_seqlens, 512, None, True)
    # s_k 2, s_q 4: queries 0 and 1 see nothing, query 2 sees key 0, query 3 keys 0..1
    assert (out[0, :2] == 0).all() and (lse[0, :, :2] == INF).all()
    k0 = cache.sequences[0][0, 0].float()
    q2 = q[0, 2].double()
    assert torch.allclose(lse[0, :, 2].double(), q2 @ k0.double() * 576 ** -0.5, atol=1e-5)
    assert torch.allclose(out[0, 2], k0[:512].expand(2, 512))


def test_dense_decode_negative_seqlen_is_an_empty_sequence():
    # flash_mla.dense_decode rejects a negative length where it can read it; on a GPU it
    # is not read, and the reference then treats the sequence as empty (never NaN).
    cache = make_paged_kv_cache([10, 3], page_size=64, d=576)
    q = torch.randn(2, 1, 4, 576).to(torch.bfloat16)
    seqlens = cache.cache_seqlens.clone()
    seqlens[1] = -5
    out, lse = reference.dense_decode(q, cache.k_cache, cache.block_table, seqlens, 512, None, False)
    assert (out[1] == 0).all() and (lse[1] == INF).all()
    want, want_lse = reference.dense_decode(q[:1], cache.k_cache, cache.block_table[:1],
                                            cache.cache_seqlens[:1], 512, None, False)
    assert torch.equal(out[:1], want) and torch.equal(lse[:1], want_lse)


# ---------------------------------------------------------------------------
# sparse decode (FP8 cache)
# ---------------------------------------------------------------------------
FORMATS = ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"]


def _fp8_pool(fmt, num_blocks, page_size, gen, live_fraction=0.5):
    """Quantised cache in format ``fmt`` (a name, or the older head dim 576 / 512) whose non-live
    tokens are NaN before quantisation (so their bytes are NaN), and the live physical indices."""
    fmt = quant.resolve_format(fmt).name
    d_qk = quant.FORMATS[fmt].d_qk
    total = num_blocks * page_size
    kv = torch.randn(num_blocks, page_size, 1, d_qk, generator=gen).to(torch.bfloat16)
    live = torch.randperm(total, generator=gen)[: max(1, int(total * live_fraction))]
    dead = torch.ones(total, dtype=torch.bool)
    dead[live] = False
    kv.view(total, d_qk)[dead] = float("nan")
    return quant.quantize_kv(kv, fmt), live


def _sparse_indices(b, s_q, topk, live, gen, invalid_fraction=0.25):
    picks = live[torch.randint(0, live.numel(), (b, s_q, topk), generator=gen)].to(torch.int32)
    invalid = torch.rand(b, s_q, topk, generator=gen) < invalid_fraction
    return torch.where(invalid, torch.full_like(picks, -1), picks)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("page_size", [1, 2, 61, 64, 69])
def test_sparse_decode_matches_float64(fmt, page_size):
    d_qk = quant.FORMATS[fmt].d_qk
    gen = torch.Generator().manual_seed(100 * page_size + FORMATS.index(fmt))
    b, s_q, h_q, topk = 3, 2, 4, 20
    num_blocks = max(2, 90 // page_size)
    cache, live = _fp8_pool(fmt, num_blocks, page_size, gen)
    indices = _sparse_indices(b, s_q, topk, live, gen)
    indices[1, 1] = -1  # an all-invalid row
    topk_length = torch.tensor([topk, 13, 0], dtype=torch.int32)  # batch 2 attends to nothing
    # past topk_length anything may sit there: it must be ignored
    indices[1, :, 13:] = 2 ** 31 - 1
    indices[2] = torch.randint(-5, 10 ** 6, (s_q, topk), generator=gen, dtype=torch.int32)
    q = make_noncontiguous(torch.randn(b, s_q, h_q, d_qk, generator=gen).to(torch.bfloat16))
    scale = d_qk ** -0.5
    out, lse = reference.sparse_decode(q, cache, indices, topk_length, scale, d_v=512, kv_format=fmt)
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, s_q, h_q)
    exp_out, exp_lse = f64.sparse_decode(q, [(cache, indices, topk_length.tolist(), fmt)], scale, 512)
    _finite_where_expected(out, "out")
    _close(out, exp_out, "sparse_decode.out")
    _close(lse, exp_lse, "sparse_decode.lse")
    assert (lse[1, 1] == INF).all() and (out[1, 1] == 0).all()
    assert (lse[2] == INF).all() and (out[2] == 0).all()
    if fmt != "V32_NO_ROPE":  # the others are what their size detects
        assert torch.equal(reference.sparse_decode(q, cache, indices, topk_length, scale, d_v=512)[0], out)


# (main, extra): the older same-format pairs, upstream's V41 + V41_FP4, and mixed ones
PAIRS = [("V32", "V32"), ("V4", "V4"), ("V41", "V41_FP4"), ("V41_FP4", "V32_NO_ROPE"), ("V4", "V41")]


@pytest.mark.parametrize("fmt,extra_fmt", PAIRS)
def test_sparse_decode_extra_pool_and_sinks(fmt, extra_fmt):
    d_qk = quant.FORMATS[fmt].d_qk
    gen = torch.Generator().manual_seed(7 + PAIRS.index((fmt, extra_fmt)))
    b, s_q, h_q, topk, extra_topk = 2, 3, 4, 16, 9
    cache, live = _fp8_pool(fmt, 5, 64, gen)
    extra, extra_live = _fp8_pool(extra_fmt, 7, 3, gen)  # a different page size
    indices = _sparse_indices(b, s_q, topk, live, gen)
    extra_indices = _sparse_indices(b, s_q, extra_topk, extra_live, gen)
    indices[0, 0] = -1                    # row served by the extra pool only
    indices[1, 2] = -1
    extra_indices[1, 2] = -1              # row empty in both pools
    extra_length = torch.tensor([extra_topk, 4], dtype=torch.int32)
    extra_indices[1, :, 4:] = -123456     # ignored: past extra_topk_length
    sink = torch.tensor([0.5, INF, -INF, -1.25])
    q = torch.randn(b, s_q, h_q, d_qk, generator=gen).to(torch.bfloat16)
    scale = 0.07
    formats = dict(kv_format=fmt, extra_kv_format=extra_fmt)
    out, lse = reference.sparse_decode(q, cache, indices, None, scale, d_v=512, attn_sink=sink,
                                       extra_k_cache=extra, extra_indices=extra_indices,
                                       extra_topk_length=extra_length, **formats)
    pools = [(cache, indices, None, fmt), (extra, extra_indices, extra_length.tolist(), extra_fmt)]
    exp_out, exp_lse = f64.sparse_decode(q, pools, scale, 512, sink=sink)
    _finite_where_expected(out, "out")
    _close(out, exp_out, "sparse_decode.out")
    _close(lse, exp_lse, "sparse_decode.lse")
    assert (out[..., 1, :] == 0).all()  # sink +inf zeroes the head
    assert (out[1, 2] == 0).all() and (lse[1, 2] == INF).all()
    # sink -inf changes nothing; the returned lse never includes the sink
    plain, plain_lse = reference.sparse_decode(q, cache, indices, None, scale, d_v=512,
                                               extra_k_cache=extra, extra_indices=extra_indices,
                                               extra_topk_length=extra_length, **formats)
    assert torch.equal(out[..., 2, :], plain[..., 2, :]) and torch.equal(lse, plain_lse)
    factor = torch.sigmoid(plain_lse[..., 0] - 0.5)
    assert torch.allclose(out[..., 0, :], plain[..., 0, :] * factor.unsqueeze(-1), atol=1e-6)


def test_sparse_decode_duplicates_count_twice_and_topk_beyond_pool():
    gen = torch.Generator().manual_seed(21)
    cache, live = _fp8_pool(576, 2, 4, gen, live_fraction=0.5)  # 4 live tokens, topk 40 > 8 slots
    indices = live[torch.randint(0, live.numel(), (1, 1, 40), generator=gen)].to(torch.int32)
    q = torch.randn(1, 1, 2, 576, generator=gen).to(torch.bfloat16)
    out, lse = reference.sparse_decode(q, cache, indices, None, 0.05)
    exp_out, exp_lse = f64.sparse_decode(q, [(cache, indices, None)], 0.05, 512)
    _close(out, exp_out, "out")
    _close(lse, exp_lse, "lse")


def test_sparse_decode_topk_zero():
    gen = torch.Generator().manual_seed(23)
    cache, _ = _fp8_pool(512, 2, 4, gen)
    q = torch.randn(2, 3, 4, 512, generator=gen).to(torch.bfloat16)
    out, lse = reference.sparse_decode(q, cache, torch.zeros(2, 3, 0, dtype=torch.int32), None, 0.1)
    assert out.shape == (2, 3, 4, 512) and (out == 0).all() and (lse == INF).all()


def test_sparse_decode_negative_and_past_the_cache_indices_are_invalid():
    # Any negative index and any index >= num_blocks * page_size is skipped like -1
    # (never read: the bytes behind the cache could be anything).
    gen = torch.Generator().manual_seed(22)
    cache, live = _fp8_pool(576, 2, 4, gen)  # 8 slots
    q = torch.randn(1, 1, 2, 576, generator=gen).to(torch.bfloat16)
    good = live[:2].to(torch.int32)
    odd = torch.tensor([[[int(good[0]), -2, 8, int(good[1]), -(2 ** 31), 2 ** 31 - 1]]], dtype=torch.int32)
    plain = torch.tensor([[[int(good[0]), -1, -1, int(good[1]), -1, -1]]], dtype=torch.int32)
    out, lse = reference.sparse_decode(q, cache, odd, None, 0.1)
    want, want_lse = reference.sparse_decode(q, cache, plain, None, 0.1)
    assert torch.isfinite(out).all() and torch.equal(out, want) and torch.equal(lse, want_lse)


# ---------------------------------------------------------------------------
# sparse prefill
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("d_qk,d_v", [(576, 512), (512, 512)])
def test_sparse_prefill_matches_float64(d_qk, d_v):
    gen = torch.Generator().manual_seed(d_qk)
    s_q, h_q, s_kv, topk = 7, 4, 40, 64  # topk > s_kv
    bad = invalid_prefill_indices(s_kv)
    assert len(bad) == 7
    indices = torch.randint(0, s_kv, (s_q, 1, topk), generator=gen, dtype=torch.int32)
    where_bad = torch.rand(s_q, 1, topk, generator=gen) < 0.3
    bad_values = torch.tensor(bad, dtype=torch.int32)[torch.randint(0, len(bad), (s_q, 1, topk), generator=gen)]
    indices = torch.where(where_bad, bad_values, indices)
    indices[0, 0, : len(bad)] = torch.tensor(bad, dtype=torch.int32)  # every candidate appears
    indices[3, 0] = torch.tensor(bad, dtype=torch.int32).repeat(10)[:topk]  # an all-invalid row
    topk_length = torch.tensor([topk, 50, 0, topk, 1, 200, 33], dtype=torch.int32)  # 0, and > topk
    sink = torch.tensor([INF, 0.3, -INF, -2.0])
    q = make_noncontiguous(torch.randn(s_q, h_q, d_qk, generator=gen).to(torch.bfloat16))
    kv = make_noncontiguous(torch.randn(s_kv, 1, d_qk, generator=gen).to(torch.bfloat16))
    for use_sink, use_length in ((False, False), (True, True)):
        kwargs = dict(attn_sink=sink if use_sink else None, topk_length=topk_length if use_length else None)
        out, max_logits, lse = reference.sparse_prefill(q, kv, make_noncontiguous(indices), 0.06,
                                                        d_v=d_v, **kwargs)
        exp = f64.sparse_prefill(q, kv, indices, 0.06, d_v, sink=kwargs["attn_sink"],
                                 topk_length=kwargs["topk_length"])
        _finite_where_expected(out, "out")
        _close(out, exp[0], "sparse_prefill.out")
        _close(max_logits, exp[1], "sparse_prefill.max_logits")
        _close(lse, exp[2], "sparse_prefill.lse")
        assert (out[3] == 0).all() and (lse[3] == INF).all() and (max_logits[3] == -INF).all()
        if use_length:
            assert (lse[2] == INF).all() and (max_logits[2] == -INF).all()


def test_sparse_prefill_noncontiguous_indices_and_small_chunks(monkeypatch):
    """Chunked evaluation (forced tiny chunks) must equal the one-shot result."""
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(9, 2, 576, generator=gen)
    kv = torch.randn(20, 1, 576, generator=gen)
    indices = torch.randint(-3, 23, (9, 1, 12), generator=gen, dtype=torch.int32)
    whole = reference.sparse_prefill(q, kv, indices, 0.05)
    monkeypatch.setattr(reference, "_MAX_CHUNK_ELEMENTS", 1)
    chunked = reference.sparse_prefill(q, kv, make_noncontiguous(indices), 0.05)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_sparse_prefill_no_keys_at_all():
    q = torch.randn(3, 2, 512)
    out, m, lse = reference.sparse_prefill(q, torch.zeros(0, 1, 512), torch.zeros(3, 1, 4, dtype=torch.int32), 0.1)
    assert (out == 0).all() and (m == -INF).all() and (lse == INF).all()


# ---------------------------------------------------------------------------
# dense MHA prefill
# ---------------------------------------------------------------------------
VARLEN_Q = [17, 1, 0, 300, 3]
VARLEN_K = [20, 0, 5, 300, 1]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _mha_inputs(gen, d_qk, d_v, h_q, h_k):
    total_q, total_k = sum(VARLEN_Q), sum(VARLEN_K)
    q = make_noncontiguous(torch.randn(total_q, h_q, d_qk, generator=gen).to(torch.bfloat16))
    k = make_noncontiguous(torch.randn(total_k, h_k, d_qk, generator=gen).to(torch.bfloat16))
    v = make_noncontiguous(torch.randn(total_k, h_k, d_v, generator=gen).to(torch.bfloat16))
    return q, k, v, _cu(VARLEN_Q), _cu(VARLEN_K)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d_qk,d_v,h_q,h_k", [(192, 128, 4, 2), (64, 64, 2, 2)])
def test_mha_prefill_fwd_matches_float64(causal, d_qk, d_v, h_q, h_k):
    gen = torch.Generator().manual_seed(d_qk + int(causal))
    q, k, v, cu_q, cu_k = _mha_inputs(gen, d_qk, d_v, h_q, h_k)
    scale = d_qk ** -0.5
    out, lse = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, causal)
    assert out.shape == (q.shape[0], h_q, d_v) and lse.shape == (q.shape[0], h_q)
    exp_out, exp_lse = f64.mha_fwd(q, k, v, cu_q.tolist(), cu_k.tolist(), scale, causal)
    _finite_where_expected(out, "out")
    _close(out, exp_out, "mha.out")
    _close(lse, exp_lse, "mha.lse")
    row_of_empty_k = VARLEN_Q[0]  # sequence 1: s_q 1, s_k 0
    assert (lse[row_of_empty_k] == INF).all() and (out[row_of_empty_k] == 0).all()
    if causal:  # sequence 4: s_q 3, s_k 1 -> rows 0 and 1 see nothing
        start = sum(VARLEN_Q[:4])
        assert (lse[start:start + 2] == INF).all() and (lse[start + 2] != INF).all()


def _autograd_mha(q, k, v, cu_q, cu_k, scale, causal):
    """float64 forward written with torch ops, one (sequence, head) at a time, differentiated by
    torch.autograd. Rows that see no key stay 0 and are left out of the softmax (no NaN)."""
    h_q, h_k = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], h_q, v.shape[2], dtype=torch.float64)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        s_q, s_k = q1 - q0, k1 - k0
        limits = [min(s_k, s_k - s_q + r + 1) if causal else s_k for r in range(s_q)]
        live = [r for r in range(s_q) if limits[r] > 0]
        if not live:
            continue
        allowed = torch.tensor([[t < limits[r] for t in range(s_k)] for r in live])
        for h in range(h_q):
            kvh = h // (h_q // h_k)
            logits = (q[q0:q1, h][live] @ k[k0:k1, kvh].T * scale).masked_fill(~allowed, -INF)
            rows = torch.softmax(logits, dim=-1) @ v[k0:k1, kvh]
            out = out.index_put((torch.tensor(live) + q0, torch.tensor(h)), rows)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_mha_prefill_bwd_matches_float64_and_autograd(causal):
    gen = torch.Generator().manual_seed(40 + int(causal))
    d_qk, d_v, h_q, h_k = 64, 32, 4, 2
    q, k, v, cu_q, cu_k = _mha_inputs(gen, d_qk, d_v, h_q, h_k)
    scale = d_qk ** -0.5
    out, lse = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, causal)
    dout = make_noncontiguous(torch.randn(out.shape, generator=gen).to(torch.bfloat16))
    dq, dk, dv = reference.mha_prefill_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32
    exp = f64.mha_bwd(dout, q, k, v, None, cu_q.tolist(), cu_k.tolist(), scale, causal)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), exp):
        _finite_where_expected(got, name)
        _close(got, want, f"mha_bwd.{name}", abs_tol=5e-5)

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    auto_out = _autograd_mha(*leaves, cu_q.tolist(), cu_k.tolist(), scale, causal)
    auto_out.backward(dout.double())
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        _close(got, leaf.grad, f"mha_bwd.{name} vs autograd", abs_tol=5e-5)
    # rows that see no key get zero gradient; keys of an s_q = 0 sequence get zero gradient
    row_of_empty_k = VARLEN_Q[0]
    assert (dq[row_of_empty_k] == 0).all()
    k_start = sum(VARLEN_K[:2])
    assert (dk[k_start:k_start + VARLEN_K[2]] == 0).all() and (dv[k_start:k_start + VARLEN_K[2]] == 0).all()


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16])
def test_mha_prefill_p_rounding_models_the_kernel_numerics(p_dtype):
    """p_dtype rounds P (fwd) and P, dS (bwd) to the input dtype, nothing else: a row that
    sees one key is exact (P = 1), the rest stay within a few units of p_dtype of the exact
    fp32 result, and the rounding does change results (the option is not a no-op)."""
    gen = torch.Generator().manual_seed(60)
    q, k, v, cu_q, cu_k = _mha_inputs(gen, 64, 64, 4, 2)
    scale = 64 ** -0.5
    exact_out, exact_lse = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, True)
    out, lse = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, True, p_dtype=p_dtype)
    assert torch.equal(lse, exact_lse)
    assert not torch.equal(out, exact_out)
    eps = torch.finfo(p_dtype).eps
    finite = exact_lse != INF
    assert ((out - exact_out).abs()[finite] <= 4 * eps * v.float().abs().max()).all()
    start = sum(VARLEN_Q[:3])  # sequence 3: s_q == s_k == 300, its first row sees one key
    expected_first_row = v[sum(VARLEN_K[:3])].float().repeat_interleave(2, dim=0)  # GQA: head h reads kv h // 2
    torch.testing.assert_close(out[start], expected_first_row, rtol=0, atol=0)

    dout = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    exact = reference.mha_prefill_bwd(dout, q, k, v, exact_out, exact_lse, cu_q, cu_k, scale, True)
    rounded = reference.mha_prefill_bwd(dout, q, k, v, exact_out, exact_lse, cu_q, cu_k, scale, True,
                                        p_dtype=p_dtype)
    for name, got, want in zip(("dq", "dk", "dv"), rounded, exact):
        assert not torch.equal(got, want), name
        report = compare(got, want, abs_tol=0.0, rel_tol=0.0, cos_tol=TOLERANCES["mha_prefill"]["out"][2])
        assert report.cos_diff <= TOLERANCES["mha_prefill"]["out"][2], (name, report)


def test_mha_prefill_chunking_is_exact(monkeypatch):
    """Chunking the query rows changes nothing a row computes alone: out, lse and dq are
    bit-identical. dk and dv sum over query rows, and chunking changes the order of that
    fp32 sum (partial sums per chunk), so they agree within fp32 summation rounding: for
    n terms t_r, two orders of the sum differ by at most 2 * gamma_n * sum |t_r|,
    gamma_n = n * eps / (1 - n * eps) (Higham, Accuracy and Stability, section 3.1),
    with sum |t_r| computed here in float64."""
    gen = torch.Generator().manual_seed(50)
    q, k, v, cu_q, cu_k = _mha_inputs(gen, 64, 64, 2, 1)
    scale = 0.1
    fwd = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, True)
    dout = torch.randn(fwd[0].shape, generator=gen)
    bwd = reference.mha_prefill_bwd(dout, q, k, v, *fwd, cu_q, cu_k, scale, True)
    monkeypatch.setattr(reference, "_MAX_CHUNK_ELEMENTS", 5000)  # 8 rows per chunk, uneven tail
    fwd2 = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, True)
    bwd2 = reference.mha_prefill_bwd(dout, q, k, v, *fwd2, cu_q, cu_k, scale, True)
    for name, a, b in zip(("out", "lse", "dq"), fwd + bwd[:1], fwd2 + bwd2[:1]):
        assert torch.equal(a, b), name

    # float64 magnitudes of the summed terms: |P|^T |dO| for dv, scale |dS|^T |Q| for dk.
    out, lse = fwd
    mag_dk = torch.zeros(k.shape, dtype=torch.float64)
    mag_dv = torch.zeros(v.shape, dtype=torch.float64)
    rows_max = 1
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        s_q, s_k = q1 - q0, k1 - k0
        if s_q == 0 or s_k == 0:
            continue
        rows_max = max(rows_max, s_q * q.shape[1])
        allowed = torch.arange(s_k).unsqueeze(0) <= torch.arange(s_q).unsqueeze(1) + (s_k - s_q)
        for h in range(q.shape[1]):
            qh, kh, vh = (t.double() for t in (q[q0:q1, h], k[k0:k1, 0], v[k0:k1, 0]))
            doh, oh, lh = dout[q0:q1, h].double(), out[q0:q1, h].double(), lse[q0:q1, h].double()
            p = torch.where(allowed & torch.isfinite(lh).unsqueeze(1),
                            torch.exp(qh @ kh.T * scale - lh.unsqueeze(1)), torch.zeros(()).double())
            ds = p * (doh @ vh.T - (doh * oh).sum(-1, keepdim=True))
            mag_dv[k0:k1, 0] += p.abs().T @ doh.abs()
            mag_dk[k0:k1, 0] += scale * ds.abs().T @ qh.abs()
    eps = torch.finfo(torch.float32).eps
    gamma = rows_max * eps / (1 - rows_max * eps)
    for name, a, b, mag in (("dk", bwd[1], bwd2[1], mag_dk), ("dv", bwd[2], bwd2[2], mag_dv)):
        bound = 2 * gamma * mag + torch.finfo(torch.float32).tiny
        excess = (a.double() - b.double()).abs() - bound
        assert (excess <= 0).all(), f"{name}: worst excess {excess.max().item():.3e} over the bound"


def test_mha_prefill_decreasing_cu_seqlens_give_an_empty_sequence():
    # flash_mla.mha_prefill rejects such cu_seqlens where it can read them; on a GPU they
    # are not read, and the reference then skips the sequence (its rows keep out 0, lse inf).
    q = torch.randn(4, 2, 64)
    k = torch.randn(4, 1, 64)
    out, lse = reference.mha_prefill_fwd(q, k, k, torch.tensor([0, 3, 2], dtype=torch.int32),
                                         torch.tensor([0, 1, 2], dtype=torch.int32), None, False)
    assert (out[3] == 0).all() and (lse[3] == INF).all() and torch.isfinite(lse[:3]).all()


# ---------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------
def test_combine_matches_float64():
    gen = torch.Generator().manual_seed(60)
    num_splits, s_q, h_q, d_v = 10, 2, 4, 16
    o_accum = torch.randn(num_splits, s_q, h_q, d_v, generator=gen)
    lse_accum = torch.randn(num_splits, s_q, h_q, generator=gen) * 4
    empty = torch.rand(num_splits, s_q, h_q, generator=gen) < 0.3
    lse_accum[empty] = -INF
    o_accum[empty.unsqueeze(-1).expand_as(o_accum)] = float("nan")  # never read
    lse_accum[7:9] = -INF  # batch 3: every split empty
    o_accum[7:9] = float("nan")
    offsets = torch.tensor([0, 3, 3, 7, 9, 14], dtype=torch.int32)  # batch 1 none; last clamped to 10
    sink = torch.tensor([0.1, INF, -INF, 2.0])
    for use_sink in (False, True):
        out, lse = reference.combine(o_accum, lse_accum, offsets, sink if use_sink else None)
        assert out.shape == (5, s_q, h_q, d_v) and lse.shape == (5, s_q, h_q)
        exp_out, exp_lse = f64.combine(o_accum, lse_accum, offsets.tolist(), sink if use_sink else None)
        _finite_where_expected(out, "out")
        _close(out, exp_out, "combine.out")
        _close(lse, exp_lse, "combine.lse")
        assert (lse[1] == INF).all() and (out[1] == 0).all()
        assert (lse[3] == INF).all() and (out[3] == 0).all()


def test_combine_of_split_attention_equals_whole():
    """Splitting the keys of a sparse prefill and merging with combine gives the unsplit result."""
    gen = torch.Generator().manual_seed(61)
    s_q, h_q, s_kv = 3, 2, 30
    q = torch.randn(s_q, h_q, 512, generator=gen)
    kv = torch.randn(s_kv, 1, 512, generator=gen)
    indices = torch.randint(0, s_kv, (s_q, 1, 24), generator=gen, dtype=torch.int32)
    whole_out, _, whole_lse = reference.sparse_prefill(q, kv, indices, 0.04)
    parts = [reference.sparse_prefill(q, kv, indices[..., a:b], 0.04) for a, b in ((0, 5), (5, 5), (5, 24))]
    o_accum = torch.stack([p[0] for p in parts])
    lse_log2 = torch.stack([torch.where(p[2] == INF, torch.full_like(p[2], -INF), p[2] / math.log(2.0)) for p in parts])
    out, lse = reference.combine(o_accum, lse_log2, torch.tensor([0, 3], dtype=torch.int32))
    check_close(out[0], whole_out, abs_tol=1e-5, rel_tol=1e-4, cos_tol=1e-10, name="combined out")
    check_close(lse[0], whole_lse, abs_tol=1e-5, rel_tol=1e-5, name="combined lse")


def test_combine_asserts_its_shape_assumptions():
    with pytest.raises(AssertionError, match=r"lse_accum must be \[num_splits_total, s_q, h_q\] = \(2, 1, 3\), got \(2, 3, 1\)"):
        reference.combine(torch.zeros(2, 1, 3, 8), torch.zeros(2, 3, 1), torch.tensor([0, 2], dtype=torch.int32))

def test_cpu_exp_helpers_are_correctly_rounded_fp32():
    """The reference's exp, exp2, sigmoid and logsumexp on CPU (flash_mla/_exp.py) agree
    with float64 math rounded to fp32 once, -inf rows included."""
    from flash_mla import _exp

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 37, generator=gen) * 8
    x[0] = -math.inf
    x[1, ::3] = -math.inf
    xd = x.double()
    assert torch.equal(_exp.exp(x), torch.exp(xd).float())
    assert torch.equal(_exp.exp2(x), torch.exp2(xd).float())
    assert torch.equal(_exp.sigmoid(x), torch.sigmoid(xd).float())
    lse = _exp.logsumexp(x, dim=-1)
    assert lse.dtype == torch.float32 and torch.isneginf(lse[0])
    assert torch.equal(lse, torch.logsumexp(xd, dim=-1).float())
