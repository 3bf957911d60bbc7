"""FP8 KV-cache formats of sparse MLA decode: quantise, dequantise, address.

Two of the five cache formats (docs/cache_formats.md describes all five):

V3.2 (d_qk 576, 656 bytes per token, token-contiguous)::

    bytes [  0, 512)  512 float8_e4m3fn, latent dims 0..511
    bytes [512, 528)  4 fp32 scales, scale t covers dims [128 t, 128 t + 128)
    bytes [528, 656)  64 bf16 RoPE dims 512..575, not quantised

MODEL1 (d_qk 512, 584 bytes per token, block-structured). The bytes of one page
block (``k_cache[j]`` flattened in logical order) are::

    [0, page_size * 576)          page_size x [448 e4m3 (dims 0..447) | 64 bf16 RoPE (dims 448..511)]
    [page_size * 576, page_size * 584)
                                  page_size x 8 bytes: 7 ue8m0 scales (one per 64
                                  values) + 1 pad byte (written as 0, ignored)

so the tensor is only *viewed* as [num_blocks, page_size, 1, 584]: token t of a
block does not own bytes [584 t, 584 t + 584). A ue8m0 byte e means 2**(e - 127);
e = 255 is the format's NaN.

Dequantised value = e4m3 value * scale, computed here in fp32. With the
power-of-two scales that the writers below produce this product is exact (so it
equals the bf16 product the kernels form); with an arbitrary fp32 V3.2 scale the
fp32 product may differ from a bf16 one by one bf16 rounding.

Scale choice (both formats): ``scale = 2 ** ceil(log2(max(amax / 448, 1e-4)))``,
amax the largest |x| of the 128 (V3.2) or 64 (MODEL1) values of a tile. The
exponent is derived exactly from the binary exponent (frexp) of amax / 448 formed
in float64, not from a rounded float log2, so a tile whose amax / 448 is a power
of two keeps that scale and no tile's values exceed 448 after division. A tile
that contains NaN or +-inf gets a NaN scale (V3.2 fp32 NaN, MODEL1 byte 255) and
NaN codes: it dequantises to NaN rather than to plausible garbage.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "V32_BYTES_PER_TOKEN",
    "MODEL1_BYTES_PER_TOKEN",
    "quantize_kv_v32",
    "dequantize_kv_v32",
    "quantize_kv_model1",
    "dequantize_kv_model1",
    "dequantize_kv_cache",
    "dequantize_kv_tokens",
    "bytes_per_token",
    "positions_to_physical_indices",
    "power_of_two_scale",
]

E4M3_MAX = 448.0
# Lower clamp of amax / 448, so an all-zero tile still gets a finite scale (2**-13).
SCALE_FLOOR = 1e-4
ROPE_DIMS = 64

V32_D_QK = 576
V32_NOPE_DIMS = 512
V32_TILE = 128
V32_NUM_TILES = V32_NOPE_DIMS // V32_TILE          # 4
V32_SCALE_OFFSET = V32_NOPE_DIMS                   # 512
V32_ROPE_OFFSET = V32_SCALE_OFFSET + 4 * V32_NUM_TILES  # 528
V32_BYTES_PER_TOKEN = V32_ROPE_OFFSET + 2 * ROPE_DIMS   # 656

MODEL1_D_QK = 512
MODEL1_NOPE_DIMS = 448
MODEL1_TILE = 64
MODEL1_NUM_TILES = MODEL1_NOPE_DIMS // MODEL1_TILE  # 7
MODEL1_TOKEN_DATA_BYTES = MODEL1_NOPE_DIMS + 2 * ROPE_DIMS  # 576
MODEL1_SCALE_BYTES = 8                              # 7 ue8m0 + 1 pad
MODEL1_BYTES_PER_TOKEN = MODEL1_TOKEN_DATA_BYTES + MODEL1_SCALE_BYTES  # 584
UE8M0_BIAS = 127
UE8M0_NAN = 255

_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_INPUT_DTYPES = (torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------
def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_dtype(name: str, t: torch.Tensor, allowed: Tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def _require_last_dim(name: str, t: torch.Tensor, size: int, what: str) -> None:
    if t.dim() < 1 or t.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {size} ({what}), got shape {tuple(t.shape)}")


def _as_bytes(name: str, t: torch.Tensor) -> torch.Tensor:
    _require_dtype(name, t, _BYTE_DTYPES)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def bytes_per_token(d_qk: int) -> int:
    """Bytes per token of the FP8 format selected by d_qk (576 -> 656, 512 -> 584)."""
    if d_qk == V32_D_QK:
        return V32_BYTES_PER_TOKEN
    if d_qk == MODEL1_D_QK:
        return MODEL1_BYTES_PER_TOKEN
    raise ValueError(f"d_qk must be 576 (V3.2 FP8 format) or 512 (MODEL1 FP8 format), got {d_qk}")


# ---------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------
def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 ``2 ** ceil(log2(max(amax / 448, 1e-4)))``; NaN where amax is not finite."""
    ratio = torch.clamp_min(amax.to(torch.float64) / E4M3_MAX, SCALE_FLOOR)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    # log2(ratio) is exactly exponent - 1 when mantissa == 0.5, else strictly inside
    # (exponent - 1, exponent), whose ceiling is exponent.
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent)
    finite = torch.isfinite(ratio)
    ceil_log2 = torch.where(finite, ceil_log2, torch.zeros_like(ceil_log2))
    scale = torch.ldexp(torch.ones_like(ratio), ceil_log2).to(torch.float32)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))


def _quantize_tiles(values: torch.Tensor, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """values fp32 [..., n * tile] -> (e4m3 codes as uint8 [..., n * tile], fp32 scales [..., n])."""
    lead = values.shape[:-1]
    tiles = values.reshape(*lead, -1, tile)
    amax = tiles.abs().amax(dim=-1)
    # Marked explicitly rather than trusting amax's NaN propagation: any NaN/inf in a
    # tile makes the whole tile NaN (scale and codes), never finite garbage.
    bad = ~torch.isfinite(tiles).all(dim=-1)
    scale = power_of_two_scale(amax)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    scaled = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)  # NaN stays NaN
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.reshape(*lead, -1), scale


def _e4m3_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    return codes.contiguous().view(torch.float8_e4m3fn).to(torch.float32)


def _ue8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ue8m0 exponents -> fp32 2**(e - 127), built from bits so it is exact (e = 0 is 2**-127,
    an fp32 subnormal); e = 255 -> NaN."""
    e = codes.to(torch.int32)
    normal_bits = e << 23
    subnormal_bits = torch.full_like(e, 1 << 22)  # 2**-127 = 2**-126 * 0.5
    bits = torch.where(e == 0, subnormal_bits, normal_bits)
    value = bits.view(torch.float32)
    return torch.where(e == UE8M0_NAN, torch.full_like(value, float("nan")), value)


def _float_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """fp32 power-of-two scales -> uint8 exponent bytes (NaN -> 255)."""
    finite = torch.isfinite(scale)
    safe = torch.where(finite, scale, torch.ones_like(scale))
    _, exponent = torch.frexp(safe)  # safe = 0.5 * 2**exponent for a power of two
    code = (exponent - 1 + UE8M0_BIAS).clamp(0, 254)
    code = torch.where(finite, code, torch.full_like(code, UE8M0_NAN))
    return code.to(torch.uint8)


def _bf16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).contiguous().view(torch.uint8)


def _bf16_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------------
# V3.2 format
# ---------------------------------------------------------------------------
def quantize_kv_v32(kv: torch.Tensor) -> torch.Tensor:
    """bf16/fp32 [..., 576] -> uint8 [..., 656] in the V3.2 layout (see module docstring).

    Returns a new contiguous tensor on kv's device. RoPE dims are rounded to bf16
    (round to nearest even) when kv is fp32.
    """
    kv = _require_tensor("kv", kv)
    _require_dtype("kv", kv, _INPUT_DTYPES)
    _require_last_dim("kv", kv, V32_D_QK, "V3.2 format: 512 latent + 64 RoPE dims")
    lead = kv.shape[:-1]
    values = kv.to(torch.float32)
    codes, scales = _quantize_tiles(values[..., :V32_NOPE_DIMS], V32_TILE)
    packed = torch.empty(*lead, V32_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    packed[..., :V32_SCALE_OFFSET] = codes
    packed[..., V32_SCALE_OFFSET:V32_ROPE_OFFSET] = scales.contiguous().view(torch.uint8)
    packed[..., V32_ROPE_OFFSET:] = _bf16_bytes(kv[..., V32_NOPE_DIMS:])
    return packed


def _decode_v32_rows(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] -> fp32 [..., 576]."""
    lead = raw.shape[:-1]
    codes = _e4m3_codes_to_float(raw[..., :V32_SCALE_OFFSET]).reshape(*lead, V32_NUM_TILES, V32_TILE)
    scales = raw[..., V32_SCALE_OFFSET:V32_ROPE_OFFSET].contiguous().view(torch.float32)
    nope = (codes * scales.unsqueeze(-1)).reshape(*lead, V32_NOPE_DIMS)
    rope = _bf16_from_bytes(raw[..., V32_ROPE_OFFSET:])
    return torch.cat([nope, rope], dim=-1)


def dequantize_kv_v32(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8/float8_e4m3fn [..., 656] (V3.2 layout) -> fp32 [..., 576]."""
    packed = _require_tensor("packed", packed)
    raw = _as_bytes("packed", packed)
    _require_last_dim("packed", raw, V32_BYTES_PER_TOKEN, "V3.2 FP8 format, bytes per token")
    return _decode_v32_rows(raw)


# ---------------------------------------------------------------------------
# MODEL1 format
# ---------------------------------------------------------------------------
def _encode_model1_tokens(values: torch.Tensor, rope_source: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 [..., 512] -> (token data uint8 [..., 576], scale bytes uint8 [..., 8])."""
    lead = values.shape[:-1]
    codes, scales = _quantize_tiles(values[..., :MODEL1_NOPE_DIMS], MODEL1_TILE)
    data = torch.cat([codes, _bf16_bytes(rope_source)], dim=-1)
    scale_bytes = torch.zeros(*lead, MODEL1_SCALE_BYTES, dtype=torch.uint8, device=values.device)
    scale_bytes[..., :MODEL1_NUM_TILES] = _float_to_ue8m0(scales)
    return data, scale_bytes


def _decode_model1_tokens(data: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """(uint8 [..., 576], uint8 [..., 8]) -> fp32 [..., 512]."""
    lead = data.shape[:-1]
    codes = _e4m3_codes_to_float(data[..., :MODEL1_NOPE_DIMS]).reshape(*lead, MODEL1_NUM_TILES, MODEL1_TILE)
    scales = _ue8m0_to_float(scale_bytes[..., :MODEL1_NUM_TILES])
    nope = (codes * scales.unsqueeze(-1)).reshape(*lead, MODEL1_NOPE_DIMS)
    rope = _bf16_from_bytes(data[..., MODEL1_NOPE_DIMS:MODEL1_TOKEN_DATA_BYTES])
    return torch.cat([nope, rope], dim=-1)


def _check_paged_4d(name: str, t: torch.Tensor, last: int, what: str) -> None:
    if t.dim() != 4 or t.shape[2] != 1 or t.shape[3] != last:
        raise ValueError(
            f"{name} must have shape [num_blocks, page_size, 1, {last}] ({what}), got shape {tuple(t.shape)}"
        )


def _model1_block_bytes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [num_blocks, page_size, 1, 584] -> [num_blocks, page_size * 584], block bytes in logical order
    (a view whenever each block is contiguous, whatever the block stride)."""
    return raw.reshape(raw.shape[0], raw.shape[1] * MODEL1_BYTES_PER_TOKEN)


def quantize_kv_model1(kv: torch.Tensor) -> torch.Tensor:
    """bf16/fp32 [num_blocks, page_size, 1, 512] -> uint8 [num_blocks, page_size, 1, 584] (MODEL1 layout).

    The result is contiguous; the [.., 584] shape is a view of page_size * 584 bytes per
    block laid out as described in the module docstring.
    """
    kv = _require_tensor("kv", kv)
    _require_dtype("kv", kv, _INPUT_DTYPES)
    _check_paged_4d("kv", kv, MODEL1_D_QK, "MODEL1 format: 448 latent + 64 RoPE dims")
    num_blocks, page_size = kv.shape[0], kv.shape[1]
    tokens = kv[:, :, 0, :]
    data, scale_bytes = _encode_model1_tokens(tokens.to(torch.float32), tokens[..., MODEL1_NOPE_DIMS:])
    blocks = torch.empty(num_blocks, page_size * MODEL1_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    split = page_size * MODEL1_TOKEN_DATA_BYTES
    blocks[:, :split] = data.reshape(num_blocks, split)
    blocks[:, split:] = scale_bytes.reshape(num_blocks, page_size * MODEL1_SCALE_BYTES)
    return blocks.view(num_blocks, page_size, 1, MODEL1_BYTES_PER_TOKEN)


def dequantize_kv_model1(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8/float8_e4m3fn [num_blocks, page_size, 1, 584] (MODEL1) -> fp32 [num_blocks, page_size, 1, 512]."""
    packed = _require_tensor("packed", packed)
    raw = _as_bytes("packed", packed)
    _check_paged_4d("packed", raw, MODEL1_BYTES_PER_TOKEN, "MODEL1 FP8 format, bytes per token")
    num_blocks, page_size = raw.shape[0], raw.shape[1]
    blocks = _model1_block_bytes(raw)
    split = page_size * MODEL1_TOKEN_DATA_BYTES
    data = blocks[:, :split].reshape(num_blocks, page_size, MODEL1_TOKEN_DATA_BYTES)
    scale_bytes = blocks[:, split:].reshape(num_blocks, page_size, MODEL1_SCALE_BYTES)
    return _decode_model1_tokens(data, scale_bytes).unsqueeze(2)


# ---------------------------------------------------------------------------
# format-agnostic access used by the sparse decode reference
# ---------------------------------------------------------------------------
def _check_kv_cache(k_cache: torch.Tensor, d_qk: int) -> torch.Tensor:
    k_cache = _require_tensor("k_cache", k_cache)
    bpt = bytes_per_token(d_qk)
    raw = _as_bytes("k_cache", k_cache)
    fmt = "V3.2" if d_qk == V32_D_QK else "MODEL1"
    _check_paged_4d("k_cache", raw, bpt, f"{fmt} FP8 format for d_qk {d_qk}")
    return raw


def dequantize_kv_cache(k_cache: torch.Tensor, d_qk: int) -> torch.Tensor:
    """Quantised cache [num_blocks, page_size, 1, bytes] -> fp32 [num_blocks, page_size, 1, d_qk].

    The format follows d_qk: 576 -> V3.2 (656 bytes), 512 -> MODEL1 (584 bytes).
    """
    raw = _check_kv_cache(k_cache, d_qk)
    if d_qk == V32_D_QK:
        return _decode_v32_rows(raw)
    return dequantize_kv_model1(raw)


def dequantize_kv_tokens(k_cache: torch.Tensor, d_qk: int, token_indices: torch.Tensor) -> torch.Tensor:
    """Dequantise only the tokens ``token_indices`` (physical, block * page_size + offset) -> fp32 [n, d_qk].

    token_indices: integer tensor [n] on k_cache's device, every value in
    [0, num_blocks * page_size) (ValueError otherwise). Touches no other token, so
    NaN in unreferenced slots never leaks in.
    """
    raw = _check_kv_cache(k_cache, d_qk)
    token_indices = _require_tensor("token_indices", token_indices)
    if token_indices.dim() != 1 or token_indices.dtype.is_floating_point or token_indices.dtype == torch.bool:
        raise ValueError(
            f"token_indices must be a 1-D integer tensor, got dtype {token_indices.dtype} shape {tuple(token_indices.shape)}"
        )
    num_blocks, page_size = raw.shape[0], raw.shape[1]
    idx = token_indices.to(device=raw.device, dtype=torch.int64)
    if idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_blocks * page_size:
            raise ValueError(
                f"token_indices must lie in [0, {num_blocks * page_size}) for a cache of {num_blocks} blocks x "
                f"{page_size} tokens, got values in [{lo}, {hi}]"
            )
    block, offset = idx // page_size, idx % page_size
    if d_qk == V32_D_QK:
        return _decode_v32_rows(raw[block, offset, 0, :])
    blocks = _model1_block_bytes(raw)
    data_cols = offset.unsqueeze(1) * MODEL1_TOKEN_DATA_BYTES + torch.arange(
        MODEL1_TOKEN_DATA_BYTES, device=raw.device
    )
    scale_cols = (
        page_size * MODEL1_TOKEN_DATA_BYTES
        + offset.unsqueeze(1) * MODEL1_SCALE_BYTES
        + torch.arange(MODEL1_SCALE_BYTES, device=raw.device)
    )
    rows = block.unsqueeze(1)
    return _decode_model1_tokens(blocks[rows, data_cols], blocks[rows, scale_cols])


def positions_to_physical_indices(
    positions: torch.Tensor, block_table: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Token positions in each sequence -> physical cache indices for sparse decode.

    positions int32 [b, s_q, topk]: position of the token in sequence b, -1 = invalid.
    block_table int32 [b, max_blocks]. Returns int32 [b, s_q, topk] with
    ``block_table[b, pos // page_size] * page_size + pos % page_size``, -1 kept.
    Raises ValueError for a position < -1 or one whose page lies beyond the table.
    """
    positions = _require_tensor("positions", positions)
    block_table = _require_tensor("block_table", block_table)
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    _require_dtype("positions", positions, (torch.int32, torch.int64))
    _require_dtype("block_table", block_table, (torch.int32, torch.int64))
    if positions.dim() != 3:
        raise ValueError(f"positions must have shape [b, s_q, topk], got shape {tuple(positions.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != positions.shape[0]:
        raise ValueError(
            f"block_table must have shape [b={positions.shape[0]}, max_blocks], got shape {tuple(block_table.shape)}"
        )
    if positions.device != block_table.device:
        raise ValueError(
            f"positions and block_table must be on one device, got {positions.device} and {block_table.device}"
        )
    pos = positions.to(torch.int64)
    invalid = pos == -1
    if positions.numel() > 0:
        lo, hi = int(pos.min()), int(pos.max())
        if lo < -1 or hi >= block_table.shape[1] * page_size:
            raise ValueError(
                f"positions must be -1 or in [0, {block_table.shape[1] * page_size}) "
                f"(max_blocks {block_table.shape[1]} x page_size {page_size}), got values in [{lo}, {hi}]"
            )
    safe = torch.where(invalid, torch.zeros_like(pos), pos)
    pages = torch.gather(block_table.to(torch.int64), 1, (safe // page_size).reshape(pos.shape[0], -1))
    physical = pages.reshape(pos.shape) * page_size + safe % page_size
    physical = torch.where(invalid, torch.full_like(physical, -1), physical)
    return physical.to(torch.int32)
