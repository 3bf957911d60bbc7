"""benchmarks/_soak_common.py on the CPU: the options both decode soaks take, the progress
line and the sentinel check (the CUDA-graph capture and the soaks themselves run on the GPU
machine)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

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
def common():
    return _load("_soak_common")


def test_both_soaks_use_the_shared_pieces(common):
    for stem in ("soak_dense_decode", "soak_sparse_decode"):
        soak = _load(stem)
        for name in ("Watchdog", "soak_parser", "capture", "check_sentinel", "progress_line"):
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
