"""The GPU tests' rule for a missing native library (tests/gpu_native.py, tests/conftest.py),
on the CPU with a planted CUDA device and loader: fail on a GPU machine, skip with the reason
without a GPU or under FLASH_MLA_BACKEND=reference."""
from __future__ import annotations

import pytest
import torch

from flash_mla import _native
from tests import conftest, gpu_native

Failed = pytest.fail.Exception
Skipped = pytest.skip.Exception


@pytest.mark.parametrize("cuda,setting,problem,action", [
    (True, "", None, gpu_native.RUN),
    (False, "", None, gpu_native.RUN),
    (True, "", "no library", gpu_native.FAIL),
    (True, "auto", "no library", gpu_native.FAIL),
    (True, "native", "no library", gpu_native.FAIL),
    (True, "reference", "no library", gpu_native.SKIP),
    (False, "", "no library", gpu_native.SKIP),
    (False, "reference", "no library", gpu_native.SKIP),
])
def test_verdict_table(cuda, setting, problem, action):
    got, reason = gpu_native.verdict(cuda, setting, problem)
    assert got == action
    if problem is not None:
        assert problem in reason


@pytest.fixture
def gpu_without_library(monkeypatch):
    """A visible 'sm_120' GPU and a loader that has no library."""
    monkeypatch.delenv("FLASH_MLA_BACKEND", raising=False)
    monkeypatch.delenv("FLASH_MLA_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (12, 0))

    def no_function(name):
        raise RuntimeError(f"native function {name!r} is unavailable: planted: no library")

    monkeypatch.setattr(_native, "function", no_function)
    monkeypatch.setattr(_native, "build_info", lambda: None)
    monkeypatch.setattr(_native, "load_error", lambda: "planted: no library")


def test_native_function_fails_on_a_gpu_machine(gpu_without_library):
    with pytest.raises(Failed, match="a CUDA GPU is visible but the native library is not usable: "
                                     "native function 'dense_prefill_fwd' unavailable: .*planted: no library"):
        gpu_native.native_function("dense_prefill_fwd")


def test_native_function_skips_under_backend_reference(gpu_without_library, monkeypatch):
    monkeypatch.setenv("FLASH_MLA_BACKEND", "Reference")
    with pytest.raises(Skipped, match="FLASH_MLA_BACKEND=reference"):
        gpu_native.native_function("dense_prefill_fwd")


def test_native_function_skips_without_a_gpu(gpu_without_library, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Skipped, match="no GPU is visible"):
        gpu_native.native_function("dense_prefill_fwd")


def test_require_native_fails_with_the_loaders_reason(gpu_without_library):
    with pytest.raises(Failed, match="planted: no library"):
        gpu_native.require_native()


def test_require_native_fails_for_a_library_without_the_gpus_arch(gpu_without_library, monkeypatch):
    monkeypatch.setattr(_native, "build_info", lambda: {"targets": ["80", "90a"], "ptx": None, "ops": {}})
    with pytest.raises(Failed, match=r"no kernel for sm_120 \(targets: 80, 90a, PTX: none\)"):
        gpu_native.require_native()
    monkeypatch.setattr(_native, "build_info", lambda: {"targets": ["120f"], "ptx": None, "ops": {}})
    gpu_native.require_native()  # runs: no skip, no failure


def test_conftest_on_a_cpu_machine_skips_gpu_tests_saying_why(monkeypatch):
    monkeypatch.setattr(conftest, "_cuda_available", lambda: False)
    assert conftest.pytest_report_header(None) == [f"gpu tests: skipped, {conftest.NO_GPU_REASON}"]

    class Item:
        def __init__(self, keywords):
            self.keywords, self.markers = keywords, []

        def add_marker(self, marker):
            self.markers.append(marker)

    gpu_item, cpu_item = Item({"gpu": True}), Item({})
    conftest.pytest_collection_modifyitems(None, [gpu_item, cpu_item])
    assert [m.kwargs["reason"] for m in gpu_item.markers] == [conftest.NO_GPU_REASON]
    assert cpu_item.markers == []


def test_conftest_on_a_gpu_machine_reports_the_library(gpu_without_library, monkeypatch):
    monkeypatch.setattr(conftest, "_cuda_available", lambda: True)
    assert conftest.pytest_report_header(None) == ["gpu tests: run; native library: planted: no library"]

    class Item:
        keywords = {"gpu": True}

        def add_marker(self, marker):
            raise AssertionError("gpu tests must not be skipped on a GPU machine")

    conftest.pytest_collection_modifyitems(None, [Item()])
