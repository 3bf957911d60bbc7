"""Schedule, output and split-partial buffers of one native MLA decode call (dense and
sparse).

Both decode families launch a decode kernel that writes fp32 split partials and a
combine that reduces them into ``out`` / ``lse``; they size the partials by the same rule
and differ only in the order of the (s_q, h_q) row dimensions of lse and the partials
(dense: heads first, sparse: queries first). Kept apart from flash_mla.sched_meta, which
does not import torch.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from . import _native

# Ints per schedule part (csrc/portable/decode/schedule/config.h, kMetaInts).
META_INTS = 8


def run_schedule(lengths: torch.Tensor, parts: int, batch_invariant: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule of ``parts`` parts over each request's length (int32 [b] on the
    GPU: cache_seqlens for the dense decode, key-list lengths for the sparse one), computed
    by the library's schedule kernel without a host sync: (metadata int32 [parts, 8], split
    offsets int32 [b + 1])."""
    metadata = torch.empty((parts, META_INTS), dtype=torch.int32, device=lengths.device)
    split_offsets = torch.empty((lengths.shape[0] + 1,), dtype=torch.int32, device=lengths.device)
    _native.function("dense_decode_schedule")(lengths, metadata, split_offsets,
                                              bool(batch_invariant))
    return metadata, split_offsets


class DecodeBuffers(NamedTuple):
    """Tensors one decode + combine call writes: out in q's dtype, the rest fp32."""

    out: torch.Tensor        # [b, s_q, h_q, head_dim_v]
    lse: torch.Tensor        # [b, *rows]
    o_accum: torch.Tensor    # [splits, *rows, head_dim_v]
    lse_accum: torch.Tensor  # [splits, *rows]


def split_count(batch: int, parts: int, batch_invariant: bool) -> int:
    """Splits the partials must hold: b + parts (each part adds at most one piece beyond one
    per request), or parts in batch-invariant mode (one part per piece)."""
    return parts if batch_invariant else batch + parts


def decode_buffers(q: torch.Tensor, head_dim_v: int, parts: int, batch_invariant: bool,
                   heads_first: bool) -> DecodeBuffers:
    """Fresh (uninitialised) buffers on q's device for q [b, s_q, h_q, d_qk] and a schedule
    of ``parts`` parts; lse and the partials index rows as (h_q, s_q) when heads_first,
    else (s_q, h_q). Allocated per call, so nothing waits on the host."""
    b, s_q, h_q, _ = q.shape
    rows: Tuple[int, int] = (h_q, s_q) if heads_first else (s_q, h_q)
    splits = split_count(b, parts, batch_invariant)
    f32 = dict(dtype=torch.float32, device=q.device)
    return DecodeBuffers(
        out=torch.empty((b, s_q, h_q, head_dim_v), dtype=q.dtype, device=q.device),
        lse=torch.empty((b, *rows), **f32),
        o_accum=torch.empty((splits, *rows, head_dim_v), **f32),
        lse_accum=torch.empty((splits, *rows), **f32))
