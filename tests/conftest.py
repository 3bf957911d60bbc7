"""Shared pytest configuration.

Tests marked ``gpu`` need a CUDA device and the native library:
- on a machine without a CUDA GPU they are skipped, with the reason printed in the
  report header and on each skip, never reported as passes;
- on a machine with one, each first checks the native library (tests/gpu_native.py):
  missing, unloadable or without a kernel for the GPU is a FAILURE, unless
  FLASH_MLA_BACKEND=reference asks for no native code (then a skip saying so).
"""
import pytest

NO_GPU_REASON = "needs a CUDA GPU (gpu marker); none is visible here"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_report_header(config):
    if not _cuda_available():
        return [f"gpu tests: skipped, {NO_GPU_REASON}"]
    from tests.gpu_native import library_problem

    problem = library_problem()
    return [f"gpu tests: run; native library: {'usable' if problem is None else problem}"]


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _native_library_for_gpu_tests(request):
    """Before every gpu test on a GPU machine: the library must be usable (or fail)."""
    if "gpu" in request.node.keywords and _cuda_available():
        from tests.gpu_native import require_native

        require_native()
