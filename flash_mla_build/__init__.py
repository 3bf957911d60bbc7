"""Build tooling for flash_mla's native library, shared by setup.py and scripts/.

Not part of the installed wheel. Modules (each documents its API at the top):

- ``toolchain``: find nvcc (CUDA_HOME / CUDA_PATH / PATH / PyPI cuda-toolkit), the
  host compiler (gcc/clang, MSVC), ninja, CUTLASS and tvm-ffi dirs, cuobjdump.
- ``archs``: FLASH_MLA_CUDA_ARCHS -> compile targets, checked against nvcc;
  -gencode flags.
- ``sources``: which csrc/ files build for which targets; FLASH_MLA_KERNELS.
- ``flags``: compiler/linker command lines for Linux and Windows.
- ``ninja_file``: writes build.ninja.
- ``patches``: the header patch layer (patches/manifest.json), FLASH_MLA_PATCHES.
- ``build``: the whole build (``BuildConfig.from_env`` + ``build_library``).
- ``wheel_verify``: per-kernel targets, registers, spills and shared memory of a
  built wheel or library (``python -m flash_mla_build.wheel_verify dist/*.whl``).

check_env, lint, workflow and __main__ belong to the scripts' side.
"""
from __future__ import annotations

__all__ = ["archs", "build", "flags", "ninja_file", "patches", "sources", "toolchain",
           "wheel_verify"]
