"""What the decode soaks (soak_dense_decode.py, soak_sparse_decode.py) share: the hang
watchdog, their common command-line options, a step of graph replays or eager calls (and the
CUDA-graph capture it uses), the sentinel's bit-for-bit check and the progress line printed at each check.

torch is passed in (as the benchmarks do) so that importing this module needs no torch.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence, Tuple, TypeVar

T = TypeVar("T")


class Watchdog:
    """Exits the process (status 3) when beat() is not called for `limit` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()
        self.what = "start"
        threading.Thread(target=self._run, daemon=True).start()

    def beat(self, what: str) -> None:
        self.last = time.monotonic()
        self.what = what

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            if time.monotonic() - self.last > self.limit:
                print(f"HANG: no call completed for {self.limit:.0f} s (last: {self.what})",
                      flush=True)
                os._exit(3)


def soak_parser(description: str, max_b: int) -> argparse.ArgumentParser:
    """The options every decode soak takes: --seconds, --seed, --check-every,
    --hang-seconds and --max-b (whose default is the soak's own)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--hang-seconds", type=float, default=60.0)
    ap.add_argument("--max-b", type=int, default=max_b)
    return ap


def capture(torch: Any, call: Callable[[], T]) -> Tuple[Any, T]:
    """(CUDA graph, the outputs it writes) of `call`: run once on a side stream first (the
    warm-up a capture needs), then captured on a fresh graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = call()
    return graph, result


def soak_calls(torch: Any, flash_mla: Any, rng: Any, use_graph: bool,
               call: Callable[[Any], Tuple[Any, Any]], refill: Callable[[], None]
               ) -> Iterator[Tuple[Any, Any, bool]]:
    """One soak step on one problem; yields (out, lse, replayed) after each call, so the
    caller's counts stay exact if a call fails. `call(meta)` runs the decode with schedule
    holder `meta`. A graph step captures call on a fresh holder and replays it 2..6 times,
    `refill()` writing new inputs into the captured buffers before each replay; an eager
    step makes 1..4 calls sharing one holder. Synchronises at the end of the step."""
    if use_graph:
        graph, (out, lse) = capture(torch, lambda: call(flash_mla.get_mla_metadata()[0]))
        for _ in range(rng.randint(2, 6)):
            refill()
            graph.replay()
            yield out, lse, True
    else:
        meta = flash_mla.get_mla_metadata()[0]
        for _ in range(rng.randint(1, 4)):
            out, lse = call(meta)
            yield out, lse, False
    torch.cuda.synchronize()


def check_sentinel(torch: Any, again: Sequence[Any], reference: Sequence[Any],
                   check: int) -> None:
    """Raises AssertionError unless the sentinel's (out, lse) rerun `again` equals its first
    result `reference` bit for bit (synchronises first)."""
    torch.cuda.synchronize()
    for got, want, name in zip(again, reference, ("out", "lse")):
        if not torch.equal(got, want):
            raise AssertionError(f"sentinel {name} drifted at check {check}")


def progress_line(seconds: float, calls: int, graphs: int, check: int, detail: str = "") -> str:
    """The line printed after a passed check; `detail` (the problem) follows a colon."""
    line = f"[{seconds:6.1f} s] {calls} calls ({graphs} in graphs), check {check} ok"
    return f"{line}: {detail}" if detail else line
