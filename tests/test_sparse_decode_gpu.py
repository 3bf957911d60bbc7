"""Native sparse FP8 MLA decode (flash_mla_with_kvcache with indices) on a GPU.

Every cache format (V32 d_qk 576; V32_NO_ROPE, V4, V41, V41_FP4 d_qk 512) under both rules
of docs/numerics.md: upstream-style inputs (kv ~ randn/10 quantised with
flash_mla.quant.quantize_kv, q ~ randn/10 clamped to [-1, 1]) by the element rule
TOLERANCES["sparse_decode"]; hostile std-1 inputs by the plain-math rule (out at most 2x
the error of flash_mla.oracle.plain_sparse_decode; lse by the element rule). The float64
answer is tests/sparse_decode_problems.exact (vectorised on the GPU), itself held to the
byte-level flash_mla.oracle.sparse_decode on a small case here and on the CPU in
tests/test_sparse_decode_problems.py.

Every problem is hostile (tests/sparse_decode_problems.py): shuffled pages, 0xFF (NaN)
bytes in every token no counted index names and in a spare block, the invalid index
candidates mixed into every row, topk larger than the valid tokens, positions past
topk_length naming NaN tokens. Also: all-invalid and zero-length rows, a main pool with no
blocks, non-contiguous q, indices and cache, byte dtypes and format detection, sink
infinities, results that do not depend on the number of schedule parts
(FLASH_MLA_SPARSE_DECODE_PARTS), bit-identical batch invariance, and CUDA-graph capture (the
schedule computed inside the capture) and replay with new indices and lengths.

The upstream grid (32 points of (s_k, topk, page) x b x s_q) runs with the format, h_q,
extra pool, topk_length and sink rotated over its points; FLASH_MLA_FULL_GRID=1 runs the
whole cross product instead (8960 cases: long).
"""
from __future__ import annotations

import itertools
import os
import random
from typing import List, NamedTuple, Optional

import pytest

torch = pytest.importorskip("torch")

import flash_mla  # noqa: E402
from flash_mla import dispatch, oracle, quant  # noqa: E402
from flash_mla.testing import (  # noqa: E402
    TOLERANCES,
    check_op_close,
    check_plain_rule,
    make_noncontiguous,
)
from tests.sparse_decode_problems import (  # noqa: E402
    D_V,
    POISON_BYTE,
    PoolSpec,
    Problem,
    exact,
    make_problem,
    oracle_pools,
    reshuffled,
    run,
)

gpu = pytest.mark.gpu
OP = "sparse_decode"
PARTS_VARIABLE = "FLASH_MLA_SPARSE_DECODE_PARTS"
FORMATS_512 = ("V32_NO_ROPE", "V4", "V41", "V41_FP4")
HEADS = (1, 8, 16, 32, 63, 64, 128)
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    """Every call must run the native kernel (a fallback raises)."""
    monkeypatch.setenv("FLASH_MLA_BACKEND", "native")
    monkeypatch.delenv(PARTS_VARIABLE, raising=False)
    monkeypatch.delenv("FLASH_MLA_SPARSE_DECODE_CTA", raising=False)


def _extra_format(main_format: str, k: int) -> str:
    """The extra pool's format: V41's upstream partner V41_FP4, V32 for V32 (the only
    d_qk 576 format), else the 512 formats in turn."""
    if main_format == "V32":
        return "V32"
    if main_format == "V41":
        return "V41_FP4"
    return FORMATS_512[k % len(FORMATS_512)]


def _seqlens(b: int, s_k: int, varlen: bool, seed: int) -> List[int]:
    """b requests of s_k tokens, or (varlen) of random lengths in [1, 2 s_k] with some 0."""
    if not varlen:
        return [s_k] * b
    rng = random.Random(seed)
    return [0 if rng.random() < 0.15 else rng.randint(1, 2 * s_k) for _ in range(b)]


def _run_native(p: Problem, **kwargs):
    out, lse = run(p, **kwargs)
    assert dispatch.last_backend(OP) == "native"
    return out, lse


def _check_shapes(p: Problem, out, lse) -> None:
    b, s_q, h_q, _ = p.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    # lse is the transposed view of a contiguous [b, s_q, h_q] buffer, as upstream's.
    assert lse.transpose(1, 2).is_contiguous()


def _check_element(p: Problem, out, lse, label: str, want=None) -> None:
    _check_shapes(p, out, lse)
    e_out, e_lse = want if want is not None else exact(p)
    check_op_close(OP, "out", out, e_out, name=f"{label} out")
    check_op_close(OP, "lse", lse.transpose(1, 2), e_lse, name=f"{label} lse")


# --------------------------------------------------------------------------- the reference

@gpu
def test_vectorised_reference_matches_the_byte_level_oracle():
    main = PoolSpec("V41", (300, 0, 77), topk=100, page_size=61, topk_length=True)
    extra = PoolSpec("V41_FP4", (40, 90, 5), topk=33, page_size=2, topk_length=(33, 0, 17))
    p = make_problem(main, 2, 5, device=DEVICE, seed=1, extra=extra, sink=True)
    got_out, got_lse = exact(p)
    want_out, want_lse = oracle.sparse_decode(p.q, oracle_pools(p), p.scale, D_V, p.sink)
    torch.testing.assert_close(got_out, want_out.to(got_out.device), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_lse, want_lse.to(got_lse.device), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- upstream grid

# (s_k, topk, page size) of upstream's decode grid, with b in {4, 74} and s_q in {1, 3}.
GRID = ((512, 64, 2), (512, 64, 64), (512, 64, 69), (1024, 576, 2), (1024, 576, 61),
        (2046, 2048, 2), (2046, 2048, 64), (2046, 2048, 576))


class Case(NamedTuple):
    s_k: int
    topk: int
    page: int
    b: int
    s_q: int
    kv_format: str
    h_q: int
    extra: bool
    lengths: bool
    sink: bool
    varlen: bool

    @property
    def id(self) -> str:
        flags = "".join(c for c, on in zip("ELSV", (self.extra, self.lengths, self.sink,
                                                    self.varlen)) if on)
        return (f"sk{self.s_k}-topk{self.topk}-p{self.page}-b{self.b}-sq{self.s_q}-"
                f"{self.kv_format}-h{self.h_q}-{flags or 'plain'}")


def grid_cases(full: bool) -> List[Case]:
    """The 32 grid points with format, h_q, extra pool, topk_length, sink and varlen
    rotated over them (each value the same number of times, in a seeded order), or with
    full=True every combination of format, h_q and the three flags at every point
    (varlen rotated)."""
    points = [(s_k, topk, page, b, s_q) for (s_k, topk, page) in GRID for b in (4, 74)
              for s_q in (1, 3)]
    if full:
        flags = list(itertools.product((False, True), repeat=3))
        return [Case(*pt, fmt, h, *fl, varlen=(i + j) % 2 == 1)
                for i, pt in enumerate(points) for fmt in quant.FORMAT_NAMES for h in HEADS
                for j, fl in enumerate(flags)]
    rng = random.Random(14)

    def spread(values) -> list:
        seq = [values[i % len(values)] for i in range(len(points))]
        rng.shuffle(seq)
        return seq

    formats = spread(quant.FORMAT_NAMES)
    heads = spread(HEADS)
    flags = spread(list(itertools.product((False, True), repeat=4)))
    return [Case(*pt, formats[i], heads[i], *flags[i]) for i, pt in enumerate(points)]


def _grid_problem(c: Case, seed: int, std: float = 0.1) -> Problem:
    b = c.b
    lengths = True if c.lengths else None
    main = PoolSpec(c.kv_format, tuple(_seqlens(b, c.s_k, c.varlen, seed)), c.topk, c.page,
                    lengths)
    extra = None
    if c.extra:
        extra_s_k = (128, 1000)[seed % 2]
        extra = PoolSpec(_extra_format(c.kv_format, seed),
                         tuple(_seqlens(b, extra_s_k, True, seed + 1)), (64, 200)[seed % 2],
                         (64, 3)[(seed // 2) % 2], lengths)
    return make_problem(main, c.s_q, c.h_q, device=DEVICE, seed=seed, extra=extra, sink=c.sink,
                        std=std)


CASES = grid_cases(os.environ.get("FLASH_MLA_FULL_GRID") == "1")


@gpu
@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=[c.id for c in CASES])
def test_upstream_grid_element_rule(seed, case):
    p = _grid_problem(case, seed=seed)
    out, lse = _run_native(p)
    _check_element(p, out, lse, case.id)


@gpu
@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("h_q", HEADS)
def test_every_format_and_head_count_element_rule(kv_format, h_q):
    k = HEADS.index(h_q)
    page = (1, 61, 69, 2, 64, 576, 7)[k]
    main = PoolSpec(kv_format, (300, 41, 0, 1000), topk=(100, 257, 64)[k % 3], page_size=page,
                    topk_length=True if k % 2 else None)
    extra = (PoolSpec(_extra_format(kv_format, k), (50, 0, 130, 9), topk=40, page_size=5,
                      topk_length=True if k % 2 else None) if k % 3 == 1 else None)
    p = make_problem(main, 1 + k % 3, h_q, device=DEVICE, seed=k * 10 + len(kv_format), extra=extra,
                     sink=k % 2 == 0)
    out, lse = _run_native(p)
    _check_element(p, out, lse, f"{kv_format} h{h_q}")


CTA_VARIABLE = "FLASH_MLA_SPARSE_DECODE_CTA"
ROWS64_SMEM = 199216  # config.h rows64::Layout<576>::kSmemBytes


def _rows64_fits() -> bool:
    """The entry's rule (config.h rows64::fits): compute capability 9.x or 10.x and blocks
    that may opt in to the 64-row CTA's shared memory."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.major in (9, 10) and props.shared_memory_per_block_optin >= ROWS64_SMEM


@gpu
@pytest.mark.parametrize("cta", ("narrow", "rowblock", "rows64"))
@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("h_q", (1, 16, 20, 64))
def test_every_cta(monkeypatch, cta, kv_format, h_q):
    """Every CTA at any head count (the library picks the narrow one up to 16 heads, the
    64-row one above 32 where the GPU runs it): an extra pool, lengths, a sink, queries > 1
    and rows of invalid indices. Forcing the 64-row CTA where it cannot run raises."""
    monkeypatch.setenv(CTA_VARIABLE, cta)
    main = PoolSpec(kv_format, (700, 33, 0), topk=300, page_size=(64, 7)[h_q % 2],
                    topk_length=True)
    extra = PoolSpec(_extra_format(kv_format, h_q), (90, 5, 200), topk=70, page_size=16,
                     topk_length=True)
    p = make_problem(main, 2, h_q, device=DEVICE, seed=h_q + 7 * len(kv_format), extra=extra,
                     sink=True, invalid_every=3)
    if cta == "rows64" and not _rows64_fits():
        with pytest.raises(ValueError, match=f"{CTA_VARIABLE}=rows64"):
            run(p)
        return
    out, lse = _run_native(p)
    _check_element(p, out, lse, f"{cta} {kv_format} h{h_q}")


@gpu
@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("parts", (None, 700))
def test_rows64_tiles_that_change_pool_and_many_splits(monkeypatch, kv_format, parts):
    """The 64-row CTA's 64-position tiles: main lists padded to 32 and 96 positions (a tile
    holds main and extra positions, in that order), an empty main list, a request with no
    extra tokens; with parts forced to 700 every request is cut into many splits (the
    combine merges them). 100 heads leave the second 64-row block 36 rows; two queries.
    Where the GPU cannot run the CTA, forcing it raises."""
    monkeypatch.setenv(CTA_VARIABLE, "rows64")
    if parts is not None:
        monkeypatch.setenv(PARTS_VARIABLE, str(parts))
    main = PoolSpec(kv_format, (900, 40, 300, 0), topk=400, page_size=(64, 61)[len(kv_format) % 2],
                    topk_length=(400, 17, 90, 0))
    extra = PoolSpec(_extra_format(kv_format, 3), (200, 90, 0, 150), topk=150, page_size=16,
                     topk_length=(150, 77, 0, 150))
    p = make_problem(main, 2, 100, device=DEVICE, seed=31 + len(kv_format), extra=extra,
                     sink=True, invalid_every=4)
    if not _rows64_fits():
        with pytest.raises(ValueError, match=f"{CTA_VARIABLE}=rows64"):
            run(p)
        return
    out, lse = _run_native(p)
    _check_element(p, out, lse, f"rows64 {kv_format} parts={parts}")


@gpu
@pytest.mark.parametrize("kv_format", ("V32", "V41_FP4"))
def test_repeat_calls_match_fresh_holders_bit_for_bit(kv_format):
    """A holder's later calls take the repeat path (flash_mla._repeat_call): new q, another
    cache of the same layout (the next layer) and new indices give exactly what a fresh
    holder's validated call gives with the same schedule."""
    from flash_mla import sparse_decode

    main = PoolSpec(kv_format, (500, 70, 0), topk=200, page_size=64, topk_length=True)
    extra = PoolSpec(_extra_format(kv_format, 1), (30, 0, 90), topk=40, page_size=16)
    p = make_problem(main, 2, 16, device=DEVICE, seed=5, extra=extra, sink=True)
    p2 = make_problem(main, 2, 16, device=DEVICE, seed=6, extra=extra, sink=True)
    meta = flash_mla.get_mla_metadata()[0]
    _run_native(p, meta=meta)
    assert sparse_decode.repeat_record(meta) is not None
    out, lse = _run_native(p2, meta=meta)
    fresh_out, fresh_lse = _run_native(p2)
    assert torch.equal(out, fresh_out) and torch.equal(lse, fresh_lse)
    _check_element(p2, out, lse, f"repeat {kv_format}")


@gpu
def test_unknown_cta_override_raises(monkeypatch):
    monkeypatch.setenv(CTA_VARIABLE, "wide")
    p = make_problem(PoolSpec("V32", (64,), topk=64, page_size=64), 1, 16, device=DEVICE, seed=1)
    with pytest.raises(ValueError, match=CTA_VARIABLE):
        run(p)


# --------------------------------------------------------------------------- hostile inputs

@gpu
@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
@pytest.mark.parametrize("h_q", (16, 128))
def test_hostile_std1_plain_rule(kv_format, h_q):
    # std-1 values, long rows, sink and lengths, an extra pool, non-contiguous q and indices.
    main = PoolSpec(kv_format, (4096, 2500, 0), topk=2048, page_size=64, topk_length=True)
    extra = PoolSpec(_extra_format(kv_format, h_q), (300, 1, 700), topk=128, page_size=61,
                     topk_length=True)
    p = make_problem(main, 2, h_q, device=DEVICE, seed=h_q + len(kv_format), extra=extra,
                     std=1.0, sink=True, invalid_every=5)
    out, lse = _run_native(p, q=make_noncontiguous(p.q),
                           indices=make_noncontiguous(p.main.indices))
    _check_shapes(p, out, lse)
    e_out, e_lse = exact(p)
    plain = oracle.plain_sparse_decode(p.q, oracle_pools(p), p.scale, D_V, p.sink)
    label = f"hostile {kv_format} h{h_q}"
    check_plain_rule(out, e_out, plain, OP, "out", name=f"{label} out")
    check_plain_rule(lse.transpose(1, 2), e_lse, None, OP, "lse", name=f"{label} lse")


@gpu
@pytest.mark.parametrize("kv_format", ("V32", "V41", "V4"))
def test_all_invalid_and_zero_length_rows(kv_format):
    b, s_q, h_q, topk = 6, 3, 20, 45
    main = PoolSpec(kv_format, (100, 0, 80, 100, 7, 64), topk, page_size=16,
                    topk_length=(topk, topk, 0, 30, 0, 1))
    p = make_problem(main, s_q, h_q, device=DEVICE, seed=3, sink=True)
    idx = p.main.indices.clone()
    for i, j in ((0, 0), (0, 2), (3, 1)):  # every index of the row an invalid candidate
        idx[i, j] = idx[1, j]                # request 1 owns no token: its rows are all invalid
    p.main.indices = idx
    out, lse = _run_native(p)
    empty = [(0, 0), (0, 2), (3, 1)] + [(i, j) for i in (1, 2, 4) for j in range(s_q)]
    for i, j in empty:
        assert torch.equal(out[i, j], torch.zeros_like(out[i, j])), (i, j)
        assert torch.isposinf(lse[i, :, j]).all(), (i, j)
    _check_element(p, out, lse, f"empty rows {kv_format}")


@gpu
def test_only_the_extra_pool_has_tokens():
    # Rows whose main list is empty but whose extra list is not attend to the extra pool.
    main = PoolSpec("V41", (0, 50, 0), topk=64, page_size=64, topk_length=(64, 0, 64))
    extra = PoolSpec("V41_FP4", (90, 0, 0), topk=32, page_size=64, topk_length=(32, 32, 0))
    p = make_problem(main, 2, 64, device=DEVICE, seed=8, extra=extra, sink=True)
    out, lse = _run_native(p)
    assert torch.isfinite(lse[0]).all() and torch.isposinf(lse[1:]).all()
    _check_element(p, out, lse, "extra only")


@gpu
@pytest.mark.parametrize("kv_format", ("V32", "V41", "V4"))
def test_a_main_pool_without_blocks(kv_format):
    # A cache of zero blocks: every index is invalid (the candidates, 0 among them) and the
    # kernel must read nothing from it; the rows attend to the extra pool only, or are empty.
    d_qk = quant.FORMATS[kv_format].d_qk
    b, s_q, h_q, topk = 3, 2, 16, 7
    cache = quant.quantize_kv(torch.zeros(0, 64, 1, d_qk, dtype=torch.bfloat16), kv_format).to(DEVICE)
    idx = torch.tensor([-2 ** 31, -123456, -1, 0, 1, 114514, 2 ** 31 - 1], dtype=torch.int32)
    idx = idx.expand(b, s_q, topk).contiguous().to(DEVICE)
    lens = torch.tensor([topk, 3, 0], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(21)
    kv2 = (torch.randn(4, 5, 1, d_qk, generator=gen) / 10).to(torch.bfloat16)
    extra_format = "V32" if kv_format == "V32" else "V41_FP4"
    cache2 = quant.quantize_kv(kv2, extra_format).to(DEVICE)
    idx2 = torch.randint(-2, 22, (b, s_q, 9), generator=gen, dtype=torch.int32).to(DEVICE)
    elens = torch.tensor([9, 0, 4], dtype=torch.int32, device=DEVICE)
    q = (torch.randn(b, s_q, h_q, d_qk, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16).to(DEVICE)
    meta = flash_mla.get_mla_metadata()[0]
    out, lse = flash_mla.flash_mla_with_kvcache(
        q, cache, None, None, D_V, meta, indices=idx, topk_length=lens, kv_format=kv_format,
        extra_k_cache=cache2, extra_indices_in_kvcache=idx2, extra_topk_length=elens,
        extra_kv_format=extra_format)
    assert dispatch.last_backend(OP) == "native"
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isposinf(lse[1]).all()
    pools = [(cache, idx, lens.tolist(), kv_format), (cache2, idx2, elens.tolist(), extra_format)]
    e_out, e_lse = oracle.sparse_decode(q, pools, d_qk ** -0.5, D_V, None)
    check_op_close(OP, "out", out, e_out, name=f"empty {kv_format} out")
    check_op_close(OP, "lse", lse.transpose(1, 2), e_lse, name=f"empty {kv_format} lse")


@gpu
def test_sink_infinities():
    main = PoolSpec("V32", (300, 200, 0), topk=64, page_size=64, topk_length=None)
    p = make_problem(main, 2, 32, device=DEVICE, seed=11)
    base_out, base_lse = _run_native(p)
    sink = torch.zeros(32, device=DEVICE)
    sink[0], sink[1] = float("inf"), float("-inf")
    p.sink = sink
    out, lse = _run_native(p)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))  # +inf sink: out 0
    assert torch.equal(out[..., 1, :], base_out[..., 1, :])               # -inf: unchanged
    assert torch.equal(lse, base_lse)                                      # lse excludes it
    _check_element(p, out, lse, "sink inf")


@gpu
@pytest.mark.parametrize("kv_format", quant.FORMAT_NAMES)
def test_noncontiguous_cache_byte_dtypes_and_format_detection(kv_format):
    main = PoolSpec(kv_format, (500, 20, 0, 333), topk=128, page_size=32, topk_length=True)
    p = make_problem(main, 2, 16, device=DEVICE, seed=5 + len(kv_format), sink=True)
    want = exact(p)
    base_out, base_lse = _run_native(p)
    _check_element(p, base_out, base_lse, f"{kv_format} contiguous", want)
    # Blocks 64 bytes apart (a padded block stride, every block still one run of bytes),
    # the padding 0xFF.
    nb, page, _, bpt = p.main.k_cache.shape
    storage = torch.full((nb, page * bpt + 64), POISON_BYTE, dtype=torch.uint8, device=DEVICE)
    padded = storage.as_strided((nb, page, 1, bpt), (page * bpt + 64, bpt, bpt, 1))
    padded.copy_(p.main.k_cache)
    assert not padded.is_contiguous()
    variants = [("padded blocks", dict(k_cache=padded)),
                ("int8", dict(k_cache=p.main.k_cache.view(torch.int8))),
                ("float8_e4m3fn", dict(k_cache=p.main.k_cache.view(torch.float8_e4m3fn))),
                ("is_fp8_kvcache=True", dict(is_fp8_kvcache=True))]
    if kv_format != "V32_NO_ROPE":  # 528 bytes are detected as V41
        variants.append(("kv_format=None", dict(name_formats=False)))
    for label, kwargs in variants:
        out, lse = _run_native(p, **kwargs)
        assert torch.equal(out, base_out) and torch.equal(lse, base_lse), label


# --------------------------------------------------------------------------- schedule

def _long_uneven_problem(seed: int) -> Problem:
    main = PoolSpec("V32", (5000, 1, 0, 777, 64, 3000), topk=2048, page_size=64,
                    topk_length=(2048, 1, 0, 700, 64, 1500))
    extra = PoolSpec("V32", (200, 0, 50, 0, 300, 1), topk=256, page_size=2,
                     topk_length=(256, 0, 50, 0, 129, 1))
    return make_problem(main, 2, 64, device=DEVICE, seed=seed, extra=extra, sink=True)


@gpu
@pytest.mark.parametrize("parts", ["1", "3", "1000"])
def test_results_do_not_depend_on_the_number_of_parts(monkeypatch, parts):
    p = _long_uneven_problem(21)
    want = exact(p)
    base_out, base_lse = _run_native(p)
    monkeypatch.setenv(PARTS_VARIABLE, parts)
    meta = flash_mla.get_mla_metadata()[0]
    out, lse = _run_native(p, meta=meta)
    assert meta.tile_scheduler_metadata.shape[0] == int(parts)
    _check_element(p, out, lse, f"parts={parts}", want)
    # Only where requests are cut differs: each split rounds its P against its own running
    # max, so out may differ by a bf16 ulp here and there (both meet the element rule
    # against float64 above); lse agrees to fp32 rounding. Bit-identity whatever the
    # split is the batch-invariant mode's (below).
    finite = torch.isfinite(base_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], base_lse[finite], rtol=2e-6, atol=1e-6)
    abs_tol, rel_tol, _ = TOLERANCES[OP]["out"]
    assert torch.allclose(out.float(), base_out.float(), rtol=rel_tol, atol=abs_tol)


@gpu
def test_batch_invariant_is_bit_identical_across_batches():
    # 12 requests of very different lengths over one cache; the target (request 0) runs
    # alone and inside batches of other requests at other positions.
    lengths = (2048, 0, 5, 2048, 1000, 64, 1, 1500, 2048, 300, 0, 2000)
    main = PoolSpec("V41", (8000, 10, 100, 9000, 3000, 64, 1, 4000, 8000, 500, 0, 7000),
                    topk=2048, page_size=64, topk_length=lengths)
    extra = PoolSpec("V41_FP4", (100,) * 12, topk=64, page_size=16,
                     topk_length=(64, 0, 3, 64, 10, 64, 0, 20, 64, 1, 0, 64))
    p = make_problem(main, 2, 32, device=DEVICE, seed=55, extra=extra, sink=True)

    def subset(rows: List[int]):
        sel = torch.tensor(rows, device=DEVICE)
        sub = Problem(q=p.q[sel], main=_take(p.main, sel), extra=_take(p.extra, sel),
                      sink=p.sink, scale=p.scale)
        return _run_native(sub, invariant=True), sub

    (alone_out, alone_lse), alone = subset([0])
    _check_element(alone, alone_out, alone_lse, "invariant alone")
    rng = random.Random(5)
    for trial in range(5):
        others = rng.sample(range(1, 12), rng.randint(1, 11))
        pos = rng.randint(0, len(others))
        rows = others[:pos] + [0] + others[pos:]
        (out, lse), _ = subset(rows)
        assert torch.equal(out[pos], alone_out[0]), (trial, rows)
        assert torch.equal(lse[pos], alone_lse[0]), (trial, rows)


def _take(pool, sel):
    """The pool's rows of the requests ``sel`` (same cache)."""
    if pool is None:
        return None
    from dataclasses import replace

    return replace(pool, indices=pool.indices[sel],
                   topk_length=None if pool.topk_length is None else pool.topk_length[sel])


# --------------------------------------------------------------------------- CUDA graphs

@gpu
def test_cuda_graph_capture_and_replay_with_new_indices_and_lengths():
    main = PoolSpec("V4", (3000, 700, 0, 2047), topk=1024, page_size=64, topk_length=True)
    extra = PoolSpec("V41_FP4", (100, 0, 300, 64), topk=128, page_size=32, topk_length=True)
    p = make_problem(main, 2, 64, device=DEVICE, seed=31, extra=extra, sink=True,
                     poison_past_length=False)
    # Captured input buffers; replays copy new values into them.
    buffers = [p.main.indices.clone(), p.main.topk_length.clone(), p.extra.indices.clone(),
               p.extra.topk_length.clone()]
    p.main.indices, p.main.topk_length, p.extra.indices, p.extra.topk_length = buffers
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (loads, first launches)
        _run_native(p)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # A fresh holder: the first call computes the schedule inside the capture.
        out, lse = run(p, meta=flash_mla.get_mla_metadata()[0])
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    for replay in range(3):
        new_main, new_extra = reshuffled(p.main, gen), reshuffled(p.extra, gen)
        for buf, new in zip(buffers, (*new_main, *new_extra)):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_lse = _run_native(p)
        # Same inputs, same schedule rule: the replay and the eager call agree bit for bit.
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), replay
        _check_element(p, out, lse, f"graph replay {replay}")
