"""The dense-decode split-KV schedule rule (docs/dense_decode.md, "Schedule") as a
Python model, checked here on the CPU against a second, brute-force formulation and
against the properties the decode kernel and the combine rely on. The GPU test
(tests/test_dense_decode_gpu.py) compares the schedule kernel with ``schedule_model``.

Constants mirror csrc/portable/decode/schedule/config.h.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import pytest

PAGE_SIZE = 64             # tokens per KV block (page)
FIXED_COST_BLOCKS = 2      # cost of starting a request, in blocks
INVARIANT_CHUNK_BLOCKS = 16
INVARIANT_MAX_PIECES = 4
META_INTS = 8              # begin_req, begin_block, end_req, end_block, first_split, 3 unused

Part = Tuple[int, int, int, int, int]


def num_blocks(seqlen: int) -> int:
    """KV blocks of a request (a negative length counts as empty)."""
    return -(-max(seqlen, 0) // PAGE_SIZE)


def invariant_pieces(n: int) -> Tuple[int, int]:
    """(pieces, blocks per piece) of a request of n blocks in batch-invariant mode."""
    if n == 0:
        return 0, 0
    pieces = min(-(-n // INVARIANT_CHUNK_BLOCKS), INVARIANT_MAX_PIECES)
    return pieces, -(-n // pieces)


def schedule_model(seqlens: Sequence[int], num_parts: int,
                   batch_invariant: bool = False) -> Tuple[List[Part], List[int]]:
    """The schedule: per part (begin_req, begin_block, end_req, end_block, first_split)
    and split_offsets [b + 1]. A part with begin_req == b is empty; the range of a part
    in request r is [begin_block if r == begin_req else 0, end_block if r == end_req
    else n_r)."""
    b = len(seqlens)
    blocks = [num_blocks(s) for s in seqlens]
    empty: Part = (b, 0, b, 0, 0)
    parts: List[Part] = [empty] * num_parts
    offsets = [0] * (b + 1)
    if batch_invariant:
        for i, n in enumerate(blocks):
            offsets[i + 1] = offsets[i] + invariant_pieces(n)[0]
        for p in range(num_parts):
            req, piece = divmod(p, INVARIANT_MAX_PIECES)
            if req >= b:
                continue
            pieces, size = invariant_pieces(blocks[req])
            if piece < pieces:
                parts[p] = (req, piece * size, req, min(blocks[req], (piece + 1) * size),
                            offsets[req] + piece)
        return parts, offsets

    costs = [n + FIXED_COST_BLOCKS if n > 0 else 0 for n in blocks]
    starts = [0] * (b + 1)
    for i, c in enumerate(costs):
        starts[i + 1] = starts[i] + c
    total = starts[b]
    per = max(1, -(-total // num_parts))
    first_part = [0] * b
    for i in range(b):
        if blocks[i] == 0:
            offsets[i + 1] = offsets[i]
            continue
        first_part[i] = (starts[i] + FIXED_COST_BLOCKS) // per
        last_part = (starts[i + 1] - 1) // per
        offsets[i + 1] = offsets[i] + last_part - first_part[i] + 1
    for p in range(num_parts):
        x0, x1 = p * per, min((p + 1) * per, total)
        if x0 >= total:
            continue
        # the request holding position x0 and the one holding x1 - 1
        i = next(r for r in range(b) if starts[r] <= x0 < starts[r + 1])
        j = next(r for r in range(b) if starts[r] < x1 <= starts[r + 1])
        begin_block = max(0, x0 - starts[i] - FIXED_COST_BLOCKS)
        end_block = min(blocks[j], max(0, x1 - starts[j] - FIXED_COST_BLOCKS))
        first_split = offsets[i] + max(0, p - first_part[i])
        parts[p] = (i, begin_block, j, end_block, first_split)
    return parts, offsets


def pieces_of(parts: Sequence[Part], seqlens: Sequence[int],
              offsets: Sequence[int]) -> List[Tuple[int, int, int, int, int]]:
    """Every non-empty (part, request, lo, hi, split) the decode kernel would run."""
    b = len(seqlens)
    out = []
    for p, (bi, bb, ei, eb, first) in enumerate(parts):
        if bi >= b:
            continue
        for r in range(bi, min(ei, b - 1) + 1):
            lo = bb if r == bi else 0
            hi = eb if r == ei else num_blocks(seqlens[r])
            if lo >= hi:
                continue
            out.append((p, r, lo, hi, first if r == bi else offsets[r]))
    return out


def _brute_force(seqlens: Sequence[int], num_parts: int) -> List[List[Tuple[int, int, int]]]:
    """The same cut, walked position by position: per part, its (request, lo, hi) runs."""
    blocks = [num_blocks(s) for s in seqlens]
    cells = []  # one entry per cost position: (request, block or None for the fixed cost)
    for r, n in enumerate(blocks):
        if n:
            cells += [(r, None)] * FIXED_COST_BLOCKS + [(r, k) for k in range(n)]
    per = max(1, -(-len(cells) // num_parts))
    result = []
    for p in range(num_parts):
        runs: List[Tuple[int, int, int]] = []
        for r, k in cells[p * per:(p + 1) * per]:
            if k is None:
                continue
            if runs and runs[-1][0] == r and runs[-1][2] == k:
                runs[-1] = (r, runs[-1][1], k + 1)
            else:
                runs.append((r, k, k + 1))
        result.append(runs)
    return result


def _random_seqlens(rng: random.Random, b: int) -> List[int]:
    pick = rng.random()
    if pick < 0.3:
        return [rng.choice([0, 1, 63, 64, 65, 4096]) for _ in range(b)]
    if pick < 0.6:
        return [rng.randint(0, 300) for _ in range(b)]
    return [rng.choice([0, rng.randint(1, 40000)]) for _ in range(b)]


@pytest.mark.parametrize("seed", range(40))
def test_model_matches_brute_force_walk(seed):
    rng = random.Random(seed)
    b = rng.randint(1, 70)
    seqlens = _random_seqlens(rng, b)
    num_parts = rng.randint(1, 300)
    parts, offsets = schedule_model(seqlens, num_parts)
    pieces = pieces_of(parts, seqlens, offsets)
    walked = _brute_force(seqlens, num_parts)
    for p in range(num_parts):
        got = [(r, lo, hi) for (q, r, lo, hi, _) in pieces if q == p]
        assert got == walked[p], f"part {p}"


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_pieces_tile_every_request_once_with_distinct_splits(seed, invariant):
    rng = random.Random(1000 + seed)
    b = rng.randint(1, 70)
    seqlens = _random_seqlens(rng, b)
    num_parts = b * INVARIANT_MAX_PIECES if invariant else rng.randint(1, 300)
    parts, offsets = schedule_model(seqlens, num_parts, invariant)
    pieces = pieces_of(parts, seqlens, offsets)
    assert offsets[0] == 0 and all(x <= y for x, y in zip(offsets, offsets[1:]))
    for r in range(b):
        mine = sorted((lo, hi, split) for (_, q, lo, hi, split) in pieces if q == r)
        n = num_blocks(seqlens[r])
        # the pieces cover [0, n) exactly once, in order, with split ids
        # offsets[r], offsets[r] + 1, ... (so the combine never reads an unwritten split)
        covered = 0
        for k, (lo, hi, split) in enumerate(mine):
            assert lo == covered and hi > lo, (r, mine)
            assert split == offsets[r] + k, (r, mine)
            covered = hi
        assert covered == n, (r, n, mine)
        assert offsets[r + 1] - offsets[r] == len(mine)
    # the partial buffers the binding allocates are large enough
    bound = b * INVARIANT_MAX_PIECES if invariant else b + num_parts
    assert offsets[b] <= bound


@pytest.mark.parametrize("seed", range(20))
def test_balance_within_one_block_plus_fixed_cost(seed):
    rng = random.Random(2000 + seed)
    b = rng.randint(1, 64)
    seqlens = [rng.randint(0, 20000) for _ in range(b)]
    num_parts = rng.randint(1, 264)
    parts, offsets = schedule_model(seqlens, num_parts)
    total = sum(num_blocks(s) + FIXED_COST_BLOCKS for s in seqlens if s > 0)
    per = max(1, -(-total // num_parts))
    load = [0] * num_parts
    for p, r, lo, hi, _ in pieces_of(parts, seqlens, offsets):
        load[p] += hi - lo
    assert max(load) <= per


def test_invariant_pieces_depend_only_on_the_request():
    rng = random.Random(7)
    target = [5000]
    for _ in range(10):
        others = [rng.randint(0, 30000) for _ in range(rng.randint(0, 20))]
        pos = rng.randint(0, len(others))
        seqlens = others[:pos] + target + others[pos:]
        parts, offsets = schedule_model(seqlens, len(seqlens) * INVARIANT_MAX_PIECES, True)
        mine = [(lo, hi, split - offsets[pos]) for (_, r, lo, hi, split)
                in pieces_of(parts, seqlens, offsets) if r == pos]
        assert mine == [(0, 20, 0), (20, 40, 1), (40, 60, 2), (60, 79, 3)]


def test_single_piece_request_and_empty_batch():
    # 2 blocks + 2 fixed = 4 positions over 8 parts: one block per part, two pieces
    parts, offsets = schedule_model([100], 8)
    assert offsets == [0, 2]
    assert parts[2] == (0, 0, 0, 1, 0) and parts[3] == (0, 1, 0, 2, 1)
    parts, offsets = schedule_model([0, 0], 4)
    assert offsets == [0, 0, 0]
    assert all(p[0] == 2 for p in parts)
    parts, offsets = schedule_model([64], 1)
    assert parts == [(0, 0, 0, 1, 0)] and offsets == [0, 1]
