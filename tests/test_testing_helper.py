"""flash_mla.testing: both numerics rules must fail where the contract says and say where (CPU)."""
from __future__ import annotations

import re

import pytest
import torch

from flash_mla import testing
from flash_mla.testing import (
    TOLERANCES,
    check_close,
    check_op_close,
    check_plain_rule,
    compare,
    compare_plain,
    invalid_prefill_indices,
    make_noncontiguous,
    make_paged_kv_cache,
)

INF = float("inf")
NAN = float("nan")


def test_tolerances_are_the_spec_table():
    assert TOLERANCES["dense_decode"]["out"] == (8e-4, 2.01 / 128, 5e-6)
    assert TOLERANCES["dense_decode"]["lse"] == (1e-6, 8.01 / 65536)
    assert TOLERANCES["sparse_decode"]["out"] == (1e-3, 2.01 / 128, 5e-6)
    assert TOLERANCES["sparse_decode"]["lse"] == (1e-6, 8.01 / 65536)
    assert TOLERANCES["sparse_prefill"]["out"] == (8e-4, 3.01 / 128, 7e-6)
    assert TOLERANCES["sparse_prefill"]["lse"] == (1e-6, 2.01 / 65536)
    assert TOLERANCES["sparse_prefill"]["max_logits"] == (1e-6, 2.01 / 65536)
    for key in ("out", "dq", "dk", "dv"):
        assert TOLERANCES["mha_prefill"][key] == (1e-3, 8.01 / 128, 7e-6)
    assert TOLERANCES["mha_prefill"]["lse"] == (1e-6, 2.01 / 65536)


def test_identical_tensors_pass_with_report():
    x = torch.tensor([[1.0, -INF], [INF, NAN]])
    report = check_close(x, x.clone(), abs_tol=0.0, rel_tol=0.0, cos_tol=0.0, name="same")
    assert report.passed and report.num_failed == 0 and report.cos_diff == 0.0
    assert report.max_abs_err == 0.0


def test_planted_bad_element_fails_and_says_where():
    ref = torch.ones(3, 4, 5)
    actual = ref.clone()
    actual[1, 2, 3] = 1.5
    actual[0, 0, 0] = 1.01  # also failing, but smaller: not the worst
    with pytest.raises(AssertionError) as info:
        check_close(actual, ref, abs_tol=1e-3, rel_tol=1e-3, name="planted")
    msg = str(info.value)
    assert msg.startswith("planted: FAIL")
    assert "2 of 60 elements" in msg
    assert "worst at index (1, 2, 3)" in msg
    assert "actual=1.5 " in msg and "reference=1 " in msg
    assert re.search(r"abs_err=5\.000e-01 rel_err=5\.000e-01", msg)
    assert "cos_diff=" in msg


def test_abs_or_rel_rule():
    ref = torch.tensor([1000.0, 1e-7])
    actual = torch.tensor([1000.5, 2e-7])  # first: abs 0.5 but rel 5e-4; second: abs 1e-7, rel ~0.09
    assert compare(actual, ref, abs_tol=1e-3, rel_tol=1e-3).passed
    report = compare(actual, ref, abs_tol=1e-3, rel_tol=1e-4)
    assert not report.passed and report.num_failed == 1 and report.worst_index == (0,)
    report = compare(actual, ref, abs_tol=1e-8, rel_tol=1e-3)
    assert not report.passed and report.worst_index == (1,)
    # the bounds are strict: abs_err == abs_tol does not pass on its own
    assert not compare(torch.tensor([1.5]), torch.tensor([1.0]), abs_tol=0.5, rel_tol=0.0).passed


@pytest.mark.parametrize(
    "actual,ref,what",
    [
        ([1.0, INF], [1.0, 3.0], r"\+inf pattern, first at \(1,\)"),
        ([1.0, -INF], [1.0, INF], r"-inf pattern"),
        ([NAN, 2.0], [0.0, 2.0], r"NaN pattern, first at \(0,\)"),
        ([1.0, 2.0], [1.0, NAN], r"NaN pattern, first at \(1,\)"),
    ],
)
def test_special_value_pattern_must_match(actual, ref, what):
    report = compare(torch.tensor(actual), torch.tensor(ref), abs_tol=1e9, rel_tol=1e9)
    assert not report.passed and report.num_special_mismatch == 1 and report.num_failed == 0
    with pytest.raises(AssertionError, match=what):
        check_close(torch.tensor(actual), torch.tensor(ref), abs_tol=1e9, rel_tol=1e9, name="pattern")


def test_cosine_violation_fails_even_when_every_element_passes():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=gen) * 1e-3
    actual = ref + torch.randn(1000, generator=gen) * 1e-4  # each within abs_tol, but cos_diff ~ 5e-3
    assert compare(actual, ref, abs_tol=1e-2, rel_tol=0.0).passed
    with pytest.raises(AssertionError, match=r"cos_diff .* exceeds cos_tol 5e-06") as info:
        check_close(actual, ref, abs_tol=1e-2, rel_tol=0.0, cos_tol=5e-6, name="cos")
    assert "elements outside" not in str(info.value)


def test_cos_diff_value_and_float64():
    a = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    r = torch.tensor([0.0, 1.0])
    assert compare(a, r, abs_tol=10, rel_tol=10).cos_diff == 1.0
    b = torch.tensor([3.0, 4.0])
    assert compare(b, 2 * b, abs_tol=10, rel_tol=10).cos_diff == pytest.approx(1 - 2 * 2 * 25 / (25 + 100), abs=1e-15)


def test_shape_mismatch_fails():
    report = compare(torch.zeros(2, 3), torch.zeros(3, 2), abs_tol=1, rel_tol=1)
    assert not report.passed and "shape mismatch" in report.message
    with pytest.raises(AssertionError, match=r"shape mismatch: actual \(2, 3\) vs reference \(3, 2\)"):
        check_close(torch.zeros(2, 3), torch.zeros(3, 2), abs_tol=1, rel_tol=1, name="shape")


def test_check_op_close_uses_table_and_validates_names():
    ref = torch.ones(4)
    check_op_close("dense_decode", "out", ref + 7e-4, ref)
    with pytest.raises(AssertionError, match=r"^sparse_prefill\.lse: FAIL"):
        check_op_close("sparse_prefill", "lse", ref + 1e-3, ref)
    with pytest.raises(ValueError, match="op must be one of"):
        check_op_close("decode", "out", ref, ref)
    with pytest.raises(ValueError, match=r"what must be one of .* for op 'dense_decode', got 'dq'"):
        check_op_close("dense_decode", "dq", ref, ref)


# ---------------------------------------------------------------------------
# hostile-input builders
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int32, torch.float8_e4m3fn])
def test_make_noncontiguous(dtype):
    t = (torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5) % 7).to(dtype)
    nc = make_noncontiguous(t)
    assert not nc.is_contiguous() and nc.stride(-1) == 1
    assert nc.stride() == (4 * 133, 133, 1)
    assert nc.dtype == dtype
    if dtype.itemsize == 1:  # float8 has no CPU equality kernel: compare the bytes
        assert torch.equal(nc.view(torch.uint8), t.view(torch.uint8))
    else:
        assert torch.equal(nc, t)
    whole = torch.as_strided(nc, (3, 4, 133), nc.stride())
    pad = torch.ones(3, 4, 133, dtype=torch.bool)
    pad[:2, :3, :5] = False
    if dtype == torch.int32:
        assert (whole[pad] == 2 ** 31 - 1).all()
    else:
        assert torch.isnan(whole[pad].float()).all()


def test_invalid_prefill_indices():
    assert invalid_prefill_indices(100) == [-(2 ** 31), -123456, -1, 100, 114514, 2147480000, 2 ** 31 - 1]
    big = invalid_prefill_indices(200000)
    assert 114514 not in big and 200000 in big and len(big) == 6


def test_make_paged_kv_cache_is_hostile_and_consistent():
    gen = torch.Generator().manual_seed(5)
    seqlens = [0, 1, 64, 65, 130]
    cache = make_paged_kv_cache(seqlens, page_size=64, h_k=2, d=8, generator=gen, spare_blocks=3)
    kc, table = cache.k_cache, cache.block_table
    assert cache.page_size == 64 and kc.dtype == torch.bfloat16
    assert cache.cache_seqlens.tolist() == seqlens and table.dtype == torch.int32
    num_blocks = kc.shape[0]
    assert num_blocks == 0 + 1 + 1 + 2 + 3 + 3
    used = torch.zeros(num_blocks, 64, dtype=torch.bool)
    seen_pages = []
    for i, s in enumerate(seqlens):
        n_pages = -(-s // 64)
        pages = table[i, :n_pages].tolist()
        seen_pages += pages
        for t in range(s):
            p, o = pages[t // 64], t % 64
            assert torch.equal(kc[p, o], cache.sequences[i][t])
            assert not torch.isnan(kc[p, o].float()).any()
            used[p, o] = True
        unused_entries = table[i, n_pages:]
        assert unused_entries.numel() >= 1
        assert ((unused_entries < 0) | (unused_entries >= num_blocks)).all()
        assert (unused_entries.to(torch.int64).abs() >= 123456).all()
    assert len(set(seen_pages)) == len(seen_pages)
    assert torch.isnan(kc[~used].float()).all()
    assert testing.PagedKVCache is type(cache)


# ---------------------------------------------------------------------------
# rule 2: the plain-math rule
# ---------------------------------------------------------------------------
def _rule2_tensors():
    g = torch.Generator().manual_seed(3)
    exact = torch.randn(4, 8, 16, generator=g, dtype=torch.float64)
    plain = exact.clone()
    plain[2, 3, 4] += 0.01  # plain's worst error: 0.01 at (2, 3, 4)
    return exact, plain


def test_plain_rule_passes_within_twice_plains_error():
    exact, plain = _rule2_tensors()
    actual = exact.clone()
    actual[1, 1, 1] += 0.02  # exactly 2x: allowed (<=)
    report = check_plain_rule(actual, exact, plain, "mha_prefill", "dq")
    assert report.passed and report.ratio == pytest.approx(2.0)
    assert report.worst_index == (1, 1, 1) and report.plain_worst_index == (2, 3, 4)
    assert testing.PLAIN_FACTOR == 2.0


def test_plain_rule_planted_miss_names_the_worst_element():
    exact, plain = _rule2_tensors()
    actual = exact.clone()
    actual[0, 5, 9] += 0.021
    actual[3, 0, 0] += 0.001  # smaller: not the worst
    with pytest.raises(AssertionError) as info:
        check_plain_rule(actual, exact, plain, "mha_prefill", "dk", name="planted")
    msg = str(info.value)
    assert msg.startswith("planted: FAIL")
    assert re.search(r"max_err 2\.100e-02 exceeds 2 x plain's 1\.000e-02 = 2\.000e-02", msg)
    assert "worst at index (0, 5, 9)" in msg and "plain's worst at (2, 3, 4)" in msg
    assert f"exact={float(exact[0, 5, 9]):.8g}" in msg


def test_plain_rule_exact_plain_demands_exact_actual():
    exact = torch.ones(3)
    assert not compare_plain(exact + 1e-6, exact, exact.clone(), cos_tol=1.0).passed
    assert compare_plain(exact.clone(), exact, exact.clone(), cos_tol=0.0).passed


def test_plain_rule_cos_bound_and_special_pattern():
    exact, plain = _rule2_tensors()
    # Within 2x plain's max error everywhere, yet every element moved: the cos bound fails.
    actual = exact + 0.019 * torch.sign(exact)
    plain_everywhere = exact + 0.01 * torch.sign(exact)
    report = compare_plain(actual, exact, plain_everywhere, cos_tol=1e-9)
    assert not report.passed and "cos_diff" in report.problems[-1] and report.ratio <= 2.0
    actual = exact.clone()
    actual[0, 0, 0] = float("nan")
    report = compare_plain(actual, exact, plain, cos_tol=1.0)
    assert not report.passed and report.num_special_mismatch == 1
    assert "NaN pattern, first at (0, 0, 0)" in report.message
    exact_inf = exact.clone()
    exact_inf[1, 2, 3] = INF
    plain_inf, actual_inf = plain.clone(), exact.clone()
    plain_inf[1, 2, 3] = actual_inf[1, 2, 3] = INF
    assert compare_plain(actual_inf, exact_inf, plain_inf, cos_tol=1.0).passed


def test_plain_rule_reports_a_broken_plain_and_shape_mismatch():
    exact, plain = _rule2_tensors()
    plain[0, 0, 1] = float("nan")
    report = compare_plain(exact.clone(), exact, plain, cos_tol=1.0)
    assert not report.passed and "plain computation is broken" in report.message
    report = compare_plain(exact[:2], exact, plain, cos_tol=1.0)
    assert not report.passed and "shape mismatch" in report.message


def test_plain_rule_keeps_the_element_rule_for_fp32_outputs():
    ref = torch.tensor([10.0, 20.0])
    # lse: the element rule (abs 1e-6 OR rel 2.01/65536); plain is not used.
    assert check_plain_rule(ref + 1e-4, ref, None, "mha_prefill", "lse").passed
    with pytest.raises(AssertionError, match="elements outside abs_tol"):
        check_plain_rule(ref + 1e-2, ref, ref + 1.0, "mha_prefill", "lse")
    with pytest.raises(AssertionError, match="elements outside abs_tol"):
        check_plain_rule(ref + 1e-2, ref, None, "sparse_prefill", "max_logits")
    with pytest.raises(TypeError, match="plain must be a torch.Tensor"):
        check_plain_rule(ref, ref, None, "mha_prefill", "out")
    with pytest.raises(ValueError, match="what must be one of"):
        check_plain_rule(ref, ref, ref, "mha_prefill", "dz")
