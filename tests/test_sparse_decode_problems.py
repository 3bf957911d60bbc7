"""tests/sparse_decode_problems.py on the CPU: the hostile problems the sparse decode GPU
tests and soak build are what they claim (indices, invalid candidates, NaN bytes, lengths),
its vectorised float64 answer equals the byte-level flash_mla.oracle.sparse_decode, and the
GPU test file's grid rotation covers every value."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from flash_mla import oracle, quant
from tests.sparse_decode_problems import (
    D_V,
    POISON_BYTE,
    PoolSpec,
    exact,
    index_rows,
    invalid_candidates,
    make_pool,
    make_problem,
    oracle_pools,
    reshuffled,
    token_bytes,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_invalid_candidates_keep_only_invalid_values():
    assert invalid_candidates(1000) == [-2 ** 31, -123456, -1, 1000, 114514, 2147480000,
                                        2 ** 31 - 1]
    # 114514 names a token of a larger pool: it is not an invalid candidate there.
    assert 114514 not in invalid_candidates(151_552)
    assert 151_552 in invalid_candidates(151_552)


def test_index_rows_are_distinct_tokens_of_the_request_with_every_candidate():
    seqlens, page, topk, s_q, every = (130, 0, 7, 64), 16, 40, 3, 7
    table = torch.tensor([[5, 0, 9, 2, 11, 3, 10, 6, 1], [0] * 9, [4] + [0] * 8,
                          [7, 8, 12, 13] + [0] * 5])
    num_tokens = 14 * page
    idx = index_rows(seqlens, s_q, topk, table, page, num_tokens, _gen(), every)
    assert idx.shape == (4, s_q, topk)
    cands = set(invalid_candidates(num_tokens))
    for i, s in enumerate(seqlens):
        owned = {int(table[i, pos // page]) * page + pos % page for pos in range(s)}
        for j in range(s_q):
            row = idx[i, j].tolist()
            valid = [x for x in row if 0 <= x < num_tokens]
            assert len(valid) == len(set(valid)) and set(valid) <= owned, (i, j)
            # valid where the request still has a token and the slot is not sprinkled
            want = sum(1 for k in range(min(s, topk)) if k % every != every - 1)
            assert len(valid) == want, (i, j)
            assert all(x in cands for x in row if not 0 <= x < num_tokens)
            if topk - want >= len(cands):
                assert {x for x in row if x in cands} == cands, (i, j)
    # rows of a request differ (independent draws)
    assert not torch.equal(idx[0, 0], idx[0, 1])


@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("page", (1, 3, 8))
def test_token_bytes_cover_the_cache_once(kv_format, page):
    fmt = quant.FORMATS[kv_format]
    cache = torch.zeros(4, page, 1, fmt.bytes_per_token, dtype=torch.uint8)
    at = token_bytes(cache, kv_format, torch.arange(4 * page))
    assert at.shape == (4 * page, fmt.bytes_per_token)
    assert torch.equal(at.flatten().sort().values, torch.arange(cache.numel()))


@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("poison_past_length", (True, False))
def test_pool_poisons_exactly_the_tokens_no_counted_index_names(kv_format, poison_past_length):
    spec = PoolSpec(kv_format, (70, 0, 9, 33), topk=24, page_size=5, topk_length=(24, 24, 3, 0))
    pool = make_pool(spec, 2, _gen(3), "cpu", std=0.1, poison_past_length=poison_past_length)
    n = pool.num_tokens
    assert pool.indices.dtype == torch.int32 and pool.topk_length.tolist() == [24, 24, 3, 0]
    idx = pool.indices.long()
    in_range = (idx >= 0) & (idx < n)
    counted = in_range & (torch.arange(24) < pool.topk_length.long()[:, None, None])
    flat = pool.k_cache.reshape(-1)
    poisoned = torch.tensor([bool((flat[token_bytes(pool.k_cache, kv_format, torch.tensor([t]))]
                                   == POISON_BYTE).all()) for t in range(n)])
    named = idx[counted] if poison_past_length else idx[in_range]
    assert not poisoned[named].any()
    rest = torch.ones(n, dtype=torch.bool)
    rest[named] = False
    assert poisoned[rest].all() and rest.sum() >= 5  # the spare block at least
    values = quant.dequantize_kv(pool.k_cache, kv_format).reshape(n, -1)
    assert torch.isnan(values[rest]).all()
    assert torch.isfinite(values[named]).all()
    past = in_range & ~counted
    if poison_past_length:
        assert past.any() and poisoned[idx[past]].all()  # reading past the length shows
    else:
        assert not poisoned[idx[past]].any()


def test_random_lengths_include_zero_one_and_topk():
    spec = PoolSpec("V4", (10,) * 12, topk=50, page_size=4, topk_length=True)
    lengths = make_pool(spec, 1, _gen(), "cpu", std=0.1).topk_length.tolist()
    assert lengths[0] == lengths[5] == lengths[10] == 50
    assert lengths[1] == lengths[8] == 0 and lengths[2] == 1
    assert all(0 <= x <= 50 for x in lengths)


@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
def test_exact_equals_the_byte_level_oracle(kv_format):
    main = PoolSpec(kv_format, (90, 0, 17, 40), topk=30, page_size=7, topk_length=True)
    d_qk = quant.FORMATS[kv_format].d_qk
    extra_format = {512: "V41_FP4", 576: "V32"}[d_qk]
    extra = PoolSpec(extra_format, (5, 12, 0, 30), topk=9, page_size=2, topk_length=(9, 9, 0, 4))
    for with_extra, sink in ((False, False), (True, True)):
        p = make_problem(main, 2, 3, seed=7, device="cpu", extra=extra if with_extra else None,
                         sink=sink, std=1.0 if sink else 0.1)
        got_out, got_lse = exact(p)
        want_out, want_lse = oracle.sparse_decode(p.q, oracle_pools(p), p.scale, D_V, p.sink)
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-12, atol=1e-12)
        assert torch.isposinf(got_lse[1]).all() == (not with_extra)  # request 1: no token


def test_exact_chunks_rows_like_one_block(monkeypatch):
    import tests.sparse_decode_problems as sdp

    main = PoolSpec("V32", (60, 31, 5), topk=40, page_size=16, topk_length=True)
    p = make_problem(main, 3, 4, seed=2, device="cpu", sink=True)
    whole = exact(p)
    monkeypatch.setattr(sdp, "_GATHER_ELEMENTS", 1)  # one row per chunk
    for a, b in zip(whole, exact(p)):
        assert torch.equal(a, b)


def test_make_problem_q_and_sink():
    main = PoolSpec("V41", (10, 10), topk=8, page_size=4)
    p = make_problem(main, 3, 6, seed=1, device="cpu", sink=True)
    assert p.q.shape == (2, 3, 6, 512) and p.q.dtype == torch.bfloat16
    assert p.q.abs().max() <= 1 and p.sink.shape == (6,) and p.scale == 512 ** -0.5
    assert p.extra is None and p.pools == [p.main]
    with pytest.raises(ValueError, match="extra.kv_format must have d_qk 512"):
        make_problem(main, 1, 2, seed=1, device="cpu",
                     extra=PoolSpec("V32", (3, 3), topk=2, page_size=2))


def test_reshuffled_keeps_each_row_and_draws_new_lengths():
    spec = PoolSpec("V41_FP4", (40, 7, 0), topk=16, page_size=8, topk_length=True)
    pool = make_pool(spec, 2, _gen(1), "cpu", std=0.1, poison_past_length=False)
    idx, lengths = reshuffled(pool, _gen(2))
    assert idx.dtype == torch.int32 and not torch.equal(idx, pool.indices)
    for row_new, row_old in zip(idx.reshape(-1, 16), pool.indices.reshape(-1, 16)):
        assert Counter(row_new.tolist()) == Counter(row_old.tolist())
    assert lengths.shape == (3,) and all(0 <= x <= 16 for x in lengths.tolist())
    poisoned = make_pool(spec, 2, _gen(1), "cpu", std=0.1)
    with pytest.raises(ValueError, match="poison_past_length=False"):
        reshuffled(poisoned, _gen(2))


def test_grid_rotation_covers_every_value_and_full_grid_is_the_product():
    from tests.test_sparse_decode_gpu import GRID, HEADS, grid_cases

    cases = grid_cases(False)
    assert len(cases) == 32 and len({c.id for c in cases}) == 32
    assert {(c.s_k, c.topk, c.page) for c in cases} == set(GRID)
    assert {c.b for c in cases} == {4, 74} and {c.s_q for c in cases} == {1, 3}
    formats = Counter(c.kv_format for c in cases)
    assert set(formats) == set(quant.FORMAT_NAMES) and min(formats.values()) >= 6
    heads = Counter(c.h_q for c in cases)
    assert set(heads) == set(HEADS) and min(heads.values()) >= 4
    for flag in ("extra", "lengths", "sink", "varlen"):
        assert sum(getattr(c, flag) for c in cases) == 16, flag
    full = grid_cases(True)
    assert len(full) == 32 * 5 * 7 * 8 and len({c.id for c in full}) == len(full)
