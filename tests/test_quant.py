"""flash_mla.quant: the format registry, byte layouts of all five formats (checked against
caches written byte by byte here), round trips, scale choice, NaN, addressing, validation (CPU)."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from flash_mla import quant
from flash_mla.testing import make_noncontiguous
from flash_mla import oracle as f64

NAN_CODES = (0x7F, 0xFF)


def _random_e4m3_values(shape, gen) -> torch.Tensor:
    """fp32 values that are exactly e4m3 numbers (random codes, NaN codes excluded)."""
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64)
    codes = torch.where((codes == 0x7F) | (codes == 0xFF), torch.zeros_like(codes), codes)
    return torch.tensor(f64.E4M3_TABLE, dtype=torch.float32)[codes]


def _representable(lead, tiles, tile, gen, dtype) -> torch.Tensor:
    """[*lead, tiles * tile]: e4m3 values times a random power of two per tile (2**-13 .. 2**20)."""
    values = _random_e4m3_values((*lead, tiles, tile), gen)
    exponents = torch.randint(-13, 21, (*lead, tiles, 1), generator=gen)
    return (values * torch.pow(2.0, exponents.float())).reshape(*lead, tiles * tile).to(dtype)


def _rope(lead, gen, dtype) -> torch.Tensor:
    return torch.randn(*lead, 64, generator=gen).to(torch.bfloat16).to(dtype)


# ---------------------------------------------------------------------------
# scale choice
# ---------------------------------------------------------------------------
def test_power_of_two_scale_edges():
    amax = torch.tensor([0.0, 448.0, 448.0 * 1.0000001, 896.0, 448.0 * 2 ** -20, 448.0 * 2 ** -13, 3.0, 1e30])
    got = quant.power_of_two_scale(amax)
    expected = [2.0 ** -13, 1.0, 2.0, 2.0, 2.0 ** -13, 2.0 ** -13, 2.0 ** -7, 2.0 ** math.ceil(math.log2(1e30 / 448))]
    assert got.dtype == torch.float32
    assert got.tolist() == expected
    bad = quant.power_of_two_scale(torch.tensor([float("nan"), float("inf")]))
    assert torch.isnan(bad).all()


def test_power_of_two_scale_matches_formula_on_random_amax():
    gen = torch.Generator().manual_seed(1)
    amax = torch.exp(torch.randn(2000, generator=gen, dtype=torch.float64) * 8).float()
    got = quant.power_of_two_scale(amax)
    for a, s in zip(amax.tolist(), got.tolist()):
        ratio = max(a / 448.0, 1e-4)
        k = math.frexp(s)[1] - 1
        assert s == 2.0 ** k
        assert 2.0 ** (k - 1) < ratio <= 2.0 ** k, (a, s)


# ---------------------------------------------------------------------------
# V3.2
# ---------------------------------------------------------------------------
def test_v32_byte_layout_offsets():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 576, generator=gen) * 5
    x[1, 128:256] = 0.0  # all-zero tile: floor scale 2**-13
    packed = quant.quantize_kv_v32(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 656) and packed.is_contiguous()
    for row in range(3):
        raw = packed[row].tolist()
        for t in range(4):
            scale = struct.unpack("<f", bytes(raw[512 + 4 * t:516 + 4 * t]))[0]
            amax = float(x[row, 128 * t:128 * (t + 1)].abs().max())
            expected = 2.0 ** math.ceil(math.log2(max(amax / 448.0, 1e-4)))
            assert scale == expected, (row, t, scale, amax)
            for i in range(128 * t, 128 * (t + 1), 17):  # e4m3 code of dim i sits at byte i
                approx = f64.E4M3_TABLE[raw[i]] * scale
                assert abs(approx - float(x[row, i])) <= max(2 ** -4 * abs(float(x[row, i])), 2 ** -10 * scale)
        for j in range(64):  # RoPE dim 512 + j: bf16 bytes 528 + 2j, little endian
            assert f64.bf16_value(raw[528 + 2 * j], raw[529 + 2 * j]) == float(x[row, 512 + j].to(torch.bfloat16))
    assert struct.unpack("<f", bytes(packed[1, 516:520].tolist()))[0] == 2.0 ** -13
    assert (packed[1, 128:256] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v32_round_trip_bit_exact_when_representable(dtype):
    gen = torch.Generator().manual_seed(3)
    lead = (4, 5)
    x = torch.cat([_representable(lead, 4, 128, gen, dtype), _rope(lead, gen, dtype)], dim=-1)
    packed = quant.quantize_kv_v32(x)
    back = quant.dequantize_kv_v32(packed)
    assert back.dtype == torch.float32 and back.shape == (4, 5, 576)
    assert torch.equal(back, x.float())
    assert torch.equal(quant.quantize_kv_v32(make_noncontiguous(x)), packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v32_round_trip_within_e4m3_error(dtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 576, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 3)).to(dtype)
    packed = quant.quantize_kv_v32(x)
    back = quant.dequantize_kv_v32(packed)
    scales = packed[:, 512:528].contiguous().view(torch.float32).repeat_interleave(128, dim=1)
    xf = x.float()
    err = (back[:, :512] - xf[:, :512]).abs()
    # round to nearest e4m3: half an ulp = 2**-4 relative for normals, 2**-10 * scale absolute below
    bound = torch.maximum(2.0 ** -4 * xf[:, :512].abs(), 2.0 ** -10 * scales)
    assert (err <= bound).all(), float((err / bound).max())
    rope_err = (back[:, 512:] - xf[:, 512:]).abs()
    assert (rope_err <= 2.0 ** -8 * xf[:, 512:].abs()).all()
    if dtype == torch.bfloat16:
        assert torch.equal(back[:, 512:], xf[:, 512:])


def test_v32_non_finite_tile_becomes_nan_only_there():
    x = torch.ones(2, 576)
    x[0, 300] = float("nan")
    x[1, 5] = float("inf")
    back = quant.dequantize_kv_v32(quant.quantize_kv_v32(x))
    assert torch.isnan(back[0, 256:384]).all() and torch.isnan(back[1, 0:128]).all()
    mask = torch.ones(2, 576, dtype=torch.bool)
    mask[0, 256:384] = False
    mask[1, 0:128] = False
    assert torch.equal(back[mask], torch.ones(int(mask.sum())))


def test_v32_accepts_int8_and_float8_views_and_noncontiguous():
    gen = torch.Generator().manual_seed(5)
    packed = quant.quantize_kv_v32(torch.randn(6, 576, generator=gen))
    ref = quant.dequantize_kv_v32(packed)
    assert torch.equal(quant.dequantize_kv_v32(packed.view(torch.int8)), ref)
    assert torch.equal(quant.dequantize_kv_v32(packed.view(torch.float8_e4m3fn)), ref)
    big = torch.zeros(12, 700, dtype=torch.uint8)
    big[::2, :656] = packed
    assert torch.equal(quant.dequantize_kv_v32(big[::2, :656]), ref)


# ---------------------------------------------------------------------------
# MODEL1
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 3, 64])
def test_model1_byte_layout_offsets(page_size):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, page_size, 1, 512, generator=gen) * 3
    packed = quant.quantize_kv_model1(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, page_size, 1, 584) and packed.is_contiguous()
    for block in range(2):
        raw = packed[block].reshape(-1).tolist()
        for t in range(page_size):
            base = page_size * 576 + 8 * t  # scales follow all token data of the block
            assert raw[base + 7] == 0  # pad byte
            for tile in range(7):
                amax = float(x[block, t, 0, 64 * tile:64 * (tile + 1)].abs().max())
                expected = math.ceil(math.log2(max(amax / 448.0, 1e-4))) + 127
                assert raw[base + tile] == expected
            values = f64.decode_model1_token(raw, page_size, t)
            ref = x[block, t, 0].tolist()
            for i in range(0, 448, 13):
                scale = f64.ue8m0_value(raw[base + i // 64])
                assert abs(values[i] - ref[i]) <= max(2 ** -4 * abs(ref[i]), 2 ** -10 * scale)
            for j in range(64):  # RoPE at token bytes 448..575
                assert values[448 + j] == float(x[block, t, 0, 448 + j].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model1_round_trip_bit_exact_when_representable(dtype):
    gen = torch.Generator().manual_seed(7)
    lead = (3, 5, 1)
    x = torch.cat([_representable(lead, 7, 64, gen, dtype), _rope(lead, gen, dtype)], dim=-1)
    packed = quant.quantize_kv_model1(x)
    back = quant.dequantize_kv_model1(packed)
    assert back.dtype == torch.float32 and back.shape == (3, 5, 1, 512)
    assert torch.equal(back, x.float())
    assert torch.equal(quant.quantize_kv_model1(make_noncontiguous(x)), packed)


def test_model1_round_trip_within_e4m3_error():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 7, 1, 512, generator=gen) * 10
    back = quant.dequantize_kv_model1(quant.quantize_kv_model1(x))
    nope_err = (back[..., :448] - x[..., :448]).abs()
    assert (nope_err <= 2.0 ** -4 * x[..., :448].abs() + 2.0 ** -10 * 2.0 ** -3).all()
    assert ((back[..., 448:] - x[..., 448:]).abs() <= 2.0 ** -8 * x[..., 448:].abs()).all()


def test_model1_padded_block_stride_and_ue8m0_edges():
    """Blocks may sit in a buffer with padding between them (stride(0) > page_size * 584)."""
    page_size = 3
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, page_size, 1, 512, generator=gen)
    dense = quant.quantize_kv_model1(x)
    padded = torch.full((4, 2304), 0xFF, dtype=torch.uint8)  # 2304 = ceil(3 * 584 / 576) * 576
    padded[:, :page_size * 584] = dense.reshape(4, -1)
    view = padded[:, :page_size * 584].view(4, page_size, 1, 584)
    assert view.stride(0) == 2304
    assert torch.equal(quant.dequantize_kv_model1(view), quant.dequantize_kv_model1(dense))
    # ue8m0 byte 0 -> 2**-127 (fp32 subnormal), 254 -> 2**127, 255 -> NaN
    crafted = dense.clone().reshape(4, -1)
    crafted[0, :448] = 0x38  # e4m3 1.0
    crafted[0, page_size * 576:page_size * 576 + 3] = torch.tensor([0, 254, 255], dtype=torch.uint8)
    out = quant.dequantize_kv_model1(crafted.view(4, page_size, 1, 584))
    assert out[0, 0, 0, 0].item() == 2.0 ** -127
    assert out[0, 0, 0, 64].item() == 2.0 ** 127
    assert torch.isnan(out[0, 0, 0, 128:192]).all()


def test_model1_non_finite_tile_gets_nan_scale_byte():
    x = torch.ones(1, 2, 1, 512)
    x[0, 1, 0, 70] = float("nan")
    packed = quant.quantize_kv_model1(x)
    assert packed.reshape(-1)[2 * 576 + 8 + 1].item() == 255
    back = quant.dequantize_kv_model1(packed)
    assert torch.isnan(back[0, 1, 0, 64:128]).all()
    assert not torch.isnan(back[0, 1, 0, :64]).any() and not torch.isnan(back[0, 0]).any()


# ---------------------------------------------------------------------------
# format-agnostic access
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("d_qk", [576, 512])
def test_dequantize_kv_cache_and_tokens_agree_with_byte_decoder(d_qk):
    gen = torch.Generator().manual_seed(10)
    nb, page_size = 3, 5
    x = torch.randn(nb, page_size, 1, d_qk, generator=gen)
    packed = quant.quantize_kv_v32(x) if d_qk == 576 else quant.quantize_kv_model1(x)
    full = quant.dequantize_kv_cache(packed, d_qk)
    assert full.shape == (nb, page_size, 1, d_qk)
    picks = torch.tensor([14, 0, 7, 7, 5], dtype=torch.int32)
    tokens = quant.dequantize_kv_tokens(packed, d_qk, picks)
    for row, idx in enumerate(picks.tolist()):
        expected = f64.decode_fp8_token(packed, d_qk, idx)
        assert torch.equal(tokens[row].double(), expected)
        assert torch.equal(full[idx // page_size, idx % page_size, 0], tokens[row])
    with pytest.raises(ValueError, match=r"token_indices must lie in \[0, 15\)"):
        quant.dequantize_kv_tokens(packed, d_qk, torch.tensor([15]))
    with pytest.raises(ValueError, match="token_indices must lie"):
        quant.dequantize_kv_tokens(packed, d_qk, torch.tensor([-1]))


def test_format_validation_messages():
    with pytest.raises(ValueError, match=r"d_qk given as a head dim must be 576 \(V32\) or 512 \(V4\), got 128"):
        quant.dequantize_kv_cache(torch.zeros(1, 1, 1, 656, dtype=torch.uint8), 128)
    with pytest.raises(ValueError, match=r"k_cache must have shape \[num_blocks, page_size, 1, 584\].*got shape \(1, 1, 1, 656\)"):
        quant.dequantize_kv_cache(torch.zeros(1, 1, 1, 656, dtype=torch.uint8), 512)
    with pytest.raises(TypeError, match=r"kv must have dtype in .*got torch.float16"):
        quant.quantize_kv_v32(torch.zeros(2, 576, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"kv must have last dimension 576.*got shape \(2, 512\)"):
        quant.quantize_kv_v32(torch.zeros(2, 512))
    with pytest.raises(ValueError, match=r"kv must have shape \[num_blocks, page_size, 1, 512\].*got shape \(2, 512\)"):
        quant.quantize_kv_model1(torch.zeros(2, 512))
    with pytest.raises(TypeError, match=r"packed must have dtype in .*got torch.float32"):
        quant.dequantize_kv_v32(torch.zeros(2, 656))
    with pytest.raises(TypeError, match="kv must be a torch.Tensor, got list"):
        quant.quantize_kv_v32([0.0] * 576)
    assert quant.bytes_per_token(576) == 656 and quant.bytes_per_token(512) == 584


# ---------------------------------------------------------------------------
# positions -> physical indices
# ---------------------------------------------------------------------------
def test_positions_to_physical_indices_matches_loop():
    gen = torch.Generator().manual_seed(11)
    b, s_q, topk, page_size, max_blocks = 3, 2, 9, 4, 5
    table = torch.randint(0, 1000, (b, max_blocks), generator=gen, dtype=torch.int32)
    pos = torch.randint(-1, max_blocks * page_size, (b, s_q, topk), generator=gen, dtype=torch.int32)
    got = quant.positions_to_physical_indices(pos, table, page_size)
    assert got.dtype == torch.int32 and got.shape == pos.shape
    for i in range(b):
        for j in range(s_q):
            for s in range(topk):
                p = int(pos[i, j, s])
                want = -1 if p == -1 else int(table[i, p // page_size]) * page_size + p % page_size
                assert int(got[i, j, s]) == want
    assert (got[pos == -1] == -1).all() and (pos == -1).any()


def test_positions_to_physical_indices_rejects_bad_positions():
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"positions must be -1 or in \[0, 8\).*got values in \[-2, 0\]"):
        quant.positions_to_physical_indices(torch.tensor([[[0, -2]]], dtype=torch.int32), table, 4)
    with pytest.raises(ValueError, match=r"positions must be -1 or in \[0, 8\).*got values in \[0, 8\]"):
        quant.positions_to_physical_indices(torch.tensor([[[0, 8]]], dtype=torch.int32), table, 4)
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        quant.positions_to_physical_indices(torch.tensor([[[0]]], dtype=torch.int32), table, 0)
    with pytest.raises(ValueError, match=r"block_table must have shape \[b=2, max_blocks\]"):
        quant.positions_to_physical_indices(torch.zeros(2, 1, 1, dtype=torch.int32), table, 4)


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------
def test_registry_lists_the_five_formats():
    assert quant.FORMAT_NAMES == ("V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4")
    assert set(quant.FORMATS) == set(quant.FORMAT_NAMES)
    table = {name: (f.bytes_per_token, f.d_qk, f.page_structured) for name, f in quant.FORMATS.items()}
    assert table == {"V32": (656, 576, False), "V32_NO_ROPE": (528, 512, False), "V4": (584, 512, True),
                     "V41": (528, 512, False), "V41_FP4": (288, 512, False)}
    assert all(f.name == name for name, f in quant.FORMATS.items())
    with pytest.raises(Exception):
        quant.FORMATS["V4"].d_qk = 576  # frozen


def test_detect_format():
    assert [quant.detect_format(n) for n in (656, 584, 528, 288)] == ["V32", "V4", "V41", "V41_FP4"]
    for bad in (576, 512, 0, 657):
        with pytest.raises(ValueError, match=rf"bytes_per_token must be 656 \(V32\), 584 \(V4\), 528 \(V41; "
                                             rf"V32_NO_ROPE has the same size and must be named\) or 288 "
                                             rf"\(V41_FP4\), got {bad}"):
            quant.detect_format(bad)
    with pytest.raises(TypeError, match="bytes_per_token must be an int, got str"):
        quant.detect_format("656")


def test_resolve_format_takes_names_and_the_old_head_dims():
    assert quant.resolve_format("V41_FP4") is quant.FORMATS["V41_FP4"]
    assert quant.resolve_format(576).name == "V32" and quant.resolve_format(512).name == "V4"
    with pytest.raises(ValueError, match=r"kv_format must be one of 'V32', 'V32_NO_ROPE', 'V4', 'V41', "
                                         r"'V41_FP4', got 'MODEL1'"):
        quant.resolve_format("MODEL1")
    with pytest.raises(ValueError, match=r"kv_format given as a head dim must be 576 \(V32\) or 512 \(V4\), got 528"):
        quant.resolve_format(528)
    with pytest.raises(TypeError, match=r"kv_format must be a format name \(str\) or a head dim \(int\), got bool"):
        quant.resolve_format(True)


# ---------------------------------------------------------------------------
# caches written byte by byte from the layout description (no quant code involved)
# ---------------------------------------------------------------------------
# e4m3 codes with their values worked out by hand: sign | 4-bit exponent (bias 7) | 3-bit mantissa.
E4M3_BY_HAND = {0x00: 0.0, 0x38: 1.0, 0x40: 2.0, 0xB8: -1.0, 0x3C: 1.5, 0x01: 2.0 ** -9,
                0x07: 7 * 2.0 ** -9, 0x08: 2.0 ** -6, 0x7E: 448.0, 0xFE: -448.0, 0x33: 0.6875, 0x80: -0.0}
E4M3_CODES = list(E4M3_BY_HAND)
# e2m1 nibbles: bit 3 the sign, bits 0..2 -> {0, .5, 1, 1.5, 2, 3, 4, 6}
E2M1_BY_HAND = {0x0: 0.0, 0x1: 0.5, 0x2: 1.0, 0x3: 1.5, 0x4: 2.0, 0x5: 3.0, 0x6: 4.0, 0x7: 6.0,
                0x8: -0.0, 0x9: -0.5, 0xA: -1.0, 0xB: -1.5, 0xC: -2.0, 0xD: -3.0, 0xE: -4.0, 0xF: -6.0}
# e4m3 codes used as FP4 scales (positive, finite)
FP4_SCALE_CODES = [0x38, 0x40, 0x3C, 0x01, 0x7E, 0x33, 0x08]
# ue8m0 scale bytes: 2 ** (e - 127)
UE8M0_BYTES = [127, 130, 120, 100, 140, 126]
FP32_SCALES = [1.0, 0.25, 3.0, 2.0 ** -13]


def _bf16_bytes_by_hand(value: float) -> bytes:
    """The two little-endian bytes of a bf16-exact value: the top half of its fp32 bytes."""
    raw = struct.pack("<f", value)
    assert struct.unpack("<f", b"\x00\x00" + raw[2:])[0] == value, value
    return raw[2:]


def _e4m3_token(token: int, count: int):
    """(codes, values): a per-token pattern of hand-decoded e4m3 codes."""
    codes = [E4M3_CODES[(token * 7 + 3 * i + i // 5) % len(E4M3_CODES)] for i in range(count)]
    return codes, [E4M3_BY_HAND[c] for c in codes]


def _rope_values(token: int):
    return [((token * 13 + j) % 17 - 8) * 0.125 for j in range(64)]  # bf16-exact


def _token_by_hand(fmt: str, token: int):
    """(bytes of one token-contiguous token, its 512 or 576 values), from the layout description."""
    if fmt in ("V32", "V32_NO_ROPE"):
        codes, values = _e4m3_token(token, 512)
        scales = [FP32_SCALES[(token + t) % 4] for t in range(4)]
        raw = bytes(codes) + struct.pack("<4f", *scales)
        values = [v * scales[i // 128] for i, v in enumerate(values)]
        if fmt == "V32":
            rope = _rope_values(token)
            raw += b"".join(_bf16_bytes_by_hand(v) for v in rope)
            values += rope
        return raw, values
    if fmt == "V41":
        codes, values = _e4m3_token(token, 512)
        exps = [UE8M0_BYTES[(token + t) % len(UE8M0_BYTES)] for t in range(16)]
        values = [v * 2.0 ** (exps[i // 32] - 127) for i, v in enumerate(values)]
        return bytes(codes) + bytes(exps), values
    assert fmt == "V41_FP4"
    nibbles = [(token * 5 + i * 3 + i // 7) % 16 for i in range(512)]
    data = bytes(nibbles[2 * k] | (nibbles[2 * k + 1] << 4) for k in range(256))  # even element low
    scale_codes = [FP4_SCALE_CODES[(token + t) % len(FP4_SCALE_CODES)] for t in range(32)]
    values = [E2M1_BY_HAND[n] * E4M3_BY_HAND[scale_codes[i // 16]] for i, n in enumerate(nibbles)]
    return data + bytes(scale_codes), values


def _v4_page_by_hand(first_token: int, page_size: int):
    """(bytes of one V4 page, values of its tokens): all token rows, then all scale rows."""
    rows, scale_rows, values = b"", b"", []
    for t in range(page_size):
        token = first_token + t
        codes, latent = _e4m3_token(token, 448)
        exps = [UE8M0_BYTES[(token + j) % len(UE8M0_BYTES)] for j in range(7)]
        rope = _rope_values(token)
        rows += bytes(codes) + b"".join(_bf16_bytes_by_hand(v) for v in rope)
        scale_rows += bytes(exps) + b"\x00"
        values.append([v * 2.0 ** (exps[i // 64] - 127) for i, v in enumerate(latent)] + rope)
    return rows + scale_rows, values


def _cache_by_hand(fmt: str, num_blocks: int, page_size: int):
    """(uint8 cache [num_blocks, page_size, 1, bpt], float64 values [num_blocks * page_size, d_qk])."""
    bpt = {"V32": 656, "V32_NO_ROPE": 528, "V4": 584, "V41": 528, "V41_FP4": 288}[fmt]
    blob, values = b"", []
    for block in range(num_blocks):
        if fmt == "V4":
            page, page_values = _v4_page_by_hand(block * page_size, page_size)
            blob += page
            values += page_values
            continue
        for t in range(page_size):
            raw, token_values = _token_by_hand(fmt, block * page_size + t)
            assert len(raw) == bpt
            blob += raw
            values.append(token_values)
    cache = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(num_blocks, page_size, 1, bpt)
    return cache, torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("page_size", [1, 2, 61, 64, 69])
@pytest.mark.parametrize("fmt", ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"])
def test_cache_written_by_hand_reads_back(fmt, page_size):
    num_blocks = 3
    cache, expected = _cache_by_hand(fmt, num_blocks, page_size)
    d_qk = expected.shape[1]
    full = quant.dequantize_kv(cache, fmt)
    assert full.dtype == torch.float32 and full.shape == (num_blocks, page_size, 1, d_qk)
    assert torch.equal(full.reshape(-1, d_qk).double(), expected)
    total = num_blocks * page_size
    picks = torch.tensor([total - 1, 0, page_size, total // 2, page_size - 1, total - 1])
    assert torch.equal(quant.dequantize_kv_tokens(cache, fmt, picks).double(), expected[picks])
    assert torch.equal(quant.dequantize_kv_tokens(cache.view(torch.int8), fmt, picks), full.reshape(-1, d_qk)[picks])
    assert torch.equal(f64.decode_fp8_tokens(cache, fmt, picks.tolist()), expected[picks])
    assert torch.equal(f64.decode_fp8_token(cache.view(torch.float8_e4m3fn), fmt, total - 1), expected[total - 1])
    if fmt in ("V32", "V4"):  # the older names and the head-dim form of the format argument
        assert torch.equal(quant.dequantize_kv_tokens(cache, d_qk, picks).double(), expected[picks])
        assert torch.equal(f64.decode_fp8_tokens(cache, d_qk, picks.tolist()), expected[picks])
        older = quant.dequantize_kv_v32(cache) if fmt == "V32" else quant.dequantize_kv_model1(cache)
        assert torch.equal(older, full)


@pytest.mark.parametrize("fmt", ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"])
def test_oracle_decode_of_a_hand_written_cache(fmt):
    """The oracle's sparse decode reads the same tokens: its output is the float64 attention over
    the hand-computed values."""
    cache, expected = _cache_by_hand(fmt, 2, 3)
    d_qk = expected.shape[1]
    gen = torch.Generator().manual_seed(20)
    q = torch.randn(1, 1, 2, d_qk, generator=gen, dtype=torch.float64) * 0.05
    picks = [4, 0, 5, 4]
    indices = torch.tensor([[picks + [-1, 6, 2 ** 31 - 1, -(2 ** 31)]]], dtype=torch.int32)
    out, lse = f64.sparse_decode(q, [(cache, indices, None, fmt)], 0.1, 512)
    keys = expected[picks]
    logits = q[0, 0] @ keys.T * 0.1
    weights = torch.softmax(logits, dim=-1)
    assert torch.allclose(out[0, 0], weights @ keys[:, :512], rtol=1e-12, atol=1e-12)
    assert torch.allclose(lse[0, 0], torch.logsumexp(logits, dim=-1), rtol=1e-12, atol=1e-12)


def test_ue8m0_and_fp4_special_scale_bytes():
    # ue8m0 0 -> 2**-127, 254 -> 2**127, 255 -> NaN; e4m3 scale 0x7F -> NaN
    raw, _ = _token_by_hand("V41", 0)
    token = bytearray(raw)
    token[:96] = bytes([0x38]) * 96        # e4m3 1.0 in dims 0..95
    token[512:515] = bytes([0, 254, 255])
    cache = torch.frombuffer(token, dtype=torch.uint8).view(1, 1, 1, 528)
    out = quant.dequantize_kv(cache, "V41")[0, 0, 0]
    assert out[0].item() == 2.0 ** -127 and out[32].item() == 2.0 ** 127
    assert torch.isnan(out[64:96]).all() and not torch.isnan(out[:64]).any()
    assert torch.equal(f64.decode_fp8_tokens(cache, "V41", [0])[0, :64], out[:64].double())
    raw, _ = _token_by_hand("V41_FP4", 0)
    token = bytearray(raw)
    token[256 + 3] = 0x7F
    cache = torch.frombuffer(token, dtype=torch.uint8).view(1, 1, 1, 288)
    out = quant.dequantize_kv(cache, "V41_FP4")[0, 0, 0]
    assert torch.isnan(out[48:64]).all() and not torch.isnan(out[:48]).any() and not torch.isnan(out[64:]).any()
    assert torch.isnan(f64.decode_fp8_tokens(cache, "V41_FP4", [0])[0, 48:64]).all()


# ---------------------------------------------------------------------------
# round trips of every format
# ---------------------------------------------------------------------------
def _e4m3_grid() -> torch.Tensor:
    """float64: every finite e4m3 value."""
    return torch.tensor([v for v in f64.E4M3_TABLE if not math.isnan(v)], dtype=torch.float64)


def _nearest_distance(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """|x - nearest grid point| for x [..., n] and per-element grid [..., n, g] (float64)."""
    return (grid - x.unsqueeze(-1)).abs().amin(dim=-1)


@pytest.mark.parametrize("page_size", [1, 2, 61, 64, 69])
@pytest.mark.parametrize("fmt,group", [("V32_NO_ROPE", 128), ("V41", 32)])
def test_e4m3_formats_round_trip_to_the_nearest_point(fmt, group, page_size):
    gen = torch.Generator().manual_seed(page_size + group)
    x = (torch.randn(2, page_size, 1, 512, generator=gen)
         * torch.exp(torch.randn(2, page_size, 1, 512 // group, generator=gen) * 3).repeat_interleave(group, -1))
    x = x.to(torch.bfloat16)
    packed = quant.quantize_kv(x, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (2, page_size, 1, quant.FORMATS[fmt].bytes_per_token)
    assert packed.is_contiguous()
    back = quant.dequantize_kv(packed, fmt).double().reshape(-1, 512)
    xf = x.double().reshape(-1, 512)
    amax = xf.reshape(-1, 512 // group, group).abs().amax(-1)
    # the scale rule, computed here with math on each group's amax
    expected_scale = torch.tensor([[2.0 ** math.ceil(math.log2(max(a / 448.0, 1e-4))) for a in row]
                                   for row in amax.tolist()], dtype=torch.float64)
    scale = expected_scale.repeat_interleave(group, dim=1)
    err = (back - xf).abs()
    # round to nearest e4m3 under that scale: half an ulp, 2**-4 relative for normals, 2**-10 * scale below
    assert (err <= torch.maximum(2.0 ** -4 * xf.abs(), 2.0 ** -10 * scale)).all()
    rows = slice(0, 8)  # and no e4m3 point under that scale is closer (a few tokens: [8, 512, 253])
    best = _nearest_distance(xf[rows], scale[rows].unsqueeze(-1) * _e4m3_grid())
    assert torch.equal(err[rows], best)
    if fmt == "V41":
        scale_bytes = packed.reshape(-1, 528)[:, 512:].double()
        assert torch.equal(torch.pow(2.0, scale_bytes - 127), expected_scale)
    else:
        stored = packed.reshape(-1, 528)[:, 512:].contiguous().view(torch.float32).double()
        assert torch.equal(stored, expected_scale)


def _fp4_expected_scale(amax: float) -> float:
    """clamp(amax / 6, 2**-9, 448) rounded to the nearest e4m3, ties to the even code, exactly."""
    from fractions import Fraction
    target = min(max(Fraction(amax) / 6, Fraction(1, 512)), Fraction(448))
    codes = [(abs(Fraction(f64.E4M3_TABLE[c]) - target), c % 2, c) for c in range(1, 127)]
    return f64.E4M3_TABLE[min(codes)[2]]


@pytest.mark.parametrize("page_size", [1, 2, 61, 64, 69])
def test_fp4_round_trip_to_the_nearest_point(page_size):
    gen = torch.Generator().manual_seed(30 + page_size)
    x = (torch.randn(2, page_size, 1, 512, generator=gen)
         * torch.exp(torch.randn(2, page_size, 1, 32, generator=gen) * 4).repeat_interleave(16, -1))
    x = x.to(torch.bfloat16)
    packed = quant.quantize_kv(x, "V41_FP4")
    assert packed.dtype == torch.uint8 and packed.shape == (2, page_size, 1, 288) and packed.is_contiguous()
    back = quant.dequantize_kv(packed, "V41_FP4").double().reshape(-1, 512)
    xf = x.double().reshape(-1, 512)
    stored = packed.reshape(-1, 288)[:, 256:].contiguous().view(torch.float8_e4m3fn).double()
    amax = xf.reshape(-1, 32, 16).abs().amax(-1)
    for row in range(min(4, amax.shape[0])):
        assert stored[row].tolist() == [_fp4_expected_scale(a) for a in amax[row].tolist()]
    scale = stored.repeat_interleave(16, dim=1)
    grid = torch.tensor(sorted(set(E2M1_BY_HAND.values())), dtype=torch.float64)
    err = (back - xf).abs()
    assert torch.equal(err, _nearest_distance(xf, scale.unsqueeze(-1) * grid))
    # which also bounds it: a quarter of the larger of |x| and the scale (the grid's half steps are
    # S/4, S/2, S below 2, 4, 6; past 6 a normal e4m3 scale, rounded by at most 2**-4, leaves at
    # most 0.4 S). Not where the scale was clamped at 448 (values past 6 * 448 saturate) or is an
    # e4m3 subnormal (below 2**-6 its steps of 2**-9 are coarse: amax / 6 may round down by a third)
    clamped = (amax > 6 * 448).repeat_interleave(16, dim=1)
    normal = (scale >= 2.0 ** -6) & ~clamped
    assert clamped.any() and normal.any()
    assert (err <= torch.maximum(xf.abs(), scale) / 4)[normal].all()
    huge = clamped & (xf.abs() > 6 * 448)
    assert torch.equal(back[huge], torch.sign(xf[huge]) * 6 * 448)


def test_fp4_ties_go_to_the_even_code():
    # each group's amax is 6, so its scale is exactly 1 and x / scale is x
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0, -6.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, 6.0, -6.0]
    x = torch.tensor(ties * 32).view(1, 1, 1, 512)
    packed = quant.quantize_kv(x, "V41_FP4")
    assert packed[0, 0, 0, 256:].tolist() == [0x38] * 32  # e4m3 1.0
    assert quant.dequantize_kv(packed, "V41_FP4")[0, 0, 0, :16].tolist() == want
    # the scale itself: amax / 6 halfway between two e4m3 values rounds to the even code
    assert _fp4_expected_scale(6 * 1.0625) == 1.0 and _fp4_expected_scale(6 * 1.1875) == 1.25
    for amax, scale_value in ((6 * 1.0625, 1.0), (6 * 1.1875, 1.25), (1e-6, 2.0 ** -9), (1e4, 448.0)):
        x = torch.zeros(1, 1, 1, 512)
        x[..., 0] = amax
        packed = quant.quantize_kv(x, "V41_FP4")
        assert packed[0, 0, 0, 256:257].view(torch.float8_e4m3fn).item() == scale_value, amax


def _on_grid(fmt: str, lead, gen, dtype) -> torch.Tensor:
    """Values every format's writer stores exactly (each group's scale is the one it picks)."""
    if fmt == "V32":
        return torch.cat([_representable(lead, 4, 128, gen, dtype), _rope(lead, gen, dtype)], dim=-1)
    if fmt == "V4":
        return torch.cat([_representable(lead, 7, 64, gen, dtype), _rope(lead, gen, dtype)], dim=-1)
    if fmt == "V32_NO_ROPE":
        return _representable(lead, 4, 128, gen, dtype)
    if fmt == "V41":
        return _representable(lead, 16, 32, gen, dtype)
    # V41_FP4: e2m1 codes with one +-6 per group, times an e4m3 scale: amax / 6 is that scale
    nibbles = torch.randint(0, 16, (*lead, 32, 16), generator=gen)
    nibbles[..., 0] = torch.randint(0, 2, (*lead, 32), generator=gen) * 8 + 7
    values = torch.tensor([E2M1_BY_HAND[n] for n in range(16)])[nibbles]
    scale_codes = torch.randint(1, 127, (*lead, 32, 1), generator=gen, dtype=torch.uint8)
    scales = scale_codes.view(torch.float8_e4m3fn).float()
    return (values * scales).reshape(*lead, 512).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"])
def test_values_on_the_grid_round_trip_exactly(fmt, dtype):
    gen = torch.Generator().manual_seed(40)
    for page_size in (1, 2, 61, 64, 69):
        x = _on_grid(fmt, (2, page_size, 1), gen, dtype)
        packed = quant.quantize_kv(x, fmt)
        back = quant.dequantize_kv(packed, fmt)
        assert back.dtype == torch.float32 and torch.equal(back, x.float()), (fmt, page_size)
        assert torch.equal(quant.quantize_kv(make_noncontiguous(x), fmt), packed)


@pytest.mark.parametrize("fmt", ["V32", "V32_NO_ROPE", "V4", "V41", "V41_FP4"])
def test_an_empty_cache_quantises_and_reads_back(fmt):
    # A pool with no blocks is legal (every index into it is invalid); torch cannot infer a
    # -1 dimension of an empty tensor, so the encoders must name their sizes.
    d_qk = quant.FORMATS[fmt].d_qk
    packed = quant.quantize_kv(torch.zeros(0, 64, 1, d_qk, dtype=torch.bfloat16), fmt)
    assert packed.shape == (0, 64, 1, quant.FORMATS[fmt].bytes_per_token) and packed.dtype == torch.uint8
    assert quant.dequantize_kv(packed, fmt).shape == (0, 64, 1, d_qk)


@pytest.mark.parametrize("fmt,group", [("V32", 128), ("V32_NO_ROPE", 128), ("V4", 64), ("V41", 32),
                                       ("V41_FP4", 16)])
def test_a_nan_or_inf_makes_its_group_nan_and_nothing_else(fmt, group):
    d_qk = quant.FORMATS[fmt].d_qk
    x = torch.full((2, 3, 1, d_qk), 3.0)  # on every format's grid (FP4: scale 0.5, code 6)
    x[0, 1, 0, 3 * group + 1] = float("nan")
    x[1, 2, 0, group - 1] = float("-inf")
    back = quant.dequantize_kv(quant.quantize_kv(x, fmt), fmt)
    bad = torch.zeros_like(back, dtype=torch.bool)
    bad[0, 1, 0, 3 * group:4 * group] = True
    bad[1, 2, 0, :group] = True
    assert torch.isnan(back[bad]).all()
    assert torch.equal(back[~bad], torch.full((int((~bad).sum()),), 3.0))
    if fmt in ("V32", "V4"):  # a RoPE dim is stored as bf16: only that element is NaN
        rope = torch.ones(1, 1, 1, d_qk)
        rope[..., d_qk - 5] = float("nan")
        back = quant.dequantize_kv(quant.quantize_kv(rope, fmt), fmt)
        assert torch.isnan(back).sum() == 1 and torch.isnan(back[..., d_qk - 5]).all()


def test_format_generic_validation_messages():
    with pytest.raises(ValueError, match=r"kv must have shape \[num_blocks, page_size, 1, 512\] "
                                         r"\(V41 format: d_qk 512\), got shape \(2, 3, 1, 576\)"):
        quant.quantize_kv(torch.zeros(2, 3, 1, 576), "V41")
    with pytest.raises(ValueError, match=r"kv must have shape \[num_blocks, page_size, 1, 512\].*got shape \(6, 512\)"):
        quant.quantize_kv(torch.zeros(6, 512), "V41_FP4")
    with pytest.raises(TypeError, match=r"kv must have dtype in .*got torch.float16"):
        quant.quantize_kv(torch.zeros(1, 1, 1, 512, dtype=torch.float16), "V41")
    with pytest.raises(ValueError, match=r"kv_format must be one of .*got 'FP4'"):
        quant.quantize_kv(torch.zeros(1, 1, 1, 512), "FP4")
    with pytest.raises(ValueError, match=r"k_cache must have shape \[num_blocks, page_size, 1, 288\] "
                                         r"\(V41_FP4 format, bytes per token\), got shape \(1, 1, 1, 528\)"):
        quant.dequantize_kv(torch.zeros(1, 1, 1, 528, dtype=torch.uint8), "V41_FP4")
    with pytest.raises(TypeError, match=r"k_cache must have dtype in .*got torch.bfloat16"):
        quant.dequantize_kv(torch.zeros(1, 1, 1, 528, dtype=torch.bfloat16), "V41")
    with pytest.raises(ValueError, match=r"token_indices must lie in \[0, 6\) for a cache of 2 blocks x 3 tokens, "
                                         r"got values in \[0, 6\]"):
        quant.dequantize_kv_tokens(torch.zeros(2, 3, 1, 288, dtype=torch.uint8), "V41_FP4", torch.tensor([0, 6]))
