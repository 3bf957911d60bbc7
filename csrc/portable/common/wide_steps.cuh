// The per-tile steps of the 64-row CTAs: 8 warps, 64 query rows, 64-key tiles, Q and the
// key tile in XOR-swizzled shared memory (swizzle.cuh), for GPUs whose blocks may opt in to
// about 226 KB (H100/H200, B200). The sparse prefill's wide CTA
// (prefill/sparse/kernel_wide.cuh), the dense decode's 64-row CTA
// (decode/dense/kernel_64rows.cuh) and the sparse decode's 64-row CTA
// (decode/sparse/kernel_64rows.cuh) run these steps; each kernel keeps its own copy, mask,
// barriers and epilogue.
//
// Roles of warp w (g = lane / 4, t = lane % 4), slab = w % 4, half = w / 4:
//   s_tile: the warps w and w ^ 1 compute the 32 x 32 block rows [32 (slab / 2), +32) x
//     tokens [32 half, +32) of S together, w over dims [kDim / 2 (slab % 2), +kDim / 2).
//     Each k-step loads 4 ldmatrix.x4 for 8 MMAs; a 16 x 32 block over all dims needs 3 for
//     4, and shared-memory bandwidth is what limits these CTAs (docs/sparse_prefill.md). The
//     two partial sums meet in the P buffer, which is free until the softmax writes P: the
//     odd warp stores its partial of the even warp's rows, the even warp adds it and stores
//     its partial of the odd warp's rows in the same place, the odd warp adds that (two
//     64-thread barriers). Each warp ends with S for rows [16 slab, +16) x tokens [32 half,
//     +32) over all dims (16 fp32 per lane); a + b = b + a in fp32, so both halves of a row
//     add the same two partial sums to the same bits. Every ldmatrix address is a per-lane
//     base plus an immediate: in a swizzled row, chunk 8 m + 2 j + b (k-step 4 m + j, b =
//     which 8 of its 16 dims) sits at 8 m + ((2 j + b) ^ (row % 8)), so four offsets
//     computed per tile serve every k-step of the warp's dims.
//   softmax_tile: the tile maxima of the (masked) S, exchanged with the slab's other warp
//     (w ^ 4) through shared memory at a __syncthreads (which also ends every exchange in
//     the P buffer before P is written), exp2, this warp's tokens' running sum, P rounded to
//     the input dtype, and (half 0) the rows' rescale factors for P V.
//   pv_tile: warp w owns output columns [64 w, +64) for all 64 rows (4 slabs x 8 n-tiles x 4
//     fp32 = 128 per lane); it rescales them, then adds P V with each V fragment feeding the
//     four slabs.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "element.cuh"
#include "ldmatrix.cuh"
#include "math.cuh"
#include "mma.cuh"
#include "swizzle.cuh"

namespace flash_mla::portable::wide_steps {

constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 64;                       // query rows
constexpr int kBlockN = 64;                       // keys per tile
constexpr int kSlabsO = kBlockM / 16;             // every warp's O covers all 64 rows
constexpr int kDimV = 512;
constexpr int kColsPerWarp = kDimV / kNumWarps;   // 64
constexpr int kPBytes = kBlockM * kBlockN * 2;    // P [64][64] in the input dtype
constexpr int kElemBytes = 2;                   // bf16 / fp16 rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// P [64 rows][64 tokens]: 8 chunks of 16 bytes per row, chunk c of row r at c ^ (r % 8), so
// the 8 rows of one ldmatrix matrix (and the 8 row groups of one store) hit 32 distinct
// banks.
__device__ __forceinline__ uint32_t p_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) * 16));
}

// Rendezvous of the two warps of S block `pair` (warps w and w ^ 1; 64 threads). Barrier 0 is
// __syncthreads; the sparse decode's 64-row CTA uses 5 and 6.
__device__ __forceinline__ void block_pair_barrier(int pair) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(1 + pair) : "memory");
}

// Per-lane ldmatrix coordinates (mma.cuh / ldmatrix.cuh give the fragment orders), computed
// once per CTA: A row-major (Q, P): row lane & 15, chunk bit lane >> 4. K (B of S): token
// (lane & 7) + 8 * bit 4, chunk bit 3. V (B of P V, transposed): token lane & 15, chunk bit 4.
struct Coords {
  int a_row, a_col, k_row, k_col, v_row, v_col;
};
__device__ __forceinline__ Coords coords_of(int lane) {
  return Coords{lane & 15, (lane >> 4) * 8, (lane & 7) + ((lane >> 4) & 1) * 8,
                ((lane >> 3) & 1) * 8, lane & 15, (lane >> 4) * 8};
}

// O = 0 at a work item's start.
__device__ __forceinline__ void zero_o(float (&o_acc)[kSlabsO][kColsPerWarp / 8][4]) {
#pragma unroll
  for (int s = 0; s < kSlabsO; ++s)
#pragma unroll
    for (int n = 0; n < kColsPerWarp / 8; ++n)
      o_acc[s][n][0] = o_acc[s][n][1] = o_acc[s][n][2] = o_acc[s][n][3] = 0.f;
}

// -inf for the keys of this warp's 32 tokens that `valid` does not have (bit j: token j of
// the warp's half; s_tile's fragment order).
__device__ __forceinline__ void mask_tokens(float (&s_acc)[4][4], uint32_t valid, int t) {
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!((valid >> (n * 8 + 2 * t + (e & 1))) & 1u)) s_acc[n][e] = kNegInf;
    }
}

// acc[i][n] += Q rows [q_row0 + 16 i, +16) x K tokens [tok0 + 8 n, +8) of the tile over the
// kKSteps k-steps (16 dims each) from k-step `first`: the MMA loop of both S blocks below.
// The fragments of k-step kk + 1 load while kk's MMAs run. Operand addresses of k-steps
// first + j, j < 4, are computed per tile (so they hold no registers during P V); k-step
// first + 4 m + j adds 128 m bytes to them.
template <typename Elem, int kDim, int kM, int kKSteps>
__device__ __forceinline__ void s_block_mma(float (&acc)[kM][4][4], uint32_t q_smem,
                                            uint32_t tile_smem, int q_row0, int tok0, int first,
                                            const Coords& c) {
  constexpr int kRowBytes = kDim * kElemBytes;
  const uint32_t a_rows = q_smem + (q_row0 + c.a_row) * kRowBytes;
  const uint32_t k_rows = tile_smem + (tok0 + c.k_row) * kRowBytes;
  uint32_t a_off[4], k_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int kk = first + j;
    const uint32_t span = 128u * static_cast<uint32_t>(kk / 4);
    a_off[j] = a_rows + span +
               static_cast<uint32_t>(((2 * (kk % 4) + c.a_col / 8) ^ (c.a_row & 7)) * 16);
    k_off[j] = k_rows + span +
               static_cast<uint32_t>(((2 * (kk % 4) + c.k_col / 8) ^ (c.k_row & 7)) * 16);
  }
  uint32_t frag[2][kM + 2][4];  // [buffer][Q rows 16 i.., K tokens 0..15, K tokens 16..31]
  auto load = [&](int kk, uint32_t(&f)[kM + 2][4]) {
    const uint32_t step = 128u * static_cast<uint32_t>(kk / 4);
#pragma unroll
    for (int i = 0; i < kM; ++i) ldmatrix_x4(f[i], a_off[kk % 4] + 16 * i * kRowBytes + step);
    ldmatrix_x4(f[kM], k_off[kk % 4] + step);
    ldmatrix_x4(f[kM + 1], k_off[kk % 4] + 16 * kRowBytes + step);
  };
  load(0, frag[0]);
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    if (kk + 1 < kKSteps) load(kk + 1, frag[(kk + 1) % 2]);
    const uint32_t(&f)[kM + 2][4] = frag[kk % 2];
    const uint32_t b[4][2] = {{f[kM][0], f[kM][1]}, {f[kM][2], f[kM][3]},
                              {f[kM + 1][0], f[kM + 1][1]}, {f[kM + 1][2], f[kM + 1][3]}};
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int n = 0; n < 4; ++n) mma_m16n8k16<Elem>(acc[i][n], f[i], b[n]);
  }
}

// The 32 x 32 block over half of the dims and the exchange of partial sums (the file's
// header describes both).
template <typename Elem, int kDim>
__device__ __forceinline__ void s_block_split(float (&s_acc)[4][4], uint32_t q_smem,
                                              uint32_t tile_smem, float* exchange, int slab,
                                              int half, int lane, const Coords& c) {
  constexpr int kKSteps = kDim / 32;  // per warp: half of the dims
  static_assert(kDim % 32 == 0, "whole k-steps in each half of the dims");
  static_assert(kPBytes >= 4 * 2048, "the P buffer holds the four S blocks' exchanges");
  const int odd = slab & 1;  // which half of the dims this warp adds
  const int pair = 2 * half + (slab >> 1);
  float acc[2][4][4];  // [slab 2 (slab / 2) + i][n-tile][fragment]
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;
  s_block_mma<Elem, kDim, 2, kKSteps>(acc, q_smem, tile_smem, 32 * (slab >> 1), 32 * half,
                                      kKSteps * odd, c);
  // The exchange: float4 n * 32 + lane of the block's 2 KB (32 lanes x 16 B: no bank conflict).
  float4* box = reinterpret_cast<float4*>(exchange) + 128 * pair + lane;
  if (odd) {
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      box[32 * n] = make_float4(acc[0][n][0], acc[0][n][1], acc[0][n][2], acc[0][n][3]);
    }
    block_pair_barrier(pair);  // the even warp may read
    block_pair_barrier(pair);  // the even warp's partial is there
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float4 v = box[32 * n];
      s_acc[n][0] = acc[1][n][0] + v.x;
      s_acc[n][1] = acc[1][n][1] + v.y;
      s_acc[n][2] = acc[1][n][2] + v.z;
      s_acc[n][3] = acc[1][n][3] + v.w;
    }
  } else {
    block_pair_barrier(pair);  // the odd warp's partial is there
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float4 v = box[32 * n];  // this lane reads, then writes, the same 16 bytes
      s_acc[n][0] = acc[0][n][0] + v.x;
      s_acc[n][1] = acc[0][n][1] + v.y;
      s_acc[n][2] = acc[0][n][2] + v.z;
      s_acc[n][3] = acc[0][n][3] + v.w;
      box[32 * n] = make_float4(acc[1][n][0], acc[1][n][1], acc[1][n][2], acc[1][n][3]);
    }
    block_pair_barrier(pair);  // the odd warp may read
  }
}

// S for rows [16 slab, +16) x tokens [32 half, +32) over all dims in one warp: 3 ldmatrix.x4
// per 4 MMAs, no exchange.
template <typename Elem, int kDim>
__device__ __forceinline__ void s_block_whole(float (&s_acc)[4][4], uint32_t q_smem,
                                              uint32_t tile_smem, int slab, int half,
                                              const Coords& c) {
  constexpr int kKSteps = kDim / 16;
  static_assert(kKSteps % 4 == 0, "k-steps come in groups of 4 (one 128-byte swizzle span)");
  float acc[1][4][4];
#pragma unroll
  for (int n = 0; n < 4; ++n) acc[0][n][0] = acc[0][n][1] = acc[0][n][2] = acc[0][n][3] = 0.f;
  s_block_mma<Elem, kDim, 1, kKSteps>(acc, q_smem, tile_smem, 16 * slab, 32 * half, 0, c);
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s_acc[n][e] = acc[0][n][e];
}

// S for rows [16 slab, +16) x tokens [32 half, +32) of the tile, all dims. exchange: the P
// buffer (kPBytes; free from the tile's first barrier until the softmax's __syncthreads);
// S block `pair` swaps its partial sums in bytes [2048 pair, +2048). On sm_100f the split
// block spills at ptxas's 255 registers (8 to 16 bytes in the sparse prefill's wide CTA and
// the dense decode's 64-row CTA), so that target keeps the whole-dims block.
template <typename Elem, int kDim>
__device__ __forceinline__ void s_tile(float (&s_acc)[4][4], uint32_t q_smem, uint32_t tile_smem,
                                       float* exchange, int slab, int half, int lane,
                                       const Coords& c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
  s_block_whole<Elem, kDim>(s_acc, q_smem, tile_smem, slab, half, c);
#else
  s_block_split<Elem, kDim>(s_acc, q_smem, tile_smem, exchange, slab, half, lane, c);
#endif
}

// After the caller masked s_acc (-inf for keys a row does not see). half_max_smem: [2][64]
// fp32; rescale_smem: [64] fp32; p: the P buffer. The __syncthreads inside is the tile's B2.
template <typename Elem>
__device__ __forceinline__ void softmax_tile(float (&s_acc)[4][4], float (&row_max)[2],
                                             float (&row_sum)[2], float scale_log2,
                                             float* half_max_smem, float* rescale_smem,
                                             unsigned char* p, int slab, int half, int g, int t) {
  float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s_acc[n][e]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = quad_max(tile_max[r]);
    if (t == 0) half_max_smem[half * kBlockM + 16 * slab + g + 8 * r] = tile_max[r];
  }
  __syncthreads();  // B2: the slab's other half's maxima are there; every S exchange is read
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = 16 * slab + g + 8 * r;
    // max is exact and commutative: both warps of the slab get the same value.
    const float m = fmaxf(tile_max[r], half_max_smem[(1 - half) * kBlockM + row]);
    const float ref = m == kNegInf ? 0.f : __fmul_rn(m, scale_log2);
    const float correction = exp2_approx(__fmul_rn(row_max[r], scale_log2) - ref);
    row_max[r] = m;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      s_acc[n][2 * r] = exp2_approx(fmaf(s_acc[n][2 * r], scale_log2, -ref));
      s_acc[n][2 * r + 1] = exp2_approx(fmaf(s_acc[n][2 * r + 1], scale_log2, -ref));
      sum += s_acc[n][2 * r] + s_acc[n][2 * r + 1];
      *reinterpret_cast<uint32_t*>(p + p_offset(row, 4 * half + n) + 4 * t) =
          pack_float2<Elem>(s_acc[n][2 * r], s_acc[n][2 * r + 1]);
    }
    row_sum[r] = row_sum[r] * correction + sum;
    if (half == 0 && t == 0) rescale_smem[row] = correction;
  }
}

// O = O * rescale + P V over warp `warp`'s 64 columns; V = dims [0, 512) of the tile.
template <typename Elem, int kDim>
__device__ __forceinline__ void pv_tile(float (&o_acc)[kSlabsO][kColsPerWarp / 8][4],
                                        float* rescale_smem, uint32_t p_smem,
                                        uint32_t tile_smem, int warp, int lane, int g,
                                        const Coords& c) {
#pragma unroll
  for (int s = 0; s < kSlabsO; ++s) {
    const float c0 = rescale_smem[16 * s + g];
    const float c1 = rescale_smem[16 * s + g + 8];
#pragma unroll
    for (int n = 0; n < kColsPerWarp / 8; ++n) {
      o_acc[s][n][0] *= c0;
      o_acc[s][n][1] *= c0;
      o_acc[s][n][2] *= c1;
      o_acc[s][n][3] *= c1;
    }
  }
#pragma unroll
  for (int kt = 0; kt < kBlockN / 16; ++kt) {
    uint32_t p_frag[kSlabsO][4];
#pragma unroll
    for (int s = 0; s < kSlabsO; ++s) {
      ldmatrix_x4(p_frag[s], p_smem + p_offset(16 * s + c.a_row, 2 * kt + (lane >> 4)));
    }
#pragma unroll
    for (int dp = 0; dp < kColsPerWarp / 16; ++dp) {
      uint32_t b[4];
      const int col = warp * kColsPerWarp + 16 * dp + c.v_col;
      ldmatrix_x4_trans(b, tile_smem + swizzled_offset<kDim>(16 * kt + c.v_row, col));
      const uint32_t b_lo[2] = {b[0], b[1]};
      const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
      for (int s = 0; s < kSlabsO; ++s) {
        mma_m16n8k16<Elem>(o_acc[s][2 * dp], p_frag[s], b_lo);
        mma_m16n8k16<Elem>(o_acc[s][2 * dp + 1], p_frag[s], b_hi);
      }
    }
  }
}

// Epilogue, first half: this lane's rows' running sums (this warp's tokens), added over the
// quad, into half_sum_smem [2 halves][64] fp32; a __syncthreads must come before row_total.
__device__ __forceinline__ void store_half_sums(const float (&row_sum)[2], float* half_sum_smem,
                                                int slab, int half, int g, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    if (t == 0) half_sum_smem[half * kBlockM + 16 * slab + g + 8 * r] = sum;
  }
}

// Epilogue, second half: row `row`'s whole softmax sum, its two token halves' sums added.
__device__ __forceinline__ float row_total(const float* half_sum_smem, int row) {
  return half_sum_smem[row] + half_sum_smem[kBlockM + row];
}

}  // namespace flash_mla::portable::wide_steps
