"""Native dense MLA decode (flash_mla_with_kvcache without indices) on a GPU.

Checked against float64 math (flash_mla.oracle.dense_decode) under both rules of
docs/numerics.md: upstream-style inputs (randn/10, q clamped to [-1, 1]) by the element
rule TOLERANCES["dense_decode"], hostile std-1 inputs by the plain-math rule (at most 2x
the error of the same computation in plain PyTorch at the input precision). Every cache is
hostile: NaN in unused slots and unreferenced pages, huge/negative unused block_table
entries (flash_mla.testing.make_paged_kv_cache). Also: zero-length requests, non-contiguous
q, results independent of the number of schedule parts (FLASH_MLA_DENSE_DECODE_PARTS),
bit-identical batch invariance, CUDA-graph capture and replay with new lengths, and the
schedule kernel against the Python model of its rule (tests/test_decode_schedule.py).
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import pytest

torch = pytest.importorskip("torch")

import flash_mla  # noqa: E402
from flash_mla import dense_decode, oracle  # noqa: E402
from flash_mla.testing import (  # noqa: E402
    TOLERANCES,
    check_op_close,
    check_plain_rule,
    make_noncontiguous,
    make_paged_kv_cache,
)
from tests.test_decode_schedule import pieces_of, schedule_model  # noqa: E402
from tests.test_repeat_call import _count_validations  # noqa: E402

gpu = pytest.mark.gpu
D_QK, D_V = 576, 512


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    """Every call must run the native kernel (a fallback raises)."""
    monkeypatch.setenv("FLASH_MLA_BACKEND", "native")
    monkeypatch.delenv("FLASH_MLA_DENSE_DECODE_PARTS", raising=False)


def _problem(seqlens: Sequence[int], s_q: int, h_q: int, h_k: int, dtype, seed: int,
             std: float = 0.1, extra_columns: int = 1):
    """q [b, s_q, h_q, 576] and a hostile paged cache with values of the given std
    (0.1: upstream's randn/10 with q clamped to [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    cache = make_paged_kv_cache(seqlens, h_k=h_k, dtype=dtype, device="cuda", generator=gen,
                                std=std, extra_table_columns=extra_columns)
    q = torch.randn(len(seqlens), s_q, h_q, D_QK, generator=gen) * std
    if std < 1:
        q = q.clamp(-1, 1)
    return q.to(dtype).cuda(), cache


def _decode(q, cache, causal, invariant=False, meta=None):
    meta = meta if meta is not None else flash_mla.get_mla_metadata()[0]
    return flash_mla.flash_mla_with_kvcache(
        q, cache.k_cache, cache.block_table, cache.cache_seqlens, D_V, meta, causal=causal,
        enable_batch_invariant=invariant)


def _exact(q, cache, causal):
    return oracle.dense_decode(q, cache.k_cache, cache.block_table, cache.cache_seqlens, D_V,
                               D_QK ** -0.5, causal)


def _plain(q, cache, causal) -> torch.Tensor:
    """The same computation in plain PyTorch at q's precision: fp32 scores and softmax, P
    cast to q's dtype, P.V in q's dtype. Returns out [b, s_q, h_q, 512] (q's dtype)."""
    b, s_q, h_q, _ = q.shape
    h_k = cache.k_cache.shape[2]
    out = torch.zeros(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device)
    for i, kv in enumerate(cache.sequences):
        s_k = kv.shape[0]
        if s_k == 0:
            continue
        kv = kv.to(q.device)                                        # [s_k, h_k, 576]
        heads = torch.arange(h_q, device=q.device) // (h_q // h_k)
        keys = kv[:, heads].permute(1, 0, 2)                        # [h_q, s_k, 576]
        scores = torch.einsum("shd,hkd->hsk", q[i].float(), keys.float()) * D_QK ** -0.5
        if causal:
            rows = torch.arange(s_q, device=q.device)[:, None]
            cols = torch.arange(s_k, device=q.device)[None, :]
            scores = scores.masked_fill(cols > s_k - s_q + rows, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
        out[i] = torch.einsum("hsk,hkd->shd", p, keys[..., :D_V])
    return out


def _check_element_rule(q, cache, causal, out, lse, label):
    exact_out, exact_lse = _exact(q, cache, causal)
    check_op_close("dense_decode", "out", out, exact_out, name=f"{label} out")
    check_op_close("dense_decode", "lse", lse, exact_lse, name=f"{label} lse")


# --------------------------------------------------------------------------- upstream grid

def _grid() -> List[Tuple]:
    """A sample of upstream's grid that covers every value of every axis: b {1, 2, 6, 64},
    s_q {1, 2, 4}, s_k {20, 140, 4096}, (h_q, h_k) with h_q {1, 3, 9, 63, 64, 126, 128},
    h_k {1, 2, 3, 8} dividing it; varlen (with zero-length requests) and causal both ways,
    bf16 and fp16. Large b goes with short s_k to keep the run short."""
    heads = [(hq, hk) for hq in (1, 3, 9, 63, 64, 126, 128) for hk in (1, 2, 3, 8) if hq % hk == 0]
    rng = random.Random(12)
    cases = []
    for idx, (h_q, h_k) in enumerate(heads):
        for s_q in (1, 2, 4):
            b = (1, 2, 6, 64)[(idx + s_q) % 4]
            s_k = (20, 140, 4096)[(idx * 3 + s_q) % 3]
            if b == 64 and s_k == 4096:
                s_k = 140
            causal = (idx + s_q) % 2 == 0
            varlen = rng.random() < 0.5
            dtype = (torch.bfloat16, torch.float16)[(idx + s_q // 2) % 2]
            cases.append((b, s_q, s_k, h_q, h_k, causal, varlen, dtype))
    cases.append((64, 1, 4096, 16, 1, False, True, torch.bfloat16))
    cases.append((2, 2, 4096, 128, 1, True, False, torch.bfloat16))
    return cases


@gpu
@pytest.mark.parametrize("b,s_q,s_k,h_q,h_k,causal,varlen,dtype", _grid())
def test_upstream_grid_element_rule(b, s_q, s_k, h_q, h_k, causal, varlen, dtype):
    rng = random.Random(b * 1000 + s_q * 100 + s_k + h_q * 7 + h_k)
    if varlen:
        seqlens = [rng.choice([0, rng.randint(1, 2 * s_k)]) for _ in range(b)]
    else:
        seqlens = [s_k] * b
    q, cache = _problem(seqlens, s_q, h_q, h_k, dtype, seed=len(seqlens) + s_k)
    out, lse = _decode(q, cache, causal)
    assert flash_mla.dispatch.last_backend("dense_decode") == "native"
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == dtype
    assert lse.shape == (b, h_q, s_q) and lse.is_contiguous()
    _check_element_rule(q, cache, causal, out, lse, f"seqlens={seqlens[:4]}...")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_length_requests_give_zero_and_inf(dtype):
    seqlens = [0, 70, 0, 0, 1, 0]
    q, cache = _problem(seqlens, 2, 16, 1, dtype, seed=3)
    out, lse = _decode(q, cache, causal=True)
    for i in (0, 2, 3, 5):
        assert torch.all(out[i] == 0)
        assert torch.all(torch.isinf(lse[i]) & (lse[i] > 0))
    # s_k = 1 with s_q = 2, causal: query 0 sees no key
    assert torch.all(out[4, 0] == 0) and torch.all(torch.isposinf(lse[4, :, 0]))
    _check_element_rule(q, cache, True, out, lse, "zero-length")


@gpu
def test_all_requests_empty():
    q, cache = _problem([0, 0, 0], 1, 64, 1, torch.bfloat16, seed=4)
    out, lse = _decode(q, cache, causal=False)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


# --------------------------------------------------------------------------- hostile inputs

@gpu
@pytest.mark.parametrize("seqlens,s_q,h_q,h_k,causal,dtype", [
    ([4096, 17, 0, 1000], 2, 128, 1, True, torch.bfloat16),
    ([8191, 64, 65], 4, 63, 3, True, torch.float16),
    ([300] * 6, 1, 16, 2, False, torch.bfloat16),
    ([20000], 1, 64, 8, False, torch.bfloat16),
])
def test_hostile_plain_rule(seqlens, s_q, h_q, h_k, causal, dtype):
    q, cache = _problem(seqlens, s_q, h_q, h_k, dtype, seed=sum(seqlens), std=1.0)
    out, lse = _decode(q, cache, causal)
    exact_out, exact_lse = _exact(q, cache, causal)
    check_plain_rule(out, exact_out, _plain(q, cache, causal), "dense_decode", "out")
    check_plain_rule(lse, exact_lse, None, "dense_decode", "lse")


# Every CTA (FLASH_MLA_DENSE_DECODE_WARPS: the 4-warp 32-row CTA, the 8-warp Q-in-registers
# one, the narrow 16-row one, the 64-row one where the device runs it) serves every shape;
# the default picks by rows per kv head (config.h choose_cta), so the grid above runs each
# CTA only where it is picked.
CTAS = ["4", "8", "4x16", "8x64"]
ROWS64_SMEM = 231168  # bytes per block of the 64-row CTA (config.h rows64::kSmemBytes)


def _rows64_fits() -> bool:
    """The entry's rule (config.h rows64::fits): compute capability 9.x or 10.x and blocks
    that may opt in to the 64-row CTA's shared memory."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.major in (9, 10) and props.shared_memory_per_block_optin >= ROWS64_SMEM


@gpu
@pytest.mark.parametrize("cta", CTAS)
@pytest.mark.parametrize("seqlens,s_q,h_q,h_k,causal,dtype", [
    ([700, 0, 33, 1], 1, 8, 1, True, torch.bfloat16),      # 8 rows
    ([1500, 64, 0], 1, 32, 2, False, torch.float16),       # 16 rows, GQA
    ([999, 2, 300], 2, 24, 1, True, torch.bfloat16),       # 48 rows: a partial last block
    ([2100, 129], 2, 128, 1, True, torch.float16),         # 256 rows
])
def test_every_cta_shape(monkeypatch, cta, seqlens, s_q, h_q, h_k, causal, dtype):
    monkeypatch.setenv("FLASH_MLA_DENSE_DECODE_WARPS", cta)
    monkeypatch.setenv("FLASH_MLA_DENSE_DECODE_PARTS", "9")  # split and direct requests
    q, cache = _problem(seqlens, s_q, h_q, h_k, dtype, seed=len(seqlens) * 31 + h_q)
    if cta == "8x64" and not _rows64_fits():
        with pytest.raises(ValueError, match="FLASH_MLA_DENSE_DECODE_WARPS=8x64"):
            _decode(q, cache, causal)
        return
    out, lse = _decode(q, cache, causal)
    _check_element_rule(q, cache, causal, out, lse, f"cta={cta}")
    q, cache = _problem(seqlens, s_q, h_q, h_k, dtype, seed=h_q, std=1.0)
    out, lse = _decode(q, cache, causal)
    exact_out, exact_lse = _exact(q, cache, causal)
    check_plain_rule(out, exact_out, _plain(q, cache, causal), "dense_decode", "out",
                     name=f"out cta={cta}")
    check_plain_rule(lse, exact_lse, None, "dense_decode", "lse", name=f"lse cta={cta}")


@gpu
def test_unknown_cta_override_raises(monkeypatch):
    monkeypatch.setenv("FLASH_MLA_DENSE_DECODE_WARPS", "16")
    q, cache = _problem([64], 1, 16, 1, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match=r"FLASH_MLA_DENSE_DECODE_WARPS must be 4, 8, 4x16 or 8x64.*'16'"):
        _decode(q, cache, causal=False)


@gpu
def test_noncontiguous_q_and_cache():
    seqlens = [130, 5, 0, 700]
    q, cache = _problem(seqlens, 2, 32, 2, torch.bfloat16, seed=9)
    q_nc = make_noncontiguous(q)
    cache.k_cache = make_noncontiguous(cache.k_cache)
    cache.block_table = make_noncontiguous(cache.block_table)
    assert not q_nc.is_contiguous() and not cache.k_cache.is_contiguous()
    out, lse = _decode(q_nc, cache, causal=True)
    _check_element_rule(q, cache, True, out, lse, "non-contiguous")


# --------------------------------------------------------------------------- schedule

@gpu
@pytest.mark.parametrize("parts", ["1", "7", "300"])
def test_results_do_not_depend_on_the_number_of_parts(monkeypatch, parts):
    seqlens = [5000, 1, 0, 777, 64, 3000]
    q, cache = _problem(seqlens, 2, 64, 1, torch.bfloat16, seed=21)
    base_out, base_lse = _decode(q, cache, causal=True)
    monkeypatch.setenv("FLASH_MLA_DENSE_DECODE_PARTS", parts)
    meta = flash_mla.get_mla_metadata()[0]
    out, lse = _decode(q, cache, causal=True, meta=meta)
    assert meta.tile_scheduler_metadata.shape[0] == int(parts)
    _check_element_rule(q, cache, True, out, lse, f"parts={parts}")
    # Only where requests are cut differs. lse is merged in fp32 and agrees to ~1e-7
    # relative. out does not agree to one rounding: each split rounds its P to bf16
    # against its own running max, so the two runs' P differ by an ulp here and there;
    # both meet the element rule against float64 (checked above), and they agree within
    # that rule's tolerance. Bit-identity whatever the split is the batch-invariant mode's.
    finite = torch.isfinite(base_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], base_lse[finite], rtol=2e-6, atol=1e-6)
    abs_tol, rel_tol, _ = TOLERANCES["dense_decode"]["out"]
    assert torch.allclose(out.float(), base_out.float(), rtol=rel_tol, atol=abs_tol)


@gpu
def test_batch_invariant_is_bit_identical_across_batches():
    rng = random.Random(5)
    target = 9000
    results = []
    for trial in range(4):
        others = [rng.choice([0, rng.randint(1, 20000)]) for _ in range(rng.randint(0, 9))]
        pos = rng.randint(0, len(others))
        seqlens = others[:pos] + [target] + others[pos:]
        q, cache = _problem(seqlens, 2, 32, 1, torch.bfloat16, seed=100 + trial)
        # the same request everywhere: same q row and same tokens
        q_t, cache_t = _problem([target], 2, 32, 1, torch.bfloat16, seed=7)
        q[pos] = q_t[0]
        k_cache = cache.k_cache.clone()
        pages = -(-target // 64)
        k_cache[cache.block_table[pos, :pages].long()] = cache_t.k_cache[
            cache_t.block_table[0, :pages].long()]
        cache.k_cache = k_cache
        out, lse = _decode(q, cache, causal=True, invariant=True)
        results.append((out[pos].clone(), lse[pos].clone()))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(lse, results[0][1])
    q_t, cache_t = _problem([target], 2, 32, 1, torch.bfloat16, seed=7)
    _check_element_rule(q_t, cache_t, True, results[0][0][None], results[0][1][None], "invariant")


@gpu
def test_schedule_kernel_matches_python_model(monkeypatch):
    from tests.gpu_native import native_function

    schedule = native_function("dense_decode_schedule")
    rng = random.Random(77)
    for trial in range(60):
        b = rng.randint(1, 700 if trial % 10 == 0 else 70)
        seqlens = [rng.choice([0, rng.randint(1, 64), rng.randint(1, 40000)]) for _ in range(b)]
        invariant = trial % 3 == 0
        parts = b * 4 if invariant else rng.randint(1, 400)
        meta = torch.full((parts, 8), -7, dtype=torch.int32, device="cuda")
        offsets = torch.full((b + 1,), -7, dtype=torch.int32, device="cuda")
        schedule(torch.tensor(seqlens, dtype=torch.int32, device="cuda"), meta, offsets, invariant)
        want_parts, want_offsets = schedule_model(seqlens, parts, invariant)
        assert offsets.tolist() == want_offsets, (trial, seqlens)
        got = [tuple(row[:5]) for row in meta.tolist()]
        # an empty part's fields beyond begin_req do not matter; compare the runs
        assert pieces_of(got, seqlens, want_offsets) == pieces_of(want_parts, seqlens, want_offsets)
        assert [g[0] == b for g in got] == [w[0] == b for w in want_parts]


# --------------------------------------------------------------------------- repeat calls

@gpu
def test_repeat_calls_match_fresh_holders_bit_for_bit():
    """A holder's later calls take the repeat path (flash_mla._repeat_call): new q, another
    cache of the same layout (the next layer) and new lengths give exactly what a fresh
    holder's validated call gives with the same schedule."""
    seqlens = [300, 0, 1500, 64]
    q, cache = _problem(seqlens, 2, 16, 1, torch.bfloat16, seed=41)
    q2, cache2 = _problem(seqlens, 2, 16, 1, torch.bfloat16, seed=42)
    meta = flash_mla.get_mla_metadata()[0]
    _decode(q, cache, True, meta=meta)
    assert dense_decode.repeat_record(meta) is not None
    out, lse = _decode(q2, cache2, True, meta=meta)
    fresh_out, fresh_lse = _decode(q2, cache2, True)
    assert torch.equal(out, fresh_out) and torch.equal(lse, fresh_lse)
    _check_element_rule(q2, cache2, True, out, lse, "repeat")


@gpu
def test_repeat_with_another_layout_takes_the_full_path(monkeypatch):
    """The library's layout-key comparison (dense_decode_fwd_repeat): a call whose tensors
    differ from the recorded ones only in layout is validated again (a wider block_table:
    accepted, correct; a q with strided heads: refused with a fresh holder's message)."""
    seqlens = [300, 0, 1500, 64]
    q, cache = _problem(seqlens, 1, 16, 1, torch.bfloat16, seed=43)
    meta = flash_mla.get_mla_metadata()[0]
    _decode(q, cache, True, meta=meta)
    assert dense_decode.repeat_record(meta).native_key is not None
    validations = _count_validations(monkeypatch, dense_decode)
    wider = torch.full((cache.block_table.shape[0], cache.block_table.shape[1] + 3), 2 ** 30,
                       dtype=torch.int32, device="cuda")
    wider[:, :cache.block_table.shape[1]] = cache.block_table
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache.k_cache, wider, cache.cache_seqlens,
                                                512, meta, causal=True)
    assert validations[0] == 1, "a call with another block_table layout took the repeat path"
    _check_element_rule(q, cache, True, out, lse, "wider block_table")
    strided = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], q.shape[3], dtype=q.dtype,
                          device="cuda")[:, :, ::2]
    strided.copy_(q)
    same = flash_mla.flash_mla_with_kvcache(strided, cache.k_cache, cache.block_table,
                                            cache.cache_seqlens, 512, meta, causal=True)
    assert validations[0] == 2, "a call with a strided q took the repeat path"
    assert torch.equal(same[0], out) and torch.equal(same[1], lse)


# --------------------------------------------------------------------------- CUDA graphs

@gpu
def test_cuda_graph_capture_and_replay_with_new_lengths():
    # the cache holds 2100 tokens per request; replays use shorter lengths
    h_q, s_q = 64, 2
    q, cache = _problem([2100] * 4, s_q, h_q, 1, torch.bfloat16, seed=31)
    seqlens_dev = torch.tensor([700, 5, 2000, 0], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (loads, first launches)
        _decode(q, cache, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta = flash_mla.get_mla_metadata()[0]
        out, lse = flash_mla.flash_mla_with_kvcache(
            q, cache.k_cache, cache.block_table, seqlens_dev, D_V, meta, causal=True)
    for new in ([700, 5, 2000, 0], [2100, 0, 64, 1], [1, 1, 1, 2099]):
        seqlens_dev.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        exact_out, exact_lse = oracle.dense_decode(q, cache.k_cache, cache.block_table, new, D_V,
                                                   D_QK ** -0.5, True)
        check_op_close("dense_decode", "out", out, exact_out, name=f"graph {new} out")
        check_op_close("dense_decode", "lse", lse, exact_lse, name=f"graph {new} lse")
