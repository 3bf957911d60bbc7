"""Sustained-load soak of the native sparse FP8 MLA decode: random problems for --seconds
(default 60): cache format, h_q 1..128, s_q, topk, page size, request lengths, an extra
pool, topk_length and sink drawn at random; alternating eager calls and CUDA-graph replays
(a call captured once per problem, on a fresh schedule holder, and replayed with new
indices and lengths copied into its input buffers).

Problems are the GPU tests' hostile ones (tests/sparse_decode_problems.py): shuffled pages,
NaN bytes in every token no index names, invalid index candidates in every row.

Checks: every --check-every calls the last result is compared with the float64 answer
(tests/sparse_decode_problems.exact, element rule TOLERANCES["sparse_decode"]); a fixed
sentinel problem is rerun and must reproduce its first result bit for bit (no drift, no
state corrupted between calls). A watchdog exits the process with status 3 when no call
completes for --hang-seconds; any error or failed check exits with status 1. Prints one
line per check and a final summary.

Usage: python benchmarks/soak_sparse_decode.py [--seconds 60] [--seed 0]
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/sparse_decode_problems
from _soak_common import (Watchdog, check_sentinel, progress_line, soak_calls,  # noqa: E402
                          soak_parser)

FORMAT_NAMES = ("V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4")
D_QK = {"V32": 576, "V32_NO_ROPE": 512, "V4": 512, "V41": 512, "V41_FP4": 512}
HEADS = (1, 3, 8, 16, 32, 63, 64, 100, 128)
TOPKS = (1, 7, 64, 200, 576, 2048)
PAGES = (1, 2, 61, 64, 69, 576)
# Tokens of one pool's requests together, to bound the cache and the check's memory.
MAX_TOKENS = 400_000


class PoolDraw(NamedTuple):
    kv_format: str
    seqlens: Tuple[int, ...]
    topk: int
    page_size: int
    lengths: bool


class SoakCase(NamedTuple):
    s_q: int
    h_q: int
    main: PoolDraw
    extra: Optional[PoolDraw]
    sink: bool
    graph: bool

    @property
    def label(self) -> str:
        extra = "" if self.extra is None else f"+{self.extra.kv_format}"
        return (f"{self.main.kv_format}{extra} b={len(self.main.seqlens)} s_q={self.s_q} "
                f"h_q={self.h_q} topk={self.main.topk} page={self.main.page_size} "
                f"graph={self.graph}")


def _pool(rng: random.Random, kv_format: str, b: int, lengths: bool) -> PoolDraw:
    topk = rng.choice(TOPKS)
    longest = min(rng.choice([topk // 2 + 1, topk, 2 * topk, 8192]), MAX_TOKENS // b)
    seqlens = tuple(0 if rng.random() < 0.1 else rng.randint(1, max(1, longest)) for _ in range(b))
    return PoolDraw(kv_format, seqlens, topk, rng.choice(PAGES), lengths)


def random_case(rng: random.Random, max_b: int) -> SoakCase:
    """A random problem description (no tensors): the extra pool, when drawn, has a format
    of the main one's d_qk (V41 pairs with V41_FP4 half of the time, as upstream's)."""
    b = rng.randint(1, max_b)
    fmt = rng.choice(FORMAT_NAMES)
    lengths = rng.random() < 0.5
    main = _pool(rng, fmt, b, lengths)
    extra = None
    if rng.random() < 0.4:
        same_d = [f for f in FORMAT_NAMES if D_QK[f] == D_QK[fmt]]
        extra_fmt = "V41_FP4" if fmt == "V41" and rng.random() < 0.5 else rng.choice(same_d)
        extra = _pool(rng, extra_fmt, b, lengths)
    return SoakCase(s_q=rng.choice([1, 1, 2, 3]), h_q=rng.choice(HEADS), main=main, extra=extra,
                    sink=rng.random() < 0.5, graph=rng.random() < 0.5)


def build(case: SoakCase, seed: int):
    """The case's hostile problem on the GPU. Graph cases keep clean tokens past topk_length
    (their replays reshuffle the rows); eager ones name NaN tokens there."""
    from tests.sparse_decode_problems import PoolSpec, make_problem

    def spec(d: Optional[PoolDraw]):
        return None if d is None else PoolSpec(d.kv_format, d.seqlens, d.topk, d.page_size,
                                               True if d.lengths else None)

    return make_problem(spec(case.main), case.s_q, case.h_q, seed=seed, extra=spec(case.extra),
                        sink=case.sink, poison_past_length=not case.graph)


def summary(ok: bool, calls: int, graphs: int, checks: int, seconds: float,
            formats: Dict[str, int], error: str = "") -> str:
    seen = ", ".join(f"{name} {formats.get(name, 0)}" for name in FORMAT_NAMES)
    if not ok:
        return f"FAIL after {calls} calls ({graphs} graph replays), {checks} checks: {error}"
    return (f"PASS: {calls} calls ({graphs} graph replays) in {seconds:.0f} s, {checks} checks, "
            f"problems per main format: {seen}; no hang, no drift")


def _check(p, out, lse, label: str) -> None:
    from flash_mla.testing import check_op_close
    from tests.sparse_decode_problems import exact

    e_out, e_lse = exact(p)
    check_op_close("sparse_decode", "out", out, e_out, name=f"{label} out")
    check_op_close("sparse_decode", "lse", lse.transpose(1, 2), e_lse, name=f"{label} lse")


def main(argv: Optional[List[str]] = None) -> int:
    args = soak_parser(__doc__.split("\n")[0], max_b=32).parse_args(argv)
    os.environ["FLASH_MLA_BACKEND"] = "native"
    import torch

    if not torch.cuda.is_available():
        print("soak_sparse_decode: no CUDA device visible; nothing to soak", file=sys.stderr)
        return 2
    import flash_mla
    from tests.sparse_decode_problems import reshuffled, run

    dog = Watchdog(args.hang_seconds)
    rng = random.Random(args.seed)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    sentinel = build(random_case(random.Random(12345), 8)._replace(graph=False), seed=1)
    sentinel_ref = [t.clone() for t in run(sentinel)]
    torch.cuda.synchronize()

    calls = graphs = checks = 0
    formats: Dict[str, int] = {}
    start = time.monotonic()
    try:
        while time.monotonic() - start < args.seconds:
            case = random_case(rng, args.max_b)
            p = build(case, seed=rng.randrange(1 << 30))
            formats[case.main.kv_format] = formats.get(case.main.kv_format, 0) + 1

            def refill() -> None:  # reshuffled indices and lengths for the next replay
                for pool in p.pools:
                    new_idx, new_len = reshuffled(pool, gen)
                    pool.indices.copy_(new_idx)
                    if new_len is not None:
                        pool.topk_length.copy_(new_len)

            for out, lse, replayed in soak_calls(torch, flash_mla, rng, case.graph,
                                                 lambda meta: run(p, meta=meta), refill):
                calls += 1
                graphs += replayed
            dog.beat(f"call {calls}: {case.label}")
            if calls // args.check_every > checks:
                checks += 1
                _check(p, out, lse, f"check {checks} ({case.label})")
                check_sentinel(torch, run(sentinel), sentinel_ref, checks)
                print(progress_line(time.monotonic() - start, calls, graphs, checks, case.label),
                      flush=True)
    except Exception as err:  # any failure ends the soak with status 1
        print(summary(False, calls, graphs, checks, time.monotonic() - start, formats,
                      f"{type(err).__name__}: {err}"), flush=True)
        return 1
    print(summary(True, calls, graphs, checks, time.monotonic() - start, formats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
