"""Shared pytest configuration.

Tests marked ``gpu`` need a CUDA device and the native library; on a machine
without a GPU they are skipped with the reason printed, never reported as passes.
"""
import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker); none is visible here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
