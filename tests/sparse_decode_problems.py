"""Sparse FP8 decode problems, their float64 answer and the API call, shared by
tests/test_sparse_decode_gpu.py and benchmarks/soak_sparse_decode.py.

A problem is q plus one or two pools (the main cache and the optional extra cache), each
a quantised paged cache in one of the five formats of flash_mla.quant with its indices
and optional topk_length. Every pool is hostile by construction:

- pages are handed to requests in a random order (a random block table), so the physical
  token ids a request names are scattered over the cache;
- each index row names distinct tokens of its own request, with the contract's invalid
  candidates (-2**31, -123456, -1, the pool's token count, 114514, 2147480000, 2**31 - 1;
  those that are really invalid for the pool) mixed in at every ``invalid_every``-th
  position, and filling the row where the request has fewer tokens than topk;
- every byte of every token that no counted index names is 0xFF (NaN as e4m3, as an fp32
  or e4m3 scale, as a ue8m0 scale and as bf16), including a spare block no request owns;
- with ``poison_past_length`` the positions past topk_length name such poisoned tokens,
  so a kernel that reads past topk_length returns NaN.

``exact(problem)`` is the float64 answer computed vectorised on the problem's device
(the whole cache dequantised once with flash_mla.quant.dequantize_kv, rows gathered and
masked, flash_mla.oracle.attend for the softmax), fast enough for the largest shapes;
tests/test_sparse_decode_problems.py holds it to the byte-level flash_mla.oracle.sparse_decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from flash_mla import oracle, quant

__all__ = ["D_V", "INVALID", "POISON_BYTE", "PoolSpec", "Pool", "Problem", "invalid_candidates",
           "random_lengths", "block_table", "index_rows", "token_bytes", "poison_tokens",
           "make_pool", "make_problem", "reshuffled", "exact", "oracle_pools", "run"]

D_V = 512
F64 = torch.float64
# The contract's invalid index candidates; None stands for the pool's token count.
INVALID = (-2 ** 31, -123456, -1, None, 114514, 2147480000, 2 ** 31 - 1)
POISON_BYTE = 0xFF
# Elements of one float64 [rows, keys, d_qk] gather and of one [rows, heads, keys] score
# block held at once by exact(); rows are processed in chunks below both.
_GATHER_ELEMENTS = 1 << 27
_SCORE_ELEMENTS = 1 << 25

Lengths = Union[None, bool, Sequence[int]]


def invalid_candidates(num_tokens: int) -> List[int]:
    """The invalid index candidates for a pool of ``num_tokens`` tokens, keeping only those
    that really are invalid there (114514 names a token once the pool holds more)."""
    values = [num_tokens if c is None else c for c in INVALID]
    return [c for c in values if c < 0 or c >= num_tokens]


@dataclass(frozen=True)
class PoolSpec:
    """What make_problem builds for one pool: a format, each request's token count, the
    number of index slots per query (topk), the page size, and topk_length (None: no
    lengths; True: random lengths including 0, 1 and topk; a sequence: those values)."""

    kv_format: str
    seqlens: Tuple[int, ...]
    topk: int
    page_size: int
    topk_length: Lengths = None


@dataclass
class Pool:
    """One built pool. ``clean_past_length``: the positions past topk_length name clean
    tokens (so the rows may be reshuffled and the lengths changed, see reshuffled)."""

    k_cache: torch.Tensor                # uint8 [num_blocks, page_size, 1, bytes_per_token]
    indices: torch.Tensor                # int32 [b, s_q, topk], physical token ids
    topk_length: Optional[torch.Tensor]  # int32 [b], or None
    kv_format: str
    clean_past_length: bool

    @property
    def num_tokens(self) -> int:
        return int(self.k_cache.shape[0] * self.k_cache.shape[1])


@dataclass
class Problem:
    q: torch.Tensor                      # bf16 [b, s_q, h_q, d_qk]
    main: Pool
    extra: Optional[Pool]
    sink: Optional[torch.Tensor]         # fp32 [h_q], or None
    scale: float

    @property
    def pools(self) -> List[Pool]:
        return [self.main] if self.extra is None else [self.main, self.extra]

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        b, s_q, h_q, d_qk = self.q.shape
        return int(b), int(s_q), int(h_q), int(d_qk)


# --------------------------------------------------------------------------- building

def _generator(device: Union[str, torch.device], seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def random_lengths(b: int, topk: int, gen: torch.Generator, device) -> List[int]:
    """Per-request topk_length: random in [0, topk], with topk at every 5th request, 0 at
    every 7th from the 2nd and 1 at every 11th from the 3rd (as many as b allows)."""
    values = torch.randint(0, topk + 1, (b,), generator=gen, device=device).tolist()
    for start, step, value in ((0, 5, topk), (1, 7, 0), (2, 11, 1)):
        for i in range(start, b, step):
            values[i] = value
    return values


def block_table(seqlens: Sequence[int], page_size: int, spare_blocks: int,
                gen: torch.Generator, device) -> Tuple[torch.Tensor, int]:
    """(int64 [b, max_pages] table of physical blocks, num_blocks): the blocks of all
    requests and ``spare_blocks`` more, handed out in a random order; entries past a
    request's pages are 0 (never read)."""
    pages = [-(-int(s) // page_size) for s in seqlens]
    num_blocks = sum(pages) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=device)
    table = torch.zeros(len(seqlens), max(max(pages, default=0), 1), dtype=torch.int64,
                        device=device)
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[at:at + n]
        at += n
    return table, num_blocks


def index_rows(seqlens: Sequence[int], s_q: int, topk: int, table: torch.Tensor, page_size: int,
               num_tokens: int, gen: torch.Generator, invalid_every: int) -> torch.Tensor:
    """int64 [b, s_q, topk]: per (request, query) distinct random tokens of the request
    (physical ids through ``table``), an invalid candidate at every invalid_every-th
    position and wherever the request has no token left; candidates cycle by row."""
    device = table.device
    b = len(seqlens)
    lens = torch.tensor([int(s) for s in seqlens], dtype=torch.int64, device=device)
    width = max(max((int(s) for s in seqlens), default=0), topk, 1)
    pos = torch.arange(width, device=device)
    # Random order of each request's positions, the positions it does not have last.
    key = torch.rand(b, s_q, width, generator=gen, device=device)
    key = torch.where(pos < lens[:, None, None], key, torch.full_like(key, 2.0))
    order = key.argsort(dim=-1)[..., :topk]                               # [b, s_q, topk]
    # Sorted so, slot k of a row holds one of the request's positions iff k < its length.
    slot = torch.arange(topk, device=device)
    owned = slot < lens[:, None, None]
    order = torch.where(owned, order, torch.zeros_like(order))
    physical = table.gather(1, (order // page_size).reshape(b, -1)).reshape(b, s_q, topk)
    physical = physical * page_size + order % page_size
    keep = owned & (slot % invalid_every != invalid_every - 1)
    cand = torch.tensor(invalid_candidates(num_tokens), dtype=torch.int64, device=device)
    row = torch.arange(b * s_q, device=device).reshape(b, s_q, 1)
    # Every candidate in turn along the sprinkled slots of a row and along a filled tail.
    filler = cand[(slot // invalid_every + slot % invalid_every + row) % len(cand)]
    return torch.where(keep, physical, filler)


def token_bytes(k_cache: torch.Tensor, kv_format: str, token_ids: torch.Tensor) -> torch.Tensor:
    """Flat byte offsets [n, bytes_per_token] of the given physical tokens in the cache's
    storage (k_cache contiguous): a token-contiguous format owns one run of bytes per
    token; V4 owns its data row and its scale row of the page (flash_mla.quant)."""
    fmt = quant.FORMATS[kv_format]
    page = int(k_cache.shape[1])
    ids = token_ids.to(torch.int64).reshape(-1, 1)
    if not fmt.page_structured:
        return ids * fmt.bytes_per_token + torch.arange(fmt.bytes_per_token, device=ids.device)
    data, scales = quant.MODEL1_TOKEN_DATA_BYTES, quant.MODEL1_SCALE_BYTES
    block, offset = ids // page, ids % page
    base = block * page * fmt.bytes_per_token
    data_at = base + offset * data + torch.arange(data, device=ids.device)
    scale_at = base + page * data + offset * scales + torch.arange(scales, device=ids.device)
    return torch.cat([data_at, scale_at], dim=1)


def poison_tokens(k_cache: torch.Tensor, kv_format: str, token_ids: torch.Tensor) -> None:
    """Sets every byte of the given tokens of a contiguous cache to 0xFF (NaN in every field
    of every format), a row per token (token_bytes describes the same bytes, per byte)."""
    if token_ids.numel() == 0:
        return
    fmt = quant.FORMATS[kv_format]
    num_blocks, page = int(k_cache.shape[0]), int(k_cache.shape[1])
    ids = token_ids.to(torch.int64)
    if not fmt.page_structured:
        k_cache.view(num_blocks * page, fmt.bytes_per_token)[ids] = POISON_BYTE
        return
    data, scales = quant.MODEL1_TOKEN_DATA_BYTES, quant.MODEL1_SCALE_BYTES
    blocks = k_cache.view(num_blocks, page * fmt.bytes_per_token)
    block, offset = ids // page, ids % page
    blocks[:, :page * data].view(num_blocks, page, data)[block, offset] = POISON_BYTE
    blocks[:, page * data:].view(num_blocks, page, scales)[block, offset] = POISON_BYTE


def make_pool(spec: PoolSpec, s_q: int, gen: torch.Generator, device, *, std: float,
              invalid_every: int = 7, spare_blocks: int = 1,
              poison_past_length: bool = True) -> Pool:
    """One hostile pool (module docstring) whose tokens are N(0, std^2) quantised to
    spec.kv_format."""
    if spec.kv_format not in quant.FORMATS:
        raise ValueError(f"kv_format must be one of {quant.FORMAT_NAMES}, got {spec.kv_format!r}")
    if spec.topk < 1 or spec.page_size < 1 or invalid_every < 2 or spare_blocks < 1:
        raise ValueError(f"topk and page_size must be >= 1, invalid_every >= 2 and spare_blocks "
                         f">= 1, got {spec} invalid_every={invalid_every} "
                         f"spare_blocks={spare_blocks}")
    fmt = quant.FORMATS[spec.kv_format]
    b, topk, page = len(spec.seqlens), spec.topk, spec.page_size
    table, num_blocks = block_table(spec.seqlens, page, spare_blocks, gen, device)
    num_tokens = num_blocks * page
    values = torch.randn(num_blocks, page, 1, fmt.d_qk, generator=gen, device=device) * std
    k_cache = quant.quantize_kv(values, spec.kv_format)
    del values
    idx = index_rows(spec.seqlens, s_q, topk, table, page, num_tokens, gen, invalid_every)

    lengths: Optional[List[int]] = None
    if spec.topk_length is True:
        lengths = random_lengths(b, topk, gen, device)
    elif spec.topk_length not in (None, False):
        lengths = [int(x) for x in spec.topk_length]
        if len(lengths) != b:
            raise ValueError(f"topk_length must have one value per request ({b}), got {lengths}")
    slot = torch.arange(topk, device=device)
    in_range = (idx >= 0) & (idx < num_tokens)
    counted = in_range
    if lengths is not None:
        limit = torch.tensor(lengths, dtype=torch.int64, device=device).clamp(0, topk)
        counted = in_range & (slot < limit[:, None, None])
    named = counted if poison_past_length else in_range
    used = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    used[idx[named]] = True
    unused = (~used).nonzero().flatten()          # never empty: the spare block is unused
    poison_tokens(k_cache, spec.kv_format, unused)
    if poison_past_length and lengths is not None:
        # Valid indices past topk_length name poisoned tokens: reading one shows as NaN.
        past = in_range & ~counted
        idx = torch.where(past, unused[slot % len(unused)].expand_as(idx), idx)
    topk_length = (None if lengths is None
                   else torch.tensor(lengths, dtype=torch.int32, device=device))
    return Pool(k_cache=k_cache, indices=idx.to(torch.int32), topk_length=topk_length,
                kv_format=spec.kv_format, clean_past_length=not poison_past_length)


def make_problem(main: PoolSpec, s_q: int, h_q: int, *, seed: int, device="cuda",
                 extra: Optional[PoolSpec] = None, std: float = 0.1, sink: bool = False,
                 invalid_every: int = 7, poison_past_length: bool = True,
                 scale: Optional[float] = None) -> Problem:
    """q [b, s_q, h_q, d_qk] bf16 of the given std (0.1 is upstream's randn/10, and then q is
    clamped to [-1, 1] as upstream's decode tests do) with its pools; sink N(0, 4) per head."""
    d_qk = quant.FORMATS[main.kv_format].d_qk
    if extra is not None:
        if len(extra.seqlens) != len(main.seqlens):
            raise ValueError(f"extra must have one seqlen per request ({len(main.seqlens)}), "
                             f"got {len(extra.seqlens)}")
        if quant.FORMATS[extra.kv_format].d_qk != d_qk:
            raise ValueError(f"extra.kv_format must have d_qk {d_qk} like {main.kv_format}, got "
                             f"{extra.kv_format}")
    gen = _generator(device, seed)
    b = len(main.seqlens)
    q = torch.randn(b, s_q, h_q, d_qk, generator=gen, device=device) * std
    if std < 1:
        q = q.clamp(-1, 1)
    pools = [make_pool(spec, s_q, gen, device, std=std, invalid_every=invalid_every,
                       poison_past_length=poison_past_length)
             for spec in ([main] if extra is None else [main, extra])]
    sink_t = torch.randn(h_q, generator=gen, device=device) * 2 if sink else None
    return Problem(q=q.to(torch.bfloat16), main=pools[0], extra=pools[1] if extra else None,
                   sink=sink_t, scale=d_qk ** -0.5 if scale is None else float(scale))


def reshuffled(pool: Pool, gen: torch.Generator) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """New (indices, topk_length) for the same cache: each row's entries in a random order,
    random lengths. Only for pools built with poison_past_length=False, whose every
    in-range index names a clean token."""
    if not pool.clean_past_length:
        raise ValueError("pool must be built with poison_past_length=False to be reshuffled")
    idx = pool.indices
    order = torch.rand(idx.shape, generator=gen, device=idx.device).argsort(dim=-1)
    new_idx = idx.gather(-1, order)
    if pool.topk_length is None:
        return new_idx, None
    b, topk = idx.shape[0], idx.shape[2]
    lengths = random_lengths(b, topk, gen, idx.device)
    return new_idx, torch.tensor(lengths, dtype=torch.int32, device=idx.device)


# --------------------------------------------------------------------------- the answer

def _pool_rows(pool: Pool, b: int, s_q: int, d_qk: int):
    """(float64 [num_tokens, d_qk] dequantised cache, int64 [b * s_q, topk] safe indices,
    bool [b * s_q, topk] counted)."""
    table = quant.dequantize_kv(pool.k_cache, pool.kv_format).to(F64).reshape(-1, d_qk)
    idx = pool.indices.to(torch.int64).reshape(b * s_q, -1)
    topk = idx.shape[1]
    counted = (idx >= 0) & (idx < table.shape[0])
    if pool.topk_length is not None:
        limit = pool.topk_length.to(torch.int64).clamp(0, topk).repeat_interleave(s_q)
        counted &= torch.arange(topk, device=idx.device) < limit[:, None]
    return table, torch.where(counted, idx, torch.zeros_like(idx)), counted


def exact(p: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 (out [b, s_q, h_q, 512], lse [b, s_q, h_q]) of the problem on its device:
    each query row attends to the tokens its counted indices name in every pool, one
    softmax over all; an empty row gives out 0, lse +inf; the sink scales out by
    exp(lse) / (exp(lse) + exp(sink)) and lse excludes it."""
    b, s_q, h_q, d_qk = p.shape
    rows = b * s_q
    parts = [_pool_rows(pool, b, s_q, d_qk) for pool in p.pools]
    keys_per_row = sum(part[1].shape[1] for part in parts)
    q = p.q.to(F64).reshape(rows, h_q, d_qk)
    step = max(1, min(_GATHER_ELEMENTS // max(1, keys_per_row * d_qk),
                      _SCORE_ELEMENTS // max(1, keys_per_row * h_q)))
    outs, lses = [], []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        keys = torch.cat([torch.where(ok[r0:r1, :, None], table[safe[r0:r1]],
                                      torch.zeros((), dtype=F64, device=table.device))
                          for table, safe, ok in parts], dim=1)           # [m, T, d_qk]
        visible = torch.cat([ok[r0:r1] for _, _, ok in parts], dim=1)[:, None, :]
        o, lse, _ = oracle.attend(q[r0:r1], keys, keys[..., :D_V], visible, p.scale)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs).reshape(b, s_q, h_q, D_V)
    lse = torch.cat(lses).reshape(b, s_q, h_q)
    if p.sink is not None:
        factor = 1.0 / (1.0 + torch.exp(p.sink.to(F64) - lse))
        out = out * torch.where(torch.isposinf(lse), torch.ones_like(factor), factor)[..., None]
    return out, lse


def oracle_pools(p: Problem) -> list:
    """The pools as flash_mla.oracle.sparse_decode / plain_sparse_decode take them."""
    return [(pool.k_cache, pool.indices,
             None if pool.topk_length is None else pool.topk_length.tolist(), pool.kv_format)
            for pool in p.pools]


# --------------------------------------------------------------------------- the call

def run(p: Problem, meta=None, *, q: Optional[torch.Tensor] = None, invariant: bool = False,
        name_formats: bool = True, is_fp8_kvcache: bool = False,
        k_cache: Optional[torch.Tensor] = None, indices: Optional[torch.Tensor] = None,
        topk_length: Optional[torch.Tensor] = None):
    """flash_mla_with_kvcache on the problem, as a caller of the newer API writes it;
    the keyword arguments replace the problem's q / main cache / indices / topk_length.
    name_formats=False leaves kv_format and extra_kv_format to detection."""
    import flash_mla

    meta = meta if meta is not None else flash_mla.get_mla_metadata()[0]
    extra = p.extra
    return flash_mla.flash_mla_with_kvcache(
        p.q if q is None else q, p.main.k_cache if k_cache is None else k_cache, None, None, D_V,
        meta, softmax_scale=p.scale, is_fp8_kvcache=is_fp8_kvcache,
        indices=p.main.indices if indices is None else indices,
        topk_length=p.main.topk_length if topk_length is None else topk_length,
        attn_sink=p.sink,
        extra_k_cache=None if extra is None else extra.k_cache,
        extra_indices_in_kvcache=None if extra is None else extra.indices,
        extra_topk_length=None if extra is None else extra.topk_length,
        enable_batch_invariant=invariant,
        kv_format=p.main.kv_format if name_formats else None,
        extra_kv_format=extra.kv_format if (extra is not None and name_formats) else None)

