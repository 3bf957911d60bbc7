"""benchmarks/bench_sparse_prefill.py on the CPU: its shape lists, FLOP count, the
environment helper that times the row-block CTA beside the default one, the per-shape
row-block timing (with a fake library call and timer). The GPU runs themselves, and the
PNGs drawn from their JSON, are in benchmarks/results/."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CTA = "FLASH_MLA_SPARSE_PREFILL_CTA"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_sparse_prefill",
                                                      BENCH / "bench_sparse_prefill.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_shapes_and_flop(bench):
    assert (128, 576, 8192) in bench.UPSTREAM and (128, 512, 65536) in bench.UPSTREAM
    assert {h for h, _, _ in bench.SERVING} == {16, 32, 64}
    assert set(bench.QUICK) <= set(bench.UPSTREAM + bench.SERVING)
    # 2 * valid keys * heads * (d_qk + d_v): the S and P V products.
    assert bench.flop(10, 4, 576) == 2 * 10 * 4 * (576 + 512)


@pytest.mark.parametrize("before", (None, "wide"))
@pytest.mark.parametrize("value", ("rowblock", None))
def test_env_helper_sets_then_restores(monkeypatch, bench, before, value):
    if before is None:
        monkeypatch.delenv(CTA, raising=False)
    else:
        monkeypatch.setenv(CTA, before)
    with bench.forced_env(CTA, value):
        assert os.environ.get(CTA) == value
    assert os.environ.get(CTA) == before


def test_env_helper_restores_after_an_error(monkeypatch, bench):
    monkeypatch.setenv(CTA, "wide")
    with pytest.raises(RuntimeError):
        with bench.forced_env(CTA, "rowblock"):
            raise RuntimeError("the timed call failed")
    assert os.environ[CTA] == "wide"


class _FakeTimer:
    """Records the CTA variable each timed call ran under; 100 us with it unset, 150 us
    with the row block forced."""

    def __init__(self):
        self.seen = []

    def time_us(self, call):
        call()
        cta = os.environ.get(CTA)
        self.seen.append(cta)
        return (150.0 if cta == "rowblock" else 100.0), "graph"


class _FakeTorch:
    bfloat16 = "bf16"
    int32 = "i32"

    class _T:
        def __truediv__(self, other):
            return self

        def to(self, *args, **kwargs):
            return self

        def topk(self, k, dim):
            return type("R", (), {"indices": self})()

        def view(self, *shape):
            return self

    def randn(self, *shape, device=None):
        return self._T()

    def rand(self, *shape, device=None):
        return self._T()


class _FakeFlashMLA:
    def __init__(self):
        self.calls = 0

    def flash_mla_sparse_fwd(self, *args):
        self.calls += 1


@pytest.mark.parametrize("h_q,expect_rowblock", ((128, True), (64, True), (32, False), (16, False)))
def test_rowblock_timed_only_past_32_heads(monkeypatch, bench, h_q, expect_rowblock):
    monkeypatch.delenv(CTA, raising=False)
    timer = _FakeTimer()
    row = bench.bench_shape(_FakeTorch(), _FakeFlashMLA(), timer, h_q, 576, 8192, False)
    assert row["us"] == 100.0 and row["reference_us"] is None
    if expect_rowblock:
        assert timer.seen == [None, "rowblock"] and row["rowblock_us"] == 150.0
    else:
        assert timer.seen == [None] and row["rowblock_us"] is None
    assert os.environ.get(CTA) is None

