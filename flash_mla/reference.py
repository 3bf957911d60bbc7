"""fp32 PyTorch references of every flash_mla op: the test oracle and the CPU fallback.

Each function takes bf16/fp16/fp32 tensors on any device (non-contiguous is fine),
computes in fp32 on that device and returns fp32 tensors; the public API casts
them. References may synchronise with the host (they read sequence lengths).

Arguments are not validated here: the op families (flash_mla.mha_prefill,
dense_decode, sparse_decode, sparse_prefill) validate every call once, with the
caller's argument names, before a reference runs, and tests call these functions
with well-formed inputs. What is asserted below are this module's own assumptions.
The semantics are the API contract's (docs/); the choices it leaves open are
written in each docstring. Common rules:

- A row with nothing to attend to gives out = 0 and lse = +inf (max_logits = -inf),
  never NaN. Masked logits are -inf and masked K/V rows are replaced by zeros
  before any product, so NaN in cache slots that are not read never leaks in.
- lse is the natural log of sum(exp(logit)), logit = q.k * softmax_scale.
- Attention sink (per query head, natural log):
  out_final = out * exp(lse) / (exp(lse) + exp(sink)); the returned lse excludes it.
- Memory is bounded by processing query rows in chunks, so the references also
  serve the benchmark shapes (s_q up to 70000) on a GPU.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from . import quant
from . import _exp

__all__ = [
    "dense_decode",
    "sparse_decode",
    "sparse_prefill",
    "mha_prefill_fwd",
    "mha_prefill_bwd",
    "combine",
]

# Upper bound on the fp32 logits held at once (elements); chunks of query rows keep
# below it. 2**26 elements = 256 MiB per live [rows, keys] tensor.
_MAX_CHUNK_ELEMENTS = 1 << 26
_INF = float("inf")


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
def _scale(softmax_scale: Optional[float], d_qk: int) -> float:
    return d_qk ** -0.5 if softmax_scale is None else float(softmax_scale)


def _offsets(cu: torch.Tensor) -> List[int]:
    """cu_seqlens as ints. The family validation has checked them where it could
    read them without a device sync; a sequence whose end precedes its start is
    empty here (its rows keep out 0, lse +inf)."""
    return [int(v) for v in cu.tolist()]


# ---------------------------------------------------------------------------
# shared math
# ---------------------------------------------------------------------------
def _round_to(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """x rounded to `dtype` (round to nearest) and back to fp32; x itself when dtype is None."""
    return x if dtype is None else x.to(dtype).to(torch.float32)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    p_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked softmax attention in fp32, batched over leading dims (broadcast).

    q [..., m, d], k [..., n, d], v [..., n, dv] (finite wherever mask is True; callers
    zero the rows they mask), mask bool broadcastable to [..., m, n], True = attend.
    Returns out [..., m, dv] (0 for empty rows), lse [..., m] (+inf for empty rows),
    max_logits [..., m] (-inf for empty rows).

    p_dtype None: exact fp32 softmax. p_dtype bf16/fp16 models the kernels' numerics
    (the kernels' contract): the unnormalised probabilities exp(s - rowmax) are rounded to p_dtype
    before P.V, and the fp32 sum of the unrounded ones normalises the result.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, -_INF)
    lead = logits.shape[:-1]
    if logits.shape[-1] == 0:
        out = torch.zeros(lead + (v.shape[-1],), dtype=torch.float32, device=q.device)
        return out, torch.full(lead, _INF, device=q.device), torch.full(lead, -_INF, device=q.device)
    max_logits = logits.amax(dim=-1)
    empty = max_logits == -_INF
    lse = _exp.logsumexp(logits, dim=-1)
    # An empty row has lse -inf; subtracting +inf instead makes every probability exp(-inf) = 0.
    lse = torch.where(empty, torch.full_like(lse, _INF), lse)
    if p_dtype is None:
        probs = _exp.exp(logits - lse.unsqueeze(-1))
        out = torch.matmul(probs, v)
        return out, lse, max_logits
    shift = torch.where(empty, torch.full_like(max_logits, _INF), max_logits).unsqueeze(-1)
    unnormalised = _exp.exp(logits - shift)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    out = torch.matmul(_round_to(unnormalised, p_dtype), v) / torch.where(row_sum > 0, row_sum, 1.0)
    return out, lse, max_logits


def _apply_sink(out: torch.Tensor, lse: torch.Tensor, sink: Optional[torch.Tensor]) -> torch.Tensor:
    """out [..., h, dv], lse [..., h] natural log (+inf = empty row), sink [h] or None."""
    if sink is None:
        return out
    # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): exact limits for sink = +-inf.
    factor = _exp.sigmoid(lse - sink.to(torch.float32))
    scaled = out * factor.unsqueeze(-1)
    empty = (lse == _INF).unsqueeze(-1)
    return torch.where(empty, torch.zeros_like(scaled), scaled)


def _rows_per_chunk(rows: int, elements_per_row: int) -> int:
    return max(1, min(rows, _MAX_CHUNK_ELEMENTS // max(1, elements_per_row)))


def _causal_mask(q_rows: torch.Tensor, s_q: int, s_k: int) -> torch.Tensor:
    """Bottom-right causal mask [len(q_rows), s_k]: query row r sees keys [0, s_k - s_q + r]."""
    keys = torch.arange(s_k, device=q_rows.device)
    return keys.unsqueeze(0) <= (q_rows + (s_k - s_q)).unsqueeze(1)


# ---------------------------------------------------------------------------
# dense decode
# ---------------------------------------------------------------------------
def dense_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: Optional[float],
    causal: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense paged MLA decode. Returns out fp32 [b, s_q, h_q, head_dim_v], lse fp32 [b, h_q, s_q].

    q [b, s_q, h_q, d_qk]; k_cache [num_blocks, page_size, h_k, d_qk] (page size =
    k_cache.shape[1], any value is accepted here), V = k_cache[..., :head_dim_v].
    Token t of batch i is k_cache[block_table[i, t // page_size], t % page_size];
    only t < cache_seqlens[i] is read, so unused table entries and cache slots may
    hold anything. Query head h reads kv head h // (h_q // h_k). Causal (bottom-right):
    query j sees keys [0, s_k - s_q + j]; a query that sees none is an empty row.
    softmax_scale None means d_qk ** -0.5. A negative seqlen counts as 0; pages a
    sequence reaches must lie in [0, num_blocks) (flash_mla.dense_decode checks both
    where it can read the values).
    """
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_k, _ = k_cache.shape
    group = h_q // h_k
    scale = _scale(softmax_scale, d_qk)
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), _INF, dtype=torch.float32, device=q.device)
    seqlens = [int(s) for s in cache_seqlens.tolist()]
    for i, s_k in enumerate(seqlens):
        if s_k <= 0 or s_q == 0:
            continue
        n_pages = -(-s_k // page_size)
        pages = block_table[i, :n_pages].to(torch.int64)
        assert pages.shape[0] == n_pages, "block_table has too few columns for cache_seqlens"
        kv = k_cache[pages].reshape(n_pages * page_size, h_k, d_qk)[:s_k].to(torch.float32)
        k = kv.permute(1, 0, 2).unsqueeze(1)  # [h_k, 1, s_k, d_qk]
        v = k[..., :head_dim_v]
        # [s_q, h_q, d] -> [h_k, group, s_q, d]: query head h = kv_head * group + g
        qi = q[i].to(torch.float32).reshape(s_q, h_k, group, d_qk).permute(1, 2, 0, 3)
        mask = _causal_mask(torch.arange(s_q, device=q.device), s_q, s_k) if causal else None
        o, l, _ = _attention(qi, k, v, mask, scale)  # [h_k, group, s_q, dv], [h_k, group, s_q]
        out[i] = o.permute(2, 0, 1, 3).reshape(s_q, h_q, head_dim_v)
        lse[i] = l.reshape(h_q, s_q)
    return out, lse


# ---------------------------------------------------------------------------
# sparse decode (FP8 cache)
# ---------------------------------------------------------------------------
def _gather_sparse_tokens(
    k_cache: torch.Tensor, kv_format: str, indices: torch.Tensor, length: Optional[int], d_qk: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One batch's pool: indices [s_q, topk] -> (tokens fp32 [s_q, topk, d_qk] with zero rows where
    invalid, valid bool [s_q, topk])."""
    s_q, topk = indices.shape
    capacity = k_cache.shape[0] * k_cache.shape[1]
    valid = (indices >= 0) & (indices < capacity)
    if length is not None:
        valid &= torch.arange(topk, device=indices.device).unsqueeze(0) < length
    tokens = torch.zeros(s_q, topk, d_qk, dtype=torch.float32, device=indices.device)
    wanted = indices[valid]
    if wanted.numel() > 0:
        tokens[valid] = quant.dequantize_kv_tokens(k_cache, kv_format, wanted)
    return tokens, valid


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: Optional[torch.Tensor],
    softmax_scale: Optional[float],
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
    kv_format: Optional[str] = None,
    extra_kv_format: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA decode on quantised caches. Returns out fp32 [b, s_q, h_q, d_v], lse fp32 [b, s_q, h_q].

    q [b, s_q, h_q, d_qk]. k_cache [num_blocks, page_size, 1, bytes_per_token] of
    uint8/int8/float8_e4m3fn in ``kv_format`` (one of flash_mla.quant.FORMAT_NAMES; None
    = detected from the last dim, flash_mla.quant.detect_format); its d_qk is q's.
    indices int32 [b, s_q, topk], block * page_size + offset; a negative index or one
    past the cache (>= num_blocks * page_size) is invalid and never read. topk_length
    int32 [b] or None: entries at or past topk_length[i] are ignored whatever they hold
    (a negative length counts as 0). Each counted slot is one logit: a token listed
    twice counts twice. The extra pool (its own cache, format ``extra_kv_format`` with
    the same rule, page size and indices [b, s_q, extra_topk]) joins the same softmax.
    V = the first d_v dequantised dims. attn_sink fp32 [h_q] as in the module
    docstring. softmax_scale None means d_qk ** -0.5.
    """
    b, s_q, h_q, d_qk = q.shape
    scale = _scale(softmax_scale, d_qk)
    pools = [(k_cache, kv_format, indices, topk_length)]
    if extra_k_cache is not None:
        pools.append((extra_k_cache, extra_kv_format, extra_indices, extra_topk_length))
    pools = [(cache, quant.detect_format(int(cache.shape[-1])) if fmt is None else fmt, idx, length)
             for cache, fmt, idx, length in pools]
    for _, fmt, _, _ in pools:
        assert quant.FORMATS[fmt].d_qk == d_qk, (fmt, d_qk)
    lengths = [None if length is None else [int(x) for x in length.tolist()] for _, _, _, length in pools]
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, s_q, h_q), _INF, dtype=torch.float32, device=q.device)
    for i in range(b):
        parts = [
            _gather_sparse_tokens(cache, fmt, idx[i], None if lens is None else lens[i], d_qk)
            for (cache, fmt, idx, _), lens in zip(pools, lengths)
        ]
        k = torch.cat([p[0] for p in parts], dim=1)  # [s_q, n, d_qk]
        valid = torch.cat([p[1] for p in parts], dim=1)  # [s_q, n]
        o, l, _ = _attention(q[i].to(torch.float32), k, k[..., :d_v], valid.unsqueeze(1), scale)
        out[i] = _apply_sink(o, l, attn_sink)
        lse[i] = l
    return out, lse


# ---------------------------------------------------------------------------
# sparse prefill
# ---------------------------------------------------------------------------
def sparse_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill. Returns out fp32 [s_q, h_q, d_v], max_logits fp32 [s_q, h_q], lse fp32 [s_q, h_q].

    q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices [s_q, 1, topk]; an index < 0 or
    >= s_kv is invalid (any value), and so is every slot at or past topk_length[r]
    (int32 [s_q] or None). A token listed twice counts twice. V = kv[..., :d_v].
    max_logits = max over valid slots of q.k * sm_scale. Empty row: out 0,
    max_logits -inf, lse +inf. attn_sink [h_q] scales out only (module docstring).
    """
    s_q, h_q, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[2]
    scale = _scale(sm_scale, d_qk)
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    max_logits = torch.full((s_q, h_q), -_INF, dtype=torch.float32, device=q.device)
    lse = torch.full((s_q, h_q), _INF, dtype=torch.float32, device=q.device)
    if topk == 0 or s_kv == 0:
        return out, max_logits, lse
    keys = kv[:, 0, :]
    idx_all = indices[:, 0, :].to(torch.int64)
    slot = torch.arange(topk, device=q.device)
    rows = _rows_per_chunk(s_q, topk * max(d_qk, h_q))
    for r0 in range(0, s_q, rows):
        r1 = min(s_q, r0 + rows)
        idx = idx_all[r0:r1]
        valid = (idx >= 0) & (idx < s_kv)
        if topk_length is not None:
            valid &= slot.unsqueeze(0) < topk_length[r0:r1].to(torch.int64).unsqueeze(1)
        safe = torch.where(valid, idx, torch.zeros_like(idx))
        k = keys[safe].to(torch.float32)  # [rows, topk, d_qk]
        k = torch.where(valid.unsqueeze(-1), k, torch.zeros_like(k))
        o, l, m = _attention(q[r0:r1].to(torch.float32), k, k[..., :d_v], valid.unsqueeze(1), scale)
        out[r0:r1] = _apply_sink(o, l, attn_sink)
        lse[r0:r1] = l
        max_logits[r0:r1] = m
    return out, max_logits, lse


# ---------------------------------------------------------------------------
# dense MHA prefill (training), forward and backward
# ---------------------------------------------------------------------------
def _heads_grouped(x: torch.Tensor, h_k: int) -> torch.Tensor:
    """[rows, h_q, d] -> fp32 [h_k, group, rows, d]; query head h = kv head * group + g."""
    rows, h_q, d = x.shape
    return x.to(torch.float32).reshape(rows, h_k, h_q // h_k, d).permute(1, 2, 0, 3)


def _heads_ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[h_k, group, rows, d] -> [rows, h_k * group, d]."""
    h_k, group, rows, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(rows, h_k * group, d)


def _kv_heads(x: torch.Tensor) -> torch.Tensor:
    """[rows, h_k, d] -> fp32 [h_k, 1, rows, d] (broadcast over the query-head group)."""
    return x.to(torch.float32).permute(1, 0, 2).unsqueeze(1)


def mha_prefill_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    *,
    p_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Varlen dense MHA forward. Returns out fp32 [total_q, h_q, d_v], lse fp32 [total_q, h_q].

    p_dtype (keyword, default None = exact fp32): when bf16/fp16, P is rounded to it
    before P.V as the numerics contract prescribes for the kernels; kernel tests use
    this oracle for the element-wise tolerances (see _attention).

    Sequence i: q rows [cu_q[i], cu_q[i+1]), k/v rows [cu_k[i], cu_k[i+1]); lengths
    may be 0. GQA: query head h reads kv head h // (h_q // h_k). Causal is
    bottom-right per sequence (row r of s_q sees keys [0, s_k - s_q + r]). Rows that
    see no key, and rows past cu_seqlens_q[-1], give out 0 and lse +inf.
    softmax_scale None means d_qk ** -0.5.
    """
    cu_q, cu_k = _offsets(cu_seqlens_q), _offsets(cu_seqlens_k)
    total_q, h_q, d_qk = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    scale = _scale(softmax_scale, d_qk)
    out = torch.zeros(total_q, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((total_q, h_q), _INF, dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        q0, s_q = cu_q[i], cu_q[i + 1] - cu_q[i]
        k0, s_k = cu_k[i], cu_k[i + 1] - cu_k[i]
        if s_q <= 0 or s_k <= 0:
            continue
        ks, vs = _kv_heads(k[k0:k0 + s_k]), _kv_heads(v[k0:k0 + s_k])
        rows = _rows_per_chunk(s_q, h_q * s_k)
        for r0 in range(0, s_q, rows):
            r1 = min(s_q, r0 + rows)
            qs = _heads_grouped(q[q0 + r0:q0 + r1], h_k)
            mask = _causal_mask(torch.arange(r0, r1, device=q.device), s_q, s_k) if causal else None
            o, l, _ = _attention(qs, ks, vs, mask, scale, p_dtype)
            out[q0 + r0:q0 + r1] = _heads_ungrouped(o)
            lse[q0 + r0:q0 + r1] = _heads_ungrouped(l.unsqueeze(-1)).squeeze(-1)
    return out, lse


def mha_prefill_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: Optional[float],
    causal: bool,
    *,
    p_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen dense MHA backward. Returns (dq, dk, dv) fp32 with the shapes of q, k, v.

    p_dtype (keyword, default None = exact fp32): when bf16/fp16, P is rounded to it
    before dV = P^T dO and dS before dQ = dS K and dK = dS^T Q, where the kernels'
    tensor-core products take them in the input dtype.

    Uses the given out and lse (as the kernels do): P = exp(S - lse) on unmasked
    pairs, dV = P^T dO, dP = dO V^T, delta = rowsum(dO * O), dS = P * (dP - delta),
    dQ = scale * dS K, dK = scale * dS^T Q. GQA: dk/dv sum over the query heads of
    each kv head. Rows with lse = +inf (empty rows) contribute nothing; keys no
    query sees get 0. The gradient of lse is not part of this backward.
    """
    cu_q, cu_k = _offsets(cu_seqlens_q), _offsets(cu_seqlens_k)
    total_q, h_q, d_qk = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    scale = _scale(softmax_scale, d_qk)
    dq = torch.zeros(total_q, h_q, d_qk, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        q0, s_q = cu_q[i], cu_q[i + 1] - cu_q[i]
        k0, s_k = cu_k[i], cu_k[i + 1] - cu_k[i]
        if s_q <= 0 or s_k <= 0:
            continue
        ks, vs = _kv_heads(k[k0:k0 + s_k]), _kv_heads(v[k0:k0 + s_k])  # [h_k, 1, s_k, d]
        dk_seq = torch.zeros(h_k, s_k, d_qk, dtype=torch.float32, device=q.device)
        dv_seq = torch.zeros(h_k, s_k, d_v, dtype=torch.float32, device=q.device)
        rows = _rows_per_chunk(s_q, 2 * h_q * s_k)
        for r0 in range(0, s_q, rows):
            r1 = min(s_q, r0 + rows)
            sl = slice(q0 + r0, q0 + r1)
            qs = _heads_grouped(q[sl], h_k)        # [h_k, g, c, d_qk]
            dos = _heads_grouped(dout[sl], h_k)    # [h_k, g, c, d_v]
            os_ = _heads_grouped(out[sl], h_k)
            ls = _heads_grouped(lse[sl].unsqueeze(-1), h_k).squeeze(-1)  # [h_k, g, c]
            logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale      # [h_k, g, c, s_k]
            keep = ls.unsqueeze(-1) != _INF
            if causal:
                keep = keep & _causal_mask(torch.arange(r0, r1, device=q.device), s_q, s_k)
            probs = torch.where(keep, _exp.exp(logits - ls.unsqueeze(-1)), torch.zeros_like(logits))
            delta = (dos * os_).sum(dim=-1, keepdim=True)                # [h_k, g, c, 1]
            dprobs = torch.matmul(dos, vs.transpose(-1, -2))             # [h_k, g, c, s_k]
            dlogits = probs * (dprobs - delta)
            dlogits = _round_to(dlogits, p_dtype)
            dq[sl] = _heads_ungrouped(torch.matmul(dlogits, ks) * scale)
            dk_seq += (torch.matmul(dlogits.transpose(-1, -2), qs) * scale).sum(dim=1)
            dv_seq += torch.matmul(_round_to(probs, p_dtype).transpose(-1, -2), dos).sum(dim=1)
        dk[k0:k0 + s_k] = dk_seq.permute(1, 0, 2)
        dv[k0:k0 + s_k] = dv_seq.permute(1, 0, 2)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# split-KV combine
# ---------------------------------------------------------------------------
def _check_combine(o_accum, lse_accum, split_offsets) -> None:
    """Shape assumptions of the oracle (combine has no public entry to validate it)."""
    assert o_accum.dim() == 4, f"o_accum must be [num_splits_total, s_q, h_q, d_v], got {tuple(o_accum.shape)}"
    assert tuple(lse_accum.shape) == tuple(o_accum.shape[:3]), (
        f"lse_accum must be [num_splits_total, s_q, h_q] = {tuple(o_accum.shape[:3])}, "
        f"got {tuple(lse_accum.shape)}")
    assert split_offsets.dim() == 1 and split_offsets.shape[0] >= 1, (
        f"split_offsets must be [batch + 1], got {tuple(split_offsets.shape)}")


def combine(
    o_accum: torch.Tensor,
    lse_accum: torch.Tensor,
    split_offsets: torch.Tensor,
    attn_sink: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results. Returns out fp32 [b, s_q, h_q, d_v], lse fp32 [b, s_q, h_q] (natural log).

    o_accum fp32 [num_splits_total, s_q, h_q, d_v] (each split normalised by its own
    sum), lse_accum fp32 [num_splits_total, s_q, h_q] in log2 units, -inf = empty
    split (its o_accum row is never read, so it may hold garbage). Batch i merges
    splits [off[i], off[i+1]) with both offsets clamped to [0, num_splits_total] and
    a reversed range taken as empty, as the kernel does (csrc/params.h):
    out = sum_j 2^(lse_j - m) o_j / sum_j 2^(lse_j - m), lse = (m + log2 sum) * ln 2.
    No split or only empty ones: out 0, lse +inf. The sink is applied once, after merging.
    """
    _check_combine(o_accum, lse_accum, split_offsets)
    num_splits, s_q, h_q, d_v = o_accum.shape
    offsets = [min(max(int(x), 0), num_splits) for x in split_offsets.tolist()]
    b = len(offsets) - 1
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float32, device=o_accum.device)
    lse = torch.full((b, s_q, h_q), _INF, dtype=torch.float32, device=o_accum.device)
    for i in range(b):
        lo, hi = offsets[i], offsets[i + 1]
        if hi <= lo:
            continue
        part_lse = lse_accum[lo:hi]
        used = part_lse != -_INF                                   # [n, s_q, h_q]
        any_used = used.any(dim=0)
        peak = torch.where(used, part_lse, torch.full_like(part_lse, -_INF)).amax(dim=0)
        peak = torch.where(any_used, peak, torch.zeros_like(peak))
        weights = torch.where(used, _exp.exp2(part_lse - peak), torch.zeros_like(part_lse))
        parts = torch.where(used.unsqueeze(-1), o_accum[lo:hi], torch.zeros_like(o_accum[lo:hi]))
        total = weights.sum(dim=0)
        merged = (weights.unsqueeze(-1) * parts).sum(dim=0) / torch.where(any_used, total, torch.ones_like(total)).unsqueeze(-1)
        merged_lse = (peak + torch.log2(total)) * math.log(2.0)
        out[i] = torch.where(any_used.unsqueeze(-1), merged, torch.zeros_like(merged))
        lse[i] = torch.where(any_used, merged_lse, torch.full_like(merged_lse, _INF))
    return _apply_sink(out, lse, attn_sink), lse
