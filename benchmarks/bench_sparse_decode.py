"""Sparse FP8 MLA decode benchmark (flash_mla_with_kvcache with indices): this library's
decode + combine against the device's own limits, measured in the same run and printed as
ratios.

Shapes (topk = 2048, page size 64, the main pool only):
- upstream FlashMLA's: h_q = 128, s_q = 2, b in {64, 128}, formats V32 (d_qk 576), V4 and
  V41 (d_qk 512). Compute-bound: TFLOPS = 2 h_q b s_q topk (d_qk + 512) / t, judged
  against an mma.sync bf16 peak.
- serving (tensor-parallel head counts): h_q in {8, 16, 32}, s_q = 1, b = 128, every
  format. Bandwidth-bound: GB/s = (unique tokens touched x bytes per token + q bytes + out
  bytes) / t, judged against the device copy bandwidth.
Indices: for each query, topk distinct tokens of its request's own 8192-token region (the
region's 128 pages scattered over the cache by a random page table), all valid; the cache
is randn/10 quantised with flash_mla.quant.quantize_kv.

Baselines of the same run (bench_dense_decode): the best torch copy_ bandwidth (read +
write) and the register-only mma.sync m16n8k16 bf16 peak. Timing: the first call computes
the schedule; the call is then captured in a CUDA graph and replayed with the L2 flushed
(bench_mha.Timer). Host time: one eager call after the first on a tiny problem through the
API, and the raw tvm-ffi sparse_decode_fwd call with the arguments the API passed it (both
without synchronisation, median of --host-iters).

Usage: python benchmarks/bench_sparse_decode.py --out DIR [--quick] [--heads 16,32]
       python benchmarks/bench_sparse_decode.py --plot DIR/bench_sparse_decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense_decode import add_timing_options, baselines, median_us  # noqa: E402
from bench_mha import Timer, save_results  # noqa: E402

D_V, TOPK, PAGE, REGION = 512, 2048, 64, 8192
FORMAT_NAMES = ("V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4")
# (bytes per token, d_qk) of each format, as flash_mla.quant.FORMATS has them (the pure
# parts of this script run without torch).
FORMATS = {"V32": (656, 576), "V32_NO_ROPE": (528, 512), "V4": (584, 512), "V41": (528, 512),
           "V41_FP4": (288, 512)}
# The entry an eager call reaches: the allocating one where torch's allocator is installed
# for the call (flash_mla._native.env_allocator_available), else the one taking buffers.
NATIVE_ENTRY = "sparse_decode_fwd"
NATIVE_ENTRY_ALLOC = "sparse_decode_fwd_alloc"


class Shape(NamedTuple):
    kind: str        # "upstream" (judged by TFLOPS) or "serving" (judged by GB/s)
    kv_format: str
    b: int
    s_q: int
    h_q: int

    @property
    def label(self) -> str:
        return f"{self.kv_format} b{self.b} s_q{self.s_q} h{self.h_q}"


UPSTREAM = [Shape("upstream", fmt, b, 2, 128) for fmt in ("V32", "V4", "V41") for b in (64, 128)]
SERVING = [Shape("serving", fmt, 128, 1, h) for h in (8, 16, 32) for fmt in FORMAT_NAMES]
QUICK = ([s for s in UPSTREAM if s.b == 64 and s.kv_format in ("V32", "V41")]
         + [s for s in SERVING if s.h_q == 16])


def shapes(quick: bool, heads: Optional[List[int]] = None) -> List[Shape]:
    """The shapes to time: QUICK or all, only those of the given head counts if any."""
    chosen = QUICK if quick else UPSTREAM + SERVING
    return [s for s in chosen if heads is None or s.h_q in heads]


def flop(b: int, s_q: int, h_q: int, topk: int, d_qk: int) -> int:
    return 2 * h_q * b * s_q * topk * (d_qk + D_V)


def nbytes(unique_tokens: int, kv_format: str, b: int, s_q: int, h_q: int) -> int:
    """Bytes a call must move at least: every token it touches once, q read, out written."""
    bpt, d_qk = FORMATS[kv_format]
    return unique_tokens * bpt + b * s_q * h_q * (d_qk + D_V) * 2


def judged_ratio(row: Dict, copy_gbps: float, peak_tflops: float) -> float:
    """The ratio a row is judged by: TFLOPS / peak (upstream) or GB/s / copy (serving)."""
    if row["kind"] == "upstream":
        return row["tflops"] / peak_tflops
    return row["gbps"] / copy_gbps


HEADER = (f"{'kind':>8} {'format':>11} {'b':>4} {'s_q':>3} {'h_q':>4} {'us':>9} {'GB/s':>7} "
          f"{'/copy':>6} {'TFLOPS':>7} {'/mma':>6} {'parts':>5} {'unique':>8}")


def format_row(row: Dict, copy_gbps: float, peak_tflops: float) -> str:
    """One printed line; the ratio the shape is judged by is marked with '*'."""
    mark_bw = "*" if row["kind"] == "serving" else " "
    mark_fl = "*" if row["kind"] == "upstream" else " "
    parts = "-" if row.get("parts") is None else str(row["parts"])
    return (f"{row['kind']:>8} {row['kv_format']:>11} {row['b']:>4} {row['s_q']:>3} "
            f"{row['h_q']:>4} {row['us']:>9.1f} {row['gbps']:>7.0f} "
            f"{row['gbps'] / copy_gbps:>5.3f}{mark_bw} {row['tflops']:>7.1f} "
            f"{row['tflops'] / peak_tflops:>5.3f}{mark_fl} {parts:>5} {row['unique_tokens']:>8}")


# ---------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------
def region_indices(torch, b: int, s_q: int, topk: int, region: int, page: int, gen,
                   device) -> Tuple[Any, Any]:
    """(int32 indices [b, s_q, topk], int64 page table [b, region / page]): request r owns
    logical tokens [0, region) of its own, whose pages are scattered over the cache's
    b * region / page pages by a random permutation; each query names topk distinct ones."""
    if region % page or topk > region:
        raise ValueError(f"region must be a multiple of page and >= topk, got region={region} "
                         f"page={page} topk={topk}")
    pages = region // page
    table = torch.randperm(b * pages, generator=gen, device=device).view(b, pages)
    pos = torch.rand(b, s_q, region, generator=gen, device=device).argsort(dim=-1)[..., :topk]
    physical = table.gather(1, (pos // page).reshape(b, -1)).reshape(b, s_q, topk)
    return (physical * page + pos % page).to(torch.int32), table


def make_problem(torch, quant, shape: Shape, seed: int = 0):
    """q [b, s_q, h_q, d_qk] bf16 (randn/10 clamped to [-1, 1]), the quantised cache of
    b regions and the indices."""
    bpt, d_qk = FORMATS[shape.kv_format]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    indices, _ = region_indices(torch, shape.b, shape.s_q, TOPK, REGION, PAGE, gen, "cuda")
    blocks = shape.b * REGION // PAGE
    kv = torch.randn(blocks, PAGE, 1, d_qk, generator=gen, device="cuda", dtype=torch.bfloat16) / 10
    k_cache = quant.quantize_kv(kv, shape.kv_format)
    del kv
    assert k_cache.shape[-1] == bpt, (shape, k_cache.shape)
    q = (torch.randn(shape.b, shape.s_q, shape.h_q, d_qk, generator=gen, device="cuda") / 10
         ).clamp(-1, 1).to(torch.bfloat16)
    return q, k_cache, indices


def _call(flash_mla, q, k_cache, indices, kv_format: str, meta) -> Callable[[], Any]:
    def call():
        return flash_mla.flash_mla_with_kvcache(q, k_cache, None, None, D_V, meta, indices=indices,
                                                kv_format=kv_format)
    return call


def bench_shape(torch, flash_mla, timer: Timer, shape: Shape) -> Dict:
    from flash_mla import quant

    q, k_cache, indices = make_problem(torch, quant, shape)
    unique = int(torch.unique(indices).numel())
    meta = flash_mla.get_mla_metadata()[0]
    us, how = timer.time_us(_call(flash_mla, q, k_cache, indices, shape.kv_format, meta))
    d_qk = FORMATS[shape.kv_format][1]
    parts = meta.tile_scheduler_metadata
    return {**shape._asdict(), "topk": TOPK, "d_qk": d_qk, "page": PAGE, "region": REGION,
            "us": us, "timing": how, "unique_tokens": unique,
            "tflops": flop(shape.b, shape.s_q, shape.h_q, TOPK, d_qk) / us / 1e6,
            "gbps": nbytes(unique, shape.kv_format, shape.b, shape.s_q, shape.h_q) / us / 1e3,
            "parts": None if parts is None else int(parts.shape[0])}


# ---------------------------------------------------------------------------
# host time
# ---------------------------------------------------------------------------
def record_call(native, name: str, call: Callable[[], Any]
                ) -> Tuple[Optional[Callable], Optional[tuple], str]:
    """(the native function ``name``, the arguments ``call`` passed it, "") by watching
    ``native.function`` (flash_mla._native's lookup, which the families call at each launch)
    during one call; (None, None, reason) when the library lacks it or the call never asked
    for it."""
    try:
        fn = native.function(name)
    except Exception as err:  # the library is missing or predates the entry
        return None, None, f"native function {name!r} unavailable: {err}"
    seen: List[tuple] = []
    original = native.function

    def watching(requested: str):
        found = original(requested)
        if requested != name:
            return found

        def recorder(*args):
            seen.append(args)
            return found(*args)
        return recorder

    native.function = watching
    try:
        call()
    finally:
        native.function = original
    if not seen:
        return None, None, f"the API call did not reach {name!r} through flash_mla._native.function"
    return fn, seen[-1], ""


def host_time(torch, flash_mla, iters: int) -> Dict[str, Any]:
    """Median host microseconds of one eager API call (after the first: the holder's repeat
    path) and of the raw tvm-ffi call the API makes (recorded during a fresh holder's first
    call, whose arguments the repeat path passes too), on a tiny problem (b 1, s_q 1, h_q 16,
    topk 64, V32)."""
    from flash_mla import _native, quant

    q = (torch.randn(1, 1, 16, 576, device="cuda") / 10).to(torch.bfloat16)
    kv = torch.randn(4, PAGE, 1, 576, device="cuda") / 10
    k_cache = quant.quantize_kv(kv, "V32")
    indices = torch.randperm(4 * PAGE, device="cuda")[:64].to(torch.int32).view(1, 1, 64)
    api = _call(flash_mla, q, k_cache, indices, "V32", flash_mla.get_mla_metadata()[0])
    api()
    torch.cuda.synchronize()
    result: Dict[str, Any] = {"api_us": median_us(api, iters, torch.cuda.synchronize)}
    entry = NATIVE_ENTRY_ALLOC if _native.env_allocator_available(q) else NATIVE_ENTRY
    fresh = _call(flash_mla, q, k_cache, indices, "V32", flash_mla.get_mla_metadata()[0])
    fn, args, why = record_call(_native, entry, fresh)
    torch.cuda.synchronize()
    result["raw_entry"] = entry
    if fn is None:
        result["raw_tvm_ffi_us"], result["raw_note"] = None, why
    else:
        result["raw_tvm_ffi_us"] = median_us(lambda: fn(*args), iters, torch.cuda.synchronize)
    return result


def host_line(host: Dict[str, Any]) -> str:
    raw = (f"{host['raw_tvm_ffi_us']:.1f} us" if host.get("raw_tvm_ffi_us") is not None
           else f"n/a ({host.get('raw_note', 'not measured')})")
    entry = f" ({host['raw_entry']})" if host.get("raw_entry") else ""
    return f"host time per eager call: API {host['api_us']:.1f} us, raw tvm-ffi{entry} {raw}"


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------
def plot_series(data: Dict) -> Dict[str, Tuple[List[str], List[float]]]:
    """Per kind, the bar labels and the judged ratios (upstream: TFLOPS / mma.sync peak,
    serving: GB/s / copy bandwidth)."""
    series: Dict[str, Tuple[List[str], List[float]]] = {"upstream": ([], []), "serving": ([], [])}
    for row in data["rows"]:
        labels, ratios = series[row["kind"]]
        labels.append(Shape(row["kind"], row["kv_format"], row["b"], row["s_q"], row["h_q"]).label)
        ratios.append(judged_ratio(row, data["copy_gbps"], data["mma_sync_tflops"]))
    return series


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    series = plot_series(data)
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for a, (kind, title) in zip(ax, (("upstream", "upstream shapes: TFLOPS / mma.sync peak"),
                                     ("serving", "serving shapes: GB/s / device copy"))):
        labels, ratios = series[kind]
        a.bar(labels, ratios)
        a.set_title(title)
        a.tick_params(axis="x", rotation=70, labelsize=7)
        a.axhline(1.0, color="grey", lw=0.5)
    fig.suptitle(f"sparse FP8 MLA decode + combine, topk={TOPK}: {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder for bench_sparse_decode.json and .png")
    ap.add_argument("--quick", action="store_true",
                    help="upstream b=64 for V32 and V41, serving h_q=16 for every format")
    ap.add_argument("--heads", type=lambda v: [int(h) for h in v.split(",")],
                    help="only the shapes of these head counts, e.g. 32 or 16,32 (A/B runs)")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    if args.plot is None and args.out is None:
        ap.error("--out is required (or --plot)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_sparse_decode: no CUDA device visible; nothing to measure", file=sys.stderr)
        return 2
    os.environ.setdefault("FLASH_MLA_BACKEND", "native")  # a fallback must not be timed
    import flash_mla

    timer = Timer(torch, args.warmup, args.iters)
    base = baselines(torch, timer)
    copy_gbps, peak = base.copy_gbps, base.peak_tflops
    print(base.line(torch), flush=True)
    print("judged by: upstream shapes TFLOPS / mma.sync peak, serving shapes GB/s / copy "
          "(marked *)")
    print(HEADER, flush=True)
    rows = []
    for shape in shapes(args.quick, args.heads):
        row = bench_shape(torch, flash_mla, timer, shape)
        rows.append(row)
        print(format_row(row, copy_gbps, peak), flush=True)
        torch.cuda.empty_cache()
    host = host_time(torch, flash_mla, args.host_iters)
    print(host_line(host), flush=True)
    save_results(args.out, "bench_sparse_decode", base.payload(torch, rows, host), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
