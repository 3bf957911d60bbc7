// The per-tile steps of an MLA row block: 32 query rows (two m16 slabs) against a 16-token
// KV tile whose rows hold d_qk dims (V = the first 512), computed by 4 warps with
// mma.sync m16n8k16. The sparse prefill kernel (csrc/portable/prefill/sparse) and the dense
// decode 4-warp kernel (csrc/portable/decode/dense/kernel.cuh) are built from these.
// Both kernels' machine code is sensitive to how the steps are cut: a step split
// differently (a local array moved into a callee, coordinates computed in a helper) made
// ptxas schedule either kernel differently, so the pieces below are the cuts under which
// each kernel compiles to the same code as its own inline loop did.
//
// Split of the work (kDimQK = 576 or 512, 4 warps):
//   S = Q K^T: warp w sums dims [w * kDimQK / 4, (w + 1) * kDimQK / 4) for all 32 rows and
//     16 tokens; warps 1..3 store their partial sums, warp 0 adds them in warp order 1, 2,
//     3 (a fixed order: bit-identical reruns).
//   softmax: warp 0 only (its lanes hold rows 16s + g and 16s + g + 8, g = lane / 4, of
//     both slabs s), base 2, state in shared memory: per row the running max (raw score
//     units) and per (row, quad lane) the partial running sum.
//   O += P V: warp w owns output columns [128w, 128w + 128): 2 slabs x 16 n-tiles x 4 fp32.
// Shared tiles are 16-bit rows XOR-swizzled in 16-byte chunks (swizzle.cuh); P is [32][16]
// in the input dtype with the two chunks of rows 4..7 of every 8 swapped (p_offset).
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "element.cuh"
#include "mla_row_block_layout.h"
#include "ldmatrix.cuh"
#include "math.cuh"
#include "mma.cuh"
#include "swizzle.cuh"

namespace flash_mla::portable::mla_row_block {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.69314718055994530942f;

template <int kDimQK>
struct Dims {
  static_assert(kDimQK % (kNumWarps * 16) == 0, "whole k-steps per warp");
  static_assert(kDimQK >= kHeadDimV, "V is the first 512 dims of a KV row");
  static constexpr int kDimsPerWarp = kDimQK / kNumWarps;  // 144 or 128
  static constexpr int kKStepsPerWarp = kDimsPerWarp / 16; // 9 or 8
  static constexpr int kChunksPerRow = kDimQK / 8;         // 16-byte chunks per row
  static constexpr int kQBytes = kBlockM * kDimQK * 2;
  static constexpr int kTileBytes = kBlockN * kDimQK * 2;
};

// P tile: 32 rows of 16 elements (two 16-byte chunks); swapping the chunks of rows 4..7 of
// every 8 makes the 8 row addresses of one ldmatrix matrix hit 32 distinct banks.
__device__ __forceinline__ uint32_t p_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 32 + ((chunk ^ ((row >> 2) & 1)) * 16));
}

// Every step takes the number of m16 slabs as a template argument kS (default kSlabs = 2,
// 32 rows); a kernel whose rows fit one slab (16 rows) instantiates them with 1.
template <int kS> using SAccOf = float[kS][2][4];
template <int kS> using OAccOf = float[kS][kNTilesO][4];
using SAcc = SAccOf<kSlabs>;
using OAcc = OAccOf<kSlabs>;

template <int kS = kSlabs>
__device__ __forceinline__ void zero_s(SAccOf<kS>& s_acc) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int n = 0; n < 2; ++n) s_acc[s][n][0] = s_acc[s][n][1] = s_acc[s][n][2] = s_acc[s][n][3] = 0.f;
}

template <int kS = kSlabs>
__device__ __forceinline__ void zero_o(OAccOf<kS>& o_acc) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int n = 0; n < kNTilesO; ++n) o_acc[s][n][0] = o_acc[s][n][1] = o_acc[s][n][2] = o_acc[s][n][3] = 0.f;
}

// Per-lane ldmatrix coordinates (mma.cuh, ldmatrix.cuh). Q (A of S, row-major): row
// (lane & 15), chunk bit lane >> 4. K (B of S, stored token-major = "col"): token (lane & 7)
// + 8 * bit 4, chunk bit (lane >> 3) & 1, so b[0..1] are tokens 0..7 and b[2..3] tokens
// 8..15. V (B of O, transposed): token (lane & 7) + 8 * bit 3, chunk bit lane >> 4.
struct SCoords {
  int a_row, a_col, k_row, k_col;
};

// This warp's share of S for the tile at tile_smem: s_acc = Q[:, dims] K[:, dims]^T.
// Addresses: k-step g of a swizzled row (chunks 2 g and 2 g + 1) has chunk 2 g + b at
// 8 (g / 4) + ((2 (g % 4) + b) ^ (row % 8)) (swizzle.cuh). This warp's k-steps are
// g0 + kk (g0 = warp * kKStepsPerWarp), so k-step g0 + 4 q + jj sits at rot[jj] + 128 q:
// the four rot values are computed once and every load is a base plus an immediate.
// kPrefetch: the next step's fragments load while this step's MMAs run (two fragment
// buffers). The dense decode passes false: there it measured the same on an H100 and
// spilled 12 bytes on sm_100f (benchmarks/results/row_block_s_step_ab_h100_2026-12-06.log).
template <typename Elem, int kDimQK, int kS = kSlabs, bool kPrefetch = true>
__device__ __forceinline__ void s_partial(SAccOf<kS>& s_acc, uint32_t q_smem, uint32_t tile_smem,
                                          int warp, const SCoords& c) {
  using D = Dims<kDimQK>;
  constexpr int kRowBytes = kDimQK * 2;
  zero_s<kS>(s_acc);
  const int g0 = warp * D::kKStepsPerWarp;
  uint32_t a_rot[4], k_rot[4];
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const int g = g0 + jj;
    a_rot[jj] = static_cast<uint32_t>(128 * (g >> 2) + (((2 * (g & 3) + c.a_col / 8) ^ (c.a_row & 7)) * 16));
    k_rot[jj] = static_cast<uint32_t>(128 * (g >> 2) + (((2 * (g & 3) + c.k_col / 8) ^ (c.k_row & 7)) * 16));
  }
  const uint32_t a_rows = q_smem + static_cast<uint32_t>(c.a_row * kRowBytes);
  const uint32_t k_rows = tile_smem + static_cast<uint32_t>(c.k_row * kRowBytes);
  uint32_t a[2][kS][4], b[2][4];
  auto load = [&](int kk, int buf) {
    const uint32_t step = 128u * static_cast<uint32_t>(kk >> 2);
    ldmatrix_x4(b[buf], k_rows + k_rot[kk & 3] + step);
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      ldmatrix_x4(a[buf][s], a_rows + 16 * s * kRowBytes + a_rot[kk & 3] + step);
    }
  };
  if constexpr (kPrefetch) load(0, 0);
#pragma unroll
  for (int kk = 0; kk < D::kKStepsPerWarp; ++kk) {
    if constexpr (kPrefetch) {
      if (kk + 1 < D::kKStepsPerWarp) load(kk + 1, (kk + 1) & 1);
    } else {
      load(kk, kk & 1);
    }
    const uint32_t b_lo[2] = {b[kk & 1][0], b[kk & 1][1]};
    const uint32_t b_hi[2] = {b[kk & 1][2], b[kk & 1][3]};
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mma_m16n8k16<Elem>(s_acc[s][0], a[kk & 1][s], b_lo);
      mma_m16n8k16<Elem>(s_acc[s][1], a[kk & 1][s], b_hi);
    }
  }
}

template <typename Elem, int kDimQK, int kS = kSlabs>
__device__ __forceinline__ void s_partial(SAccOf<kS>& s_acc, uint32_t q_smem, uint32_t tile_smem,
                                          int warp, int lane) {
  const SCoords c{lane & 15, (lane >> 4) * 8, (lane & 7) + ((lane >> 4) & 1) * 8,
                  ((lane >> 3) & 1) * 8};
  s_partial<Elem, kDimQK, kS>(s_acc, q_smem, tile_smem, warp, c);
}

// Warps 1..3: publish this warp's partial S (float4 per lane and fragment).
template <int kS = kSlabs>
__device__ __forceinline__ void store_s_partial(float4* s_partials, const SAccOf<kS>& s_acc,
                                                int warp, int lane) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int n = 0; n < 2; ++n)
      s_partials[(((warp - 1) * kS + s) * 2 + n) * 32 + lane] =
          make_float4(s_acc[s][n][0], s_acc[s][n][1], s_acc[s][n][2], s_acc[s][n][3]);
}

// Warp 0: fragment n of slab s += the partials of warps 1, 2, 3 (in that order).
template <int kS = kSlabs>
__device__ __forceinline__ void add_s_partial(SAccOf<kS>& s_acc, const float4* s_partials, int s,
                                              int n, int lane) {
#pragma unroll
  for (int w = 1; w < kNumWarps; ++w) {
    const float4 v = s_partials[(((w - 1) * kS + s) * 2 + n) * 32 + lane];
    s_acc[s][n][0] += v.x;
    s_acc[s][n][1] += v.y;
    s_acc[s][n][2] += v.z;
    s_acc[s][n][3] += v.w;
  }
}

// Warp 0: s_acc += the partials of warps 1, 2, 3 (in that order).
template <int kS = kSlabs>
__device__ __forceinline__ void add_s_partials(SAccOf<kS>& s_acc, const float4* s_partials,
                                               int lane) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int n = 0; n < 2; ++n) add_s_partial<kS>(s_acc, s_partials, s, n, lane);
}

// Warp 0, after the partials are added: scores of the tile's invalid tokens become -inf
// (bit j of valid_mask: token j of the 16 is valid; t = lane % 4).
template <int kS = kSlabs>
__device__ __forceinline__ void mask_invalid_tokens(SAccOf<kS>& s_acc, uint32_t valid_mask,
                                                    int t) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = n * 8 + 2 * t + (e & 1);
        if (!((valid_mask >> tok) & 1u)) s_acc[s][n][e] = kNegInf;
      }
}

// Warp 0: this lane's rows' softmax state (running max, partial running sum).
template <int kS> using RowStateOf = float[kS][2];
using RowState = RowStateOf<kSlabs>;

// g = lane / 4, t = lane % 4, computed by the caller (recomputed here from `lane`, they
// changed the dense decode kernel's sm_120 code).
template <int kS = kSlabs>
__device__ __forceinline__ void load_softmax_state(RowStateOf<kS>& row_max, RowStateOf<kS>& row_sum,
                                                   const float* row_max_smem,
                                                   const float* row_sum_smem, int g, int t) {
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * s + g + 8 * r;
      row_max[s][r] = row_max_smem[row];
      row_sum[s][r] = row_sum_smem[row * 4 + t];
    }
}

// Warp 0, after masking (masked scores are -inf) and after every lane has loaded the old
// state (a __syncwarp between, since the state is replaced here; g, t as above): one
// online-softmax step in base 2. Maxima stay in raw score units; p = 2^(s c - m c) with
// one FFMA; __fmul_rn keeps an unchanged max's rescale at exactly 1 (a fused residual
// would drift over long rows). A row whose every score so far is -inf keeps max -inf, sum
// 0 and P 0. Writes P (rounded to the input dtype) at p_smem, each row's rescale factor,
// and the new state (to shared memory and to row_max / row_sum).
template <typename Elem, int kS = kSlabs>
__device__ __forceinline__ void softmax_update(SAccOf<kS>& s_acc, RowStateOf<kS>& row_max,
                                               RowStateOf<kS>& row_sum, float scale_log2,
                                               float* row_max_smem, float* row_sum_smem,
                                               float* rescale_smem, unsigned char* p_smem, int g,
                                               int t) {
#pragma unroll
  for (int s = 0; s < kS; ++s) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[s][r];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        tile_max = fmaxf(tile_max, fmaxf(s_acc[s][n][2 * r], s_acc[s][n][2 * r + 1]));
      }
      tile_max = quad_max(tile_max);
      const float ref = tile_max == kNegInf ? 0.f : __fmul_rn(tile_max, scale_log2);
      const float correction = exp2_approx(__fmul_rn(row_max[s][r], scale_log2) - ref);
      row_max[s][r] = tile_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        s_acc[s][n][2 * r] = exp2_approx(fmaf(s_acc[s][n][2 * r], scale_log2, -ref));
        s_acc[s][n][2 * r + 1] = exp2_approx(fmaf(s_acc[s][n][2 * r + 1], scale_log2, -ref));
        sum += s_acc[s][n][2 * r] + s_acc[s][n][2 * r + 1];
      }
      row_sum[s][r] = row_sum[s][r] * correction + sum;
      const int row = 16 * s + g + 8 * r;
      row_sum_smem[row * 4 + t] = row_sum[s][r];
      if (t == 0) {
        rescale_smem[row] = correction;
        row_max_smem[row] = row_max[s][r];
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        *reinterpret_cast<uint32_t*>(p_smem + p_offset(row, n) + 4 * t) =
            pack_float2<Elem>(s_acc[s][n][2 * r], s_acc[s][n][2 * r + 1]);
      }
    }
  }
}

// Warp 0, after masking: load the state, one softmax step (softmax_update).
template <typename Elem, int kS = kSlabs>
__device__ __forceinline__ void softmax_step(SAccOf<kS>& s_acc, float scale_log2,
                                             float* row_max_smem, float* row_sum_smem,
                                             float* rescale_smem, unsigned char* p_smem,
                                             int lane) {
  const int g = lane / 4;
  const int t = lane % 4;
  float row_max[kS][2], row_sum[kS][2];
  load_softmax_state<kS>(row_max, row_sum, row_max_smem, row_sum_smem, g, t);
  __syncwarp();  // every lane has read the old maxima before any is replaced
  softmax_update<Elem, kS>(s_acc, row_max, row_sum, scale_log2, row_max_smem, row_sum_smem,
                           rescale_smem, p_smem, g, t);
}

// Every warp, after the softmax step is visible: O *= each row's rescale factor.
template <int kS = kSlabs>
__device__ __forceinline__ void rescale_o(OAccOf<kS>& o_acc, const float* rescale_smem, int lane) {
  const int g = lane / 4;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const float c0 = rescale_smem[16 * s + g];
    const float c1 = rescale_smem[16 * s + g + 8];
#pragma unroll
    for (int n = 0; n < kNTilesO; ++n) {
      o_acc[s][n][0] *= c0;
      o_acc[s][n][1] *= c0;
      o_acc[s][n][2] *= c1;
      o_acc[s][n][3] *= c1;
    }
  }
}

// rescale_o, skipped by a warp whose rows' factors are all exactly 1 (once the row maxima
// settle, most tiles change none; multiplying by 1 would change no bit). Warp-uniform.
// Used by the sparse decode, where it measured faster; the dense decode and the sparse
// prefill measured 2-4% slower with it on an H100 (the skipped multiplications had been
// hidden under the P V loads), so they keep rescale_o.
template <int kS = kSlabs>
__device__ __forceinline__ void rescale_o_if_changed(OAccOf<kS>& o_acc, const float* rescale_smem,
                                                     int lane) {
  const int g = lane / 4;
  bool unchanged = true;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    unchanged = unchanged && rescale_smem[16 * s + g] == 1.f &&
                rescale_smem[16 * s + g + 8] == 1.f;
  }
  if (!__all_sync(0xffffffffu, unchanged)) rescale_o<kS>(o_acc, rescale_smem, lane);
}

template <int kS> using PFragOf = uint32_t[kS][4];
using PFrag = PFragOf<kSlabs>;

// P as the A operand of O += P V, read like Q (row (lane & 15), chunk bit lane >> 4; the
// ldmatrix row order of lanes 8..15 is folded into the row as bit 3).
template <int kS = kSlabs>
__device__ __forceinline__ void load_p(PFragOf<kS>& p_frag, uint32_t p_smem, int lane) {
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int row = 16 * s + (lane & 7) + ((lane >> 3) & 1) * 8;
    ldmatrix_x4(p_frag[s], p_smem + p_offset(row, lane >> 4));
  }
}

// O += P V over this warp's 128 columns; V is the tile read transposed.
template <typename Elem, int kDimQK, int kS = kSlabs>
__device__ __forceinline__ void pv(OAccOf<kS>& o_acc, const PFragOf<kS>& p_frag,
                                   uint32_t tile_smem, int warp, int v_row, int v_col) {
#pragma unroll
  for (int dp = 0; dp < kNTilesO / 2; ++dp) {
    const int col = warp * kColsPerWarp + dp * 16;
    uint32_t b[4];
    ldmatrix_x4_trans(b, tile_smem + swizzled_offset<kDimQK>(v_row, col + v_col));
    const uint32_t b_lo[2] = {b[0], b[1]};
    const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mma_m16n8k16<Elem>(o_acc[s][2 * dp], p_frag[s], b_lo);
      mma_m16n8k16<Elem>(o_acc[s][2 * dp + 1], p_frag[s], b_hi);
    }
  }
}

// Every warp, after the softmax step is visible: O = O * rescale + P V.
template <typename Elem, int kDimQK>
__device__ __forceinline__ void rescale_and_pv(OAcc& o_acc, const float* rescale_smem,
                                               uint32_t p_smem, uint32_t tile_smem, int warp,
                                               int lane) {
  rescale_o(o_acc, rescale_smem, lane);
  uint32_t p_frag[kSlabs][4];
  load_p(p_frag, p_smem, lane);
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;
  pv<Elem, kDimQK>(o_acc, p_frag, tile_smem, warp, v_row, v_col);
}

}  // namespace flash_mla::portable::mla_row_block
