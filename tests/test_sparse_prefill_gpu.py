"""Native sparse MLA prefill (flash_mla_sparse_fwd) on a GPU.

Checked against float64 math (flash_mla.oracle.sparse_prefill) under both rules of
docs/numerics.md: upstream-style inputs (randn/10) by the element rule
TOLERANCES["sparse_prefill"], hostile std-1 inputs by the plain-math rule (out at most 2x
the error of flash_mla.oracle.plain_sparse_prefill: fp32 scores and softmax, P rounded to
bf16, P.V in bf16); max_logits and lse always by the element rule, with the exact inf
pattern (empty rows: out 0, max_logits -inf, lse +inf).

Every problem is hostile in its indices: each invalid-index candidate (-2^31, -123456, -1,
s_kv, 114514, 2147480000, 2^31-1) appears, kv rows that no valid index names hold NaN, and
the positions past topk_length name such NaN rows (so reading one shows). Shapes: d_qk 512
and 576; h_q 1, 3, 8, 16, 32, 64, 128; regular and irregular (s_kv, topk), topk > s_kv;
s_q 1, 62, 213, 1024 with and without sink and topk_length; all-invalid rows; s_q 70000;
non-contiguous q, kv and indices; bit-identical reruns. Both CTAs (the 32-head row block and
the wide 64-head one, FLASH_MLA_SPARSE_PREFILL_CTA) at every head count.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import pytest

torch = pytest.importorskip("torch")

import flash_mla  # noqa: E402
from flash_mla import dispatch, oracle  # noqa: E402
from flash_mla.testing import check_op_close, check_plain_rule, make_noncontiguous  # noqa: E402

gpu = pytest.mark.gpu
D_V = 512
INVALID = (-2 ** 31, -123456, -1, None, 114514, 2147480000, 2 ** 31 - 1)  # None = s_kv
CTA_VARIABLE = "FLASH_MLA_SPARSE_PREFILL_CTA"
WIDE_SMEM = {576: 230928, 512: 206352}  # bytes per block of the wide CTA (config.h)


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    """Every call must run the native kernel (a fallback raises)."""
    monkeypatch.setenv("FLASH_MLA_BACKEND", "native")


class Problem(NamedTuple):
    q: torch.Tensor
    kv: torch.Tensor
    indices: torch.Tensor
    topk_length: Optional[torch.Tensor]
    sink: Optional[torch.Tensor]
    scale: float


def _candidates(s_kv: int) -> List[int]:
    return [s_kv if v is None else v for v in INVALID]


def _problem(s_q: int, h_q: int, d_qk: int, s_kv: int, topk: int, *, seed: int, std: float = 0.1,
             lengths: bool = False, sink: bool = False, invalid_every: int = 7) -> Problem:
    """q [s_q, h_q, d_qk] and kv [s_kv, 1, d_qk] of the given std (0.1: upstream's randn/10);
    indices: per query distinct random rows (as many as fit), every invalid_every-th
    position an invalid candidate (cycling through all of them), positions past s_kv
    invalid too; optional topk_length (0, 1, topk and random values) and sink."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(s_q, h_q, d_qk, generator=gen, device="cuda") * std).to(torch.bfloat16)
    kv = (torch.randn(s_kv, 1, d_qk, generator=gen, device="cuda") * std).to(torch.bfloat16)
    take = min(topk, s_kv)
    rows = torch.rand(s_q, s_kv, generator=gen, device="cuda").argsort(dim=1)[:, :take]
    cand = torch.tensor(_candidates(s_kv), dtype=torch.int64, device="cuda")
    idx = cand[torch.arange(s_q * topk, device="cuda") % len(cand)].view(s_q, topk)
    idx[:, :take] = rows
    pos = torch.arange(topk, device="cuda")
    sprinkle = (pos % invalid_every == invalid_every - 1).unsqueeze(0).expand(s_q, topk)
    idx = torch.where(sprinkle, cand[(pos + torch.arange(s_q, device="cuda").unsqueeze(1)) % len(cand)], idx)
    topk_length = None
    if lengths:
        tl = torch.randint(0, topk + 1, (s_q,), generator=gen, device="cuda")
        tl[0::5] = topk
        if s_q > 1:
            tl[1::7] = 0
        if s_q > 2:
            tl[2::11] = 1
        topk_length = tl.to(torch.int32)
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= pos.unsqueeze(0) < topk_length.long().unsqueeze(1)
    used = torch.zeros(s_kv, dtype=torch.bool, device="cuda")
    used[idx[valid]] = True
    unused = (~used).nonzero().flatten()
    if len(unused):
        kv[unused] = float("nan")
        if topk_length is not None:
            # Positions past topk_length name NaN rows: a read there poisons the row.
            past = pos.unsqueeze(0) >= topk_length.long().unsqueeze(1)
            idx = torch.where(past, unused[pos % len(unused)].unsqueeze(0).expand(s_q, topk), idx)
    sink_t = torch.randn(h_q, generator=gen, device="cuda") * 2 if sink else None
    return Problem(q, kv, idx.to(torch.int32).view(s_q, 1, topk), topk_length, sink_t, d_qk ** -0.5)


def _run(p: Problem, q=None, kv=None, indices=None):
    out = flash_mla.flash_mla_sparse_fwd(q if q is not None else p.q, kv if kv is not None else p.kv,
                                         indices if indices is not None else p.indices, p.scale, D_V,
                                         attn_sink=p.sink, topk_length=p.topk_length)
    assert dispatch.last_backend("sparse_prefill") == "native"
    return out


def _exact(p: Problem):
    lengths = p.topk_length.tolist() if p.topk_length is not None else None
    return oracle.sparse_prefill(p.q, p.kv, p.indices, p.scale, D_V, sink=p.sink, topk_length=lengths)


def _check_element(p: Problem, got, label: str) -> None:
    out, max_logits, lse = got
    assert out.shape == (p.q.shape[0], p.q.shape[1], D_V) and out.dtype == torch.bfloat16
    assert max_logits.dtype == lse.dtype == torch.float32
    e_out, e_max, e_lse = _exact(p)
    check_op_close("sparse_prefill", "out", out, e_out, name=f"{label} out")
    check_op_close("sparse_prefill", "max_logits", max_logits, e_max, name=f"{label} max_logits")
    check_op_close("sparse_prefill", "lse", lse, e_lse, name=f"{label} lse")


def _check_plain(p: Problem, got, label: str) -> None:
    out, max_logits, lse = got
    e_out, e_max, e_lse = _exact(p)
    lengths = p.topk_length.tolist() if p.topk_length is not None else None
    plain = oracle.plain_sparse_prefill(p.q, p.kv, p.indices, p.scale, D_V, sink=p.sink,
                                        topk_length=lengths)
    check_plain_rule(out, e_out, plain, "sparse_prefill", "out", name=f"{label} out")
    check_plain_rule(max_logits, e_max, None, "sparse_prefill", "max_logits", name=f"{label} max_logits")
    check_plain_rule(lse, e_lse, None, "sparse_prefill", "lse", name=f"{label} lse")


# (s_kv, topk): regular, irregular, topk > s_kv.
KV_TOPK = ((256, 128), (1000, 123), (50, 200))


@gpu
@pytest.mark.parametrize("d_qk", (512, 576))
@pytest.mark.parametrize("h_q", (1, 3, 8, 16, 32, 64, 128))
@pytest.mark.parametrize("s_kv,topk", KV_TOPK)
def test_heads_and_topk_element_rule(d_qk, h_q, s_kv, topk):
    p = _problem(37, h_q, d_qk, s_kv, topk, seed=h_q * 1000 + topk + d_qk)
    _check_element(p, _run(p), f"d{d_qk} h{h_q} s_kv{s_kv} topk{topk}")


@gpu
@pytest.mark.parametrize("s_q", (1, 62, 213, 1024))
@pytest.mark.parametrize("sink", (False, True))
@pytest.mark.parametrize("lengths", (False, True))
def test_queries_sink_and_topk_length_element_rule(s_q, sink, lengths):
    d_qk = 576 if s_q % 2 else 512
    h_q = 128 if s_q == 62 else 16
    p = _problem(s_q, h_q, d_qk, 700, 257, seed=s_q + 10 * sink + 100 * lengths, sink=sink,
                 lengths=lengths)
    _check_element(p, _run(p), f"s_q{s_q} sink{sink} lengths{lengths}")


@gpu
@pytest.mark.parametrize("d_qk", (512, 576))
@pytest.mark.parametrize("h_q", (8, 64, 128))
def test_hostile_std1_plain_rule(d_qk, h_q):
    # Long rows of std-1 values, sink and lengths, non-contiguous q, kv and indices.
    p = _problem(24, h_q, d_qk, 4096, 2048, seed=7 + h_q + d_qk, std=1.0, sink=True, lengths=True,
                 invalid_every=5)
    got = _run(p, q=make_noncontiguous(p.q), kv=make_noncontiguous(p.kv),
               indices=make_noncontiguous(p.indices))
    _check_plain(p, got, f"hostile d{d_qk} h{h_q}")


@gpu
@pytest.mark.parametrize("d_qk", (512, 576))
def test_all_invalid_rows_and_zero_lengths(d_qk):
    s_q, h_q, s_kv, topk = 12, 20, 64, 45
    p = _problem(s_q, h_q, d_qk, s_kv, topk, seed=3, lengths=True, sink=True)
    idx = p.indices.clone()
    cand = torch.tensor(_candidates(s_kv), dtype=torch.int32, device="cuda")
    for r in (0, 5, 11):  # every index invalid
        idx[r, 0] = cand[torch.arange(topk, device="cuda") % len(cand)]
    tl = p.topk_length.clone()
    tl[3] = 0
    tl[7] = -5  # a negative length counts as 0
    p = p._replace(indices=idx, topk_length=tl)
    out, max_logits, lse = _run(p)
    for r in (0, 3, 5, 7, 11):
        assert torch.equal(out[r], torch.zeros_like(out[r])), r
        assert torch.isneginf(max_logits[r]).all() and torch.isposinf(lse[r]).all(), r
    _check_element(p, (out, max_logits, lse), f"all-invalid d{d_qk}")


@gpu
def test_no_valid_index_anywhere_and_empty_kv():
    q = (torch.randn(4, 8, 576, device="cuda") / 10).to(torch.bfloat16)
    kv = torch.zeros(0, 1, 576, dtype=torch.bfloat16, device="cuda")
    idx = torch.tensor([[[0, -1, 5, 2 ** 31 - 1]]] * 4, dtype=torch.int32, device="cuda")
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.04)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(max_logits).all() and torch.isposinf(lse).all()


@gpu
def test_sink_infinities():
    p = _problem(9, 32, 576, 300, 64, seed=11)
    sink = torch.zeros(32, device="cuda")
    sink[0], sink[1] = float("inf"), float("-inf")
    out, max_logits, lse = _run(p._replace(sink=sink))
    base, base_max, base_lse = _run(p)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # +inf sink: out 0
    assert torch.equal(out[:, 1], base[:, 1])                   # -inf sink: unchanged
    assert torch.equal(lse, base_lse) and torch.equal(max_logits, base_max)  # sink excluded
    _check_element(p._replace(sink=sink), (out, max_logits, lse), "sink inf")


@gpu
def test_s_q_70000_small_topk():
    # 70000 queries: past the 65535 limit of grid dimensions y and z (8 heads keep the
    # float64 check's memory small).
    p = _problem(70000, 8, 576, 3000, 20, seed=70000, lengths=True, sink=True)
    _check_element(p, _run(p), "s_q 70000")


@gpu
def test_strides_the_kernel_cannot_gather_from_are_copied():
    # kv row stride 580 (not a multiple of 8): the module passes a contiguous copy.
    p = _problem(16, 16, 576, 200, 64, seed=21)
    wide = torch.full((200, 1, 580), float("nan"), dtype=torch.bfloat16, device="cuda")
    wide[..., :576] = p.kv
    _check_element(p, _run(p, kv=wide[..., :576]), "odd kv stride")
    # A contiguous q at an address 2 bytes past 16-byte alignment.
    flat = torch.empty(p.q.numel() + 8, dtype=torch.bfloat16, device="cuda")
    shifted = flat[1:1 + p.q.numel()].view(p.q.shape)
    shifted.copy_(p.q)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    _check_element(p, _run(p, q=shifted), "misaligned q")


@gpu
def test_reruns_are_bit_identical():
    p = _problem(300, 64, 512, 5000, 1000, seed=99, std=1.0, sink=True, lengths=True)
    first = _run(p)
    second = _run(p)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _wide_fits(d_qk: int) -> bool:
    """The entry's rule (config.h wide_fits): compute capability 9.x or 10.x and blocks
    that may opt in to the wide CTA's shared memory."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.major in (9, 10) and props.shared_memory_per_block_optin >= WIDE_SMEM[d_qk]


def _force_cta(monkeypatch, cta: str, d_qk: int) -> bool:
    """Sets the override; False when the device cannot run that CTA (then a call must
    raise a ValueError naming the variable, which the caller checks instead)."""
    monkeypatch.setenv(CTA_VARIABLE, cta)
    return cta != "wide" or _wide_fits(d_qk)


def _run_forced(monkeypatch, cta: str, p: Problem, **tensors):
    if not _force_cta(monkeypatch, cta, p.q.shape[2]):
        with pytest.raises(ValueError, match=CTA_VARIABLE):
            _run(p, **tensors)
        return None
    return _run(p, **tensors)


@gpu
@pytest.mark.parametrize("cta", ("wide", "rowblock"))
@pytest.mark.parametrize("d_qk", (512, 576))
@pytest.mark.parametrize("h_q", (1, 20, 33, 64, 100, 128))
def test_every_cta_element_rule(monkeypatch, cta, d_qk, h_q):
    """Both CTAs at any head count (the library takes the wide one past 32 heads where the
    device allows it): a sink, topk_length, an invalid index every third position, topk not
    a multiple of either tile (16 or 64 tokens)."""
    p = _problem(29, h_q, d_qk, 1000, 300, seed=h_q + d_qk, sink=True, lengths=True,
                 invalid_every=3)
    got = _run_forced(monkeypatch, cta, p)
    if got is not None:
        _check_element(p, got, f"{cta} d{d_qk} h{h_q}")


@gpu
@pytest.mark.parametrize("cta", ("wide", "rowblock"))
@pytest.mark.parametrize("h_q", (48, 128))
def test_every_cta_hostile_plain_rule(monkeypatch, cta, h_q):
    p = _problem(16, h_q, 576, 4096, 2048, seed=17 + h_q, std=1.0, sink=True, lengths=True,
                 invalid_every=5)
    got = _run_forced(monkeypatch, cta, p, kv=make_noncontiguous(p.kv))
    if got is not None:
        _check_plain(p, got, f"hostile {cta} h{h_q}")


@gpu
@pytest.mark.parametrize("cta", ("wide", "rowblock"))
def test_every_cta_reruns_are_bit_identical(monkeypatch, cta):
    p = _problem(200, 128, 576, 5000, 1000, seed=98, std=1.0, sink=True, lengths=True)
    first = _run_forced(monkeypatch, cta, p)
    if first is not None:
        second = _run(p)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@gpu
def test_unknown_cta_override_raises(monkeypatch):
    monkeypatch.setenv(CTA_VARIABLE, "narrow")
    p = _problem(2, 64, 576, 100, 32, seed=1)
    with pytest.raises(ValueError, match=CTA_VARIABLE):
        _run(p)


@gpu
def test_native_rejects_a_bad_call_with_the_argument_name():
    from tests.gpu_native import native_function

    fn = native_function("sparse_prefill_fwd")
    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16, device="cuda")
    kv = torch.zeros(10, 1, 576, dtype=torch.bfloat16, device="cuda")
    idx = torch.zeros(2, 1, 8, dtype=torch.int32, device="cuda")
    out = torch.empty(2, 4, 512, dtype=torch.bfloat16, device="cuda")
    ml = torch.empty(2, 4, dtype=torch.float32, device="cuda")
    lse = torch.empty(2, 4, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="kv must have shape"):
        fn(q, kv[:, :, :512], idx, None, None, out, ml, lse, 0.1, 512)
    with pytest.raises(TypeError, match="indices must have dtype int32"):
        fn(q, kv, idx.long(), None, None, out, ml, lse, 0.1, 512)
    with pytest.raises(ValueError, match="q must have between 1 and 128 heads"):
        q129 = torch.zeros(2, 129, 576, dtype=torch.bfloat16, device="cuda")
        fn(q129, kv, idx, None, None, torch.empty(2, 129, 512, dtype=torch.bfloat16, device="cuda"),
           torch.empty(2, 129, device="cuda"), torch.empty(2, 129, device="cuda"), 0.1, 512)
    with pytest.raises(ValueError, match="d_v must be 512"):
        fn(q, kv, idx, None, None, out, ml, lse, 0.1, 256)
