"""Build the native library: toolchain -> targets -> sources -> patches -> ninja.

Public API (setup.py, scripts/build, tests):
- ``BuildConfig.from_env(repo_root, env=None)``: reads FLASH_MLA_CUDA_ARCHS,
  FLASH_MLA_KERNELS, FLASH_MLA_PATCHES, FLASH_MLA_BUILD_DIR, FLASH_MLA_JOBS (or
  MAX_JOBS), FLASH_MLA_DEBUG (1 = dev build: -lineinfo, spills only warn).
- ``plan_build(config) -> BuildPlan``: resolves everything and writes build.ninja,
  without compiling (cheap; check_env and tests use it).
- ``build_library(config, out_dir=None, log=print) -> BuildResult``: plans, runs
  ninja (its [n/N] progress lines pass through), fails a release build on ptxas
  spills, and copies the library to out_dir (default flash_mla/lib).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from . import archs as A
from . import flags as F
from . import ninja_file as N
from . import patches as P
from . import sources as S
from . import toolchain as T

__all__ = ["BuildError", "BuildConfig", "BuildPlan", "BuildResult", "plan_build",
           "build_library", "package_version", "stream_process"]


class BuildError(RuntimeError):
    """The native build failed; the message says at which step."""


def package_version(repo_root: Path) -> str:
    text = (Path(repo_root) / "flash_mla" / "_version.py").read_text(encoding="utf-8")
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if not m:
        raise BuildError("flash_mla/_version.py defines no __version__")
    return m.group(1)


@dataclass
class BuildConfig:
    repo_root: Path
    build_dir: Path
    archs: str = "all"
    kernels: str = "all"
    patches: str = "auto"
    jobs: Optional[int] = None
    release: bool = True
    platform: str = field(default_factory=F.host_platform)

    @classmethod
    def from_env(cls, repo_root, env: Optional[Mapping[str, str]] = None) -> "BuildConfig":
        env = os.environ if env is None else env
        repo_root = Path(repo_root).resolve()
        build_dir = Path(env.get("FLASH_MLA_BUILD_DIR") or repo_root / "build" / "native")
        jobs_text = env.get("FLASH_MLA_JOBS") or env.get("MAX_JOBS")
        jobs = None
        if jobs_text:
            if not jobs_text.isdigit() or int(jobs_text) < 1:
                raise BuildError(f"FLASH_MLA_JOBS must be a positive integer, got {jobs_text!r}")
            jobs = int(jobs_text)
        return cls(repo_root=repo_root, build_dir=build_dir.resolve(),
                   archs=env.get("FLASH_MLA_CUDA_ARCHS") or "all",
                   kernels=env.get("FLASH_MLA_KERNELS") or "all",
                   patches=P.patch_mode(env), jobs=jobs,
                   release=(env.get("FLASH_MLA_DEBUG") or "0") in ("0", ""))


@dataclass
class BuildPlan:
    config: BuildConfig
    cuda: T.CudaToolchain
    host: T.HostCompiler
    ninja: str
    targets: list
    sources: list
    patches_applied: list
    ninja_file: Path
    library: Path          # in the build dir


@dataclass
class BuildResult:
    plan: BuildPlan
    library: Path          # the installed copy
    seconds: float
    compiler_output: str


def _defines(config: BuildConfig, targets, version: str) -> list:
    ptx = A.ptx_target(targets)
    # Values are pp-numbers that build_info.cpp stringifies (no quoting across
    # shells and nvcc's comma splitting): 80_86_90a -> "80_86_90a".
    if not re.fullmatch(r"[0-9][0-9A-Za-z_.]*", version):
        raise BuildError(f"package version {version!r} must start with a digit and hold only "
                         "letters, digits, '.' and '_' to be embedded in build_info")
    return [f"FLASH_MLA_VERSION={version}",
            "FLASH_MLA_TARGETS=" + "_".join(t.name for t in targets),
            f"FLASH_MLA_PTX={ptx.name if ptx else 0}"]


def plan_build(config: BuildConfig, log: Callable[[str], None] = print) -> BuildPlan:
    p = config.platform
    cuda = T.find_cuda()
    host = T.find_host_compiler(p, cuda_version=tuple(cuda.version))
    ninja = T.find_ninja()
    targets = A.select_targets(config.archs, cuda.version)
    families = S.select_kernel_families(config.kernels)
    sources = S.discover_sources(config.repo_root, targets, families)
    if not sources:
        raise BuildError(f"no sources selected under {config.repo_root / 'csrc'}")
    cutlass = T.cutlass_include_dir()
    tvm = T.tvm_ffi_dirs()
    cuda_include = cuda.root / "include"

    build_dir = Path(config.build_dir)
    overlay = build_dir / "overlay"
    applied = []
    if P.patches_enabled(config.patches, host.kind):
        applied = P.apply_patches(overlay, P.package_roots_for_build(cuda_include, cutlass),
                                  P.package_versions_for_build(cuda_include))
    elif overlay.is_dir():
        shutil.rmtree(overlay)
    include_dirs = ([str(overlay)] if applied else []) + [
        str(config.repo_root / "csrc"), str(cutlass), *tvm.include_dirs, *cuda.include_dirs]
    opts = F.BuildOptions(include_dirs=include_dirs,
                          defines=_defines(config, targets, package_version(config.repo_root)),
                          release=config.release, debug_info=not config.release,
                          extra_nvcc=(f"-ccbin={host.path}",))
    library_rel = F.library_filename(p)
    plan = N.NinjaPlan(
        platform=p, nvcc=str(cuda.nvcc), cxx=host.path,
        nvcc_args=F.nvcc_compile_args(p, opts, gencode=()),
        cxx_args=F.cxx_compile_args(p, opts),
        link_args=F.nvcc_link_args(p, "$out", [tvm.lib_dir], [tvm.lib_name]),
        output=library_rel, sources=sources,
        gencode_for={s.rel: A.gencode_flags(s.targets, ptx=s.ptx) for s in sources if s.is_cuda})
    ninja_path = N.write_ninja(plan, build_dir)
    log(f"flash_mla build: CUDA {cuda.version_text} ({cuda.source}: {cuda.nvcc}), host "
        f"{host.kind}, targets {';'.join(t.name for t in targets)}, "
        f"{len(sources)} sources, kernels={config.kernels}, patches="
        f"{', '.join(a.id for a in applied) or 'none'}")
    return BuildPlan(config, cuda, host, ninja, targets, sources, applied, ninja_path,
                     build_dir / library_rel)


def stream_process(cmd, env, log: Callable[[str], None]) -> tuple:
    """Run cmd, passing progress/error lines to log as they come; (returncode, text).

    Output is decoded as UTF-8 with replacement: a non-English compiler or a
    stray byte never crashes the build.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    captured = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        captured.append(line)
        lowered = line.lower()
        if line.startswith("[") or "error" in lowered or "warning" in lowered:
            log(line)
    return proc.wait(), "\n".join(captured)


def _run_ninja(plan: BuildPlan, log: Callable[[str], None]) -> str:
    cfg = plan.config
    cmd = [plan.ninja, "-C", str(cfg.build_dir)]
    if cfg.jobs:
        cmd += ["-j", str(cfg.jobs)]
    env = dict(os.environ)
    env.update(plan.host.env)
    env.update(F.compiler_env(cfg.platform))
    # ninja prints a command's output (ptxas -v goes to stderr) after its [n/N] line.
    rc, text = stream_process(cmd, env, log)
    if rc != 0:
        tail = "\n".join(text.splitlines()[-60:])
        raise BuildError(f"ninja failed with exit code {rc} in {cfg.build_dir}:\n{tail}")
    return text


def build_library(config: BuildConfig, out_dir: Optional[Path] = None,
                  log: Callable[[str], None] = print) -> BuildResult:
    start = time.monotonic()
    plan = plan_build(config, log)
    output = _run_ninja(plan, log)
    if config.release:
        spills = F.spilling_kernels(output)
        if spills:
            # Drop the objects so the next build recompiles and reports them again.
            shutil.rmtree(Path(config.build_dir) / "obj", ignore_errors=True)
            raise BuildError("release build refused: ptxas reports register spills in "
                             + "; ".join(spills))
    if not plan.library.is_file():
        raise BuildError(f"ninja finished but {plan.library} does not exist")
    out_dir = Path(out_dir or config.repo_root / "flash_mla" / "lib")
    out_dir.mkdir(parents=True, exist_ok=True)
    installed = out_dir / plan.library.name
    tmp = installed.with_name(installed.name + ".tmp")
    shutil.copy2(plan.library, tmp)
    os.replace(tmp, installed)
    seconds = time.monotonic() - start
    log(f"flash_mla build: {installed} ({installed.stat().st_size} bytes) in {seconds:.1f} s")
    return BuildResult(plan, installed, seconds, output)
