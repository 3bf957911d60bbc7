"""benchmarks/bench_layouts.py on the CPU: the layouts it forces per pass and head dim,
its geomeans against the 8-warp CTA, and its exits (the GPU run itself is recorded in
benchmarks/results/)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layouts.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_layouts", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_layouts_per_pass_and_head_dim():
    bl = _load()
    assert bl.layouts("fwd", 64) == ["default", "8", "4", "4x32"]
    assert bl.layouts("fwd", 192) == ["default", "8", "4x32"]  # no 4-warp forward at d = 192
    assert bl.layouts("bwd", 128) == ["default", "8", "4", "8x128", "det"]
    assert bl.layouts("bwd", 192) == ["default", "8", "det"]  # 8 warps only at d = 192


def _row(d_qk, fwd_us, bwd_us):
    return {"d_qk": d_qk, "flop": {"fwd": 10 ** 12, "bwd": 10 ** 12},
            "fwd": {k: {"us": v} for k, v in fwd_us.items()},
            "bwd": {k: {"us": v} for k, v in bwd_us.items()}}


def test_geomeans_against_the_8_warp_cta():
    bl = _load()
    rows = [
        _row(64, {"default": 50.0, "8": 100.0, "4": 80.0, "4x32": 50.0},
             {"default": 75.0, "8": 100.0, "4": 75.0}),
        _row(64, {"default": 25.0, "8": 100.0, "4": 125.0, "4x32": 25.0},
             {"default": 60.0, "8": 100.0, "4": None}),  # 4 could not run: left out
    ]
    gm = bl.geomeans(rows)
    assert gm["fwd d64"]["8"] == 1.0
    assert gm["fwd d64"]["4x32"] == pytest.approx(math.sqrt(2.0 * 4.0), rel=1e-3)
    assert gm["fwd d64"]["4"] == pytest.approx(math.sqrt(1.25 * 0.8), rel=1e-3)
    assert gm["bwd d64"]["4"] == pytest.approx(100.0 / 75.0, rel=1e-3)  # one shape only
    assert gm["bwd d64"]["default"] == pytest.approx(math.sqrt(100 / 75 * 100 / 60), rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_it_exits_2_and_says_why(tmp_path, capsys):
    bl = _load()
    assert bl.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "bench_layouts.json").exists()


def test_save_results_writes_json_and_survives_a_missing_matplotlib(tmp_path, capsys):
    _load()  # loading bench_layouts imports bench_mha (sys.modules)
    import bench_mha

    drawn = []
    bench_mha.save_results(tmp_path / "a", "x", {"rows": [1]}, lambda j, p: drawn.append((j, p)))
    assert (tmp_path / "a" / "x.json").read_text().replace(" ", "").replace("\n", "") == '{"rows":[1]}'
    assert drawn == [(tmp_path / "a" / "x.json", tmp_path / "a" / "x.png")]

    def no_matplotlib(json_path, png_path):
        raise ImportError("matplotlib")

    bench_mha.save_results(tmp_path / "b", "y", {}, no_matplotlib)
    assert "draw the PNG elsewhere with --plot" in capsys.readouterr().out
