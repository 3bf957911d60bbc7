"""setuptools entry: builds the native library through flash_mla_build (ninja +
nvcc) and ships it inside the flash_mla package.

The wheel is tagged py3-none-<platform>: the library links neither Python nor
torch, so one wheel serves every Python 3.9+. It holds the flash_mla package and
flash_mla/lib/<library> only (not flash_mla_build, not the build tree).

Environment: FLASH_MLA_CUDA_ARCHS, FLASH_MLA_KERNELS, FLASH_MLA_PATCHES,
FLASH_MLA_BUILD_DIR, FLASH_MLA_JOBS / MAX_JOBS, FLASH_MLA_DEBUG (docs/build.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from flash_mla_build.build import BuildConfig, build_library  # noqa: E402


def _log(line: str) -> None:
    # pip shows a build backend's stderr live with -v; flush so [n/N] lines stream.
    print(line, file=sys.stderr, flush=True)


class BuildPyWithNative(build_py):
    """Copies the Python package, then builds the native library into it."""

    def run(self) -> None:
        super().run()
        config = BuildConfig.from_env(ROOT)
        if getattr(self, "editable_mode", False):
            out_dir = ROOT / "flash_mla" / "lib"
        else:
            out_dir = Path(self.build_lib) / "flash_mla" / "lib"
        build_library(config, out_dir=out_dir, log=_log)


class BinaryDistribution(Distribution):
    """Holds a native library: installs to platlib, wheel root not purelib."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: platform-specific, independent of the Python ABI."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel},
    package_data={"flash_mla": ["lib/*.so", "lib/*.dll"]},
    include_package_data=False,
    zip_safe=False,
)
