"""Dense MLA decode benchmark: decode + combine of this library against the device's own
limits, measured in the same run and printed as ratios.

Shapes: the upstream FlashMLA ones (b = 128, s_q in {1, 2}, h_q = 128, h_k = 1, s_k 4096 ..
32768, causal) and the serving ones (b = 128, s_q = 1, h_q in {16, 32, 64}, h_k = 1,
s_k = 8192). FLOP = b h_q s_q (2 * 576 s_k + 2 * 512 s_k); bytes = b (s_q h_q 576 * 2 +
s_k 576 * 2 + s_q h_q 512 * 2).

Baselines of the same run: the device copy bandwidth (the best torch copy_ over uint8,
float32 and int64 views and 256 MiB and 1 GiB buffers, read + write bytes; the winner is
printed and stored) and an mma.sync m16n8k16 bf16 peak (a register-only loop of eight
independent accumulator chains per warp, PTX JIT-loaded through the CUDA driver so no
compiler is needed on the machine). Bandwidth-bound shapes are judged by GB/s / copy
bandwidth, compute-bound ones by TFLOPS / mma.sync peak.

Timing: the schedule is computed by a first call; the decode + combine call is then
captured in a CUDA graph and replayed with the L2 flushed (bench_mha.Timer). Host time:
one eager flash_mla_with_kvcache call after the first on a tiny problem, next to the raw
tvm-ffi dense_decode_fwd call with preallocated buffers and of dense_decode_fwd_alloc (the
entry the API's repeat path calls), without synchronisation (median of --host-iters).

CTA shapes: by default each shape runs the CTA the library picks; --ab also times every
shape with FLASH_MLA_DENSE_DECODE_WARPS=4, =8, =4x16 and =8x64 (every CTA serves every
shape), rows marked by "cta", to check the pick; --ctas names the values to time instead.
A forced CTA the device cannot run (8x64 needs an H100/H200 or B200) is reported once and
left out.

Usage: python benchmarks/bench_dense_decode.py --out DIR [--lib PATH] [--quick] [--ab | --ctas LIST]
       python benchmarks/bench_dense_decode.py --plot DIR/bench_dense_decode.json
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mha import Timer, device_line, forced_env, load_native, save_results  # noqa: E402

D_QK, D_V, PAGE = 576, 512, 64
UPSTREAM = [(128, s_q, 128, s_k) for s_q in (1, 2) for s_k in (4096, 8192, 16384, 32768)]
SERVING = [(128, 1, h_q, 8192) for h_q in (16, 32, 64)]


def flop(b: int, s_q: int, h_q: int, s_k: int) -> int:
    return b * h_q * s_q * (2 * D_QK * s_k + 2 * s_k * D_V)


def nbytes(b: int, s_q: int, h_q: int, s_k: int) -> int:
    return b * (s_q * h_q * D_QK * 2 + s_k * D_QK * 2 + s_q * h_q * D_V * 2)


# ---------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------
COPY_DTYPES = ("uint8", "float32", "int64")
COPY_SIZES = (256 << 20, 1 << 30)


def copy_bandwidth(torch, timer: Timer) -> Tuple[float, Dict, List[Dict]]:
    """Best GB/s (bytes read + written) of a device-to-device torch copy_ over COPY_DTYPES
    views of the same buffers and COPY_SIZES bytes, so that no single copy path that
    happens to be slow on this device flatters the decode's ratio. Returns the best GB/s,
    the winning candidate and every candidate."""
    src_all = torch.empty(max(COPY_SIZES), dtype=torch.uint8, device="cuda")
    dst_all = torch.empty_like(src_all)
    candidates = []
    for size in COPY_SIZES:
        for name in COPY_DTYPES:
            dtype = getattr(torch, name)
            src = src_all[:size].view(dtype)
            dst = dst_all[:size].view(dtype)
            us, _ = timer.time_us(lambda: dst.copy_(src))
            candidates.append({"dtype": name, "bytes": size, "us": us, "gbps": 2 * size / us / 1e3})
    del src_all, dst_all
    best = max(candidates, key=lambda c: c["gbps"])
    return best["gbps"], best, candidates


def _mma_peak_ptx(chains: int = 8) -> str:
    """PTX of `mma_peak(float* out, u32 iters)`: `chains` independent m16n8k16 bf16 MMAs
    per iteration on register operands."""
    lines = [".version 7.0", ".target sm_80", ".address_size 64",
             ".visible .entry mma_peak(.param .u64 out, .param .u32 iters) {",
             " .reg .pred p; .reg .b32 a<6>; .reg .f32 d<%d>; .reg .b32 i, n, t, g;" % (4 * chains),
             " .reg .u64 o, off; .reg .f32 s;",
             " mov.u32 t, %tid.x; mov.u32 a0, t; mul.lo.u32 a1, t, 3; mul.lo.u32 a2, t, 5;",
             " mul.lo.u32 a3, t, 7; mul.lo.u32 a4, t, 11; mul.lo.u32 a5, t, 13;"]
    lines += [" mov.f32 d%d, 0f00000000;" % k for k in range(4 * chains)]
    lines += [" ld.param.u32 n, [iters]; mov.u32 i, 0;", "LOOP:"]
    for c in range(chains):
        d = ", ".join("d%d" % (4 * c + k) for k in range(4))
        lines.append(" mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%s}, {a0, a1, a2, a3},"
                     " {a4, a5}, {%s};" % (d, d))
    lines += [" add.u32 i, i, 1; setp.lt.u32 p, i, n; @p bra LOOP;", " mov.f32 s, d0;"]
    lines += [" add.f32 s, s, d%d;" % k for k in range(1, 4 * chains)]
    lines += [" mov.u32 g, %ctaid.x; mov.u32 n, %ntid.x; mad.lo.u32 g, g, n, t;",
              " mul.wide.u32 off, g, 4; ld.param.u64 o, [out]; cvta.to.global.u64 o, o;",
              " add.u64 o, o, off; st.global.f32 [o], s;", " ret;", "}"]
    return "\n".join(lines) + "\n"


def mma_sync_peak(torch, timer: Timer, chains: int = 8) -> float:
    """TFLOPS of a register-only mma.sync m16n8k16 bf16 loop on every SM."""
    cuda = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    torch.cuda.init()
    module, func = ctypes.c_void_p(), ctypes.c_void_p()
    ptx = _mma_peak_ptx(chains).encode()
    for what, rc in (("cuModuleLoadData", cuda.cuModuleLoadData(ctypes.byref(module), ptx)),):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUresult {rc}")
    rc = cuda.cuModuleGetFunction(ctypes.byref(func), module, b"mma_peak")
    if rc != 0:
        raise RuntimeError(f"cuModuleGetFunction failed with CUresult {rc}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks, threads, iters = sms * 8, 256, 4096
    out = torch.empty(blocks * threads, dtype=torch.float32, device="cuda")
    ptr, n = ctypes.c_void_p(out.data_ptr()), ctypes.c_uint32(iters)
    args = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.byref(ptr), ctypes.c_void_p),
                                 ctypes.cast(ctypes.byref(n), ctypes.c_void_p))

    def launch() -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        err = cuda.cuLaunchKernel(func, blocks, 1, 1, threads, 1, 1, 0, stream, args, None)
        if err != 0:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {err}")

    us, _ = timer.time_us(launch)
    total = blocks * (threads // 32) * iters * chains * 16 * 8 * 16 * 2
    return total / us / 1e6


class Baselines(NamedTuple):
    """The device limits of one run (copy_bandwidth and mma_sync_peak)."""
    copy_gbps: float
    copy_best: Dict
    copy_all: List[Dict]
    peak_tflops: float

    def line(self, torch) -> str:
        """The printed device line: copy bandwidth (and its winner) and mma.sync peak."""
        return (f"{device_line(torch)}: copy {self.copy_gbps:.0f} GB/s (best: "
                f"{self.copy_best['dtype']}, {self.copy_best['bytes'] >> 20} MiB), mma.sync bf16 "
                f"peak {self.peak_tflops:.0f} TFLOPS")

    def payload(self, torch, rows: List[Dict], host: Dict) -> Dict:
        """The JSON the decode benchmarks save: device, baselines, rows and host time."""
        return {"device": device_line(torch), "copy_gbps": self.copy_gbps,
                "copy_best": self.copy_best, "copy_candidates": self.copy_all,
                "mma_sync_tflops": self.peak_tflops, "rows": rows, "host": host}


def baselines(torch, timer: Timer) -> Baselines:
    """Copy bandwidth, then the mma.sync peak, measured with `timer`."""
    copy_gbps, copy_best, copy_all = copy_bandwidth(torch, timer)
    return Baselines(copy_gbps, copy_best, copy_all, mma_sync_peak(torch, timer))


def add_timing_options(ap: argparse.ArgumentParser) -> None:
    """--warmup, --iters, --host-iters and --plot, which every decode benchmark takes."""
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--host-iters", type=int, default=300)
    ap.add_argument("--plot", type=Path, help="draw the PNG of an existing JSON and exit")


def median_us(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    """Median host microseconds of fn, synchronising every 64 calls to keep the queue short."""
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if len(samples) % 64 == 0:
            sync()
    return statistics.median(samples)


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------
def make_problem(torch, b: int, s_q: int, h_q: int, s_k: int):
    pages = -(-s_k // PAGE)
    q = (torch.randn(b, s_q, h_q, D_QK, device="cuda") / 10).clamp(-1, 1).to(torch.bfloat16)
    k_cache = (torch.randn(b * pages, PAGE, 1, D_QK, device="cuda") / 10).to(torch.bfloat16)
    block_table = torch.randperm(b * pages, device="cuda").to(torch.int32).view(b, pages)
    seqlens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
    return q, k_cache, block_table, seqlens


CTA_VARIABLE = "FLASH_MLA_DENSE_DECODE_WARPS"


def bench_shape(torch, flash_mla, timer: Timer, b: int, s_q: int, h_q: int, s_k: int,
                cta: str = "default") -> Dict:
    """Time one shape; cta "4", "8", "4x16" or "8x64" forces that CTA (through CTA_VARIABLE,
    restored afterwards), "default" leaves the library's choice."""
    q, k_cache, block_table, seqlens = make_problem(torch, b, s_q, h_q, s_k)
    meta = flash_mla.get_mla_metadata()[0]

    def call() -> None:
        flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, D_V, meta,
                                         causal=True)

    with forced_env(CTA_VARIABLE, cta) if cta != "default" else contextlib.nullcontext():
        us, how = timer.time_us(call)
    return {"b": b, "s_q": s_q, "h_q": h_q, "h_k": 1, "s_k": s_k, "cta": cta, "us": us,
            "timing": how, "tflops": flop(b, s_q, h_q, s_k) / us / 1e6,
            "gbps": nbytes(b, s_q, h_q, s_k) / us / 1e3,
            "parts": int(meta.tile_scheduler_metadata.shape[0])}


def host_time(torch, flash_mla, native, iters: int) -> Dict[str, float]:
    """Median host microseconds of one eager call (public API, after the first) and of the
    raw tvm-ffi dense_decode_fwd call on the same tiny problem."""
    q, k_cache, block_table, seqlens = make_problem(torch, 1, 1, 16, 64)
    meta = flash_mla.get_mla_metadata()[0]

    def api() -> None:
        flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, D_V, meta)

    api()
    torch.cuda.synchronize()
    fwd, _ = native.get("dense_decode_fwd")
    parts = meta.tile_scheduler_metadata.shape[0]
    o_acc = torch.empty(1 + parts, 16, 1, D_V, device="cuda")
    l_acc = torch.empty(1 + parts, 16, 1, device="cuda")
    out = torch.empty(1, 1, 16, D_V, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(1, 16, 1, device="cuda")

    def raw() -> None:
        fwd(q, k_cache, block_table, seqlens, meta.tile_scheduler_metadata, meta.num_splits,
            o_acc, l_acc, out, lse, D_QK ** -0.5, False)

    # The entry the API's repeat path calls where torch's allocator is installed: it
    # allocates out, lse and the partials itself (docs/dense_decode.md, "Host time").
    fwd_alloc, _ = native.get("dense_decode_fwd_alloc")

    def raw_alloc() -> None:
        fwd_alloc(q, k_cache, block_table, seqlens, meta.tile_scheduler_metadata,
                  meta.num_splits, D_QK ** -0.5, False, False)

    def allocations() -> None:  # what the API allocates per call beside the raw call
        torch.empty(out.shape, dtype=out.dtype, device="cuda")
        torch.empty(lse.shape, dtype=torch.float32, device="cuda")
        torch.empty(o_acc.shape, dtype=torch.float32, device="cuda")
        torch.empty(l_acc.shape, dtype=torch.float32, device="cuda")

    timed = [("api_us", api), ("raw_tvm_ffi_us", raw), ("allocations_us", allocations)]
    if fwd_alloc is not None:
        timed.append(("raw_alloc_tvm_ffi_us", raw_alloc))
    return {name: median_us(fn, iters, torch.cuda.synchronize) for name, fn in timed}


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"s_q{r['s_q']} h{r['h_q']} s_k{r['s_k']}"
              + ("" if r.get("cta", "default") == "default" else f" w{r['cta']}") for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    ax[0].bar(labels, [r["gbps"] / data["copy_gbps"] for r in rows])
    ax[0].set_title("GB/s / device copy bandwidth")
    ax[1].bar(labels, [r["tflops"] / data["mma_sync_tflops"] for r in rows])
    ax[1].set_title("TFLOPS / mma.sync peak")
    for a in ax:
        a.tick_params(axis="x", rotation=70, labelsize=7)
        a.axhline(1.0, color="grey", lw=0.5)
    fig.suptitle(f"dense MLA decode + combine, b=128, bf16, causal: {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lib", action="append", default=[])
    ap.add_argument("--quick", action="store_true", help="serving shapes and s_k 8192 only")
    ap.add_argument("--ab", action="store_true",
                    help=f"also time every shape with {CTA_VARIABLE}=4, =8, =4x16 and =8x64")
    ap.add_argument("--ctas", default=None,
                    help="comma-separated CTA values to time per shape instead (e.g. default,4,4x16)")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    if args.out is None:
        ap.error("--out is required (or --plot)")
    import torch

    import flash_mla

    native = load_native(args.lib)
    timer = Timer(torch, args.warmup, args.iters)
    base = baselines(torch, timer)
    copy_gbps, peak = base.copy_gbps, base.peak_tflops
    for c in base.copy_all:
        print(f"copy_ {c['dtype']:>7} {c['bytes'] >> 20:>5} MiB: {c['gbps']:.0f} GB/s")
    print(base.line(torch))
    shapes = SERVING + [s for s in UPSTREAM if not args.quick or s[3] == 8192]
    rows = []
    ctas = ("default", "4", "8", "4x16", "8x64") if args.ab else ("default",)
    if args.ctas:
        ctas = tuple(c for c in args.ctas.split(",") if c)
    print(f"{'b':>4} {'s_q':>3} {'h_q':>4} {'s_k':>6} {'cta':>7} {'us':>9} {'GB/s':>7} {'/copy':>6} "
          f"{'TFLOPS':>7} {'/mma':>6} parts")
    unavailable = set()
    for b, s_q, h_q, s_k in shapes:
        for cta in ctas:
            if cta in unavailable:
                continue
            try:
                row = bench_shape(torch, flash_mla, timer, b, s_q, h_q, s_k, cta)
            except ValueError as exc:  # a forced CTA this device cannot run: say so, go on
                if cta == "default" or CTA_VARIABLE not in str(exc):
                    raise
                print(f"cta {cta}: not run on this device ({exc})")
                unavailable.add(cta)
                continue
            rows.append(row)
            print(f"{b:>4} {s_q:>3} {h_q:>4} {s_k:>6} {cta:>7} {row['us']:>9.1f} "
                  f"{row['gbps']:>7.0f} {row['gbps'] / copy_gbps:>6.3f} {row['tflops']:>7.1f} "
                  f"{row['tflops'] / peak:>6.3f} {row['parts']}")
    host = host_time(torch, flash_mla, native, args.host_iters)
    alloc = host.get("raw_alloc_tvm_ffi_us")
    print(f"host time per eager call: API {host['api_us']:.1f} us, raw tvm-ffi "
          f"dense_decode_fwd {host['raw_tvm_ffi_us']:.1f} us with preallocated buffers"
          + (f", dense_decode_fwd_alloc {alloc:.1f} us" if alloc is not None else "")
          + f" (four torch.empty of those buffers: {host['allocations_us']:.1f} us)")
    save_results(args.out, "bench_dense_decode", base.payload(torch, rows, host), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
