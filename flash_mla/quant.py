"""KV-cache byte formats of sparse MLA decode: registry, quantise, dequantise, address.

Five formats (docs/cache_formats.md has the byte tables). A cache is
``[num_blocks, page_size, 1, bytes_per_token]`` of uint8/int8/float8_e4m3fn::

    name         bytes  d_qk  layout            content of one token
    V32          656    576   token-contiguous  512 e4m3 | 4 fp32 scales (per 128) | 64 bf16 RoPE
    V32_NO_ROPE  528    512   token-contiguous  512 e4m3 | 4 fp32 scales (per 128)
    V4 (MODEL1)  584    512   page-structured   448 e4m3 | 64 bf16 RoPE, scales after the page
    V41          528    512   token-contiguous  512 e4m3 | 16 ue8m0 scales (per 32)
    V41_FP4      288    512   token-contiguous  512 e2m1 nibbles | 32 e4m3 scales (per 16)

V4 is page-structured: the bytes of one page block (``k_cache[j]`` flattened in
logical order) are::

    [0, page_size * 576)          page_size x [448 e4m3 (dims 0..447) | 64 bf16 RoPE (dims 448..511)]
    [page_size * 576, page_size * 584)
                                  page_size x 8 bytes: 7 ue8m0 scales (one per 64
                                  values) + 1 pad byte (written as 0, ignored)

so such a tensor is only *viewed* as [num_blocks, page_size, 1, 584]: token t of a
block does not own bytes [584 t, 584 t + 584). A ue8m0 byte e means 2**(e - 127);
e = 255 is the format's NaN. An e2m1 nibble has the sign in bit 3 and a magnitude
code 0..7 for {0, .5, 1, 1.5, 2, 3, 4, 6}; element i of a token sits in byte i // 2,
the even element in the low nibble.

Dequantised value = code value * scale, computed here in fp32. With the scales the
writers below produce (powers of two for the e4m3 formats, e4m3 scales for e2m1) this
product is exact, so it equals the bf16 product the kernels form; with an arbitrary
fp32 V32 scale the fp32 product may differ from a bf16 one by one bf16 rounding.

Scale choice of the e4m3 formats: ``scale = 2 ** ceil(log2(max(amax / 448, 1e-4)))``,
amax the largest |x| of the 128 (V32, V32_NO_ROPE), 64 (V4) or 32 (V41) values of a
group. The exponent is derived exactly from the binary exponent (frexp) of amax / 448
formed in float64, not from a rounded float log2, so a group whose amax / 448 is a
power of two keeps that scale and no group's values exceed 448 after division.
V41_FP4: ``scale = clamp(amax / 6, 2**-9, 448)`` rounded to the nearest e4m3 (ties to
the even code), per 16 values; each value / scale is rounded to the nearest e2m1
magnitude (ties to the even code), saturating at 6. Both roundings are decided by
exact float64 comparisons (amax against 6 x midpoints, |x| against scale x
midpoints), so no double rounding can move a tie.

A group that contains NaN or +-inf gets a NaN scale (fp32 NaN, ue8m0 byte 255, e4m3
NaN code 0x7F) and dequantises to NaN rather than to plausible garbage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch

__all__ = [
    "FORMAT_NAMES",
    "KvFormat",
    "FORMATS",
    "DETECTED_FORMATS",
    "detect_format",
    "resolve_format",
    "quantize_kv",
    "dequantize_kv",
    "dequantize_kv_tokens",
    "V32_BYTES_PER_TOKEN",
    "MODEL1_BYTES_PER_TOKEN",
    "quantize_kv_v32",
    "dequantize_kv_v32",
    "quantize_kv_model1",
    "dequantize_kv_model1",
    "dequantize_kv_cache",
    "bytes_per_token",
    "positions_to_physical_indices",
    "power_of_two_scale",
]

E4M3_MAX = 448.0
# Lower clamp of amax / 448, so an all-zero group still gets a finite scale (2**-13).
SCALE_FLOOR = 1e-4
ROPE_DIMS = 64

V32_D_QK = 576
V32_NOPE_DIMS = 512
V32_TILE = 128
V32_NUM_TILES = V32_NOPE_DIMS // V32_TILE          # 4
V32_SCALE_OFFSET = V32_NOPE_DIMS                   # 512
V32_ROPE_OFFSET = V32_SCALE_OFFSET + 4 * V32_NUM_TILES  # 528
V32_BYTES_PER_TOKEN = V32_ROPE_OFFSET + 2 * ROPE_DIMS   # 656
V32_NO_ROPE_BYTES_PER_TOKEN = V32_ROPE_OFFSET           # 528: V32 without its RoPE part

MODEL1_D_QK = 512
MODEL1_NOPE_DIMS = 448
MODEL1_TILE = 64
MODEL1_NUM_TILES = MODEL1_NOPE_DIMS // MODEL1_TILE  # 7
MODEL1_TOKEN_DATA_BYTES = MODEL1_NOPE_DIMS + 2 * ROPE_DIMS  # 576
MODEL1_SCALE_BYTES = 8                              # 7 ue8m0 + 1 pad
MODEL1_BYTES_PER_TOKEN = MODEL1_TOKEN_DATA_BYTES + MODEL1_SCALE_BYTES  # 584
UE8M0_BIAS = 127
UE8M0_NAN = 255

V41_D_QK = 512
V41_TILE = 32
V41_NUM_TILES = V41_D_QK // V41_TILE                # 16
V41_SCALE_OFFSET = V41_D_QK                         # 512
V41_BYTES_PER_TOKEN = V41_SCALE_OFFSET + V41_NUM_TILES  # 528

FP4_D_QK = 512
FP4_TILE = 16
FP4_NUM_TILES = FP4_D_QK // FP4_TILE                # 32
FP4_SCALE_OFFSET = FP4_D_QK // 2                    # 256: two e2m1 codes per byte
FP4_BYTES_PER_TOKEN = FP4_SCALE_OFFSET + FP4_NUM_TILES  # 288
E2M1_MAX = 6.0
FP4_SCALE_MIN = 2.0 ** -9                           # the smallest positive e4m3 (a subnormal)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_SIGN_BIT = 0x8
E4M3_NAN_CODE = 0x7F

_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_INPUT_DTYPES = (torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KvFormat:
    """One cache format: its name (a ``kv_format`` value), bytes per token, the head dim
    d_qk of q that reads it, and whether a page holds its tokens' bytes in several runs
    (page_structured, V4) rather than one record per token."""
    name: str
    bytes_per_token: int
    d_qk: int
    page_structured: bool


FORMAT_NAMES = ("V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4")

FORMATS: Dict[str, KvFormat] = {
    "V32": KvFormat("V32", V32_BYTES_PER_TOKEN, V32_D_QK, False),
    "V32_NO_ROPE": KvFormat("V32_NO_ROPE", V32_NO_ROPE_BYTES_PER_TOKEN, V32_NOPE_DIMS, False),
    "V4": KvFormat("V4", MODEL1_BYTES_PER_TOKEN, MODEL1_D_QK, True),
    "V41": KvFormat("V41", V41_BYTES_PER_TOKEN, V41_D_QK, False),
    "V41_FP4": KvFormat("V41_FP4", FP4_BYTES_PER_TOKEN, FP4_D_QK, False),
}

# bytes per token -> the format a cache of that size is read as when no format is named.
# V32_NO_ROPE shares V41's 528 bytes, so it is read only when named.
DETECTED_FORMATS = {656: "V32", 584: "V4", 528: "V41", 288: "V41_FP4"}
# The older rule of this module: q's head dim selected the format.
_BY_HEAD_DIM = {V32_D_QK: "V32", MODEL1_D_QK: "V4"}

DETECTION_RULE = "656 (V32), 584 (V4), 528 (V41; V32_NO_ROPE has the same size and must be named) or 288 (V41_FP4)"


def detect_format(bytes_per_token: int) -> str:
    """The format name a cache with ``bytes_per_token`` bytes per token is read as when
    none is named: 656 -> V32, 584 -> V4, 528 -> V41, 288 -> V41_FP4; ValueError otherwise."""
    if isinstance(bytes_per_token, bool) or not isinstance(bytes_per_token, int):
        raise TypeError(f"bytes_per_token must be an int, got {type(bytes_per_token).__name__}")
    if bytes_per_token not in DETECTED_FORMATS:
        raise ValueError(f"bytes_per_token must be {DETECTION_RULE}, got {bytes_per_token}")
    return DETECTED_FORMATS[bytes_per_token]


def resolve_format(kv_format: Union[str, int], name: str = "kv_format") -> KvFormat:
    """A format name (one of FORMAT_NAMES) -> its KvFormat. An int is the older calling
    convention, q's head dim: 576 -> V32, 512 -> V4."""
    if isinstance(kv_format, bool):
        raise TypeError(f"{name} must be a format name (str) or a head dim (int), got bool")
    if isinstance(kv_format, int):
        if kv_format not in _BY_HEAD_DIM:
            raise ValueError(f"{name} given as a head dim must be 576 (V32) or 512 (V4), got {kv_format}")
        return FORMATS[_BY_HEAD_DIM[kv_format]]
    if not isinstance(kv_format, str):
        raise TypeError(f"{name} must be a format name (str) or a head dim (int), got {type(kv_format).__name__}")
    if kv_format not in FORMATS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, FORMAT_NAMES))}, got {kv_format!r}")
    return FORMATS[kv_format]


def bytes_per_token(d_qk: int) -> int:
    """Bytes per token of the format the older rule selects by d_qk (576 -> V32 656, 512 -> V4 584)."""
    if d_qk not in _BY_HEAD_DIM:
        raise ValueError(f"d_qk must be 576 (V32 format) or 512 (V4 format), got {d_qk}")
    return FORMATS[_BY_HEAD_DIM[d_qk]].bytes_per_token


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


def _check_paged_4d(name: str, t: torch.Tensor, last: int, what: str) -> None:
    if t.dim() != 4 or t.shape[2] != 1 or t.shape[3] != last:
        raise ValueError(
            f"{name} must have shape [num_blocks, page_size, 1, {last}] ({what}), got shape {tuple(t.shape)}"
        )


# ---------------------------------------------------------------------------
# number formats
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
    """values fp32 [..., n * tile] -> (e4m3 codes as uint8 [..., n * tile], fp32 power-of-two scales [..., n])."""
    lead = values.shape[:-1]
    tiles = values.reshape(*lead, values.shape[-1] // tile, tile)  # explicit: lead may hold 0
    amax = tiles.abs().amax(dim=-1)
    # Marked explicitly rather than trusting amax's NaN propagation: any NaN/inf in a
    # tile makes the whole tile NaN (scale and codes), never finite garbage.
    bad = ~torch.isfinite(tiles).all(dim=-1)
    scale = power_of_two_scale(amax)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    scaled = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)  # NaN stays NaN
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.reshape(*lead, values.shape[-1]), scale


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


def _e4m3_positive(device: torch.device) -> torch.Tensor:
    """The 126 positive finite e4m3 values in float64, ascending; entry k is code k + 1."""
    return torch.arange(1, 127, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).to(torch.float64)


def _fp4_scale_codes(amax: torch.Tensor) -> torch.Tensor:
    """float64 group amax (finite, >= 0) -> e4m3 codes of clamp(amax / 6, 2**-9, 448) rounded
    to nearest, ties to the even code. Decided by comparing amax with 6 x the midpoints
    between neighbouring e4m3 values (exact in float64), never by rounding amax / 6 twice."""
    table = _e4m3_positive(amax.device)
    midpoints6 = 3.0 * (table[:-1] + table[1:])            # 6 * (t_k + t_{k+1}) / 2, exact
    below = torch.searchsorted(midpoints6, amax.contiguous(), right=False)  # midpoints < amax
    tie = midpoints6[below.clamp(max=midpoints6.numel() - 1)] == amax
    code = below + 1                                        # below the first midpoint: code 1 = 2**-9
    code = torch.where(tie & (code % 2 == 1), code + 1, code)
    return code.to(torch.uint8)


def _e2m1_magnitude_codes(magnitude: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|x| and the e4m3 scale (float64, broadcast) -> magnitude codes 0..7 of round(|x| / scale)
    to {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code, saturating at 6. Each boundary is
    compared as |x| against scale x midpoint, exact in float64."""
    code = torch.zeros(magnitude.shape, dtype=torch.int64, device=magnitude.device)
    for k in range(len(E2M1_MAGNITUDES) - 1):
        bound = scale * ((E2M1_MAGNITUDES[k] + E2M1_MAGNITUDES[k + 1]) / 2)
        # a tie goes to the even code of (k, k + 1)
        passed = magnitude > bound if k % 2 == 0 else magnitude >= bound
        code += passed.to(torch.int64)
    return code


def _e2m1_table(device: torch.device) -> torch.Tensor:
    """fp32 [16]: the value of each e2m1 nibble (bit 3 the sign)."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])


# ---------------------------------------------------------------------------
# token-contiguous formats: one row of bytes per token
# ---------------------------------------------------------------------------
def _encode_v32_rows(values: torch.Tensor, rope_source: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 576] (RoPE dims taken from rope_source, rounded to bf16) -> uint8 [..., 656]."""
    lead = values.shape[:-1]
    codes, scales = _quantize_tiles(values[..., :V32_NOPE_DIMS], V32_TILE)
    packed = torch.empty(*lead, V32_BYTES_PER_TOKEN, dtype=torch.uint8, device=values.device)
    packed[..., :V32_SCALE_OFFSET] = codes
    packed[..., V32_SCALE_OFFSET:V32_ROPE_OFFSET] = scales.contiguous().view(torch.uint8)
    packed[..., V32_ROPE_OFFSET:] = _bf16_bytes(rope_source)
    return packed


def _decode_v32_latent(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., >= 528] (V32 or V32_NO_ROPE) -> fp32 [..., 512]: e4m3 codes times fp32 scales."""
    lead = raw.shape[:-1]
    codes = _e4m3_codes_to_float(raw[..., :V32_SCALE_OFFSET]).reshape(*lead, V32_NUM_TILES, V32_TILE)
    scales = raw[..., V32_SCALE_OFFSET:V32_ROPE_OFFSET].contiguous().view(torch.float32)
    return (codes * scales.unsqueeze(-1)).reshape(*lead, V32_NOPE_DIMS)


def _decode_v32_rows(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] -> fp32 [..., 576]."""
    rope = _bf16_from_bytes(raw[..., V32_ROPE_OFFSET:])
    return torch.cat([_decode_v32_latent(raw), rope], dim=-1)


def _encode_v32_no_rope_rows(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 512] -> uint8 [..., 528]: the first 528 bytes of V32."""
    codes, scales = _quantize_tiles(values, V32_TILE)
    return torch.cat([codes, scales.contiguous().view(torch.uint8)], dim=-1)


def _encode_v41_rows(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 512] -> uint8 [..., 528]: 512 e4m3 codes, 16 ue8m0 scales."""
    codes, scales = _quantize_tiles(values, V41_TILE)
    return torch.cat([codes, _float_to_ue8m0(scales)], dim=-1)


def _decode_v41_rows(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 528] -> fp32 [..., 512]."""
    lead = raw.shape[:-1]
    codes = _e4m3_codes_to_float(raw[..., :V41_SCALE_OFFSET]).reshape(*lead, V41_NUM_TILES, V41_TILE)
    scales = _ue8m0_to_float(raw[..., V41_SCALE_OFFSET:V41_BYTES_PER_TOKEN])
    return (codes * scales.unsqueeze(-1)).reshape(*lead, V41_D_QK)


def _encode_fp4_rows(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 512] -> uint8 [..., 288]: 256 bytes of e2m1 pairs, 32 e4m3 scales."""
    lead = values.shape[:-1]
    groups = values.to(torch.float64).reshape(*lead, FP4_NUM_TILES, FP4_TILE)
    bad = ~torch.isfinite(groups).all(dim=-1)
    magnitude = torch.where(torch.isfinite(groups), groups.abs(), torch.zeros_like(groups))
    scale_codes = _fp4_scale_codes(magnitude.amax(dim=-1))
    scale_codes = torch.where(bad, torch.full_like(scale_codes, E4M3_NAN_CODE), scale_codes)
    scale = scale_codes.view(torch.float8_e4m3fn).to(torch.float64)
    codes = _e2m1_magnitude_codes(magnitude, torch.where(bad, 1.0, scale).unsqueeze(-1))
    codes = torch.where(bad.unsqueeze(-1), torch.zeros_like(codes), codes)  # the NaN scale decides
    nibbles = codes | torch.where(torch.signbit(groups), E2M1_SIGN_BIT, 0)
    nibbles = nibbles.reshape(*lead, FP4_SCALE_OFFSET, 2)
    data = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)  # even element: low nibble
    return torch.cat([data, scale_codes], dim=-1)


def _decode_fp4_rows(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 288] -> fp32 [..., 512]."""
    lead = raw.shape[:-1]
    data = raw[..., :FP4_SCALE_OFFSET].to(torch.int64)
    nibbles = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(*lead, FP4_NUM_TILES, FP4_TILE)
    values = _e2m1_table(raw.device)[nibbles]
    scales = _e4m3_codes_to_float(raw[..., FP4_SCALE_OFFSET:FP4_BYTES_PER_TOKEN])
    return (values * scales.unsqueeze(-1)).reshape(*lead, FP4_D_QK)


def _encode_rows(values: torch.Tensor, source: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 tokens [..., d_qk] -> bytes [..., bpt] of a token-contiguous format (source: the
    caller's tensor, whose RoPE dims V32 stores as bf16)."""
    if name == "V32":
        return _encode_v32_rows(values, source[..., V32_NOPE_DIMS:])
    if name == "V32_NO_ROPE":
        return _encode_v32_no_rope_rows(values)
    if name == "V41":
        return _encode_v41_rows(values)
    return _encode_fp4_rows(values)


def _decode_rows(raw: torch.Tensor, name: str) -> torch.Tensor:
    """Bytes [..., bpt] of a token-contiguous format -> fp32 [..., d_qk]."""
    if name == "V32":
        return _decode_v32_rows(raw)
    if name == "V32_NO_ROPE":
        return _decode_v32_latent(raw)
    if name == "V41":
        return _decode_v41_rows(raw)
    return _decode_fp4_rows(raw)


# ---------------------------------------------------------------------------
# V4 (MODEL1): page-structured
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


def _model1_block_bytes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [num_blocks, page_size, 1, 584] -> [num_blocks, page_size * 584], block bytes in logical order
    (a view whenever each block is contiguous, whatever the block stride)."""
    return raw.reshape(raw.shape[0], raw.shape[1] * MODEL1_BYTES_PER_TOKEN)


def _quantize_model1(kv: torch.Tensor) -> torch.Tensor:
    num_blocks, page_size = kv.shape[0], kv.shape[1]
    tokens = kv[:, :, 0, :]
    data, scale_bytes = _encode_model1_tokens(tokens.to(torch.float32), tokens[..., MODEL1_NOPE_DIMS:])
    blocks = torch.empty(num_blocks, page_size * MODEL1_BYTES_PER_TOKEN, dtype=torch.uint8, device=kv.device)
    split = page_size * MODEL1_TOKEN_DATA_BYTES
    blocks[:, :split] = data.reshape(num_blocks, split)
    blocks[:, split:] = scale_bytes.reshape(num_blocks, page_size * MODEL1_SCALE_BYTES)
    return blocks.view(num_blocks, page_size, 1, MODEL1_BYTES_PER_TOKEN)


def _dequantize_model1(raw: torch.Tensor) -> torch.Tensor:
    num_blocks, page_size = raw.shape[0], raw.shape[1]
    blocks = _model1_block_bytes(raw)
    split = page_size * MODEL1_TOKEN_DATA_BYTES
    data = blocks[:, :split].reshape(num_blocks, page_size, MODEL1_TOKEN_DATA_BYTES)
    scale_bytes = blocks[:, split:].reshape(num_blocks, page_size, MODEL1_SCALE_BYTES)
    return _decode_model1_tokens(data, scale_bytes).unsqueeze(2)


def _model1_tokens(raw: torch.Tensor, block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    page_size = raw.shape[1]
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


# ---------------------------------------------------------------------------
# the format-generic API
# ---------------------------------------------------------------------------
def quantize_kv(kv: torch.Tensor, kv_format: str) -> torch.Tensor:
    """bf16/fp32 [num_blocks, page_size, 1, d_qk] -> uint8 [num_blocks, page_size, 1, bytes_per_token]
    in the layout of ``kv_format`` (one of FORMAT_NAMES; d_qk 576 for V32, 512 otherwise).

    Returns a new contiguous tensor on kv's device. Dims stored as bf16 (V32's and
    V4's RoPE dims) are rounded to bf16 (nearest even) when kv is fp32.
    """
    fmt = resolve_format(kv_format)
    kv = _require_tensor("kv", kv)
    _require_dtype("kv", kv, _INPUT_DTYPES)
    _check_paged_4d("kv", kv, fmt.d_qk, f"{fmt.name} format: d_qk {fmt.d_qk}")
    if fmt.page_structured:
        return _quantize_model1(kv)
    return _encode_rows(kv.to(torch.float32), kv, fmt.name)


def _check_cache(k_cache: torch.Tensor, fmt: KvFormat) -> torch.Tensor:
    k_cache = _require_tensor("k_cache", k_cache)
    raw = _as_bytes("k_cache", k_cache)
    _check_paged_4d("k_cache", raw, fmt.bytes_per_token, f"{fmt.name} format, bytes per token")
    return raw


def dequantize_kv(k_cache: torch.Tensor, kv_format: str) -> torch.Tensor:
    """uint8/int8/float8_e4m3fn [num_blocks, page_size, 1, bytes_per_token] in ``kv_format``
    -> fp32 [num_blocks, page_size, 1, d_qk]."""
    fmt = resolve_format(kv_format)
    raw = _check_cache(k_cache, fmt)
    if fmt.page_structured:
        return _dequantize_model1(raw)
    return _decode_rows(raw, fmt.name)


def dequantize_kv_tokens(k_cache: torch.Tensor, kv_format: Union[str, int], token_indices: torch.Tensor) -> torch.Tensor:
    """Dequantise only the tokens ``token_indices`` (physical, block * page_size + offset) -> fp32 [n, d_qk].

    kv_format: a format name; an int is q's head dim under the older rule (576 -> V32,
    512 -> V4). token_indices: integer tensor [n] on k_cache's device, every value in
    [0, num_blocks * page_size) (ValueError otherwise). Touches no other token, so NaN
    in unreferenced slots never leaks in.
    """
    fmt = resolve_format(kv_format)
    raw = _check_cache(k_cache, fmt)
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
    if fmt.page_structured:
        return _model1_tokens(raw, block, offset)
    return _decode_rows(raw[block, offset, 0, :], fmt.name)


def dequantize_kv_cache(k_cache: torch.Tensor, d_qk: Union[int, str]) -> torch.Tensor:
    """Older form of dequantize_kv: the format follows d_qk (576 -> V32, 512 -> V4), or is named."""
    return dequantize_kv(k_cache, resolve_format(d_qk, "d_qk").name)


# ---------------------------------------------------------------------------
# the older per-format names (kept for existing callers)
# ---------------------------------------------------------------------------
def quantize_kv_v32(kv: torch.Tensor) -> torch.Tensor:
    """bf16/fp32 [..., 576] -> uint8 [..., 656] in the V32 layout (any leading dims).

    Returns a new contiguous tensor on kv's device. RoPE dims are rounded to bf16
    (round to nearest even) when kv is fp32.
    """
    kv = _require_tensor("kv", kv)
    _require_dtype("kv", kv, _INPUT_DTYPES)
    _require_last_dim("kv", kv, V32_D_QK, "V32 format: 512 latent + 64 RoPE dims")
    return _encode_v32_rows(kv.to(torch.float32), kv[..., V32_NOPE_DIMS:])


def dequantize_kv_v32(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8/float8_e4m3fn [..., 656] (V32 layout, any leading dims) -> fp32 [..., 576]."""
    packed = _require_tensor("packed", packed)
    raw = _as_bytes("packed", packed)
    _require_last_dim("packed", raw, V32_BYTES_PER_TOKEN, "V32 format, bytes per token")
    return _decode_v32_rows(raw)


def quantize_kv_model1(kv: torch.Tensor) -> torch.Tensor:
    """bf16/fp32 [num_blocks, page_size, 1, 512] -> uint8 [num_blocks, page_size, 1, 584] (V4 layout)."""
    kv = _require_tensor("kv", kv)
    _require_dtype("kv", kv, _INPUT_DTYPES)
    _check_paged_4d("kv", kv, MODEL1_D_QK, "V4 format: 448 latent + 64 RoPE dims")
    return _quantize_model1(kv)


def dequantize_kv_model1(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8/float8_e4m3fn [num_blocks, page_size, 1, 584] (V4) -> fp32 [num_blocks, page_size, 1, 512]."""
    packed = _require_tensor("packed", packed)
    raw = _as_bytes("packed", packed)
    _check_paged_4d("packed", raw, MODEL1_BYTES_PER_TOKEN, "V4 format, bytes per token")
    return _dequantize_model1(raw)


# ---------------------------------------------------------------------------
# addressing
# ---------------------------------------------------------------------------
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
