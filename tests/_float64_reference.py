"""Independent float64 formulations of every op, written plainly (loops per row and head),
to check flash_mla.reference against. Nothing here imports flash_mla: the FP8 formats are
decoded from their bytes with struct and a bit-level e4m3 decoder, so a layout bug in
flash_mla.quant cannot cancel out.

Every function returns float64 CPU tensors; empty rows give out 0, lse +inf,
max_logits -inf.
"""
from __future__ import annotations

import math
import struct
from typing import List, Optional, Sequence, Tuple

import torch

INF = float("inf")


# ---------------------------------------------------------------------------
# byte-level decoding of the FP8 formats
# ---------------------------------------------------------------------------
def e4m3_value(byte: int) -> float:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * (mantissa / 8.0) * 2.0 ** -6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


E4M3_TABLE = [e4m3_value(b) for b in range(256)]


def bf16_value(lo: int, hi: int) -> float:
    """Two little-endian bytes of a bf16 -> its value (the top half of an fp32)."""
    return struct.unpack("<f", bytes([0, 0, lo, hi]))[0]


def fp32_value(raw: Sequence[int]) -> float:
    return struct.unpack("<f", bytes(raw))[0]


def ue8m0_value(byte: int) -> float:
    return float("nan") if byte == 255 else math.ldexp(1.0, byte - 127)


def decode_v32_token(raw: Sequence[int]) -> List[float]:
    """656 bytes -> 576 values: 512 e4m3 * fp32 scale per 128, then 64 bf16."""
    assert len(raw) == 656
    scales = [fp32_value(raw[512 + 4 * t:516 + 4 * t]) for t in range(4)]
    values = [E4M3_TABLE[raw[i]] * scales[i // 128] for i in range(512)]
    values += [bf16_value(raw[528 + 2 * j], raw[529 + 2 * j]) for j in range(64)]
    return values


def decode_model1_token(block_bytes: Sequence[int], page_size: int, offset: int) -> List[float]:
    """Token `offset` of one MODEL1 block (page_size * 584 bytes in logical order) -> 512 values."""
    data = block_bytes[offset * 576:(offset + 1) * 576]
    scale_base = page_size * 576 + offset * 8
    scales = [ue8m0_value(block_bytes[scale_base + t]) for t in range(7)]
    values = [E4M3_TABLE[data[i]] * scales[i // 64] for i in range(448)]
    values += [bf16_value(data[448 + 2 * j], data[449 + 2 * j]) for j in range(64)]
    return values


def decode_fp8_token(k_cache: torch.Tensor, d_qk: int, index: int) -> torch.Tensor:
    """Physical token index of a quantised cache [num_blocks, page_size, 1, bytes] -> float64 [d_qk]."""
    raw = k_cache.view(torch.uint8) if k_cache.dtype != torch.uint8 else k_cache
    page_size = raw.shape[1]
    block, offset = index // page_size, index % page_size
    if d_qk == 576:
        values = decode_v32_token(raw[block, offset, 0].tolist())
    else:
        block_bytes = raw[block].reshape(-1).tolist()
        values = decode_model1_token(block_bytes, page_size, offset)
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------
# one softmax row
# ---------------------------------------------------------------------------
def attend_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """One query row in float64. q [d], keys [n, d], values [n, dv] -> (out [dv], lse, max_logit);
    out is None when n == 0."""
    if keys.shape[0] == 0:
        return None, INF, -INF
    logits = (keys @ q) * scale
    peak = float(logits.max())
    lse = peak + math.log(float(torch.exp(logits - peak).sum()))
    weights = torch.exp(logits - lse)
    return weights @ values, lse, peak


def stack_rows(rows: List[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.float64)


def sink_factor(lse: float, sink: Optional[float]) -> float:
    """exp(lse) / (exp(lse) + exp(sink)) written as 1 / (1 + exp(sink - lse))."""
    if sink is None:
        return 1.0
    x = sink - lse
    if x > 700.0:
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


# ---------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------
def dense_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal):
    b, s_q, h_q, d = q.shape
    page_size, h_k = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_k
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), INF, dtype=torch.float64)
    for i in range(b):
        s_k = int(cache_seqlens[i])
        for j in range(s_q):
            limit = min(s_k, s_k - s_q + j + 1) if causal else s_k
            for h in range(h_q):
                kvh = h // group
                rows = []
                for t in range(max(0, limit)):
                    page = int(block_table[i, t // page_size])
                    rows.append(k_cache[page, t % page_size, kvh].double())
                keys = stack_rows(rows, d)
                o, l, _ = attend_row(q[i, j, h].double(), keys, keys[:, :head_dim_v], scale)
                if o is not None:
                    out[i, j, h] = o
                    lse[i, h, j] = l
    return out, lse


def sparse_decode(q, pools, scale, d_v, sink=None):
    """pools: list of (k_cache, indices [b, s_q, topk], topk_length list or None)."""
    b, s_q, h_q, d_qk = q.shape
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, s_q, h_q), INF, dtype=torch.float64)
    cache_of_tokens = {}
    for i in range(b):
        for j in range(s_q):
            rows = []
            for p, (cache, indices, lengths) in enumerate(pools):
                topk = indices.shape[2]
                count = topk if lengths is None else max(0, min(topk, int(lengths[i])))
                for s in range(count):
                    idx = int(indices[i, j, s])
                    if idx == -1:
                        continue
                    key = (p, idx)
                    if key not in cache_of_tokens:
                        cache_of_tokens[key] = decode_fp8_token(cache, d_qk, idx)
                    rows.append(cache_of_tokens[key])
            keys = stack_rows(rows, d_qk)
            for h in range(h_q):
                o, l, _ = attend_row(q[i, j, h].double(), keys, keys[:, :d_v], scale)
                if o is not None:
                    f = sink_factor(l, None if sink is None else float(sink[h]))
                    out[i, j, h] = o * f
                    lse[i, j, h] = l
    return out, lse


def sparse_prefill(q, kv, indices, scale, d_v, sink=None, topk_length=None):
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float64)
    max_logits = torch.full((s_q, h_q), -INF, dtype=torch.float64)
    lse = torch.full((s_q, h_q), INF, dtype=torch.float64)
    for r in range(s_q):
        count = topk if topk_length is None else max(0, min(topk, int(topk_length[r])))
        rows = []
        for s in range(count):
            idx = int(indices[r, 0, s])
            if 0 <= idx < s_kv:
                rows.append(kv[idx, 0].double())
        keys = stack_rows(rows, kv.shape[2])
        for h in range(h_q):
            o, l, m = attend_row(q[r, h].double(), keys, keys[:, :d_v], scale)
            if o is not None:
                out[r, h] = o * sink_factor(l, None if sink is None else float(sink[h]))
                lse[r, h] = l
                max_logits[r, h] = m
    return out, max_logits, lse


def _sequences(cu_q: Sequence[int], cu_k: Sequence[int]):
    for i in range(len(cu_q) - 1):
        yield cu_q[i], cu_q[i + 1] - cu_q[i], cu_k[i], cu_k[i + 1] - cu_k[i]


def mha_fwd(q, k, v, cu_q, cu_k, scale, causal):
    total_q, h_q, _ = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    group = h_q // h_k
    out = torch.zeros(total_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((total_q, h_q), INF, dtype=torch.float64)
    for q0, s_q, k0, s_k in _sequences(cu_q, cu_k):
        for r in range(s_q):
            limit = min(s_k, s_k - s_q + r + 1) if causal else s_k
            for h in range(h_q):
                n = max(0, limit)
                keys = k[k0:k0 + n, h // group].double()
                vals = v[k0:k0 + n, h // group].double()
                o, l, _ = attend_row(q[q0 + r, h].double(), keys, vals, scale)
                if o is not None:
                    out[q0 + r, h] = o
                    lse[q0 + r, h] = l
    return out, lse


def mha_bwd(dout, q, k, v, cu_q, cu_k, scale, causal):
    """Softmax recomputed in float64 (not taken from a given lse), one (sequence, head) at a time."""
    h_q = q.shape[1]
    h_k = k.shape[1]
    group = h_q // h_k
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk = torch.zeros(k.shape, dtype=torch.float64)
    dv = torch.zeros(v.shape, dtype=torch.float64)
    for q0, s_q, k0, s_k in _sequences(cu_q, cu_k):
        if s_q == 0 or s_k == 0:
            continue
        for h in range(h_q):
            kvh = h // group
            Q = q[q0:q0 + s_q, h].double()
            K = k[k0:k0 + s_k, kvh].double()
            V = v[k0:k0 + s_k, kvh].double()
            dO = dout[q0:q0 + s_q, h].double()
            S = Q @ K.T * scale
            P = torch.zeros_like(S)
            for r in range(s_q):
                limit = min(s_k, s_k - s_q + r + 1) if causal else s_k
                if limit <= 0:
                    continue
                row = S[r, :limit]
                e = torch.exp(row - row.max())
                P[r, :limit] = e / e.sum()
            dV = P.T @ dO
            dP = dO @ V.T
            D = (P * dP).sum(dim=1, keepdim=True)
            dS = P * (dP - D)
            dq[q0:q0 + s_q, h] = dS @ K * scale
            dk[k0:k0 + s_k, kvh] += dS.T @ Q * scale
            dv[k0:k0 + s_k, kvh] += dV
    return dq, dk, dv


def combine(o_accum, lse_accum, split_offsets, sink=None):
    num_splits, s_q, h_q, d_v = o_accum.shape
    offsets = [min(max(int(x), 0), num_splits) for x in split_offsets]
    b = len(offsets) - 1
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, s_q, h_q), INF, dtype=torch.float64)
    for i in range(b):
        for j in range(s_q):
            for h in range(h_q):
                live = [s for s in range(offsets[i], offsets[i + 1]) if float(lse_accum[s, j, h]) != -INF]
                if not live:
                    continue
                # natural-log lse of each split: log2 value * ln 2
                nat = [float(lse_accum[s, j, h]) * math.log(2.0) for s in live]
                peak = max(nat)
                total = sum(math.exp(x - peak) for x in nat)
                merged_lse = peak + math.log(total)
                acc = torch.zeros(d_v, dtype=torch.float64)
                for s, x in zip(live, nat):
                    acc += math.exp(x - merged_lse) * o_accum[s, j, h].double()
                out[i, j, h] = acc * sink_factor(merged_lse, None if sink is None else float(sink[h]))
                lse[i, j, h] = merged_lse
    return out, lse
