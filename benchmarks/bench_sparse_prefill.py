"""Sparse MLA prefill benchmark (flash_mla_sparse_fwd): TFLOPS of this library's kernel
against an mma.sync peak measured in the same run, printed as ratios.

Shapes: the upstream FlashMLA ones (s_q = 4096, h_q = 128, d_qk 576 and 512, topk = 2048,
s_kv 8192 .. 65536) and the tensor-parallel serving head counts h_q 16, 32, 64 (s_q = 4096,
d_qk 576, topk 2048, s_kv 8192 and 65536). Each query's indices are topk distinct random
rows of kv, all valid. FLOP = 2 * sum(valid topk) * h_q * (d_qk + 512).

Baselines of the same run: the mma.sync m16n8k16 bf16 peak of bench_dense_decode (a
register-only loop, PTX JIT-loaded through the driver), the PyTorch reference
(FLASH_MLA_BACKEND=reference, eager) on the first shape of each d_qk, and, past 32 heads,
the 32-head row-block CTA (FLASH_MLA_SPARSE_PREFILL_CTA=rowblock: the kernel the library ran
before the wide CTA, and what sm_120 runs), printed as the default call's speedup over it.

Timing: the call (output allocation included) is captured in a CUDA graph and replayed
with the L2 flushed (bench_mha.Timer).

Usage: python benchmarks/bench_sparse_prefill.py --out DIR [--quick] [--no-reference]
       python benchmarks/bench_sparse_prefill.py --plot DIR/bench_sparse_prefill.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense_decode import mma_sync_peak  # noqa: E402
from bench_mha import Timer, device_line, forced_env, save_results  # noqa: E402

D_V, S_Q, TOPK = 512, 4096, 2048
# (h_q, d_qk, s_kv)
UPSTREAM = [(128, d, s_kv) for d in (576, 512) for s_kv in (8192, 16384, 32768, 65536)]
SERVING = [(h, 576, s_kv) for h in (16, 32, 64) for s_kv in (8192, 65536)]
QUICK = [(128, 576, 8192), (128, 576, 65536), (128, 512, 8192)] + [(h, 576, 8192) for h in (16, 32, 64)]


def flop(valid: int, h_q: int, d_qk: int) -> int:
    return 2 * valid * h_q * (d_qk + D_V)


def make_problem(torch, h_q: int, d_qk: int, s_kv: int) -> Tuple:
    q = (torch.randn(S_Q, h_q, d_qk, device="cuda") / 10).to(torch.bfloat16)
    kv = (torch.randn(s_kv, 1, d_qk, device="cuda") / 10).to(torch.bfloat16)
    indices = torch.rand(S_Q, s_kv, device="cuda").topk(TOPK, dim=1).indices
    return q, kv, indices.to(torch.int32).view(S_Q, 1, TOPK)


def bench_shape(torch, flash_mla, timer: Timer, h_q: int, d_qk: int, s_kv: int,
                reference: bool) -> Dict:
    q, kv, indices = make_problem(torch, h_q, d_qk, s_kv)
    scale = d_qk ** -0.5

    def call() -> None:
        flash_mla.flash_mla_sparse_fwd(q, kv, indices, scale, D_V)

    us, how = timer.time_us(call)
    valid = S_Q * TOPK
    row = {"s_q": S_Q, "h_q": h_q, "d_qk": d_qk, "s_kv": s_kv, "topk": TOPK, "us": us,
           "timing": how, "tflops": flop(valid, h_q, d_qk) / us / 1e6, "rowblock_us": None,
           "reference_us": None, "reference_tflops": None}
    if h_q > 32:
        with forced_env("FLASH_MLA_SPARSE_PREFILL_CTA", "rowblock"):
            row["rowblock_us"] = timer.time_us(call)[0]
    if reference:
        with forced_env("FLASH_MLA_BACKEND", "reference"):
            ref_us = Timer(torch, 1, 3)._median(call)
        row["reference_us"] = ref_us
        row["reference_tflops"] = flop(valid, h_q, d_qk) / ref_us / 1e6
    return row


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"h{r['h_q']} d{r['d_qk']} s_kv{r['s_kv']}" for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    x = list(range(len(rows)))
    # Past 32 heads the row block was timed too (rowblock_us): its bar stands beside.
    rowblock = [flop(r["s_q"] * r["topk"], r["h_q"], r["d_qk"]) / r["rowblock_us"] / 1e6
                if r.get("rowblock_us") else 0.0 for r in rows]
    for a, scale in ((ax[0], 1.0), (ax[1], 1.0 / data["mma_sync_tflops"])):
        a.bar([i - 0.2 for i in x], [r["tflops"] * scale for r in rows], width=0.4,
              label="default CTA")
        a.bar([i + 0.2 for i in x], [v * scale for v in rowblock], width=0.4,
              label="32-head row block")
        a.set_xticks(x)
        a.set_xticklabels(labels)
    ax[0].set_title("TFLOPS")
    ax[1].legend(fontsize=8, loc="upper right")
    ax[1].set_title("TFLOPS / mma.sync peak")
    for a in ax:
        a.tick_params(axis="x", rotation=70, labelsize=7)
    ax[1].axhline(1.0, color="grey", lw=0.5)
    fig.suptitle(f"sparse MLA prefill, s_q={S_Q}, topk={TOPK}, bf16: {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true",
                    help="h_q 128 at s_kv 8192 and 65536 (d_qk 576), 8192 (d_qk 512); h_q 16, 32, "
                         "64 at s_kv 8192")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--plot", type=Path, help="draw the PNG of an existing JSON and exit")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    if args.out is None:
        ap.error("--out is required (or --plot)")
    import torch

    import flash_mla

    os.environ.setdefault("FLASH_MLA_BACKEND", "native")  # a fallback must not be timed
    timer = Timer(torch, args.warmup, args.iters)
    peak = mma_sync_peak(torch, timer)
    print(f"{device_line(torch)}: mma.sync bf16 peak {peak:.0f} TFLOPS")
    shapes = QUICK if args.quick else UPSTREAM + SERVING
    rows = []
    referenced = set()
    print(f"{'h_q':>4} {'d_qk':>4} {'s_kv':>6} {'us':>10} {'TFLOPS':>7} {'/mma':>6} "
          f"{'rowblock us':>11} {'x':>5} {'ref us':>11} {'ref TFLOPS':>10}")
    for h_q, d_qk, s_kv in shapes:
        reference = not args.no_reference and d_qk not in referenced
        referenced.add(d_qk)
        row = bench_shape(torch, flash_mla, timer, h_q, d_qk, s_kv, reference)
        rows.append(row)
        ref = (f"{row['reference_us']:>11.0f} {row['reference_tflops']:>10.2f}"
               if row["reference_us"] is not None else f"{'-':>11} {'-':>10}")
        rb = (f"{row['rowblock_us']:>11.1f} {row['rowblock_us'] / row['us']:>5.2f}"
              if row["rowblock_us"] is not None else f"{'-':>11} {'-':>5}")
        print(f"{h_q:>4} {d_qk:>4} {s_kv:>6} {row['us']:>10.1f} {row['tflops']:>7.1f} "
              f"{row['tflops'] / peak:>6.3f} {rb} {ref}", flush=True)
        torch.cuda.empty_cache()
    payload = {"device": device_line(torch), "mma_sync_tflops": peak, "rows": rows}
    save_results(args.out, "bench_sparse_prefill", payload, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
