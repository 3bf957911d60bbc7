"""Access to the native library's tvm-ffi functions for the GPU tests.

``native_function(name)`` returns ``flash_mla._native.function(name)`` when the
packaged library provides it; otherwise it loads the library named by the
FLASH_MLA_LIBRARY_PATH environment variable (a developer build, e.g.
.devbuild/<name>/lib....so) with tvm_ffi.load_module and returns its attribute.
When neither works the calling test is skipped with both reasons, so a missing
library is reported as a skip, never as a pass.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

_MODULES: Dict[str, Any] = {}


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
    """The exported native function ``name``; pytest.skip (with the reasons) if unavailable."""
    try:
        return _from_package(name)
    except Exception as package_err:  # the packaged library is missing or lacks the op
        try:
            return _from_env(name)
        except Exception as env_err:
            pytest.skip(
                f"native function {name!r} unavailable: package: {package_err}; "
                f"FLASH_MLA_LIBRARY_PATH: {env_err}"
            )
    raise AssertionError("unreachable")
