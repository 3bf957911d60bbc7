"""Loader of the native library (flash_mla/lib/libflash_mla_native.so or
flash_mla_native.dll, or the file FLASH_MLA_LIBRARY_PATH names).

Contract used by the dispatch layer:

- ``unavailable_reason(op, device, features=None) -> str | None``: None when the
  loaded library has a kernel for ``op`` on ``device`` supporting ``features``
  (a dict of feature name -> value, matched against the op's capability lists in
  build_info()["ops"]), else a sentence naming the reason. A feature name the op's
  capability table does not list is a caller's mistake, not a missing kernel: ValueError.
- ``function(name)``: the exported tvm-ffi function; RuntimeError if unavailable.
- ``build_info() -> dict | None``: the library's build info, None if not loaded.

Refusals, each naming its fix: no library file; apache-tvm-ffi missing; the file does
not load (on Windows a path with non-ASCII characters cannot, through tvm-ffi); a
driver older than the build's CUDA major; no cubin or PTX for the GPU. torch's own
CUDA version is not a gate (cudart is linked statically; docs/build.md says why).

The library is loaded once per process (it is process-wide); answers that depend
on the GPU (compute capability against the compiled targets) are computed and
cached per device. tvm_ffi is imported before the library so libtvm_ffi is
resolvable, and on Windows the DLL folders are added explicitly.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from . import _arch

__all__ = ["unavailable_reason", "function", "build_info", "library_path", "load_error",
           "env_allocator_available", "array_item"]

_LIB_NAMES = ("flash_mla_native.dll",) if sys.platform.startswith("win") else (
    "libflash_mla_native.so", "flash_mla_native.so")

_lock = threading.Lock()
_state: Dict[str, Any] = {}          # "module", "info", "error", "path" once loaded
_capabilities: Dict[int, Tuple[int, int]] = {}
_dll_handles = []                    # keep os.add_dll_directory handles alive


def library_path() -> Optional[Path]:
    """The library file the loader uses, or None if none exists."""
    env = os.environ.get("FLASH_MLA_LIBRARY_PATH")
    if env:
        return Path(env)
    lib_dir = Path(__file__).resolve().parent / "lib"
    for name in _LIB_NAMES:
        if (lib_dir / name).is_file():
            return lib_dir / name
    return None


def _driver_cuda_version() -> Optional[Tuple[int, int]]:
    """The newest CUDA version the installed driver supports, None without a driver."""
    names = ["nvcuda.dll"] if sys.platform.startswith("win") else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return version.value // 1000, (version.value % 1000) // 10
        except AttributeError:
            return None
    return None


def _load() -> Dict[str, Any]:
    with _lock:
        if _state:
            return _state
        path = library_path()
        if path is None:
            _state["error"] = ("no native library built (flash_mla/lib has no flash_mla_native "
                               "library; build and install it with scripts/build.sh "
                               "(scripts\\build.ps1 on Windows) or set "
                               "FLASH_MLA_LIBRARY_PATH)")
            return _state
        _state["path"] = path
        if not path.is_file():
            _state["error"] = f"native library {path} does not exist (FLASH_MLA_LIBRARY_PATH)"
            return _state
        try:
            import tvm_ffi  # loads libtvm_ffi, which the library links against
        except ImportError as exc:
            _state["error"] = f"apache-tvm-ffi is not importable ({exc}); pip install apache-tvm-ffi"
            return _state
        if sys.platform.startswith("win") and hasattr(os, "add_dll_directory"):
            folders = [path.resolve().parent]
            try:
                from tvm_ffi import libinfo

                folders.append(Path(libinfo.find_libtvm_ffi()).resolve().parent)
            except Exception:  # noqa: BLE001 - fall back to the package's lib folder
                folders.append(Path(tvm_ffi.__file__).resolve().parent / "lib")
            for folder in folders:
                if folder.is_dir():
                    _dll_handles.append(os.add_dll_directory(str(folder)))
        try:
            module = tvm_ffi.load_module(str(path))
            info = json.loads(module.build_info())
        except Exception as exc:  # noqa: BLE001 - any load failure becomes the reason
            _state["error"] = f"native library {path} failed to load: {exc}"
            if sys.platform.startswith("win") and not str(path.resolve()).isascii():
                _state["error"] += ("; tvm-ffi cannot load a DLL from a path with non-ASCII "
                                    "characters: install into (or build from) a folder whose "
                                    "path is plain ASCII")
            return _state
        error = _driver_refusal(info, path)
        if error:
            _state["error"] = error
            _state["info"] = info
            return _state
        _state["module"] = module
        _state["info"] = info
        return _state


# The oldest driver branch that runs each CUDA major's code (minor-version compatibility:
# any driver of the major's first release runs every later minor release of it).
MIN_DRIVER_FOR_MAJOR = {12: "R525", 13: "R580"}


def _driver_refusal(info: dict, path: Path) -> Optional[str]:
    """Why this machine's driver cannot run the library, or None.

    What gates loading is the driver, not torch: the library links cudart statically and
    runs on the caller's stream in the process's primary context, which torch shares,
    whatever CUDA version torch was built with. A driver of the same CUDA major as the
    build (even an older minor release) runs it; an older major does not.
    """
    built = str(info.get("cuda_version", "0.0"))
    try:
        built_major = int(built.split(".")[0])
    except ValueError:
        return f"native library {path} reports an unreadable CUDA version {built!r}; rebuild it"
    driver = _driver_cuda_version()
    if driver is None or driver[0] >= built_major:
        return None
    branch = MIN_DRIVER_FOR_MAJOR.get(built_major)
    needs = f"a driver for CUDA {built_major}.x" + (f" ({branch} or newer)" if branch else "")
    return (f"native library {path} was built with CUDA {built} and needs {needs}, but the "
            f"NVIDIA driver supports only CUDA {driver[0]}.{driver[1]}: update the NVIDIA driver, "
            f"or install a flash_mla wheel built with CUDA {driver[0]}")


def load_error() -> Optional[str]:
    """Why the library is not usable (process-wide), or None when it is."""
    return _load().get("error")


def build_info() -> Optional[dict]:
    state = _load()
    return state.get("info") if "module" in state else None


def function(name: str) -> Callable:
    """The exported function ``name``, looked up once per loaded library (a tvm-ffi
    lookup costs microseconds; the families call this on every launch)."""
    state = _load()
    if "module" not in state:
        raise RuntimeError(f"native function {name!r} is unavailable: {state['error']}")
    functions = state.setdefault("functions", {})
    fn = functions.get(name)
    if fn is None:
        try:
            fn = functions[name] = getattr(state["module"], name)
        except AttributeError:
            raise RuntimeError(f"native function {name!r} is not exported by "
                               f"{state['path']}") from None
    return fn


def env_allocator_available(tensor: Any) -> bool:
    """Whether entries that allocate their own outputs (``*_alloc``, csrc/api/env_alloc.h)
    can run for a caller passing ``tensor``: the library exports the question and the
    caller's framework installs its DLPack tensor allocator (torch does, through
    ``__dlpack_c_exchange_api__``). False when the library predates the entry."""
    try:
        ask = function("env_allocator_available")
    except RuntimeError:
        return False
    return bool(ask(tensor))


def array_item() -> Callable:
    """tvm-ffi's public ``ffi.ArrayGetItem`` global function: item i of an array an entry
    returned (a torch tensor, for the ``*_alloc`` entries' outputs). Unpacking the array in
    Python costs several microseconds more (measured in docs/dense_decode.md)."""
    state = _load()
    item = state.get("array_item")
    if item is None:
        import tvm_ffi

        item = state["array_item"] = tvm_ffi.get_global_func("ffi.ArrayGetItem")
    return item


def _device_capability(device: Any) -> Tuple[Optional[int], Optional[Tuple[int, int]], str]:
    """(cuda index or None, (major, minor) or None, description)."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return None, None, str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return index, _capabilities[index], f"cuda:{index}"


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def unavailable_reason(op: str, device: Any, features: Optional[dict] = None) -> Optional[str]:
    state = _load()
    if "module" not in state:
        return state["error"]
    info = state["info"]
    ops = info.get("ops", {})
    if op not in ops:
        built = ", ".join(sorted(ops)) or "none"
        return (f"op {op!r} is not in this native build (ops built: {built}); rebuild with "
                "FLASH_MLA_KERNELS=all")
    capabilities = ops[op]
    # Checked before the device: a misspelt or stale key must fail on every machine
    # rather than let a feature go unchecked.
    unknown = sorted(name for name in (features or {}) if name not in capabilities)
    if unknown:
        raise ValueError(
            f"features for op {op!r} name {', '.join(map(repr, unknown))}, which its capability "
            f"table does not list; known keys: {', '.join(sorted(capabilities)) or 'none'}")
    _, cap, desc = _device_capability(device)
    if cap is None:
        return f"device {desc} is not a CUDA device"
    targets = info.get("targets", [])
    if _arch.runnable_target(targets, info.get("ptx"), cap[0], cap[1]) is None:
        return (f"no kernel for {_arch.sm_name(*cap)} in this build (targets: "
                f"{', '.join(targets) or 'none'}); rebuild with FLASH_MLA_CUDA_ARCHS=native on "
                "this machine, or add its target")
    for name, value in (features or {}).items():
        accepted = capabilities[name]
        if _normalise(value) not in accepted:
            shown = json.dumps(_normalise(value))
            return (f"feature {name}={shown} not implemented natively for {op} "
                    f"(supported: {json.dumps(accepted)})")
    return None


def _reset_for_tests() -> None:
    """Forget the loaded library and cached device answers (tests only)."""
    with _lock:
        _state.clear()
        _capabilities.clear()
