"""Sustained-load soak of the native dense MLA decode: random shapes for --seconds
(default 60), alternating eager calls and CUDA-graph replays (a step captured once per
shape and replayed with new cache_seqlens), checked at intervals.

Checks: every --check-every calls the last result is compared with float64 math
(flash_mla.oracle, element rule TOLERANCES["dense_decode"]); a fixed sentinel problem is
rerun every --check-every calls and must reproduce its first result bit for bit (no drift,
no corruption of state between calls). A watchdog thread exits the process with status 3
when no call completes for --hang-seconds (a livelock or hang); any error or failed check
exits with status 1. Prints one summary line per check and a final count.

Usage: python benchmarks/soak_dense_decode.py [--seconds 60] [--seed 0]
"""
from __future__ import annotations

import os
import random
import sys
import time
import types
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _soak_common import (Watchdog, check_sentinel, progress_line, soak_calls,  # noqa: E402
                          soak_parser)

D_QK, D_V, PAGE = 576, 512, 64
HEADS = [(1, 1), (3, 1), (9, 3), (16, 1), (32, 2), (63, 3), (64, 1), (64, 8), (126, 2), (128, 1)]


def make(torch, rng: random.Random, gen, max_b: int):
    """A random problem built on the GPU: q, a cache whose pages are shuffled, with NaN in
    two unreferenced blocks and huge values in an extra block_table column, lengths with
    some zeros (at most 400k tokens in all), causal or not."""
    b = rng.randint(1, max_b)
    s_q = rng.choice([1, 1, 2, 4])
    h_q, h_k = rng.choice(HEADS)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    max_len = min(rng.choice([64, 700, 5000, 20000]), 400_000 // b)
    seqlens = [0 if rng.random() < 0.1 else rng.randint(1, max_len) for _ in range(b)]
    pages = -(-max_len // PAGE)
    k_cache = (torch.randn(b * pages + 2, PAGE, h_k, D_QK, device="cuda", generator=gen) / 10
               ).to(dtype)
    k_cache[-2:] = float("nan")
    table = torch.randperm(b * pages, device="cuda", generator=gen).to(torch.int32).view(b, pages)
    huge = torch.full((b, 1), 2 ** 31 - 1, dtype=torch.int32, device="cuda")
    cache = types.SimpleNamespace(k_cache=k_cache, block_table=torch.cat([table, huge], 1),
                                  max_len=max_len)
    q = (torch.randn(b, s_q, h_q, D_QK, device="cuda", generator=gen) / 10).clamp(-1, 1).to(dtype)
    seqlens_dev = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    return q, cache, seqlens_dev, rng.random() < 0.5


def check(torch, flash_mla, q, cache, seqlens_dev, causal, out, lse, label: str) -> None:
    from flash_mla import oracle
    from flash_mla.testing import check_op_close

    exact_out, exact_lse = oracle.dense_decode(q, cache.k_cache, cache.block_table,
                                               seqlens_dev.tolist(), D_V, D_QK ** -0.5, causal)
    check_op_close("dense_decode", "out", out, exact_out, name=f"{label} out")
    check_op_close("dense_decode", "lse", lse, exact_lse, name=f"{label} lse")


def main(argv: Optional[list] = None) -> int:
    args = soak_parser(__doc__.split("\n")[0], max_b=64).parse_args(argv)
    os.environ["FLASH_MLA_BACKEND"] = "native"
    import torch

    import flash_mla

    dog = Watchdog(args.hang_seconds)
    rng = random.Random(args.seed)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)

    def decode(q, cache, seqlens_dev, causal, meta=None):
        meta = meta or flash_mla.get_mla_metadata()[0]
        return flash_mla.flash_mla_with_kvcache(q, cache.k_cache, cache.block_table, seqlens_dev,
                                                D_V, meta, causal=causal)

    sentinel = make(torch, random.Random(12345), torch.Generator(device="cuda").manual_seed(1), 8)
    sentinel_ref = [t.clone() for t in decode(*sentinel)]
    torch.cuda.synchronize()

    calls = graphs = checks = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < args.seconds:
            problem = make(torch, rng, gen, args.max_b)
            q, cache, seqlens_dev, causal = problem
            use_graph = rng.random() < 0.5

            def refill() -> None:  # new lengths for the next replay
                new = [rng.randint(0, cache.max_len) for _ in range(q.shape[0])]
                seqlens_dev.copy_(torch.tensor(new, dtype=torch.int32))

            for out, lse, replayed in soak_calls(
                    torch, flash_mla, rng, use_graph,
                    lambda meta: decode(q, cache, seqlens_dev, causal, meta), refill):
                calls += 1
                graphs += replayed
            dog.beat(f"call {calls}: b={q.shape[0]} s_q={q.shape[1]} h_q={q.shape[2]} "
                     f"h_k={cache.k_cache.shape[2]} graph={use_graph}")
            if calls // args.check_every > checks:
                checks += 1
                if q.shape[0] <= 16:
                    check(torch, flash_mla, q, cache, seqlens_dev, causal, out, lse,
                          f"check {checks}")
                check_sentinel(torch, decode(*sentinel), sentinel_ref, checks)
                print(progress_line(time.monotonic() - start, calls, graphs, checks), flush=True)
    except Exception as err:  # any failure ends the soak with status 1
        print(f"FAIL after {calls} calls: {type(err).__name__}: {err}", flush=True)
        return 1
    print(f"PASS: {calls} calls ({graphs} graph replays) in {time.monotonic() - start:.0f} s, "
          f"{checks} checks, no hang, no drift", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
