// Per-tile steps shared by the decode CTAs that hold Q in registers: the dense decode's
// narrow and wide CTAs (csrc/portable/decode/dense/kernel_wide.cuh) and the sparse decode's
// narrow CTA (csrc/portable/decode/sparse/kernel_narrow.cuh). mma.sync m16n8k16 on
// 16-token tiles; rows g and g + 8 of an m16 slab per lane (g = lane / 4).
//
// A warp computes its slab's S partial over its own dims (the kernel says which: dim_of(kk)
// for k-step kk) and stores it to a double-buffered exchange ([buffer][warp][n-tile][lane]
// float4); after the kernel adds the slab's partials, every warp runs the same online
// softmax, keeps P in registers (the C fragments of S are the A fragment of P V) and
// rescales its O accumulators (16 n-tiles x 4 fp32 per lane). The partial sums and P V stay
// written in each kernel: cut into a function there, they changed ptxas's schedule of one
// kernel (mla_row_block.cuh says the same of its steps), while the steps here compile to the
// same machine code as the kernels' own loops did, on every target.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "element.cuh"
#include "ldmatrix.cuh"
#include "math.cuh"
#include "mma.cuh"
#include "swizzle.cuh"

namespace flash_mla::portable::qreg {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kNTilesO = 16;  // 128 output columns per warp

// This warp's S partial of a tile (16 rows x 16 tokens over its k-steps) from the bf16/fp16
// tile at `tile_smem` (rows of kRowElems, swizzled): k-step kk reads dims [dim_of(kk),
// dim_of(kk) + 16). k_row / k_col: the lane's ldmatrix coordinates for B (not transposed).
template <typename Elem, int kRowElems, int kKSteps, typename DimOf>
__device__ __forceinline__ void s_partial(float (&s_acc)[2][4], const uint32_t (&q_frag)[kKSteps][4],
                                          uint32_t tile_smem, int k_row, int k_col,
                                          DimOf dim_of) {
#pragma unroll
  for (int n = 0; n < 2; ++n) s_acc[n][0] = s_acc[n][1] = s_acc[n][2] = s_acc[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t b[4];
    ldmatrix_x4(b, tile_smem + swizzled_offset<kRowElems>(k_row, dim_of(kk) + k_col));
    const uint32_t b_lo[2] = {b[0], b[1]};
    const uint32_t b_hi[2] = {b[2], b[3]};
    mma_m16n8k16<Elem>(s_acc[0], q_frag[kk], b_lo);
    mma_m16n8k16<Elem>(s_acc[1], q_frag[kk], b_hi);
  }
}

// Stores warp `warp`'s partial into exchange buffer `buf`.
template <int kNumWarps>
__device__ __forceinline__ void store_partial(float4* exchange, const float (&s_acc)[2][4],
                                              int buf, int warp, int lane) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    exchange[((buf * kNumWarps + warp) * 2 + n) * 32 + lane] =
        make_float4(s_acc[n][0], s_acc[n][1], s_acc[n][2], s_acc[n][3]);
  }
}

// One online-softmax step of the lane's rows g and g + 8 over the tile's masked scores sc
// (-inf = masked), in base 2: maxima in raw score units, p = 2^(s c - m c) with one FFMA;
// __fmul_rn keeps an unchanged max's rescale at exactly 1. sc becomes p; correction[r] is
// the factor the row's O and sum are rescaled by.
__device__ __forceinline__ void softmax_step(float (&sc)[2][4], float (&row_max)[2],
                                             float (&row_sum)[2], float (&correction)[2],
                                             float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tile_max = row_max[r];
#pragma unroll
    for (int n = 0; n < 2; ++n) tile_max = fmaxf(tile_max, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
    tile_max = quad_max(tile_max);
    const float ref = tile_max == kNegInf ? 0.f : __fmul_rn(tile_max, scale_log2);
    correction[r] = exp2_approx(__fmul_rn(row_max[r], scale_log2) - ref);
    row_max[r] = tile_max;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      sc[n][2 * r] = exp2_approx(fmaf(sc[n][2 * r], scale_log2, -ref));
      sc[n][2 * r + 1] = exp2_approx(fmaf(sc[n][2 * r + 1], scale_log2, -ref));
      sum += sc[n][2 * r] + sc[n][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

// P as the A fragment of P V (mma.cuh) from the softmax's p values sc: a[0] row g tokens
// 2t.., a[1] row g+8 tokens 2t.., a[2] row g tokens 8+2t.., a[3] row g+8 tokens 8+2t..
// (n-tile 0 then 1).
template <typename Elem>
__device__ __forceinline__ void pack_p(uint32_t (&p_frag)[4], const float (&sc)[2][4]) {
  p_frag[0] = pack_float2<Elem>(sc[0][0], sc[0][1]);
  p_frag[1] = pack_float2<Elem>(sc[0][2], sc[0][3]);
  p_frag[2] = pack_float2<Elem>(sc[1][0], sc[1][1]);
  p_frag[3] = pack_float2<Elem>(sc[1][2], sc[1][3]);
}

// O *= correction, row g by correction[0] and row g + 8 by correction[1].
__device__ __forceinline__ void rescale_o(float (&o_acc)[kNTilesO][4],
                                          const float (&correction)[2]) {
#pragma unroll
  for (int n = 0; n < kNTilesO; ++n) {
    o_acc[n][0] *= correction[0];
    o_acc[n][1] *= correction[0];
    o_acc[n][2] *= correction[1];
    o_acc[n][3] *= correction[1];
  }
}

}  // namespace flash_mla::portable::qreg
