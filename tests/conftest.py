"""Shared pytest configuration.

Tests marked ``gpu`` need a CUDA device and the native library:
- on a machine without a CUDA GPU they are skipped, with the reason printed in the
  report header and on each skip, never reported as passes;
- on a machine with one, each first checks the native library (tests/gpu_native.py):
  missing, unloadable or without a kernel for the GPU is a FAILURE, unless
  FLASH_MLA_BACKEND=reference asks for no native code (then a skip saying so).
"""
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def combine_library(tmp_path_factory):
    """One real build, shared by the tests that need a library on disk: the combine family
    for sm_80 (with its PTX), with the patch layer forced on so its overlay is exercised
    too (the patched declaration differs only under MSVC). Returns (build_dir, library,
    build stdout). Skips where no CUDA toolkit is installed."""
    from flash_mla_build.toolchain import ToolchainError, find_cuda

    try:
        find_cuda()
    except ToolchainError as exc:
        pytest.skip(f"no CUDA toolkit here: {exc}")
    root = Path(__file__).resolve().parent.parent
    tmp = tmp_path_factory.mktemp("combine_build")
    env = dict(os.environ, FLASH_MLA_PATCHES="always", FLASH_MLA_KERNELS="combine",
               FLASH_MLA_CUDA_ARCHS="80", FLASH_MLA_JOBS="1",
               FLASH_MLA_BUILD_DIR=str(tmp / "build"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from flash_mla_build.build import BuildConfig, build_library; "
            "r = build_library(BuildConfig.from_env(sys.argv[1]), out_dir=Path(sys.argv[2]), "
            "log=lambda s: None); "
            "print('PATCHES', [a.id for a in r.plan.patches_applied]); print(r.library)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(tmp / "lib")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "build", Path(out.stdout.strip().splitlines()[-1]), out.stdout
