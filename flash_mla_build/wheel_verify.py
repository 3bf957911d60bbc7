"""Verify what a built wheel (or library file) holds: for every kernel, the targets it
was compiled for, and for every sm_120 kernel its registers, spills (stack/local
memory) and static shared memory, joined with the dynamic shared memory the library
reports in build_info(). Fails when an sm_120 kernel needs more than 101376 B of
shared memory or uses local memory (spills), or when a required target is missing.

    python -m flash_mla_build.wheel_verify dist/*.whl [--require 120f --require 100f]
        [--json report.json]

Public API (scripts/, ci/ and tests call these):
- ``parse_resource_usage(text) -> list[KernelUsage]``: parses
  ``cuobjdump --dump-resource-usage`` output (one entry per (arch, kernel)).
- ``verify(usages, build_info, required=()) -> Report``: the checks (required targets
  default to the ones build_info claims, plus ``required``); ``Report.ok``,
  ``Report.problems`` (sentences), ``Report.kernels`` (name -> arches).
- ``verify_file(path, cuobjdump=None, required=()) -> Report``: extracts the library
  from a wheel if needed, runs cuobjdump (toolkit, nvidia-cuda-cuobjdump wheel or
  Triton's) and reads build_info by loading the library through tvm_ffi (no GPU needed).
- ``main(argv) -> int``.

cuobjdump shows static shared memory only; the dynamic amount comes from the kernel
registry (build_info "kernels"). A kernel is joined to the registry by op name: its
symbol contains the op's name (e.g. "combine" in flash_mla::combine::combine_kernel; the
longest such name where several occur); the largest dynamic size registered for that op
is used, or, when no op matches, the largest in the whole library (a conservative bound).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["KernelUsage", "Report", "SM120_SMEM_LIMIT", "parse_resource_usage", "verify",
           "verify_file", "main", "read_build_info"]

SM120_SMEM_LIMIT = 101376
_LIB_RE = re.compile(r"(^|/)(lib)?flash_mla_native\.(so|dll)$")


@dataclass
class KernelUsage:
    arch: str          # "sm_120f", "sm_90a", ...
    name: str          # mangled symbol
    registers: int
    stack: int
    local: int
    static_smem: int


@dataclass
class Report:
    ok: bool
    problems: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)     # symbol -> sorted arches
    sm120: list = field(default_factory=list)       # dicts per sm_120 kernel
    targets: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "targets": self.targets,
                "kernels": self.kernels, "sm120": self.sm120}


_ARCH_RE = re.compile(r"^arch = (sm_\w+)")
_FUNC_RE = re.compile(r"^\s*Function (\S+?):?\s*$")
_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> list:
    usages, arch, in_elf, func = [], None, False, None
    for line in text.splitlines():
        if line.startswith("Fatbin elf code"):
            in_elf, arch, func = True, None, None
            continue
        if line.startswith("Fatbin ptx code"):
            in_elf, arch, func = False, None, None
            continue
        m = _ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        f = _FUNC_RE.match(line)
        if f:
            func = f.group(1)
            continue
        r = _RES_RE.search(line)
        if r and func and in_elf and arch:
            usages.append(KernelUsage(arch, func, int(r.group(1)), int(r.group(2)),
                                      int(r.group(4)), int(r.group(3))))
            func = None
    return usages


def _is_sm120(arch: str) -> bool:
    return re.match(r"^sm_12\d", arch) is not None


def _own_records(symbol: str, kernels: Sequence[dict]) -> list:
    """The records whose symbol pieces (build_info "symbol", space-separated) all occur in
    the mangled kernel name: the kernel's own record, when its registration names it."""
    own = []
    for k in kernels:
        pieces = str(k.get("symbol") or "").split()
        if pieces and all(p in symbol for p in pieces):
            own.append(k)
    return own


def _dynamic_smem_for(symbol: str, info: dict) -> tuple:
    """(dynamic shared memory, how it was found) for an sm_120 cubin of `symbol`."""
    everything = info.get("kernels", []) if info else []
    own = _own_records(symbol, everything)
    if own:
        if not any(k.get("runs_on_sm120", True) for k in own):
            # Built for sm_120 as a trap, never launched there (the dispatch checks the
            # device's shared memory): nothing to hold its cubin to.
            return 0, f"never launched on sm_120 ({own[0].get('variant', '')})"
        best = max(int(k.get("dynamic_smem_bytes", 0)) for k in own)
        return best, f"record {own[0].get('variant', '')}"
    # Kernels that never run on sm_120 (more shared memory than it has, launched only
    # where the device allows) do not bound what an sm_120 cubin may use.
    kernels = [k for k in everything if k.get("runs_on_sm120", True)]
    matching = [k for k in kernels if k.get("op") and k["op"] in symbol]
    if matching:
        # The most specific op: "dense_decode_schedule_kernel" is the schedule's kernel,
        # not one of "dense_decode"'s, although both names occur in its symbol.
        longest = max(len(k["op"]) for k in matching)
        matching = [k for k in matching if len(k["op"]) == longest]
    pool = matching or kernels
    if not pool:
        return 0, "none registered"
    best = max(int(k.get("dynamic_smem_bytes", 0)) for k in pool)
    how = f"op {matching[0]['op']}" if matching else "library maximum"
    return best, how


def verify(usages: Sequence[KernelUsage], build_info: Optional[dict],
           required: Sequence[str] = ()) -> Report:
    report = Report(ok=True, targets=list((build_info or {}).get("targets", [])))
    by_kernel = {}
    for u in usages:
        by_kernel.setdefault(u.name, set()).add(u.arch)
    report.kernels = {k: sorted(v) for k, v in sorted(by_kernel.items())}
    if not usages:
        report.problems.append("no kernels found in the library's fatbinary")
    for u in usages:
        if not _is_sm120(u.arch):
            continue
        dyn, how = _dynamic_smem_for(u.name, build_info or {})
        total = u.static_smem + dyn
        entry = {"kernel": u.name, "arch": u.arch, "registers": u.registers, "stack": u.stack,
                 "local": u.local, "static_smem": u.static_smem, "dynamic_smem": dyn,
                 "dynamic_from": how, "total_smem": total}
        report.sm120.append(entry)
        if total > SM120_SMEM_LIMIT:
            report.problems.append(
                f"{u.name} on {u.arch} needs {total} B of shared memory ({u.static_smem} static + "
                f"{dyn} dynamic, {how}); sm_120 allows {SM120_SMEM_LIMIT} B")
        if u.local or u.stack:
            report.problems.append(
                f"{u.name} on {u.arch} uses local memory (stack {u.stack} B, local {u.local} B): "
                "register spills are not allowed in release kernels")
    # Every target the library claims (build_info "targets") plus --require'd ones must
    # hold a cubin of every portable kernel. Portable = built for a plain target or for
    # two or more majors; an arch-specific kernel (csrc/sm90/, csrc/sm100/, ...) exists
    # for its own family only.
    wanted = list(dict.fromkeys(list(report.targets) + list(required)))
    for want in wanted:
        arch = want if want.startswith("sm_") else f"sm_{want}"
        for name, arches in report.kernels.items():
            majors = {re.sub(r"[af]$", "", a)[3:-1] for a in arches}
            portable = len(majors) >= 2 or any(re.fullmatch(r"sm_\d+", a) for a in arches)
            if portable and arch not in arches:
                report.problems.append(f"{name} has no {arch} cubin (built for "
                                       f"{', '.join(arches)})")
    report.ok = not report.problems
    return report


# Run in a child Python: a DLL loaded into this process could not be deleted on Windows
# until the process ends, so the temporary folder holding it could not be cleaned up.
_READ_BUILD_INFO = ("import sys, tvm_ffi\n"
                    "sys.stdout.write(tvm_ffi.load_module(sys.argv[1]).build_info())\n")


def read_build_info(library: Path, python: Optional[str] = None) -> Optional[dict]:
    """build_info() of a library file, loaded through tvm_ffi in a child process (no GPU
    needed; this process never maps the library, so its file can be deleted at once)."""
    cmd = [python or sys.executable, "-c", _READ_BUILD_INFO, str(library)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"warning: could not run {cmd[0]} to read build_info from {library}: {exc}",
              file=sys.stderr)
        return None
    if out.returncode != 0:
        err = out.stderr.decode("utf-8", "replace").strip().splitlines()
        print(f"warning: could not read build_info from {library}: "
              f"{err[-1] if err else 'exit code ' + str(out.returncode)}", file=sys.stderr)
        return None
    try:
        return json.loads(out.stdout.decode("utf-8", "replace"))
    except ValueError as exc:
        print(f"warning: build_info of {library} is not JSON: {exc}", file=sys.stderr)
        return None


def _extract_library(path: Path, workdir: Path) -> Path:
    if path.suffix != ".whl":
        return path
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if _LIB_RE.search(n)]
        if not names:
            raise FileNotFoundError(f"{path} holds no flash_mla_native library")
        target = workdir / Path(names[0]).name
        target.write_bytes(zf.read(names[0]))
        return target


def verify_file(path, cuobjdump: Optional[str] = None, required: Sequence[str] = ()) -> Report:
    from .toolchain import find_cuobjdump

    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found: install the CUDA toolkit or "
                                "pip install nvidia-cuda-cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        lib = _extract_library(Path(path), Path(tmp))
        out = subprocess.run([tool, "--dump-resource-usage", str(lib)], capture_output=True,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"cuobjdump failed on {lib}: "
                               f"{out.stderr.decode('utf-8', 'replace').strip()}")
        usages = parse_resource_usage(out.stdout.decode("utf-8", "replace"))
        info = read_build_info(lib)
        return verify(usages, info, required)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_mla_build.wheel_verify",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="wheels (.whl) or library files")
    parser.add_argument("--require", action="append", default=[],
                        help="a target every portable kernel must have a cubin for (e.g. 120f)")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump to use")
    parser.add_argument("--json", default=None, help="write the report(s) here as JSON")
    args = parser.parse_args(argv)
    all_ok, reports = True, {}
    for p in args.paths:
        report = verify_file(p, args.cuobjdump, args.require)
        reports[p] = report.to_json()
        print(f"{p}: targets {', '.join(report.targets) or '?'}; {len(report.kernels)} kernels")
        for name, arches in report.kernels.items():
            print(f"  {name}: {', '.join(arches)}")
        for e in report.sm120:
            print(f"  [{e['arch']}] {e['kernel']}: {e['registers']} regs, stack {e['stack']} B, "
                  f"local {e['local']} B, smem {e['static_smem']} static + {e['dynamic_smem']} "
                  f"dynamic = {e['total_smem']} B")
        for problem in report.problems:
            print(f"  FAIL: {problem}")
        print(f"  {'OK' if report.ok else 'FAILED'}")
        all_ok = all_ok and report.ok
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2), encoding="utf-8")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
