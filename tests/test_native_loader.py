"""The native loader (flash_mla/_native.py) and target matching (flash_mla/_arch.py):
device capability x build contents -> kernel or reason; load errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_mla import _arch, _native

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target,cap,runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (8, 9), True), ("80", (9, 0), False),
    ("86", (8, 0), False),
    ("90a", (9, 0), True), ("90a", (9, 1), False),
    ("100f", (10, 0), True), ("100f", (10, 3), True), ("100f", (12, 0), False),
    ("120f", (12, 0), True), ("120f", (12, 1), True), ("120f", (10, 0), False),
    ("120a", (12, 0), True), ("120a", (12, 1), False),
    ("120", (12, 1), True), ("121", (12, 0), False),
])
def test_target_runs_on(target, cap, runs):
    assert _arch.target_runs_on(target, *cap) is runs


def test_runnable_target_prefers_cubins_then_ptx():
    targets = ["80", "86", "89", "90a", "100f", "120f"]
    assert _arch.runnable_target(targets, "120", 12, 1) == "120f"
    assert _arch.runnable_target(targets, "120", 8, 9) == "89"
    assert _arch.runnable_target(targets, "120", 9, 0) == "90a"
    assert _arch.runnable_target(["80", "120f"], "120", 13, 0) == "ptx:120"
    assert _arch.runnable_target(["90a", "120f"], "120", 8, 6) is None
    with pytest.raises(ValueError, match="target must look like 80, 90a or 120f"):
        _arch.parse_target("hopper")


INFO = {
    "version": "0.1.0", "cuda_version": "13.0", "targets": ["90a", "120f"], "ptx": "120",
    "kernels": [], "ops": {
        "combine": {"dtype": ["bf16", "fp16"], "d_v": [128, 512]},
        "dense_prefill_fwd": {"head_dims": [[64, 64], [128, 128], [192, 128]]},
    },
}


@pytest.fixture
def fake_library(monkeypatch):
    _native._reset_for_tests()
    _native._state.update(module=object(), info=json.loads(json.dumps(INFO)),
                          path=Path("fake.so"))
    caps = {}

    def device_capability(device):
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        if not str(device).startswith("cuda"):
            return None, None, str(device)
        return index, caps[index], f"cuda:{index}"

    monkeypatch.setattr(_native, "_device_capability", device_capability)
    yield caps
    _native._reset_for_tests()


def test_reasons_per_device(fake_library):
    fake_library.update({0: (12, 0), 1: (8, 6), 2: (9, 0)})
    assert _native.unavailable_reason("combine", "cuda:0", {"dtype": "bf16"}) is None
    assert _native.unavailable_reason("combine", "cuda:2") is None
    assert _native.unavailable_reason("combine", "cuda:1") == \
        ("no kernel for sm_86 in this build (targets: 90a, 120f); rebuild with "
         "FLASH_MLA_CUDA_ARCHS=native on this machine, or add its target")
    assert _native.unavailable_reason("combine", "cpu") == "device cpu is not a CUDA device"


def test_reasons_for_features_and_ops(fake_library):
    fake_library[0] = (12, 0)
    assert _native.unavailable_reason("dense_prefill_fwd", "cuda:0",
                                      {"head_dims": (96, 96)}) == (
        "feature head_dims=[96, 96] not implemented natively for dense_prefill_fwd "
        "(supported: [[64, 64], [128, 128], [192, 128]])")
    assert _native.unavailable_reason("dense_prefill_fwd", "cuda:0",
                                      {"head_dims": (192, 128)}) is None
    assert _native.unavailable_reason("combine", "cuda:0", {"dtype": "fp16", "d_v": 512}) is None
    assert _native.unavailable_reason("combine", "cuda:0", {"dtype": "fp32"}) == (
        "feature dtype=\"fp32\" not implemented natively for combine "
        "(supported: [\"bf16\", \"fp16\"])")
    assert _native.unavailable_reason("sparse_decode", "cuda:0") == (
        "op 'sparse_decode' is not in this native build (ops built: combine, "
        "dense_prefill_fwd); rebuild with FLASH_MLA_KERNELS=all")


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cpu"])
def test_unknown_feature_key_is_an_error(fake_library, device):
    """A key the op's capability table does not list is the caller's mistake: it raises on
    every device (an sm_86 or a CPU tensor included) instead of passing unchecked."""
    fake_library.update({0: (12, 0), 1: (8, 6)})
    with pytest.raises(ValueError) as err:
        _native.unavailable_reason("combine", device, {"dtype": "bf16", "causal": True})
    assert str(err.value) == ("features for op 'combine' name 'causal', which its capability "
                              "table does not list; known keys: d_v, dtype")
    with pytest.raises(ValueError, match="name 'dtype', 'head_dim', which its capability table "
                                         "does not list; known keys: head_dims$"):
        _native.unavailable_reason("dense_prefill_fwd", device, {"head_dim": 64, "dtype": "bf16"})


def test_missing_library(monkeypatch):
    _native._reset_for_tests()
    monkeypatch.setattr(_native, "library_path", lambda: None)
    try:
        reason = _native.unavailable_reason("combine", "cuda:0")
        assert reason.startswith("no native library built")
        assert _native.build_info() is None
        with pytest.raises(RuntimeError, match="native function 'combine' is unavailable: no "
                                               "native library built"):
            _native.function("combine")
    finally:
        _native._reset_for_tests()


def test_library_path_env_pointing_nowhere(monkeypatch, tmp_path):
    _native._reset_for_tests()
    monkeypatch.setenv("FLASH_MLA_LIBRARY_PATH", str(tmp_path / "nope.so"))
    try:
        assert _native.load_error() == (f"native library {tmp_path / 'nope.so'} does not exist "
                                        "(FLASH_MLA_LIBRARY_PATH)")
    finally:
        _native._reset_for_tests()


def test_not_a_library(monkeypatch, tmp_path):
    _native._reset_for_tests()
    bogus = tmp_path / "libflash_mla_native.so"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setenv("FLASH_MLA_LIBRARY_PATH", str(bogus))
    try:
        assert _native.load_error().startswith(f"native library {bogus} failed to load:")
    finally:
        _native._reset_for_tests()


def test_torch_cuda_major_is_not_a_gate_the_driver_is(monkeypatch):
    # A cu12 torch with a CUDA 13 library works (static cudart, shared primary context,
    # streams passed as driver handles); only a driver older than the build's major fails.
    torch = pytest.importorskip("torch")
    lib = Path("lib.so")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_native, "_driver_cuda_version", lambda: (13, 0))
    assert _native._driver_refusal({"cuda_version": "13.0"}, lib) is None
    # Minor-version compatibility: a 13.0 driver runs a library built with CUDA 13.5.
    assert _native._driver_refusal({"cuda_version": "13.5"}, lib) is None
    monkeypatch.setattr(_native, "_driver_cuda_version", lambda: None)  # no driver: no verdict
    assert _native._driver_refusal({"cuda_version": "13.0"}, lib) is None
    monkeypatch.setattr(_native, "_driver_cuda_version", lambda: (12, 4))
    assert _native._driver_refusal({"cuda_version": "13.0"}, lib) == (
        "native library lib.so was built with CUDA 13.0 and needs a driver for CUDA 13.x (R580 "
        "or newer), but the NVIDIA driver supports only CUDA 12.4: update the NVIDIA driver, or "
        "install a flash_mla wheel built with CUDA 12")
    assert "unreadable CUDA version" in _native._driver_refusal({"cuda_version": "x"}, lib)


@pytest.mark.slow
def test_real_library_loads_without_gpu(combine_library):
    """The combine-only library for one target (conftest.combine_library's build), loaded
    through the loader."""
    lib = str(combine_library[1])
    probe = ("import json; from flash_mla import _native as n; i = n.build_info(); "
             "print(json.dumps([i['targets'], i['ptx'], sorted(i['ops']), "
             "n.unavailable_reason('combine', 'cpu'), callable(n.function('combine'))]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=str(REPO), capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, FLASH_MLA_LIBRARY_PATH=lib))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["80"], "80", ["combine"],
                                      "device cpu is not a CUDA device", True]
