"""Dense MHA prefill (training) benchmark: this library's native kernels against torch
SDPA's flash and cuDNN backends, forward and backward, all measured in one run.

Shapes are the upstream FlashMLA benchmark's: b = 2, seqlen 4096 and 8192,
(h_q, h_k) in {(128, 128), (32, 4)}, (d_qk, d_v) in {(128, 128), (192, 128)},
causal and not. FLOP counts the unmasked (query, key) pairs:
forward pairs * h_q * 2 * (d_qk + d_v), backward pairs * h_q * 2 * (3 d_qk + 2 d_v).

Timing is kernels only: each measured call is captured once in a CUDA graph and
replayed between CUDA events; before every replay a 512 MiB buffer is zeroed so
the L2 holds none of the inputs; median of --iters replays after --warmup.
SDPA gets q/k/v as [b, h, s, d] views of the same data; for GQA its k/v heads are
expanded to h_q first (expansion not timed), since the flash backend has no GQA.
A backend that refuses a shape (e.g. the flash backend with d_qk != d_v) is
printed as n/a with its reason. The backward of this library runs only when a
loaded native library exports dense_prefill_bwd.

Usage: python benchmarks/bench_mha.py --out DIR [--lib PATH ...] [--quick]
       python benchmarks/bench_mha.py --plot DIR/bench_mha.json   (PNG only)
Native functions come from the installed flash_mla package when it has them, else
from the libraries given by --lib or by FLASH_MLA_LIBRARY_PATH (os.pathsep-separated).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

SHAPES_SEQLEN = (4096, 8192)
SHAPES_HEADS = ((128, 128), (32, 4))
SHAPES_DIMS = ((128, 128), (192, 128))
BATCH = 2


# ---------------------------------------------------------------------------
# native functions
# ---------------------------------------------------------------------------
class Native:
    """Looks a tvm-ffi function up in the package first, then in explicit libraries."""

    def __init__(self, libs: List[str]):
        self.libs = libs
        self.modules = []
        self.errors: List[str] = []
        for path in libs:
            try:
                import tvm_ffi

                self.modules.append(tvm_ffi.load_module(str(Path(path).resolve())))
            except Exception as err:  # report, keep going with the others
                self.errors.append(f"{path}: {err}")

    def get(self, name: str) -> Tuple[Optional[Callable], str]:
        try:
            from flash_mla import _native

            return _native.function(name), "package"
        except Exception as err:
            package_reason = str(err)
        for module in self.modules:
            try:
                return getattr(module, name), "library"
            except AttributeError:
                continue
        return None, f"no {name}: package: {package_reason}; libraries: {self.libs or 'none'} {self.errors}"


def load_native(lib_args: List[str]) -> Native:
    """The libraries of --lib, else those in FLASH_MLA_LIBRARY_PATH (os.pathsep-separated)."""
    libs = list(lib_args)
    env = os.environ.get("FLASH_MLA_LIBRARY_PATH")
    if not libs and env:
        libs = [p for p in env.split(os.pathsep) if p]
    return Native(libs)


@contextlib.contextmanager
def forced_env(name: str, value: Optional[str]) -> Iterator[None]:
    """Sets one environment variable to `value` (None: unsets it) for a with-block, then
    restores what was there. The benchmarks force a kernel variant or backend this way."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def device_line(torch_mod) -> str:
    props = torch_mod.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, torch {torch_mod.__version__}"


def save_results(out: Path, stem: str, payload: Dict, plot_fn: Callable[[Path, Path], None]) -> None:
    """out/stem.json, then out/stem.png drawn by plot_fn (skipped without matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {json_path}")
    try:
        plot_fn(json_path, out / f"{stem}.png")
    except ImportError:
        print("matplotlib missing: draw the PNG elsewhere with --plot " + str(json_path))


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
class Timer:
    def __init__(self, torch_mod, warmup: int, iters: int):
        self.torch = torch_mod
        self.warmup = warmup
        self.iters = iters
        # Larger than any current L2 (H100 50 MB, H200 60 MB, RTX 5090 96 MB).
        self.flush_buf = torch_mod.empty(512 * 1024 * 1024, dtype=torch_mod.uint8, device="cuda")

    def _median(self, run: Callable[[], None]) -> float:
        torch = self.torch
        times = []
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        for i in range(self.warmup + self.iters):
            self.flush_buf.zero_()
            start.record()
            run()
            end.record()
            end.synchronize()
            if i >= self.warmup:
                times.append(start.elapsed_time(end) * 1000.0)
        return statistics.median(times)

    def time_us(self, fn: Callable[[], None]) -> Tuple[float, str]:
        """Median microseconds of fn and how they were taken ("graph" or "eager")."""
        torch = self.torch
        fn()  # first call outside capture: lazy init, workspace allocation
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm the capture stream's allocator
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, stream=stream):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        except Exception:
            # Capture refused (e.g. autograd's backward streams): plain launches
            # between the events; the ms-long kernels hide the launch latency.
            torch.cuda.synchronize()
            return self._median(fn), "eager"
        us = self._median(graph.replay)
        del graph
        return us, "graph"


# ---------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------
def pairs_count(seqlen: int, causal: bool) -> int:
    # s_q == s_k here, so bottom-right causal keeps s (s + 1) / 2 pairs.
    return seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen


def bench_shape(torch, native: Native, timer: Timer, s: int, h_q: int, h_k: int, d_qk: int,
                d_v: int, causal: bool, baselines: bool = True) -> Dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    dtype = torch.bfloat16
    b = BATCH
    scale = d_qk ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b * s, h_q, d_qk, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b * s, h_k, d_qk, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b * s, h_k, d_v, device="cuda", dtype=dtype, generator=gen)
    dout = torch.randn(b * s, h_q, d_v, device="cuda", dtype=dtype, generator=gen)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    pairs = b * pairs_count(s, causal)
    flop = {"fwd": pairs * h_q * 2 * (d_qk + d_v), "bwd": pairs * h_q * 2 * (3 * d_qk + 2 * d_v)}
    row = {"seqlen": s, "batch": b, "h_q": h_q, "h_k": h_k, "d_qk": d_qk, "d_v": d_v,
           "causal": causal, "flop": flop, "us": {}, "timing": {},
           "notes": {}}
    mask_code = 1 if causal else 0

    # --- this library ---
    out = torch.empty(b * s, h_q, d_v, device="cuda", dtype=dtype)
    lse = torch.empty(h_q, b * s, device="cuda", dtype=torch.float32).T
    fwd, why = native.get("dense_prefill_fwd")
    if fwd is None:
        row["notes"]["ours_fwd"] = why
    else:
        ws_fn, _ = native.get("dense_prefill_fwd_workspace_bytes")
        ws_bytes = ws_fn(b, b * s, b * s, h_q, h_k, d_qk, d_v) if ws_fn else 0
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
        call = lambda: fwd(ws, q, k, v, cu, cu, out, lse, mask_code, scale, s, s, True)
        row["us"]["ours_fwd"], row["timing"]["ours_fwd"] = timer.time_us(call)
    bwd, why = native.get("dense_prefill_bwd")
    if bwd is None or fwd is None:
        row["notes"]["ours_bwd"] = why if bwd is None else "forward unavailable"
    else:
        ws_fn, _ = native.get("dense_prefill_bwd_workspace_bytes")
        ws_b = torch.empty(max(ws_fn(b, b * s, b * s, h_q, h_k, d_qk, d_v), 1), dtype=torch.uint8,
                           device="cuda")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        call = lambda: bwd(ws_b, dout, q, k, v, out, lse, cu, cu, dq, dk, dv, mask_code, scale, s, s,
                           True)
        row["us"]["ours_bwd"], row["timing"]["ours_bwd"] = timer.time_us(call)

    if not baselines:
        return row
    # --- torch SDPA, [b, h, s, d] views; GQA heads expanded (not timed) ---
    group = h_q // h_k
    qs = q.view(b, s, h_q, d_qk).transpose(1, 2)
    ks = k.view(b, s, h_k, d_qk).repeat_interleave(group, dim=2).transpose(1, 2)
    vs = v.view(b, s, h_k, d_v).repeat_interleave(group, dim=2).transpose(1, 2)
    douts = dout.view(b, s, h_q, d_v).transpose(1, 2)
    if group > 1:
        row["notes"]["sdpa"] = f"k/v heads expanded {h_k} -> {h_q} for SDPA (copy not timed)"
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                qg = qs.detach().requires_grad_(True)
                kg = ks.detach().requires_grad_(True)
                vg = vs.detach().requires_grad_(True)
                ref = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale)
                torch.cuda.synchronize()
                if fwd is not None:  # sanity: ours (last timed run) against this backend
                    row[name + "_maxdiff_vs_ours"] = float(
                        (ref.detach().transpose(1, 2).reshape(b * s, h_q, d_v).float() - out.float())
                        .abs().max())
                row["us"][name + "_fwd"], row["timing"][name + "_fwd"] = timer.time_us(
                    lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale))
                row["us"][name + "_bwd"], row["timing"][name + "_bwd"] = timer.time_us(
                    lambda: torch.autograd.grad(ref, (qg, kg, vg), douts, retain_graph=True))
                del ref, qg, kg, vg
        except Exception as err:  # backend refuses the shape, or capture failed
            msg = str(err).strip().splitlines()
            row["notes"][name] = (msg[0] if msg else type(err).__name__)[:200]
    return row


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def tflops(flop: int, us: Optional[float]) -> Optional[float]:
    return flop / (us * 1e-6) / 1e12 if us else None


def fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_row(row: Dict) -> None:
    shape = (f"s={row['seqlen']:5d} h={row['h_q']:3d}/{row['h_k']:<3d} d={row['d_qk']}/{row['d_v']} "
             f"{'causal' if row['causal'] else 'full  '}")
    for pass_ in ("fwd", "bwd"):
        us = {m: row["us"].get(f"{m}_{pass_}") for m in ("ours", "flash", "cudnn")}
        tf = {m: tflops(row["flop"][pass_], us[m]) for m in us}
        r_flash = us["flash"] / us["ours"] if us["ours"] and us["flash"] else None
        r_cudnn = us["cudnn"] / us["ours"] if us["ours"] and us["cudnn"] else None
        print(f"{shape} {pass_} | ours {fmt(us['ours'], '9.1f')} us {fmt(tf['ours'], '6.1f')} TF"
              f" | flash {fmt(us['flash'], '9.1f')} us {fmt(tf['flash'], '6.1f')} TF"
              f" | cudnn {fmt(us['cudnn'], '9.1f')} us {fmt(tf['cudnn'], '6.1f')} TF"
              f" | x flash {fmt(r_flash, '5.2f')} | x cudnn {fmt(r_cudnn, '5.2f')}", flush=True)
    eager = sorted(k for k, m in row["timing"].items() if m != "graph")
    if eager:
        print(f"    note timing: eager launches (graph capture refused) for {', '.join(eager)}")
    if row.get("flash_maxdiff_vs_ours") is not None or row.get("cudnn_maxdiff_vs_ours") is not None:
        print(f"    max |ours - flash| {fmt(row.get('flash_maxdiff_vs_ours'), '.2e')}, "
              f"max |ours - cudnn| {fmt(row.get('cudnn_maxdiff_vs_ours'), '.2e')}")
    for key, note in row["notes"].items():
        print(f"    note {key}: {note}", flush=True)


def geomeans(rows: List[Dict]) -> Dict[str, Optional[float]]:
    result = {}
    for pass_ in ("fwd", "bwd"):
        for base in ("flash", "cudnn"):
            ratios = [r["us"][f"{base}_{pass_}"] / r["us"][f"ours_{pass_}"] for r in rows
                      if r["us"].get(f"ours_{pass_}") and r["us"].get(f"{base}_{pass_}")]
            result[f"{pass_}_vs_{base}"] = (
                math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None)
            result[f"{pass_}_vs_{base}_count"] = len(ratios)
    return result


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"{r['seqlen'] // 1024}k {r['h_q']}/{r['h_k']} {r['d_qk']}/{r['d_v']}"
              f"{' c' if r['causal'] else ''}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharex=True)
    width = 0.27
    for ax, pass_ in zip(axes, ("fwd", "bwd")):
        for i, (method, color) in enumerate((("ours", "tab:red"), ("flash", "tab:blue"),
                                             ("cudnn", "tab:green"))):
            vals = [tflops(r["flop"][pass_], r["us"].get(f"{method}_{pass_}")) or 0.0 for r in rows]
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, vals, width, label=method, color=color)
        ax.set_ylabel(f"{pass_} TFLOPS")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(rows)))
    axes[-1].set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.suptitle(f"dense MHA prefill, bf16, b={BATCH} - {data.get('device', '?')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for bench_mha.json and bench_mha.png")
    parser.add_argument("--lib", action="append", default=[],
                        help="native library to load (repeatable); else FLASH_MLA_LIBRARY_PATH")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="seqlen 4096 only")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from an existing JSON")
    parser.add_argument("--ours-only", action="store_true",
                        help="skip the SDPA baselines (A/B runs of this library's variants; "
                             "FLASH_MLA_DENSE_FWD_WARPS=8|4|4x32 picks the forward's warp layout, "
                             "FLASH_MLA_DENSE_BWD_WARPS=8|4 the backward's)")
    args = parser.parse_args(argv)

    if args.plot is not None:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")

    import torch

    if not torch.cuda.is_available():
        print("bench_mha: no CUDA device visible; nothing to measure", file=sys.stderr)
        return 2
    native = load_native(args.lib)
    timer = Timer(torch, args.warmup, args.iters)
    device = device_line(torch)
    for variable in ("FLASH_MLA_DENSE_FWD_WARPS", "FLASH_MLA_DENSE_BWD_WARPS"):
        forced = os.environ.get(variable)
        if forced:
            device += f", {variable}={forced}"
    print(f"device: {device}")
    print("times: median of CUDA-graph replays between CUDA events, L2 flushed before each; "
          "x flash / x cudnn = their time / ours (> 1: ours faster)", flush=True)

    rows = []
    seqlens = SHAPES_SEQLEN[:1] if args.quick else SHAPES_SEQLEN
    for s in seqlens:
        for h_q, h_k in SHAPES_HEADS:
            for d_qk, d_v in SHAPES_DIMS:
                for causal in (False, True):
                    row = bench_shape(torch, native, timer, s, h_q, h_k, d_qk, d_v, causal,
                                      baselines=not args.ours_only)
                    rows.append(row)
                    print_row(row)
                    torch.cuda.empty_cache()

    gm = geomeans(rows)
    print("geomean speed ratios (their time / ours, over shapes where both ran):")
    for key in ("fwd_vs_flash", "fwd_vs_cudnn", "bwd_vs_flash", "bwd_vs_cudnn"):
        print(f"  {key}: {fmt(gm[key], '.3f')} over {gm[key + '_count']} shapes")
    save_results(args.out, "bench_mha", {"device": device, "rows": rows, "geomean": gm}, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
