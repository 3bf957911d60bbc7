"""The native library for the GPU tests, and what a test does when it is not there.

``native_function(name)`` returns ``flash_mla._native.function(name)`` when the
packaged library provides it; otherwise it loads the library named by the
FLASH_MLA_LIBRARY_PATH environment variable (a developer build, e.g.
.devbuild/<name>/lib....so) with tvm_ffi.load_module and returns its attribute.

When the library is missing, unloadable or has no kernel for the GPU, ``verdict`` decides:
- no CUDA device visible: skip (the conftest already skips every ``gpu`` test there);
- FLASH_MLA_BACKEND=reference: skip, saying so (the user asked for no native code);
- otherwise: FAIL with the loader's reasons. A GPU machine without a working library is a
  broken install, never a pass and never a quiet skip.
``require_native()`` applies the same rule to the whole library; the conftest calls it
before every ``gpu`` test, so tests that go through the public API (and would otherwise
run the reference silently) fail too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest

_MODULES: Dict[str, Any] = {}

RUN, SKIP, FAIL = "run", "skip", "fail"


def verdict(cuda_available: bool, backend_setting: str, problem: Optional[str]) -> Tuple[str, str]:
    """(RUN | SKIP | FAIL, reason) for a GPU test whose native library has ``problem``
    (None: it is usable); backend_setting is FLASH_MLA_BACKEND (lower-cased, '' if unset)."""
    if problem is None:
        return RUN, ""
    if not cuda_available:
        return SKIP, f"needs a CUDA GPU and the native library; no GPU is visible ({problem})"
    if backend_setting == "reference":
        return SKIP, f"FLASH_MLA_BACKEND=reference: native code is not used ({problem})"
    return FAIL, (f"a CUDA GPU is visible but the native library is not usable: {problem} "
                  "(set FLASH_MLA_BACKEND=reference to run without it)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _backend_setting() -> str:
    return os.environ.get("FLASH_MLA_BACKEND", "").strip().lower()


def _act(problem: Optional[str]) -> None:
    action, reason = verdict(_cuda_available(), _backend_setting(), problem)
    if action == SKIP:
        pytest.skip(reason)
    if action == FAIL:
        pytest.fail(reason, pytrace=False)


def library_problem() -> Optional[str]:
    """Why the packaged library (or FLASH_MLA_LIBRARY_PATH's, which the loader honours)
    cannot run on the current GPU; None when it can."""
    import torch

    from flash_mla import _arch, _native

    info = _native.build_info()
    if info is None:
        return _native.load_error() or "the loader gave no reason"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    targets = info.get("targets", [])
    if _arch.runnable_target(targets, info.get("ptx"), major, minor) is None:
        return (f"it has no kernel for {_arch.sm_name(major, minor)} (targets: "
                f"{', '.join(targets) or 'none'}, PTX: {info.get('ptx') or 'none'})")
    return None


def require_native() -> None:
    """Skip or fail (see the module docstring) unless the library runs on this GPU."""
    _act(library_problem())


def _from_package(name: str) -> Callable:
    from flash_mla import _native

    return _native.function(name)


def _from_env(name: str) -> Callable:
    path = os.environ.get("FLASH_MLA_LIBRARY_PATH")
    if not path:
        raise RuntimeError("FLASH_MLA_LIBRARY_PATH is not set")
    lib = Path(path)
    if not lib.is_file():
        raise RuntimeError(f"FLASH_MLA_LIBRARY_PATH points at {str(lib)!r}, which is not a file")
    key = str(lib.resolve())
    if key not in _MODULES:
        import tvm_ffi

        _MODULES[key] = tvm_ffi.load_module(key)
    try:
        return getattr(_MODULES[key], name)
    except AttributeError as err:
        raise RuntimeError(f"{lib} exports no function {name!r}") from err


def native_function(name: str) -> Callable:
    """The exported native function ``name``; skip or fail (module docstring) if unavailable."""
    try:
        return _from_package(name)
    except Exception as package_err:  # the packaged library is missing or lacks the function
        try:
            return _from_env(name)
        except Exception as env_err:
            _act(f"native function {name!r} unavailable: package: {package_err}; "
                 f"FLASH_MLA_LIBRARY_PATH: {env_err}")
    raise AssertionError("unreachable: _act skips or fails")
