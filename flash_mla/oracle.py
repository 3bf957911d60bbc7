"""The float64 oracle of every op, and the "plain" PyTorch computation of the numerics rules.

One module serves the tests, the smoke test and the benchmarks. It imports nothing from
the rest of flash_mla: FP8 caches are decoded from their bytes here (a bit-level e4m3
decoder, scales read from the raw bytes), so a layout bug in flash_mla.quant or a
mistake in flash_mla.reference cannot cancel out against it.

Exact functions (float64, on the device of the first tensor argument; no rounding but
float64's, softmax in natural log):

- ``mha_fwd`` / ``mha_bwd``: dense MHA prefill over varlen sequences, bottom-right causal
  mask. ``mha_bwd`` takes the forward output the backward is given (the kernels' contract:
  delta = rowsum(dO * out) with out as the forward rounded it); ``out=None`` gives the
  true gradient of the float64 forward.
- ``dense_decode``: paged cache, ``block_table``, ``cache_seqlens``.
- ``sparse_decode``: the tokens named by ``indices`` in one or more quantised caches (each
  in any of the five formats V32, V32_NO_ROPE, V4, V41, V41_FP4, decoded from its bytes by
  ``decode_fp8_tokens``), optional attention sink.
- ``sparse_prefill``: the tokens named by ``indices`` in a bf16 ``kv``, optional sink.
- ``combine``: the split-KV merge of partial outputs with log2 partial LSEs.

Common rules: a row with nothing to attend to gives out 0, lse +inf, max_logits -inf; the
sink multiplies out by exp(lse) / (exp(lse) + exp(sink)) and the lse excludes it. The
functions are differentiable (torch ops only), so autograd through ``mha_fwd`` is the
true gradient. Query rows are processed in chunks so long rows fit in memory.

Plain functions (the numerics rule for hostile inputs compares a kernel's error with
theirs): ``plain_mha_fwd`` / ``plain_mha_bwd`` compute the op in plain PyTorch at the
input precision: fp32 scores and softmax, P cast to the input dtype, P.V in that dtype;
the gradients by autograd through exactly that. ``plain_sparse_prefill`` and
``plain_sparse_decode`` do the same over the selected tokens (decode: the dequantised
tokens in q's dtype). ``plain_combine`` merges in fp32 and rounds once to the output dtype.
"""
from __future__ import annotations

import math
import struct
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "E4M3_TABLE",
    "e4m3_value",
    "bf16_value",
    "fp32_value",
    "ue8m0_value",
    "e2m1_value",
    "FORMAT_SIZES",
    "format_name",
    "decode_v32_token",
    "decode_v32_no_rope_token",
    "decode_model1_token",
    "decode_v41_token",
    "decode_v41_fp4_token",
    "decode_fp8_token",
    "decode_fp8_tokens",
    "attend",
    "mha_fwd",
    "mha_bwd",
    "dense_decode",
    "sparse_decode",
    "sparse_prefill",
    "combine",
    "plain_mha_fwd",
    "plain_mha_bwd",
    "plain_combine",
    "plain_sparse_prefill",
    "plain_sparse_decode",
]

INF = float("inf")
F64 = torch.float64
# Elements of one [heads, rows, keys] float64 tensor held at once (256 MiB); query rows
# are processed in chunks below it.
_MAX_CHUNK_ELEMENTS = 1 << 25

Offsets = Union[torch.Tensor, Sequence[int]]


# ---------------------------------------------------------------------------
# FP8 formats, decoded from their bytes
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


E4M3_TABLE: List[float] = [e4m3_value(b) for b in range(256)]


def bf16_value(lo: int, hi: int) -> float:
    """Two little-endian bytes of a bf16 -> its value (the top half of an fp32)."""
    return struct.unpack("<f", bytes([0, 0, lo, hi]))[0]


def fp32_value(raw: Sequence[int]) -> float:
    """Four little-endian bytes -> the fp32 value."""
    return struct.unpack("<f", bytes(raw))[0]


def ue8m0_value(byte: int) -> float:
    """ue8m0 scale byte e -> 2**(e - 127); 255 is NaN."""
    return float("nan") if byte == 255 else math.ldexp(1.0, byte - 127)


E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_value(nibble: int) -> float:
    """e2m1 (FP4): bit 3 the sign, bits 0..2 a magnitude code for {0, .5, 1, 1.5, 2, 3, 4, 6}."""
    magnitude = E2M1_MAGNITUDES[nibble & 0x7]
    return -magnitude if nibble & 0x8 else magnitude

# name -> (bytes per token, d_qk); written out here, not imported, so the oracle stays
# independent of flash_mla.quant.
FORMAT_SIZES = {"V32": (656, 576), "V32_NO_ROPE": (528, 512), "V4": (584, 512),
                "V41": (528, 512), "V41_FP4": (288, 512)}
_BY_HEAD_DIM = {576: "V32", 512: "V4"}


def format_name(kv_format: Union[str, int]) -> str:
    """A format name, or q's head dim under the older rule (576 -> V32, 512 -> V4)."""
    if isinstance(kv_format, int) and not isinstance(kv_format, bool):
        if kv_format not in _BY_HEAD_DIM:
            raise ValueError(f"kv_format given as a head dim must be 576 (V32) or 512 (V4), got {kv_format}")
        return _BY_HEAD_DIM[kv_format]
    if kv_format not in FORMAT_SIZES:
        raise ValueError(f"kv_format must be one of {', '.join(map(repr, FORMAT_SIZES))}, got {kv_format!r}")
    return kv_format


def decode_v32_token(raw: Sequence[int]) -> List[float]:
    """656 bytes -> 576 values: 512 e4m3 * fp32 scale per 128, then 64 bf16."""
    if len(raw) != 656:
        raise ValueError(f"raw must hold 656 bytes (one V32 token), got {len(raw)}")
    values = decode_v32_no_rope_token(raw[:528])
    values += [bf16_value(raw[528 + 2 * j], raw[529 + 2 * j]) for j in range(64)]
    return values


def decode_v32_no_rope_token(raw: Sequence[int]) -> List[float]:
    """528 bytes -> 512 values: 512 e4m3 * fp32 scale per 128 (the first 528 bytes of V32)."""
    if len(raw) != 528:
        raise ValueError(f"raw must hold 528 bytes (one V32_NO_ROPE token), got {len(raw)}")
    scales = [fp32_value(raw[512 + 4 * t:516 + 4 * t]) for t in range(4)]
    return [E4M3_TABLE[raw[i]] * scales[i // 128] for i in range(512)]


def decode_v41_token(raw: Sequence[int]) -> List[float]:
    """528 bytes -> 512 values: 512 e4m3 * ue8m0 scale per 32."""
    if len(raw) != 528:
        raise ValueError(f"raw must hold 528 bytes (one V41 token), got {len(raw)}")
    scales = [ue8m0_value(raw[512 + t]) for t in range(16)]
    return [E4M3_TABLE[raw[i]] * scales[i // 32] for i in range(512)]


def decode_v41_fp4_token(raw: Sequence[int]) -> List[float]:
    """288 bytes -> 512 values: e2m1 (element i in byte i // 2, even element in the low
    nibble) * e4m3 scale per 16."""
    if len(raw) != 288:
        raise ValueError(f"raw must hold 288 bytes (one V41_FP4 token), got {len(raw)}")
    scales = [E4M3_TABLE[raw[256 + t]] for t in range(32)]
    nibbles = [(raw[i // 2] >> (4 * (i % 2))) & 0xF for i in range(512)]
    return [e2m1_value(nibbles[i]) * scales[i // 16] for i in range(512)]


def decode_model1_token(block_bytes: Sequence[int], page_size: int, offset: int) -> List[float]:
    """Token ``offset`` of one V4 (MODEL1) block (page_size * 584 bytes in logical order) -> 512
    values: 448 e4m3 * ue8m0 scale per 64, then 64 bf16."""
    data = block_bytes[offset * 576:(offset + 1) * 576]
    scale_base = page_size * 576 + offset * 8
    scales = [ue8m0_value(block_bytes[scale_base + t]) for t in range(7)]
    values = [E4M3_TABLE[data[i]] * scales[i // 64] for i in range(448)]
    values += [bf16_value(data[448 + 2 * j], data[449 + 2 * j]) for j in range(64)]
    return values


_TOKEN_DECODERS = {"V32": decode_v32_token, "V32_NO_ROPE": decode_v32_no_rope_token,
                   "V41": decode_v41_token, "V41_FP4": decode_v41_fp4_token}


def _raw_bytes(k_cache: torch.Tensor) -> torch.Tensor:
    return k_cache.view(torch.uint8) if k_cache.dtype != torch.uint8 else k_cache


def _check_cache_bytes(raw: torch.Tensor, name: str) -> None:
    bpt = FORMAT_SIZES[name][0]
    if raw.dim() != 4 or raw.shape[3] != bpt:
        raise ValueError(f"k_cache must have shape [num_blocks, page_size, 1, {bpt}] for kv_format {name!r}, "
                         f"got shape {tuple(raw.shape)}")


def decode_fp8_token(k_cache: torch.Tensor, kv_format: Union[str, int], index: int) -> torch.Tensor:
    """Physical token ``index`` of a quantised cache [num_blocks, page_size, 1, bytes] ->
    float64 [d_qk], one byte at a time. kv_format: a format name, or q's head dim
    (576: V32, 512: V4)."""
    name = format_name(kv_format)
    raw = _raw_bytes(k_cache)
    _check_cache_bytes(raw, name)
    page_size = raw.shape[1]
    block, offset = index // page_size, index % page_size
    if name == "V4":
        values = decode_model1_token(raw[block].reshape(-1).tolist(), page_size, offset)
    else:
        values = _TOKEN_DECODERS[name](raw[block, offset, 0].tolist())
    return torch.tensor(values, dtype=F64)


def _bytes_to(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, k * itemsize] uint8 -> [n, k] float64, reading little-endian ``dtype`` values."""
    return raw.contiguous().view(dtype).to(F64)


def _ue8m0_to_f64(codes: torch.Tensor) -> torch.Tensor:
    return torch.where(codes == 255, torch.full(codes.shape, float("nan"), dtype=F64),
                       torch.pow(2.0, codes.to(F64) - 127.0))


def decode_fp8_tokens(k_cache: torch.Tensor, kv_format: Union[str, int], indices: Sequence[int]) -> torch.Tensor:
    """Physical tokens ``indices`` of a quantised cache -> float64 [len(indices), d_qk], on the
    CPU; the same decoding as decode_fp8_token, done for many tokens at once. kv_format: a
    format name, or q's head dim (576: V32, 512: V4)."""
    name = format_name(kv_format)
    d_qk = FORMAT_SIZES[name][1]
    raw = _raw_bytes(k_cache).detach().cpu()
    _check_cache_bytes(raw, name)
    num_blocks, page_size = raw.shape[0], raw.shape[1]
    ids = torch.as_tensor(list(indices), dtype=torch.int64)
    if ids.numel() == 0:
        return torch.zeros(0, d_qk, dtype=F64)
    if int(ids.min()) < 0 or int(ids.max()) >= num_blocks * page_size:
        raise ValueError(f"indices must lie in [0, {num_blocks * page_size}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    table = torch.tensor(E4M3_TABLE, dtype=F64)
    if name == "V4":
        blocks = raw.reshape(num_blocks, -1)                                       # [blocks, page * 584]
        block, offset = ids // page_size, ids % page_size
        data = blocks[block.unsqueeze(1), offset.unsqueeze(1) * 576 + torch.arange(576)]
        codes = blocks[block.unsqueeze(1), page_size * 576 + offset.unsqueeze(1) * 8 + torch.arange(7)]
        nope = table[data[:, :448].long()] * _ue8m0_to_f64(codes).repeat_interleave(64, dim=1)
        rope = _bytes_to(data[:, 448:576], torch.bfloat16)
        return torch.cat([nope, rope], dim=1)
    tok = raw.reshape(num_blocks * page_size, -1)[ids]                             # [n, bytes]
    if name in ("V32", "V32_NO_ROPE"):
        scales = _bytes_to(tok[:, 512:528], torch.float32)                         # [n, 4]
        nope = table[tok[:, :512].long()] * scales.repeat_interleave(128, dim=1)
        if name == "V32_NO_ROPE":
            return nope
        return torch.cat([nope, _bytes_to(tok[:, 528:656], torch.bfloat16)], dim=1)
    if name == "V41":
        return table[tok[:, :512].long()] * _ue8m0_to_f64(tok[:, 512:528]).repeat_interleave(32, dim=1)
    e2m1 = torch.tensor([e2m1_value(n) for n in range(16)], dtype=F64)
    data = tok[:, :256].long()
    nibbles = torch.stack([data & 0xF, data >> 4], dim=2).reshape(-1, 512)
    return e2m1[nibbles] * table[tok[:, 256:288].long()].repeat_interleave(16, dim=1)


# ---------------------------------------------------------------------------
# one attention block in float64
# ---------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
           scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [..., m, d], k [..., n, d], v [..., n, dv], visible bool broadcastable to [..., m, n]
    -> (out [..., m, dv], lse [..., m], max_logits [..., m]), all float64.

    Keys no row sees are zeroed before any product, so NaN in them never leaks in (and
    gives no NaN gradient); rows that see nothing give out 0, lse +inf, max_logits -inf.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    used = visible.any(dim=-2).unsqueeze(-1)                          # [..., n, 1]
    visible = visible.expand(torch.broadcast_shapes(q.shape[:-1] + (k.shape[-2],), visible.shape))
    k = torch.where(used, k, torch.zeros((), dtype=F64, device=k.device))
    v = torch.where(used, v, torch.zeros((), dtype=F64, device=v.device))
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    any_row = visible.any(dim=-1, keepdim=True)
    masked = torch.where(visible, logits, torch.full((), -INF, dtype=F64, device=q.device))
    if masked.shape[-1] == 0:
        peak = torch.full(masked.shape[:-1] + (1,), -INF, dtype=F64, device=q.device)
    else:
        peak = masked.amax(dim=-1, keepdim=True)
    # Softmax is shift-invariant: the shift carries no gradient.
    shift = torch.where(any_row, peak, torch.zeros_like(peak)).detach()
    weights = torch.exp(masked - shift)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights / torch.where(any_row, total, torch.ones_like(total)), v)
    lse = torch.where(any_row, torch.log(torch.where(any_row, total, torch.ones_like(total))) + shift,
                      torch.full_like(total, INF)).squeeze(-1)
    return out, lse, peak.squeeze(-1)


def _sink_factor(lse: torch.Tensor, sink: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); 1 without a sink and
    in empty rows (lse +inf), whose out is 0 anyway."""
    if sink is None:
        return torch.ones_like(lse)
    x = sink.to(F64) - lse
    factor = 1.0 / (1.0 + torch.exp(x))
    return torch.where(torch.isposinf(lse), torch.ones_like(lse), factor)


def _offsets(name: str, cu: Offsets) -> List[int]:
    values = cu.tolist() if isinstance(cu, torch.Tensor) else [int(x) for x in cu]
    if not values or any(b < a for a, b in zip(values, values[1:])) or values[0] < 0:
        raise ValueError(f"{name} must be non-empty, non-negative and non-decreasing, got {values}")
    return values


def _chunk_rows(heads: int, keys: int) -> int:
    return max(1, _MAX_CHUNK_ELEMENTS // max(1, heads * keys))


def _visible_keys(rows: torch.Tensor, s_q: int, s_k: int, causal: bool) -> torch.Tensor:
    """[len(rows), s_k] bool: bottom-right causal (row r sees keys < s_k - s_q + r + 1)."""
    cols = torch.arange(s_k, device=rows.device)
    if not causal:
        return torch.ones(rows.numel(), s_k, dtype=torch.bool, device=rows.device)
    return cols.unsqueeze(0) <= (rows.unsqueeze(1) + (s_k - s_q))


def _causal_key_limit(last_row: int, s_q: int, s_k: int, causal: bool) -> int:
    """Keys any of rows [.., last_row] can see."""
    return s_k if not causal else max(0, min(s_k, s_k - s_q + last_row + 1))


# ---------------------------------------------------------------------------
# dense MHA prefill
# ---------------------------------------------------------------------------
def _sequences(cu_q: List[int], cu_k: List[int]):
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{len(cu_q)} and {len(cu_k)}")
    for i in range(len(cu_q) - 1):
        yield cu_q[i], cu_q[i + 1] - cu_q[i], cu_k[i], cu_k[i + 1] - cu_k[i]


def _grouped(x: torch.Tensor, h_k: int) -> torch.Tensor:
    """[rows, h_q, d] -> [h_k, group, rows, d]."""
    rows, h_q, d = x.shape
    return x.permute(1, 0, 2).reshape(h_k, h_q // h_k, rows, d)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[h_k, group, rows, d] -> [rows, h_q, d]."""
    h_k, group, rows, d = x.shape
    return x.reshape(h_k * group, rows, d).permute(1, 0, 2)


def _check_heads(h_q: int, h_k: int) -> None:
    if h_k < 1 or h_q % h_k:
        raise ValueError(f"q heads must be a positive multiple of k heads, got h_q={h_q}, h_k={h_k}")


def mha_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Offsets,
            cu_seqlens_k: Offsets, scale: float, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [total_q, h_q, d_qk], k [total_k, h_k, d_qk], v [total_k, h_k, d_v] ->
    (out [total_q, h_q, d_v], lse [total_q, h_q]) in float64 on q's device.
    Rows outside every sequence give out 0, lse +inf. Differentiable."""
    cu_q, cu_k = _offsets("cu_seqlens_q", cu_seqlens_q), _offsets("cu_seqlens_k", cu_seqlens_k)
    total_q, h_q, _ = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    _check_heads(h_q, h_k)
    dev = q.device
    outs: List[torch.Tensor] = []
    lses: List[torch.Tensor] = []
    at = 0

    def gap(rows: int) -> None:
        outs.append(torch.zeros(rows, h_q, d_v, dtype=F64, device=dev))
        lses.append(torch.full((rows, h_q), INF, dtype=F64, device=dev))

    for q0, s_q, k0, s_k in _sequences(cu_q, cu_k):
        if q0 < at:
            raise ValueError(f"cu_seqlens_q must not overlap, got {cu_q}")
        if q0 > at:
            gap(q0 - at)
        ks = k[k0:k0 + s_k].to(dev, F64).permute(1, 0, 2).unsqueeze(1)   # [h_k, 1, s_k, d]
        vs = v[k0:k0 + s_k].to(dev, F64).permute(1, 0, 2).unsqueeze(1)
        step = _chunk_rows(h_q, s_k)
        for r0 in range(0, s_q, step):
            r1 = min(s_q, r0 + step)
            n = _causal_key_limit(r1 - 1, s_q, s_k, causal)
            rows = torch.arange(r0, r1, device=dev)
            visible = _visible_keys(rows, s_q, s_k, causal)[:, :n]
            o, l, _ = attend(_grouped(q[q0 + r0:q0 + r1].to(dev, F64), h_k), ks[:, :, :n],
                             vs[:, :, :n], visible, scale)
            outs.append(_ungrouped(o))
            lses.append(l.reshape(h_q, r1 - r0).T)
        at = q0 + s_q
    if at > total_q:
        raise ValueError(f"cu_seqlens_q[-1] must be <= q.shape[0] = {total_q}, got {at}")
    if at < total_q:
        gap(total_q - at)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def mha_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: Optional[torch.Tensor], cu_seqlens_q: Offsets, cu_seqlens_k: Offsets, scale: float,
            causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MHA backward written out in float64 on q's device: P = softmax(q.k * scale) (exact),
    dV = P^T dO, dP = dO V^T, delta = rowsum(dO * out), dS = P * (dP - delta),
    dQ = scale * dS K, dK = scale * dS^T Q; GQA sums dK/dV over each kv head's group.

    ``out`` is the forward output the backward is given (the kernels' contract: as the
    forward rounded it). ``out=None``: delta = rowsum(P * dP), the true gradient of the
    float64 forward (equal to feeding the exact out). Rows outside every sequence and
    keys no query sees get gradient 0."""
    cu_q, cu_k = _offsets("cu_seqlens_q", cu_seqlens_q), _offsets("cu_seqlens_k", cu_seqlens_k)
    h_q, h_k = q.shape[1], k.shape[1]
    _check_heads(h_q, h_k)
    dev = q.device
    dq = torch.zeros(q.shape, dtype=F64, device=dev)
    dk = torch.zeros(k.shape, dtype=F64, device=dev)
    dv = torch.zeros(v.shape, dtype=F64, device=dev)
    for q0, s_q, k0, s_k in _sequences(cu_q, cu_k):
        if s_q == 0 or s_k == 0:
            continue
        ks = k[k0:k0 + s_k].detach().to(dev, F64).permute(1, 0, 2).unsqueeze(1)   # [h_k, 1, s_k, d]
        vs = v[k0:k0 + s_k].detach().to(dev, F64).permute(1, 0, 2).unsqueeze(1)
        step = _chunk_rows(h_q, s_k)
        for r0 in range(0, s_q, step):
            r1 = min(s_q, r0 + step)
            n = _causal_key_limit(r1 - 1, s_q, s_k, causal)
            if n == 0:
                continue
            rows = torch.arange(r0, r1, device=dev)
            visible = _visible_keys(rows, s_q, s_k, causal)[:, :n]
            qs = _grouped(q[q0 + r0:q0 + r1].detach().to(dev, F64), h_k)        # [h_k, g, m, d]
            dos = _grouped(dout[q0 + r0:q0 + r1].detach().to(dev, F64), h_k)
            kn, vn = ks[:, :, :n], vs[:, :, :n]
            logits = torch.matmul(qs, kn.transpose(-1, -2)) * scale
            masked = torch.where(visible, logits, torch.full((), -INF, dtype=F64, device=dev))
            any_row = visible.any(dim=-1, keepdim=True)
            masked = torch.where(any_row, masked, torch.zeros((), dtype=F64, device=dev))
            p = torch.softmax(masked, dim=-1) * any_row
            dp = torch.matmul(dos, vn.transpose(-1, -2))
            if out is None:
                delta = (p * dp).sum(dim=-1, keepdim=True)
            else:
                os_ = _grouped(out[q0 + r0:q0 + r1].detach().to(dev, F64), h_k)
                delta = (dos * os_).sum(dim=-1, keepdim=True)
            ds = p * (dp - delta)
            dq[q0 + r0:q0 + r1] = _ungrouped(torch.matmul(ds, kn) * scale)
            dk_part = (torch.matmul(ds.transpose(-1, -2), qs) * scale).sum(dim=1)   # [h_k, n, d]
            dv_part = torch.matmul(p.transpose(-1, -2), dos).sum(dim=1)
            dk[k0:k0 + n] += dk_part.permute(1, 0, 2)
            dv[k0:k0 + n] += dv_part.permute(1, 0, 2)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# decode and sparse prefill
# ---------------------------------------------------------------------------
def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: Offsets, head_dim_v: int, scale: float,
                 causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, d], k_cache [num_blocks, page_size, h_k, d] (V is its first
    head_dim_v dims) -> (out [b, s_q, h_q, head_dim_v], lse [b, h_q, s_q]), float64 on q's
    device. Query j of batch i sees cache tokens t < s_k - s_q + j + 1 when causal."""
    b, s_q, h_q, d = q.shape
    page_size, h_k = k_cache.shape[1], k_cache.shape[2]
    _check_heads(h_q, h_k)
    dev = q.device
    seqlens = cache_seqlens.tolist() if isinstance(cache_seqlens, torch.Tensor) else list(cache_seqlens)
    table = block_table.detach().cpu()
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=F64, device=dev)
    lse = torch.full((b, h_q, s_q), INF, dtype=F64, device=dev)
    for i in range(b):
        s_k = int(seqlens[i])
        if s_k <= 0:
            continue
        pages = table[i, :-(-s_k // page_size)].long().to(k_cache.device)
        tokens = k_cache[pages].reshape(-1, h_k, d)[:s_k].to(dev, F64)          # [s_k, h_k, d]
        keys = tokens.permute(1, 0, 2).unsqueeze(1)                              # [h_k, 1, s_k, d]
        visible = _visible_keys(torch.arange(s_q, device=dev), s_q, s_k, causal)
        o, l, _ = attend(_grouped(q[i].to(dev, F64), h_k), keys, keys[..., :head_dim_v], visible, scale)
        out[i] = _ungrouped(o)
        lse[i] = l.reshape(h_q, s_q)
    return out, lse


Pool = Tuple  # (k_cache, indices, topk_length or None[, kv_format])


def _decoded_pools(q: torch.Tensor, pools: Sequence[Pool]) -> List[Tuple[list, dict, Optional[torch.Tensor]]]:
    """Per pool: (the tokens each (batch, query) reads, in order; token -> row of the table;
    float64 table [n, d_qk] of the decoded tokens on q's device, or None when nothing is read).

    A pool is (k_cache, indices [b, s_q, topk], topk_length per batch or None, kv_format);
    without the fourth entry the format follows q's head dim (576 -> V32, 512 -> V4). Only
    the first topk_length[i] entries count; an index < 0 or >= num_blocks * page_size is
    invalid and never read."""
    b, s_q, _, d_qk = q.shape
    decoded = []
    for n, pool in enumerate(pools):
        if len(pool) == 4:
            cache, indices, lengths, kv_format = pool
        elif len(pool) == 3:
            (cache, indices, lengths), kv_format = pool, d_qk
        else:
            raise ValueError(f"pools[{n}] must be (k_cache, indices, topk_length[, kv_format]), got {len(pool)} items")
        name = format_name(kv_format)
        if FORMAT_SIZES[name][1] != d_qk:
            raise ValueError(f"pools[{n}] has kv_format {name!r} (d_qk {FORMAT_SIZES[name][1]}), "
                             f"but q has head dim {d_qk}")
        capacity = cache.shape[0] * cache.shape[1]
        idx = indices.detach().cpu().long()
        topk = idx.shape[2]
        reads = []
        for i in range(b):
            count = topk if lengths is None else max(0, min(topk, int(lengths[i])))
            reads.append([[t for t in idx[i, j, :count].tolist() if 0 <= t < capacity] for j in range(s_q)])
        wanted = sorted({t for per_batch in reads for per_query in per_batch for t in per_query})
        table = decode_fp8_tokens(cache, name, wanted).to(q.device) if wanted else None
        decoded.append((reads, {t: r for r, t in enumerate(wanted)}, table))
    return decoded


def _row_keys(q: torch.Tensor, pools: Sequence[Pool]) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """(i, j, keys) for every query row (i, j) of q that reads at least one token, in row
    order: keys float64 [n, d_qk], the tokens the row reads from every pool, in pool order."""
    decoded = _decoded_pools(q, pools)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            rows = []
            for reads, position, table in decoded:
                picks = [position[t] for t in reads[i][j]]
                if picks:
                    rows.append(table[torch.tensor(picks, device=table.device)])
            if rows:
                yield i, j, torch.cat(rows, dim=0)


def sparse_decode(q: torch.Tensor, pools: Sequence[Pool], scale: float, d_v: int,
                  sink: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, d_qk]; pools: (k_cache, indices [b, s_q, topk], topk_length per batch or
    None, kv_format) each (a 3-tuple takes the format from q's head dim: 576 V32, 512 V4); a
    row attends to the first topk_length[i] entries of every pool's indices (all topk
    without lengths), skipping any index < 0 or past its cache, a repeated index counting
    each time. -> (out [b, s_q, h_q, d_v], lse [b, s_q, h_q]), float64 on q's device; the
    sink (per head) scales out only."""
    b, s_q, h_q, d_qk = q.shape
    dev = q.device
    out = torch.zeros(b, s_q, h_q, d_v, dtype=F64, device=dev)
    lse = torch.full((b, s_q, h_q), INF, dtype=F64, device=dev)
    for i, j, keys in _row_keys(q, pools):
        visible = torch.ones(1, keys.shape[0], dtype=torch.bool, device=dev)
        o, l, _ = attend(q[i, j].to(dev, F64).unsqueeze(1), keys, keys[:, :d_v], visible, scale)
        l = l.squeeze(1)
        out[i, j] = o.squeeze(1) * _sink_factor(l, sink).unsqueeze(-1)
        lse[i, j] = l
    return out, lse


def _prefill_picks(indices: torch.Tensor, s_kv: int, topk_length: Optional[Sequence[int]],
                   dev: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse prefill's indices [s_q, 1, topk] -> (safe, valid), both [s_q, topk] on dev:
    valid marks the counted positions whose index lies in [0, s_kv); safe is the index
    there and 0 elsewhere (a row that can be gathered without bounds checks)."""
    topk = indices.shape[2]
    idx = indices[:, 0].to(dev).long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        lengths = torch.as_tensor(topk_length if not isinstance(topk_length, torch.Tensor)
                                  else topk_length.tolist(), device=dev).long()
        valid &= torch.arange(topk, device=dev).unsqueeze(0) < lengths.clamp(0, topk).unsqueeze(1)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def sparse_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int,
                   sink: Optional[torch.Tensor] = None, topk_length: Optional[Sequence[int]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] (V its first d_v dims), indices [s_q, 1, topk];
    row r attends to its first topk_length[r] indices (all without lengths) that lie in
    [0, s_kv), a repeated index counting each time. -> (out [s_q, h_q, d_v],
    max_logits [s_q, h_q], lse [s_q, h_q]), float64 on q's device."""
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    dev = q.device
    safe, valid = _prefill_picks(indices, s_kv, topk_length, dev)
    out_rows, max_rows, lse_rows = [], [], []
    step = min(_chunk_rows(h_q, topk), _chunk_rows(kv.shape[2], topk))
    for r0 in range(0, s_q, step):
        r1 = min(s_q, r0 + step)
        keys = kv[safe[r0:r1].flatten().to(kv.device), 0].to(dev, F64).reshape(r1 - r0, topk, -1)
        o, l, m = attend(q[r0:r1].to(dev, F64), keys, keys[..., :d_v], valid[r0:r1].unsqueeze(1), scale)
        out_rows.append(o * _sink_factor(l, sink).unsqueeze(-1))
        max_rows.append(m)
        lse_rows.append(l)
    if not out_rows:
        return (torch.zeros(0, h_q, d_v, dtype=F64, device=dev),
                torch.zeros(0, h_q, dtype=F64, device=dev), torch.zeros(0, h_q, dtype=F64, device=dev))
    return torch.cat(out_rows), torch.cat(max_rows), torch.cat(lse_rows)


def combine(o_accum: torch.Tensor, lse_accum: torch.Tensor, split_offsets: Offsets,
            sink: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """o_accum [num_splits, s_q, h_q, d_v], lse_accum [num_splits, s_q, h_q] (log2; -inf marks
    an empty split, whose partial output is never read); batch i merges splits
    [split_offsets[i], split_offsets[i + 1]) clamped to [0, num_splits]. -> (out [b, s_q, h_q,
    d_v], lse [b, s_q, h_q] natural log, excluding the sink), float64 on o_accum's device."""
    num_splits, s_q, h_q, d_v = o_accum.shape
    dev = o_accum.device
    offsets = split_offsets.tolist() if isinstance(split_offsets, torch.Tensor) else list(split_offsets)
    offsets = [min(max(int(x), 0), num_splits) for x in offsets]
    b = len(offsets) - 1
    out = torch.zeros(b, s_q, h_q, d_v, dtype=F64, device=dev)
    lse = torch.full((b, s_q, h_q), INF, dtype=F64, device=dev)
    for i in range(b):
        start, end = offsets[i], offsets[i + 1]
        if end <= start:
            continue
        nat = lse_accum[start:end].to(dev, F64) * math.log(2.0)                  # [n, s_q, h_q]
        live = ~torch.isneginf(nat)
        peak = nat.amax(dim=0)
        any_live = live.any(dim=0)
        shift = torch.where(any_live, peak, torch.zeros_like(peak))
        weights = torch.where(live, torch.exp(nat - shift), torch.zeros_like(nat))
        merged = torch.log(torch.where(any_live, weights.sum(dim=0), torch.ones_like(peak))) + shift
        merged = torch.where(any_live, merged, torch.full_like(merged, INF))
        parts = torch.where(live.unsqueeze(-1), o_accum[start:end].to(dev, F64), torch.zeros((), dtype=F64, device=dev))
        acc = (torch.exp(nat - torch.where(any_live, merged, torch.zeros_like(merged))).unsqueeze(-1)
               * parts).sum(dim=0)
        acc = torch.where(any_live.unsqueeze(-1), acc, torch.zeros_like(acc))
        out[i] = acc * _sink_factor(merged, sink).unsqueeze(-1)
        lse[i] = merged
    return out, lse


# ---------------------------------------------------------------------------
# plain PyTorch at the input precision (the numerics rule for hostile inputs)
# ---------------------------------------------------------------------------
def _plain_rows(qc: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, visible: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Plain attention of grouped query rows qc [h_k, g, m, d] (input dtype) over ks / vs
    [h_k, 1, n, *]: fp32 scores and softmax, P cast to the input dtype, P.V in that dtype."""
    dtype = qc.dtype
    scores = torch.matmul(qc.float(), ks.float().transpose(-1, -2)) * scale
    any_row = visible.any(dim=-1, keepdim=True)
    # Rows that see nothing: softmax of zeros, then multiplied by 0 (no NaN, no gradient).
    scores = scores.masked_fill(~visible, -INF).masked_fill(~any_row, 0.0)
    p = torch.softmax(scores, dim=-1) * any_row
    return torch.matmul(p.to(dtype), vs)


def plain_mha_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Offsets,
                  cu_seqlens_k: Offsets, scale: float, causal: bool) -> torch.Tensor:
    """The MHA forward in plain PyTorch at q's dtype, on q's device: out [total_q, h_q, d_v]
    in q's dtype (0 in rows outside every sequence and rows that see no key)."""
    with torch.no_grad():
        out, _ = _plain_mha(q, k, v, None, cu_seqlens_q, cu_seqlens_k, scale, causal)
    return out


def plain_mha_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cu_seqlens_q: Offsets, cu_seqlens_k: Offsets, scale: float, causal: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype: autograd through plain_mha_fwd's computation (its
    own forward; not given an out). Query rows are processed in chunks where a sequence is
    too long for one [heads, rows, keys] block; the chunks' dk / dv are then summed in fp32
    and rounded once (one chunk is exactly autograd's answer)."""
    _, grads = _plain_mha(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, scale, causal)
    return grads


def _plain_mha(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, scale, causal):
    cu_q, cu_k = _offsets("cu_seqlens_q", cu_seqlens_q), _offsets("cu_seqlens_k", cu_seqlens_k)
    h_q, h_k = q.shape[1], k.shape[1]
    _check_heads(h_q, h_k)
    dev, dtype = q.device, q.dtype
    out = torch.zeros(q.shape[0], h_q, v.shape[2], dtype=dtype, device=dev)
    want_grads = dout is not None
    if want_grads:
        dq = torch.zeros(q.shape, dtype=dtype, device=dev)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=dev)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=dev)
    for q0, s_q, k0, s_k in _sequences(cu_q, cu_k):
        if s_q == 0 or s_k == 0:
            continue
        step = _chunk_rows(h_q, s_k)
        for r0 in range(0, s_q, step):
            r1 = min(s_q, r0 + step)
            n = _causal_key_limit(r1 - 1, s_q, s_k, causal)
            if n == 0:
                continue
            visible = _visible_keys(torch.arange(r0, r1, device=dev), s_q, s_k, causal)[:, :n]
            qc = q[q0 + r0:q0 + r1].detach().to(dev)
            kc = k[k0:k0 + n].detach().to(dev)
            vc = v[k0:k0 + n].detach().to(dev)
            with torch.enable_grad() if want_grads else torch.no_grad():
                leaves = [t.requires_grad_(want_grads) for t in (qc.clone(), kc.clone(), vc.clone())]
                o = _plain_rows(_grouped(leaves[0], h_k), leaves[1].permute(1, 0, 2).unsqueeze(1),
                                leaves[2].permute(1, 0, 2).unsqueeze(1), visible, scale)
                o = _ungrouped(o)
                if want_grads:
                    g = torch.autograd.grad(o, leaves, dout[q0 + r0:q0 + r1].to(dev, dtype))
                    dq[q0 + r0:q0 + r1] = g[0]
                    dk[k0:k0 + n] += g[1].float()
                    dv[k0:k0 + n] += g[2].float()
            out[q0 + r0:q0 + r1] = o.detach()
    grads = (dq, dk.to(dtype), dv.to(dtype)) if want_grads else None
    return out, grads


def plain_combine(o_accum: torch.Tensor, lse_accum: torch.Tensor, split_offsets: Offsets,
                  sink: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """The split-KV merge in plain fp32 PyTorch, rounded once to out_dtype: out [b, s_q, h_q, d_v]."""
    num_splits = o_accum.shape[0]
    offsets = split_offsets.tolist() if isinstance(split_offsets, torch.Tensor) else list(split_offsets)
    offsets = [min(max(int(x), 0), num_splits) for x in offsets]
    dev = o_accum.device
    b = len(offsets) - 1
    outs = []
    for i in range(b):
        start, end = offsets[i], max(offsets[i], offsets[i + 1])
        l2 = lse_accum[start:end].float()
        live = ~torch.isneginf(l2)
        any_live = live.any(dim=0) if end > start else torch.zeros(l2.shape[1:], dtype=torch.bool, device=dev)
        lse = torch.logsumexp(l2 * math.log(2.0), dim=0) if end > start else torch.full(l2.shape[1:], -INF, device=dev)
        w = torch.where(live, torch.exp(l2 * math.log(2.0) - torch.where(any_live, lse, 0.0)), 0.0)
        parts = torch.where(live.unsqueeze(-1), o_accum[start:end].float(), 0.0)
        acc = (w.unsqueeze(-1) * parts).sum(dim=0)
        if sink is not None:
            acc = acc * torch.where(any_live, 1.0 / (1.0 + torch.exp(sink.float() - lse)), 1.0).unsqueeze(-1)
        outs.append(torch.where(any_live.unsqueeze(-1), acc, 0.0))
    if not outs:
        return torch.zeros(0, *o_accum.shape[1:], dtype=out_dtype, device=dev)
    return torch.stack(outs).to(out_dtype)


def plain_sparse_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                         d_v: int, sink: Optional[torch.Tensor] = None,
                         topk_length: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sparse prefill in plain PyTorch at q's dtype, on q's device (the rule-2 baseline):
    fp32 scores and softmax over each query's valid indices (as sparse_prefill above),
    P cast to q's dtype, P.V in that dtype, the sink factor applied in fp32, one rounding
    to q's dtype. Returns out [s_q, h_q, d_v] in q's dtype (0 in rows with no valid index)."""
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    dev, dtype = q.device, q.dtype
    safe, valid = _prefill_picks(indices, s_kv, topk_length, dev)
    out = torch.zeros(s_q, h_q, d_v, dtype=dtype, device=dev)
    step = min(_chunk_rows(h_q, topk), _chunk_rows(kv.shape[2], topk))
    for r0 in range(0, s_q, step):
        r1 = min(s_q, r0 + step)
        keys = kv[safe[r0:r1].flatten().to(kv.device), 0].to(dev, dtype).reshape(r1 - r0, topk, -1)
        vis = valid[r0:r1].unsqueeze(1)                                  # [m, 1, topk]
        # Invalid slots read row 0 (may hold anything): zero them before any product.
        keys = torch.where(valid[r0:r1].unsqueeze(-1), keys, torch.zeros((), dtype=dtype, device=dev))
        scores = torch.matmul(q[r0:r1].float(), keys.float().transpose(-1, -2)) * scale
        any_row = vis.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~vis, -INF).masked_fill(~any_row, 0.0)
        p = torch.softmax(scores, dim=-1) * any_row
        o = torch.matmul(p.to(dtype), keys[..., :d_v]).float()
        if sink is not None:
            lse = torch.logsumexp(scores, dim=-1)
            factor = 1.0 / (1.0 + torch.exp(sink.to(dev, torch.float32) - lse))
            o = o * torch.where(any_row.squeeze(-1), factor, torch.ones_like(factor)).unsqueeze(-1)
        out[r0:r1] = o.to(dtype)
    return out


def plain_sparse_decode(q: torch.Tensor, pools: Sequence[Pool], scale: float, d_v: int,
                        sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sparse decode in plain PyTorch at q's dtype, on q's device (the rule-2 baseline): the
    tokens of sparse_decode above, dequantised (float64) and rounded to q's dtype (exact for
    the writers' scales), fp32 scores and softmax, P cast to q's dtype, P.V in that dtype,
    the sink factor applied in fp32, one rounding to q's dtype. Returns out [b, s_q, h_q, d_v]
    in q's dtype (0 in rows with no valid index)."""
    b, s_q, h_q, _ = q.shape
    dev, dtype = q.device, q.dtype
    out = torch.zeros(b, s_q, h_q, d_v, dtype=dtype, device=dev)
    for i, j, keys in _row_keys(q, pools):
        keys = keys.to(dtype)
        scores = torch.matmul(q[i, j].float(), keys.float().T) * scale      # [h_q, n]
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p.to(dtype), keys[:, :d_v]).float()
        if sink is not None:
            lse = torch.logsumexp(scores, dim=-1)
            o = o * (1.0 / (1.0 + torch.exp(sink.to(dev, torch.float32) - lse))).unsqueeze(-1)
        out[i, j] = o.to(dtype)
    return out
