"""benchmarks/bwd_numerics.py on the CPU: its judgement of one gradient under both rules, and its exit
without a GPU (the GPU run itself is recorded in benchmarks/results/)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bwd_numerics.py"


def _load():
    spec = importlib.util.spec_from_file_location("bwd_numerics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_passes_equal_tensors_and_counts_a_planted_miss():
    bn = _load()
    ref = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(0))
    same = bn.judge(torch, ref.clone(), ref, "dq", "same")
    assert same["pass"] and same["bad"] == 0 and same["worst"] == 0.0

    got = ref.clone()
    ref[3, 1, 7] = 1.0
    got[3, 1, 7] = 1.5  # abs error 0.5 > 1e-3 and rel error 0.5 > 8.01/128
    report = bn.judge(torch, got, ref, "dk", "planted")
    assert not report["pass"] and report["bad"] == 1
    # min(0.5 / 1e-3, 0.5 / (8.01 / 128)) = 7.99: the element misses both bounds 8x.
    assert report["worst"] == pytest.approx(0.5 / (8.01 / 128), rel=1e-3)


def test_judge_applies_the_plain_rule_when_given_plain():
    bn = _load()
    ref = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(1))
    plain = ref.clone()
    plain[0, 0, 0] += 0.01          # plain's worst error: 0.01
    got = ref.clone()
    got[5, 2, 1] += 0.015           # 1.5x plain's: passes the plain-math rule
    report = bn.judge(torch, got, ref, "dv", "within", plain)
    assert report["plain_pass"] and report["vs_plain"] == pytest.approx(1.5, rel=1e-3)
    got[5, 2, 1] += 0.01            # 2.5x plain's: fails it
    report = bn.judge(torch, got, ref, "dv", "beyond", plain)
    assert not report["plain_pass"] and report["vs_plain"] == pytest.approx(2.5, rel=1e-3)
    assert "plain_pass" not in bn.judge(torch, got, ref, "dv", "no plain")


def test_bounds_are_the_element_rules_mha_rows():
    bn = _load()
    for what in ("dq", "dk", "dv"):
        assert bn.bounds(what) == (1e-3, 8.01 / 128, 7e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_it_exits_2_and_says_why(tmp_path, capsys):
    bn = _load()
    assert bn.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "bwd_numerics.json").exists()
