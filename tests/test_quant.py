"""flash_mla.quant: byte layouts, round trips, scale choice, addressing, validation (CPU)."""
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
    return torch.tensor([f64.E4M3_TABLE[c] for c in codes.flatten().tolist()], dtype=torch.float32).reshape(shape)


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
    with pytest.raises(ValueError, match=r"d_qk must be 576 .* or 512 .*got 128"):
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
