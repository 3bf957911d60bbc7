"""benchmarks/bench_sparse_decode.py and benchmarks/soak_sparse_decode.py on the CPU: their
shape lists, FLOP and byte counts, index generator, row and summary lines, the plot's data,
the raw-call recorder, random soak cases, the parts both decode soaks share
(benchmarks/_soak_common.py) and their exits without a GPU (the GPU runs
themselves are recorded in benchmarks/results/)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from flash_mla import quant

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(stem: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(stem, BENCH / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_sparse_decode")


@pytest.fixture(scope="module")
def soak():
    return _load("soak_sparse_decode")


# --------------------------------------------------------------------------- benchmark

def test_format_tables_agree_with_flash_mla_quant(bench, soak):
    assert bench.FORMAT_NAMES == soak.FORMAT_NAMES == quant.FORMAT_NAMES
    for name, fmt in quant.FORMATS.items():
        assert bench.FORMATS[name] == (fmt.bytes_per_token, fmt.d_qk)
        assert soak.D_QK[name] == fmt.d_qk


def test_shapes_are_the_upstream_and_serving_ones(bench):
    up = [s for s in bench.shapes(False) if s.kind == "upstream"]
    serving = [s for s in bench.shapes(False) if s.kind == "serving"]
    assert {(s.kv_format, s.b) for s in up} == {(f, b) for f in ("V32", "V4", "V41")
                                                 for b in (64, 128)}
    assert all(s.h_q == 128 and s.s_q == 2 for s in up)
    assert {(s.kv_format, s.h_q) for s in serving} == {(f, h) for f in quant.FORMAT_NAMES
                                                       for h in (8, 16, 32)}
    assert all(s.b == 128 and s.s_q == 1 for s in serving)
    quick = bench.shapes(True)
    assert set(quick) < set(bench.shapes(False))
    assert {s.kind for s in quick} == {"upstream", "serving"}
    assert {s.kv_format for s in quick if s.kind == "serving"} == set(quant.FORMAT_NAMES)
    assert bench.TOPK == 2048 and bench.REGION == 8192


def test_heads_option_keeps_only_those_head_counts(bench):
    only = bench.shapes(False, [32, 128])
    assert {s.h_q for s in only} == {32, 128}
    assert only == [s for s in bench.shapes(False) if s.h_q in (32, 128)]
    assert bench.shapes(True, [8]) == []  # --quick has no 8-head shape
    assert bench.parse_args(["--out", "x", "--heads", "16,32"]).heads == [16, 32]


def test_flop_and_byte_counts(bench):
    # upstream: 2 h_q b s_q topk (d_qk + 512)
    assert bench.flop(64, 2, 128, 2048, 576) == 2 * 128 * 64 * 2 * 2048 * 1088
    # serving: unique tokens x bytes per token + q (d_qk bf16) + out (512 bf16)
    assert bench.nbytes(1000, "V41_FP4", 128, 1, 8) == 1000 * 288 + 128 * 8 * (512 + 512) * 2
    assert bench.nbytes(10, "V32", 2, 2, 4) == 10 * 656 + 2 * 2 * 4 * (576 + 512) * 2


def test_region_indices_are_distinct_tokens_of_the_request_region(bench):
    gen = torch.Generator().manual_seed(0)
    b, s_q, topk, region, page = 3, 2, 50, 128, 16
    idx, table = bench.region_indices(torch, b, s_q, topk, region, page, gen, "cpu")
    assert idx.dtype == torch.int32 and idx.shape == (b, s_q, topk)
    assert sorted(table.flatten().tolist()) == list(range(b * region // page))
    for r in range(b):
        owned = {int(p) * page + o for p in table[r] for o in range(page)}
        for j in range(s_q):
            row = idx[r, j].tolist()
            assert len(set(row)) == topk and set(row) <= owned
    assert not torch.equal(idx[0, 0], idx[0, 1])
    with pytest.raises(ValueError, match="region must be a multiple of page"):
        bench.region_indices(torch, 1, 1, 300, 256, 16, gen, "cpu")


def _row(bench, kind, fmt, us=100.0, parts=7):
    shape = bench.Shape(kind, fmt, 64, 2, 128)
    return {**shape._asdict(), "us": us, "gbps": 1500.0, "tflops": 300.0, "parts": parts,
            "unique_tokens": 12345}


def test_rows_mark_the_ratio_they_are_judged_by(bench):
    up = bench.format_row(_row(bench, "upstream", "V32"), 3000.0, 600.0)
    assert "0.500 " in up and "0.500*" in up.replace("0.500 ", "", 1)  # GB/s plain, TFLOPS marked
    serving = bench.format_row(_row(bench, "serving", "V41_FP4", parts=None), 3000.0, 600.0)
    assert "0.500*" in serving and serving.split()[-2] == "-"
    assert len(bench.HEADER.split()) == len(up.split())
    assert bench.judged_ratio(_row(bench, "upstream", "V4"), 3000.0, 600.0) == 0.5
    assert bench.judged_ratio(_row(bench, "serving", "V4"), 2000.0, 600.0) == 0.75


def test_plot_series_from_json(bench, tmp_path):
    data = {"device": "x", "copy_gbps": 3000.0, "mma_sync_tflops": 600.0,
            "rows": [_row(bench, "upstream", "V32"), _row(bench, "serving", "V4"),
                     _row(bench, "serving", "V41")]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    series = bench.plot_series(json.loads(path.read_text()))
    assert series["upstream"] == (["V32 b64 s_q2 h128"], [0.5])
    assert series["serving"] == (["V4 b64 s_q2 h128", "V41 b64 s_q2 h128"], [0.5, 0.5])


def test_record_call_returns_the_arguments_the_api_passed(bench):
    calls = []

    def lookup(name):
        if name == "sparse_decode_fwd":
            return lambda *args: calls.append(args)
        if name == "other":
            return lambda *args: None
        raise RuntimeError(f"native function {name!r} is not exported")

    native = types.SimpleNamespace(function=lookup)

    def api():
        native.function("other")(1)
        native.function("sparse_decode_fwd")("q", 2, None)

    fn, args, why = bench.record_call(native, "sparse_decode_fwd", api)
    assert why == "" and args == ("q", 2, None) and native.function is lookup
    fn(*args)
    assert calls == [("q", 2, None), ("q", 2, None)]  # the API's call, then the replay
    fn, args, why = bench.record_call(native, "missing_fwd", api)
    assert fn is None and "unavailable" in why and "not exported" in why
    fn, args, why = bench.record_call(native, "sparse_decode_fwd", lambda: None)
    assert fn is None and "did not reach 'sparse_decode_fwd'" in why

    def failing():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        bench.record_call(native, "sparse_decode_fwd", failing)
    assert native.function is lookup  # restored


def test_host_line_and_median(bench):
    assert bench.host_line({"api_us": 41.23, "raw_tvm_ffi_us": 9.87}) == (
        "host time per eager call: API 41.2 us, raw tvm-ffi 9.9 us")
    line = bench.host_line({"api_us": 41.0, "raw_tvm_ffi_us": None, "raw_note": "no entry"})
    assert line.endswith("raw tvm-ffi n/a (no entry)")
    # the entry the API reached is named (the allocating one where torch's allocator is on)
    assert bench.host_line({"api_us": 21.0, "raw_tvm_ffi_us": 9.5,
                            "raw_entry": "sparse_decode_fwd_alloc"}) == (
        "host time per eager call: API 21.0 us, raw tvm-ffi (sparse_decode_fwd_alloc) 9.5 us")
    syncs = []
    assert bench.median_us(lambda: None, 130, lambda: syncs.append(1)) >= 0
    assert len(syncs) == 2


def test_arguments_and_exits(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args([])
    assert exc.value.code == 2 and "--out is required" in capsys.readouterr().err
    assert bench.parse_args(["--plot", "x.json"]).plot == Path("x.json")
    args = bench.parse_args(["--out", "d", "--quick"])
    assert args.quick and args.iters == 10 and args.host_iters == 300


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_both_scripts_exit_2_and_say_why(bench, soak, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "bench_sparse_decode.json").exists()
    assert soak.main(["--seconds", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------- soak

def test_random_cases_cover_the_space_within_bounds(soak):
    rng = random.Random(0)
    cases = [soak.random_case(rng, 32) for _ in range(600)]
    assert set(Counter(c.main.kv_format for c in cases)) == set(quant.FORMAT_NAMES)
    assert set(c.h_q for c in cases) == set(soak.HEADS)
    assert set(c.main.page_size for c in cases) == set(soak.PAGES)
    assert set(c.main.topk for c in cases) == set(soak.TOPKS)
    assert {c.s_q for c in cases} == {1, 2, 3}
    for flag in ("sink", "graph"):
        assert 0.3 < sum(getattr(c, flag) for c in cases) / len(cases) < 0.7
    with_extra = [c for c in cases if c.extra is not None]
    assert 0.25 < len(with_extra) / len(cases) < 0.55
    assert any(c.main.kv_format == "V41" and c.extra.kv_format == "V41_FP4" for c in with_extra)
    for c in cases:
        b = len(c.main.seqlens)
        assert 1 <= b <= 32
        for pool in filter(None, (c.main, c.extra)):
            assert len(pool.seqlens) == b and sum(pool.seqlens) <= soak.MAX_TOKENS
            assert min(pool.seqlens) >= 0 and pool.lengths == c.main.lengths
        if c.extra is not None:
            assert soak.D_QK[c.extra.kv_format] == soak.D_QK[c.main.kv_format]
    assert any(0 in c.main.seqlens for c in cases)
    # deterministic under the seed
    assert [soak.random_case(random.Random(5), 32) for _ in range(3)] == \
        [soak.random_case(random.Random(5), 32) for _ in range(3)]


def test_a_random_case_builds_a_problem(soak, monkeypatch):
    import tests.sparse_decode_problems as sdp

    case = soak.random_case(random.Random(3), 4)
    case = case._replace(main=case.main._replace(topk=64, page_size=8), graph=True)
    built = {}
    real = sdp.make_problem

    def on_cpu(*args, **kwargs):
        built.update(kwargs)
        return real(*args, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(sdp, "make_problem", on_cpu)
    p = soak.build(case, seed=9)
    assert built["poison_past_length"] is False  # graph cases are reshuffled between replays
    assert p.q.shape == (len(case.main.seqlens), case.s_q, case.h_q, soak.D_QK[case.main.kv_format])
    assert p.main.kv_format == case.main.kv_format and p.main.indices.shape[-1] == 64


def test_summary_lines(soak):
    ok = soak.summary(True, 1200, 500, 24, 60.4, {"V32": 10, "V4": 3})
    assert ok.startswith("PASS: 1200 calls (500 graph replays) in 60 s, 24 checks")
    assert "V32 10, V32_NO_ROPE 0, V4 3" in ok and "no hang, no drift" in ok
    bad = soak.summary(False, 7, 2, 0, 3.0, {}, "AssertionError: x")
    assert bad == "FAIL after 7 calls (2 graph replays), 0 checks: AssertionError: x"


# --------------------------------------------------------------------------- shared soak parts

@pytest.fixture(scope="module")
def common():
    return _load("_soak_common")


def test_both_soaks_use_the_shared_pieces(common):
    for stem in ("soak_dense_decode", "soak_sparse_decode"):
        soak = _load(stem)
        for name in ("Watchdog", "soak_parser", "soak_calls", "check_sentinel", "progress_line"):
            assert getattr(soak, name).__module__ == "_soak_common", (stem, name)


def test_parser_options_and_defaults(common):
    args = common.soak_parser("d", max_b=64).parse_args([])
    assert vars(args) == {"seconds": 60.0, "seed": 0, "check_every": 50, "hang_seconds": 60.0,
                          "max_b": 64}
    args = common.soak_parser("d", max_b=32).parse_args(
        ["--seconds", "5", "--seed", "3", "--check-every", "7", "--hang-seconds", "9",
         "--max-b", "4"])
    assert vars(args) == {"seconds": 5.0, "seed": 3, "check_every": 7, "hang_seconds": 9.0,
                          "max_b": 4}


def test_progress_line(common):
    assert common.progress_line(3.25, 120, 40, 2) == "[   3.2 s] 120 calls (40 in graphs), check 2 ok"
    assert common.progress_line(12.0, 5, 0, 1, "V32 b=1") == \
        "[  12.0 s] 5 calls (0 in graphs), check 1 ok: V32 b=1"


def test_sentinel_check_passes_equal_and_names_the_drifted_output(common):
    synced = []
    fake = types.SimpleNamespace(equal=torch.equal,
                                 cuda=types.SimpleNamespace(synchronize=lambda: synced.append(1)))
    out, lse = torch.arange(6.0), torch.ones(3)
    common.check_sentinel(fake, (out.clone(), lse.clone()), (out, lse), 4)
    assert synced == [1]
    with pytest.raises(AssertionError, match="sentinel lse drifted at check 4"):
        common.check_sentinel(fake, (out.clone(), lse + 1e-7), (out, lse), 4)
    with pytest.raises(AssertionError, match="sentinel out drifted at check 5"):
        common.check_sentinel(fake, (out.flip(0), lse), (out, lse), 5)


class _FakeCuda:
    """What soak_calls and capture use of torch.cuda, recording the order of events."""

    def __init__(self, log):
        self.log = log
        fake = self

        class Graph:
            def replay(self):
                log.append("replay")

        class Ctx:
            def __init__(self, what):
                self.what = what

            def __enter__(self):
                log.append(f"enter {self.what}")

            def __exit__(self, *exc):
                log.append(f"exit {self.what}")

        class Stream:
            def wait_stream(self, other):
                pass

        self.CUDAGraph = Graph
        self.Stream = Stream
        self.current_stream = Stream
        self.stream = lambda s: Ctx("stream")
        self.graph = lambda g: Ctx("graph")
        self.synchronize = lambda: fake.log.append("sync")


@pytest.mark.parametrize("use_graph", [True, False])
def test_soak_calls_yield_once_per_call_then_synchronise(common, use_graph):
    log = []
    holders = []
    fake_torch = types.SimpleNamespace(cuda=_FakeCuda(log))

    def new_holder():
        holders.append(object())
        return holders[-1], None

    fake_flash_mla = types.SimpleNamespace(get_mla_metadata=new_holder)

    def call(meta):
        log.append(("call", holders.index(meta)))
        return "out", "lse"

    steps = list(common.soak_calls(fake_torch, fake_flash_mla, random.Random(1), use_graph, call,
                                   lambda: log.append("refill")))
    n = random.Random(1).randint(2, 6) if use_graph else random.Random(1).randint(1, 4)
    assert steps == [("out", "lse", use_graph)] * n and log[-1] == "sync"
    if use_graph:  # warm-up and capture on fresh holders, then refill before each replay
        assert log[:-1] == (["enter stream", ("call", 0), "exit stream", "enter graph",
                             ("call", 1), "exit graph"] + ["refill", "replay"] * n)
    else:  # every eager call shares one holder
        assert log[:-1] == [("call", 0)] * n


def test_decode_benchmarks_share_baseline_line_payload_and_options(bench):
    dense = sys.modules["bench_dense_decode"]
    assert bench.baselines is dense.baselines and bench.median_us is dense.median_us
    props = types.SimpleNamespace(name="GPU X", multi_processor_count=132)
    fake = types.SimpleNamespace(__version__="9.9",
                                 cuda=types.SimpleNamespace(get_device_properties=lambda i: props))
    best = {"dtype": "int64", "bytes": 1 << 30, "us": 1.0, "gbps": 3000.4}
    base = dense.Baselines(3000.4, best, [best], 600.6)
    assert base.line(fake) == ("GPU X, 132 SMs, torch 9.9: copy 3000 GB/s (best: int64, 1024 MiB), "
                               "mma.sync bf16 peak 601 TFLOPS")
    payload = base.payload(fake, [{"us": 1.0}], {"api_us": 2.0})
    assert list(payload) == ["device", "copy_gbps", "copy_best", "copy_candidates",
                             "mma_sync_tflops", "rows", "host"]
    assert payload["copy_candidates"] == [best] and payload["mma_sync_tflops"] == 600.6
    ap = argparse.ArgumentParser()
    dense.add_timing_options(ap)
    assert vars(ap.parse_args([])) == {"warmup": 3, "iters": 10, "host_iters": 300, "plot": None}
