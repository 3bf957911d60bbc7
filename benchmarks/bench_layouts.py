"""Dense MHA prefill CTA layouts on this GPU: each forward and backward layout forced in
turn, with the default choice timed beside them, so one run shows whether the
dispatch picks the fastest layout here (run it on an RTX 50xx to check sm_120's).

Layouts (docs/mha_fwd.md, docs/mha_bwd.md): forward 8 warps (sm_120's at d >= 128),
4 warps (d <= 128), 4x32; backward 8 warps, 4 warps (d <= 128), 8x128 (8 warps over
128 keys, d <= 128) and "det", the deterministic backward
(flash_attn_varlen_func(deterministic=True): the 8-warp CTA adding dq in key-block
order). A layout the GPU cannot run (the 4-warp backward where two CTAs do not fit an
SM, the 8x128 one where a block cannot have 164864 B at d = 128) is n/a with the
library's reason.

Shapes: b = 2, bf16, seqlen 4096 and 8192 (--quick: 4096), (h_q, h_k) in
{(128, 128), (32, 4)}, causal and not, for each --dims head dim (d_v = 128 at
d_qk = 192, else d_v = d_qk). FLOP and timing as bench_mha.py (kernels only,
CUDA-graph replays, L2 flushed, median).

Usage: python benchmarks/bench_layouts.py --out DIR [--dims 64 128 192] [--quick]
       python benchmarks/bench_layouts.py --plot DIR/bench_layouts.json   (PNG only)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mha import (BATCH, SHAPES_HEADS, SHAPES_SEQLEN, Native, Timer, device_line,  # noqa: E402
                       fmt, forced_env, load_native, pairs_count, save_results)

FWD_VARIABLE, BWD_VARIABLE = "FLASH_MLA_DENSE_FWD_WARPS", "FLASH_MLA_DENSE_BWD_WARPS"
BASE = "8"  # every ratio is against the 8-warp CTA, which runs everywhere


def layouts(pass_: str, d_qk: int) -> List[str]:
    """The forced layouts of a pass at d_qk, "default" (nothing forced) first."""
    if pass_ == "fwd":
        return ["default", "8", "4", "4x32"] if d_qk <= 128 else ["default", "8", "4x32"]
    return ["default", "8", "4", "8x128", "det"] if d_qk <= 128 else ["default", "8", "det"]


def time_layout(timer: Timer, variable: str, layout: str, call) -> Dict:
    """Median microseconds of call with `variable` forcing `layout`, or the reason it
    cannot run here."""
    try:
        with forced_env(variable, None if layout == "default" else layout):
            us, how = timer.time_us(call)
        return {"us": us, "timing": how}
    except Exception as err:  # e.g. the 4-warp backward where two CTAs do not fit an SM
        lines = str(err).strip().splitlines()
        return {"us": None, "note": (lines[-1] if lines else type(err).__name__)[:200]}


def bench_shape(torch, native: Native, timer: Timer, s: int, h_q: int, h_k: int, d_qk: int,
                causal: bool) -> Dict:
    d_v = 128 if d_qk == 192 else d_qk
    dtype, b, scale = torch.bfloat16, BATCH, d_qk ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b * s, h_q, d_qk, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b * s, h_k, d_qk, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b * s, h_k, d_v, device="cuda", dtype=dtype, generator=gen)
    dout = torch.randn(b * s, h_q, d_v, device="cuda", dtype=dtype, generator=gen)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    out = torch.empty(b * s, h_q, d_v, device="cuda", dtype=dtype)
    lse = torch.empty(h_q, b * s, device="cuda", dtype=torch.float32).T
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pairs = b * pairs_count(s, causal)
    row = {"seqlen": s, "batch": b, "h_q": h_q, "h_k": h_k, "d_qk": d_qk, "d_v": d_v,
           "causal": causal,
           "flop": {"fwd": pairs * h_q * 2 * (d_qk + d_v),
                    "bwd": pairs * h_q * 2 * (3 * d_qk + 2 * d_v)},
           "fwd": {}, "bwd": {}}
    mask = 1 if causal else 0
    fwd, why_fwd = native.get("dense_prefill_fwd")
    bwd, why_bwd = native.get("dense_prefill_bwd")
    if fwd is None or bwd is None:
        raise RuntimeError(why_fwd if fwd is None else why_bwd)
    ws_f, _ = native.get("dense_prefill_fwd_workspace_bytes")
    ws_b, _ = native.get("dense_prefill_bwd_workspace_bytes")
    wsf = torch.empty(max(ws_f(b, b * s, b * s, h_q, h_k, d_qk, d_v), 1), dtype=torch.uint8,
                      device="cuda")
    wsb = torch.empty(max(ws_b(b, b * s, b * s, h_q, h_k, d_qk, d_v), 1), dtype=torch.uint8,
                      device="cuda")
    call_fwd = lambda: fwd(wsf, q, k, v, cu, cu, out, lse, mask, scale, s, s, True)
    for layout in layouts("fwd", d_qk):
        row["fwd"][layout] = time_layout(timer, FWD_VARIABLE, layout, call_fwd)
    call_fwd()  # out and lse for the backward, from the default layout
    bwd_det, why_det = native.get("dense_prefill_bwd_deterministic")

    def call_with(fn):
        return lambda: fn(wsb, dout, q, k, v, out, lse, cu, cu, dq, dk, dv, mask, scale, s, s, True)

    for layout in layouts("bwd", d_qk):
        if layout != "det":
            row["bwd"][layout] = time_layout(timer, BWD_VARIABLE, layout, call_with(bwd))
        elif bwd_det is None:
            row["bwd"][layout] = {"us": None, "note": why_det}
        else:
            row["bwd"][layout] = time_layout(timer, BWD_VARIABLE, "default", call_with(bwd_det))
    return row


def tflops(row: Dict, pass_: str, layout: str) -> Optional[float]:
    us = row[pass_].get(layout, {}).get("us")
    return row["flop"][pass_] / (us * 1e-6) / 1e12 if us else None


def print_row(row: Dict) -> None:
    shape = (f"s={row['seqlen']:5d} h={row['h_q']:3d}/{row['h_k']:<3d} d={row['d_qk']}/{row['d_v']} "
             f"{'causal' if row['causal'] else 'full  '}")
    for pass_ in ("fwd", "bwd"):
        cells = " | ".join(f"{layout} {fmt(tflops(row, pass_, layout), '6.1f')}"
                           for layout in row[pass_])
        print(f"{shape} {pass_} TFLOPS | {cells}", flush=True)
        for layout, result in row[pass_].items():
            if result.get("note"):
                print(f"    note {pass_} {layout}: {result['note']}", flush=True)


def geomeans(rows: List[Dict]) -> Dict[str, Dict[str, float]]:
    """Per (pass, d_qk): geomean over the shapes where both ran of each layout's speed
    against the 8-warp CTA (> 1: faster than it)."""
    result: Dict[str, Dict[str, float]] = {}
    for pass_ in ("fwd", "bwd"):
        for d_qk in sorted({r["d_qk"] for r in rows}):
            for layout in layouts(pass_, d_qk):
                ratios = []
                for r in rows:
                    if r["d_qk"] != d_qk:
                        continue
                    mine, base = tflops(r, pass_, layout), tflops(r, pass_, BASE)
                    if mine and base:
                        ratios.append(mine / base)
                if ratios:
                    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                    result.setdefault(f"{pass_} d{d_qk}", {})[layout] = round(gm, 4)
    return result


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    groups = data["geomean"]
    fig, ax = plt.subplots(figsize=(10, 5))
    names = ["default", "8", "4", "4x32", "det"]
    width = 0.16
    for i, name in enumerate(names):
        xs = [j + (i - 2) * width for j in range(len(groups))]
        ax.bar(xs, [groups[g].get(name, 0.0) for g in groups], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_ylabel("speed against the 8-warp CTA (geomean)")
    ax.legend(title="layout")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"dense MHA prefill CTA layouts, bf16, b={BATCH} - {data.get('device', '?')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for bench_layouts.json and .png")
    parser.add_argument("--lib", action="append", default=[],
                        help="native library to load (repeatable); else FLASH_MLA_LIBRARY_PATH")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 192],
                        choices=[64, 128, 192], help="d_qk values (d_v = 128 at 192)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="seqlen 4096 only")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from an existing JSON")
    args = parser.parse_args(argv)

    if args.plot is not None:
        plot(args.plot, args.plot.with_suffix(".png"))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    import torch

    if not torch.cuda.is_available():
        print("bench_layouts: no CUDA device visible; nothing to measure", file=sys.stderr)
        return 2
    for variable in (FWD_VARIABLE, BWD_VARIABLE):
        if os.environ.get(variable):
            print(f"bench_layouts: unset {variable}; this script forces each layout itself",
                  file=sys.stderr)
            return 2
    native = load_native(args.lib)
    timer = Timer(torch, args.warmup, args.iters)
    device = device_line(torch)
    print(f"device: {device}")
    print("TFLOPS per layout (median of CUDA-graph replays, L2 flushed); default = the "
          "library's own choice", flush=True)

    rows = []
    seqlens = SHAPES_SEQLEN[:1] if args.quick else SHAPES_SEQLEN
    shapes = [(d, s, hq, hk, c) for d in args.dims for s in seqlens for hq, hk in SHAPES_HEADS
              for c in (False, True)]
    for i, (d_qk, s, h_q, h_k, causal) in enumerate(shapes):
        print(f"[{i + 1}/{len(shapes)}]", end=" ")
        row = bench_shape(torch, native, timer, s, h_q, h_k, d_qk, causal)
        rows.append(row)
        print_row(row)
        torch.cuda.empty_cache()

    gm = geomeans(rows)
    print("geomean speed against the 8-warp CTA (> 1: faster):")
    for group, values in gm.items():
        print(f"  {group}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    save_results(args.out, "bench_layouts", {"device": device, "rows": rows, "geomean": gm}, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
