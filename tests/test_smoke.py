"""`python -m flash_mla.smoke` in-process: passes on the CPU (reference backend),
prints the build line and the table, and fails (exit 1, FAIL row) when an op is
wrong, so the smoke test itself can fail."""
from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import smoke

ROWS = ["mha_prefill_fwd out", "mha_prefill_fwd lse", "mha_prefill_bwd dq", "mha_prefill_bwd dk",
        "mha_prefill_bwd dv", "dense_decode out", "dense_decode lse", "sparse_decode out",
        "sparse_decode lse"]


def test_smoke_main_passes_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("FLASH_MLA_BACKEND", raising=False)
    assert smoke.main(["--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].startswith("native library: ")
    header = next(line for line in text.splitlines() if line.startswith("op "))
    for column in ("backend", "device", "max_abs_err", "cos_diff", "result"):
        assert column in header
    for row in ROWS:
        line = next((l for l in text.splitlines() if l.startswith(row + " ")), None)
        assert line is not None, f"row {row!r} missing from:\n{text}"
        assert "reference" in line and "cpu" in line and line.rstrip().endswith("PASS"), line
    assert f"smoke: {len(ROWS)}/{len(ROWS)} passed" in text


def test_smoke_reports_a_wrong_op(capsys, monkeypatch):
    real = flash_mla.flash_mla_with_kvcache

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 0.05, lse

    monkeypatch.setattr(flash_mla, "flash_mla_with_kvcache", off_by_a_bit)
    assert smoke.main(["--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert any(l.startswith("dense_decode out") and l.rstrip().endswith("FAIL") for l in text.splitlines())
    assert "FAIL dense_decode out:" in text
    assert f"smoke: {len(ROWS) - 2}/{len(ROWS)} passed" in text  # dense and sparse out rows


def test_smoke_reports_an_exception_as_failure(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(flash_mla, "flash_attn_varlen_func", broken)
    assert smoke.main(["--device", "cpu"]) == 1
    assert "FAIL mha_prefill: RuntimeError: kernel exploded" in capsys.readouterr().out


@pytest.mark.gpu
def test_smoke_on_gpu_uses_native_where_the_library_serves_it(capsys):
    from flash_mla import _native

    device = torch.device("cuda", torch.cuda.current_device())
    assert smoke.main(["--device", str(device)]) == 0
    text = capsys.readouterr().out
    features = {"dtype": "bf16", "head_dims": [128, 128]}
    for op in ("dense_prefill_fwd", "dense_prefill_bwd"):
        expected = "native" if _native.unavailable_reason(op, device, features) is None else "reference"
        rows = [l for l in text.splitlines() if l.startswith(op.replace("dense_", "mha_") + " ")]
        assert rows and all(f" {expected} " in l for l in rows), (op, expected, text)
