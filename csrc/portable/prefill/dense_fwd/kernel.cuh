// Portable dense MHA prefill forward: FA2-style, mma.sync m16n8k16 + ldmatrix +
// cp.async only, so the same source runs on sm_80 .. sm_90 and sm_120/121.
//
// Work split. One CTA per (query block, query head, sequence):
//   blockIdx.x = query block (reversed when causal, so the longest blocks start
//   first and the short ones fill the tail), blockIdx.y = query head,
//   blockIdx.z = sequence. kNumWarps = 8 (128-row blocks) or 4 (64-row blocks;
//   config.h says which GPUs get which); warp w owns query rows [16w, 16w + 16) of
//   the block; its Q fragments (d_qk / 16 x 4 registers), the S tile (16 x 64 fp32)
//   and the O accumulator (16 x d_v fp32) stay in registers. Rows never cross
//   warps, so the online softmax needs only quad shuffles. (The third layout, 4 warps
//   x 32 rows with Q in shared memory, is kernel_4x32.cuh, included at the end.)
//
// Global memory. q/k/v rows are 16-byte aligned with arbitrary (multiple of 8
// elements) row and head strides; the last dim is contiguous. K/V tiles of 64
// keys are read with 16-byte cp.async, consecutive lanes along a row. Rows past a
// sequence's end are zero-filled without being read (src-size 0). out is written
// with 16-byte stores, one warp per 16 rows; lse (natural log) by the lane with
// t == 0 of each accumulator row. Nothing past cu_seqlens is read or written; no
// atomics, fixed reduction order: bit-identical reruns.
//
// Shared memory (bytes; config.h computes them; 16-bit elements, every row XOR-
// swizzled in 16-byte chunks, swizzle.cuh, so ldmatrix and cp.async are
// conflict-free without padding; M = rows per CTA):
//   [0, stage)            stage 1: K tile [64][d_qk], then V tile [64][d_v]
//   [0, M*d_qk*2)         Q tile, aliased on stage 1 (Q moves to registers before
//                         stage 1 is first filled); stage 0 starts at max(Q, stage)
//   [stage0, +stage)      stage 0: K tile, V tile
//   [0, M*d_v*2)          O staging, aliased after the last tile
//   8 warps: d=192: Q 49152, stage 40960 -> 90112 B; d=128: 65536 B; d=64: 32768 B.
//   4 warps (d_qk <= 128 only): d=128: 65536 B; d=64: 32768 B.
//
// Barrier / cp.async protocol (key tiles walk from the last one down to 0, so
// the partial and diagonal tiles, which need masking, come first):
//   prologue: cp.async Q -> commit; cp.async K,V of tile T-1 -> stage 0 -> commit;
//             wait_group 1 (Q landed); __syncthreads; ldmatrix Q -> registers.
//   plain loop (kOverlap false), iteration i (tile n = T-1-i, stage i % 2):
//             wait_group 0 (tile n landed, this thread's part);
//             __syncthreads: tile n visible to all, and every warp has finished
//             iteration i-1 (so stage (i+1) % 2, or Q at i == 0, is free);
//             cp.async K,V of tile n-1 -> stage (i+1) % 2 -> commit;
//             S = Q K^T, mask, online softmax (base 2), O += P V.
//   overlapped loop (kOverlap: 8 warps, d_qk <= 128): S of tile n-1 is computed
//             while tile n's softmax runs, so K runs one tile ahead of V.
//             prologue tail: wait_group 0; __syncthreads (tile T-1 visible, Q read
//             by every warp); cp.async K_{T-2} -> stage 1; S_{T-1} = Q K_{T-1}^T.
//             iteration i (tile n, slot i % 2 holds K_n and V_n, slot (i+1) % 2
//             holds K_{n-1}): wait_group 0; __syncthreads (K_{n-1} and V_n visible;
//             every warp done with iteration i-1, so K slot i % 2 and V slot
//             (i+1) % 2 are free); cp.async V_{n-1} -> V slot (i+1) % 2 and
//             K_{n-2} -> K slot i % 2 -> commit; first half of S_{n-1}, softmax
//             max of S_n, second half of S_{n-1}, softmax exp of S_n; O += P V_n.
//   epilogue: __syncthreads (all warps done with the last tile; no copy in
//             flight), each warp writes its own 16 rows of O (rounded to nearest)
//             into the staging buffer, __syncwarp, 16-byte global stores.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include "../../../params.h"
#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mma.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "config.h"
#include "kernel.h"

namespace flash_mla::portable::dense_fwd {

// The kernel takes the params struct by value: its layout must be the same for
// the host compiler (MSVC or gcc) and nvcc's device pass, or the kernel would read
// fields at the wrong offsets.
static_assert(sizeof(DensePrefillFwdParams) == 200, "DensePrefillFwdParams layout changed");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Masking policies. For a query block starting at row m0 of a sequence with
// s_q queries and s_k keys, `num_tiles` is how many 64-key tiles any of its rows
// sees (tiles 0 .. num_tiles-1) and `num_masked` how many of the highest ones
// need per-element masking. apply() returns whether key `col` is visible to
// query `row` (both 0-based in the sequence).
// ---------------------------------------------------------------------------
struct NoMask {
  int s_k;
  __device__ __forceinline__ NoMask(int /*s_q*/, int s_k_, int /*m0*/, int /*block_m*/)
      : s_k(s_k_) {}
  __device__ __forceinline__ int num_tiles() const { return (s_k + kBlockN - 1) / kBlockN; }
  // Only a partial last tile has keys past s_k.
  __device__ __forceinline__ int num_masked() const { return s_k % kBlockN != 0 ? 1 : 0; }
  __device__ __forceinline__ bool visible(int /*row*/, int col) const { return col < s_k; }
};

// Bottom-right aligned: query r sees keys [0, s_k - s_q + r].
struct CausalMask {
  int s_k, offset, tiles, masked;
  __device__ __forceinline__ CausalMask(int s_q, int s_k_, int m0, int block_m)
      : s_k(s_k_), offset(s_k_ - s_q) {
    const int last_row = min(m0 + block_m, s_q) - 1;
    // Keys [0, end) are seen by some row of the block; keys [0, full) by all rows.
    const int end = min(s_k, last_row + offset + 1);
    const int full = min(s_k, m0 + offset + 1);
    tiles = end > 0 ? (end + kBlockN - 1) / kBlockN : 0;
    const int full_tiles = full > 0 ? full / kBlockN : 0;
    masked = tiles - min(full_tiles, tiles);
  }
  __device__ __forceinline__ int num_tiles() const { return tiles; }
  __device__ __forceinline__ int num_masked() const { return masked; }
  __device__ __forceinline__ bool visible(int row, int col) const {
    return col < s_k && col <= row + offset;
  }
};

// Global -> shared tile copies: load_tile_async (common/tile_copy.cuh).

// Per-lane ldmatrix byte offsets into a swizzled tile of kDim-element rows. Lane l
// addresses row `row` (whose low 3 bits are l & 7) and 16-byte chunk 2j + `bit`;
// under the swizzle that chunk lands at (2j ^ (bit ^ (l & 7))) (2j is even, so
// the low bit never carries). Only j % 4 changes the lane-dependent part, so four
// offsets per operand cover every k-step: chunk 2j lives at off[j % 4] + (j / 4) *
// 128. (One address per (k-step, n-pair), left to the compiler, takes far more
// registers and spills at d = 192.)
template <int kDim>
__device__ __forceinline__ void lane_offsets(uint32_t (&off)[4], int row, int bit, int lane) {
  const int x = bit ^ (lane & 7);
#pragma unroll
  for (int j = 0; j < 4; ++j) off[j] = row * (kDim * 2) + ((2 * j) ^ x) * 16;
}

template <typename Elem, int kDQK, int kDV, bool kIsCausal, int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32, 8 / kNumWarps)
    dense_prefill_fwd_kernel(const __grid_constant__ DensePrefillFwdParams params) {
  using Cfg = Config<kDQK, kDV, kNumWarps>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kBlockM = Cfg::kBlockM;
  using Storage = typename Elem::Storage;
  using Mask = typename std::conditional<kIsCausal, CausalMask, NoMask>::type;
  constexpr int kKSteps = kDQK / 16;  // k-steps of S = Q K^T
  constexpr int kNTilesS = kBlockN / 8;
  constexpr int kNTilesO = kDV / 8;
  constexpr int kPSteps = kBlockN / 16;  // k-steps of O += P V
  // Interleave the next tile's S = Q K^T MMAs with this tile's softmax (tensor pipe
  // and SFU overlap). Needs a second 16 x 64 score tile in registers, which fits
  // without spills only for d_qk <= 128 with 8 warps; d = 192 and the 4-warp CTA
  // (two per SM, half the registers each) run the plain loop.
  constexpr bool kOverlap = kDQK <= 128 && kNumWarps == 8;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Sequence bounds, clamped to the tensors so a bad cu_seqlens can never make
  // this CTA read or write outside q/k/v/out/lse.
  const int seq = blockIdx.z;
  const int q_start = min(max(params.cu_seqlens_q[seq], 0), params.total_q);
  const int s_q = min(max(params.cu_seqlens_q[seq + 1], q_start), params.total_q) - q_start;
  const int m_block = kIsCausal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int m0 = m_block * kBlockM;
  if (m0 >= s_q) return;  // the grid covers max_seqlen_q; this sequence is shorter
  const int k_start = min(max(params.cu_seqlens_k[seq], 0), params.total_k);
  const int s_k = min(max(params.cu_seqlens_k[seq + 1], k_start), params.total_k) - k_start;

  const int head = blockIdx.y;
  const int kv_head = head / (params.h_q / params.h_k);
  const Storage* q_head = static_cast<const Storage*>(params.q) +
                          static_cast<int64_t>(q_start + m0) * params.q_row_stride +
                          static_cast<int64_t>(head) * params.q_head_stride;
  const Storage* k_head = static_cast<const Storage*>(params.k) +
                          static_cast<int64_t>(k_start) * params.k_row_stride +
                          static_cast<int64_t>(kv_head) * params.k_head_stride;
  const Storage* v_head = static_cast<const Storage*>(params.v) +
                          static_cast<int64_t>(k_start) * params.v_row_stride +
                          static_cast<int64_t>(kv_head) * params.v_head_stride;

  const Mask mask(s_q, s_k, m0, kBlockM);
  const int num_tiles = mask.num_tiles();
  const int num_masked = mask.num_masked();

  // softmax(s * c) with c < 0 equals softmax((-s) * |c|): a negative scale negates
  // Q (a sign flip, exact; so is every score it yields) and uses |c|. c = 0 becomes
  // the smallest normal float: the same uniform weights (2^(s * 1e-38) == 1), and
  // -inf * c stays -inf instead of NaN.
  const bool negate_q = params.softmax_scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(params.softmax_scale_log2), 1.17549435e-38f);
  // Accumulator rows of this thread: g and g + 8 of the warp's slab.
  const int g = lane / 4;
  const int t = lane % 4;
  const int row0 = m0 + warp * 16 + g;  // 0-based in the sequence; row1 = row0 + 8

  float o_acc[kNTilesO][4];
#pragma unroll
  for (int i = 0; i < kNTilesO; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};  // running max of raw scores q.k (Q negated if c < 0)
  float row_sum[2] = {0.f, 0.f};          // this thread's partial sums; quad-reduced at the end

  if (num_tiles > 0) {
    // Stage 0 after max(Q, stage) bytes, stage 1 at 0 (aliasing Q). A function,
    // not a two-element array: a run-time index would put the array in local memory.
    auto k_addr = [&](int stage) -> uint32_t {
      return smem_base + (stage == 0 ? Cfg::kStage0Offset : 0);
    };
    auto issue_kv = [&](int tile, int stage) {
      const int first = tile * kBlockN;
      load_tile_async<kBlockN, kDQK, kThreads>(k_addr(stage), k_head, params.k_row_stride, first,
                                     s_k - first, tid);
      load_tile_async<kBlockN, kDV, kThreads>(k_addr(stage) + Cfg::kKTileBytes, v_head,
                                    params.v_row_stride, first, s_k - first, tid);
      cp_async_commit();
    };

    // ---- prologue: Q and the first (highest) K/V tile ----
    load_tile_async<kBlockM, kDQK, kThreads>(smem_base, q_head, params.q_row_stride, 0, s_q - m0, tid);
    cp_async_commit();
    issue_kv(num_tiles - 1, 0);
    cp_async_wait<1>();
    __syncthreads();

    // ldmatrix lane offsets. Q: A operand, rows 16w + (lane & 15), chunk bit
    // lane >> 4. K: B of S (not transposed), rows (lane & 7) + 8 * bit 4, chunk bit
    // (lane >> 3) & 1. V: B of O (transposed), rows (lane & 7) + 8 * bit 3, chunk
    // bit lane >> 4.
    uint32_t k_off[4], v_off[4];
    uint32_t q_frag[kKSteps][4];
    {
      uint32_t q_off[4];
      lane_offsets<kDQK>(q_off, warp * 16 + (lane & 15), lane >> 4, lane);
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        ldmatrix_x4(q_frag[ks], smem_base + q_off[ks % 4] + (ks / 4) * 128);
        if (negate_q) {
#pragma unroll
          for (int e = 0; e < 4; ++e) q_frag[ks][e] ^= 0x80008000u;  // both 16-bit halves
        }
      }
    }
    lane_offsets<kDQK>(k_off, (lane & 7) + ((lane >> 4) & 1) * 8, (lane >> 3) & 1, lane);
    lane_offsets<kDV>(v_off, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4, lane);

    // Per-tile working set, captured by the lambdas below (not passed: cudafe++
    // 13.0 segfaulted on a lambda parameter of type float (&)[8][4]). s holds the
    // scores of the tile being softmaxed, s_next those of the next tile, whose
    // MMAs are interleaved with that softmax (tensor pipe and SFU overlap).
    struct ScoreTile {
      float v[kNTilesS][4];
    };
    ScoreTile tile_a, tile_b;  // alternate as "current" and "next" (no copies)
    uint32_t p_frag[kPSteps][4];

    // Part of s_next = Q K^T (16 x 64 per warp, fp32): k-steps [kBegin, kEnd) of
    // the K tile at k_smem; the first part also zeroes the accumulators.
    auto compute_s = [&](ScoreTile& out, uint32_t k_smem, auto begin_tag, auto end_tag) {
      constexpr int kBegin = decltype(begin_tag)::value;
      constexpr int kEnd = decltype(end_tag)::value;
      if (kBegin == 0) {
#pragma unroll
        for (int i = 0; i < kNTilesS; ++i) {
          out.v[i][0] = out.v[i][1] = out.v[i][2] = out.v[i][3] = 0.f;
        }
      }
#pragma unroll
      for (int ks = kBegin; ks < kEnd; ++ks) {
#pragma unroll
        for (int np = 0; np < kNTilesS / 2; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, k_smem + k_off[ks % 4] + (ks / 4) * 128 + np * 16 * (kDQK * 2));
          const uint32_t b_lo[2] = {b[0], b[1]};
          const uint32_t b_hi[2] = {b[2], b[3]};
          mma_m16n8k16<Elem>(out.v[2 * np], q_frag[ks], b_lo);
          mma_m16n8k16<Elem>(out.v[2 * np + 1], q_frag[ks], b_hi);
        }
      }
    };
    using KStep0 = std::integral_constant<int, 0>;
    using KStepHalf = std::integral_constant<int, kKSteps / 2>;
    using KStepEnd = std::integral_constant<int, kKSteps>;

    // Mask (raw scores), online softmax in base 2, and pack P (rounded to the input
    // dtype) as A fragments: C fragments of n-tiles 2kk, 2kk+1 are exactly the A
    // fragment of P.V k-step kk. Maxima are kept in raw score units and the scale
    // is folded into one FFMA per element, p = 2^(s * c - max * c), c > 0
    // (a negative softmax_scale was turned into a negated Q above). Packing P here
    // frees S's registers before P.V.
    float ref[2], correction[2];
    auto softmax_max = [&](ScoreTile& st, int tile, auto masked_tag) {
      auto& s = st.v;
      constexpr bool kMasked = decltype(masked_tag)::value;
      if (kMasked) {
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = tile * kBlockN + nt * 8 + 2 * t + (e & 1);
            const int row = row0 + (e >> 1) * 8;
            if (!mask.visible(row, col)) s[nt][e] = kNegInf;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = row_max[r];
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        }
        tile_max = quad_max(tile_max);
        // A row that has seen no key yet keeps max -inf; its exponent reference
        // is then 0, so 2^(-inf - ref) = 0, never NaN.
        // An unchanged max must rescale by exactly 1. Written plainly, the compiler
        // fuses row_max * c - ref into one FMA whose result is the rounding residual
        // of ref, so exp2 gives ~1 + 1e-7 on every tile and the drift compounds
        // over long rows until lse leaves its tolerance (docs/mha_fwd.md).
        // __fmul_rn forbids the fusion, so equal maxima give exactly 0 and 2^0 = 1,
        // at no register cost (a select here would cost registers the 8-warp d = 128
        // kernel does not have).
        ref[r] = tile_max == kNegInf ? 0.f : __fmul_rn(tile_max, scale_log2);
        correction[r] = exp2_approx(__fmul_rn(row_max[r], scale_log2) - ref[r]);
        row_max[r] = tile_max;
      }
    };
    auto softmax_exp = [&](ScoreTile& st) {
      auto& s = st.v;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          s[nt][2 * r] = exp2_approx(fmaf(s[nt][2 * r], scale_log2, -ref[r]));
          s[nt][2 * r + 1] = exp2_approx(fmaf(s[nt][2 * r + 1], scale_log2, -ref[r]));
          sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * correction[r] + sum;
      }
      // Always rescaled, even when no row's max moved: a branch around it keeps the
      // multiplies from interleaving with the MMAs (docs/mha_fwd.md, tried and dropped).
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        o_acc[nt][0] *= correction[0];
        o_acc[nt][1] *= correction[0];
        o_acc[nt][2] *= correction[1];
        o_acc[nt][3] *= correction[1];
      }
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
        p_frag[kk][0] = pack_float2<Elem>(s[2 * kk][0], s[2 * kk][1]);
        p_frag[kk][1] = pack_float2<Elem>(s[2 * kk][2], s[2 * kk][3]);
        p_frag[kk][2] = pack_float2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p_frag[kk][3] = pack_float2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
    };

    // O += P V from the V tile at v_smem.
    auto pv = [&](uint32_t v_smem) {
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
        for (int dp = 0; dp < kNTilesO / 2; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_smem + v_off[dp % 4] + (dp / 4) * 128 + kk * 16 * (kDV * 2));
          const uint32_t b_lo[2] = {b[0], b[1]};
          const uint32_t b_hi[2] = {b[2], b[3]};
          mma_m16n8k16<Elem>(o_acc[2 * dp], p_frag[kk], b_lo);
          mma_m16n8k16<Elem>(o_acc[2 * dp + 1], p_frag[kk], b_hi);
        }
      }
    };

    // Slot j of K (V) is the K (V) half of stage j.
    auto issue_k = [&](int tile, int slot) {
      load_tile_async<kBlockN, kDQK, kThreads>(k_addr(slot), k_head, params.k_row_stride,
                                               tile * kBlockN, s_k - tile * kBlockN, tid);
    };
    auto issue_v = [&](int tile, int slot) {
      load_tile_async<kBlockN, kDV, kThreads>(k_addr(slot) + Cfg::kKTileBytes, v_head,
                                              params.v_row_stride, tile * kBlockN,
                                              s_k - tile * kBlockN, tid);
    };

    if (!kOverlap) {
      // ---- plain loop: tiles num_tiles-1 .. 0; the masked ones come first ----
      for (int i = 0; i < num_tiles; ++i) {
        const int tile = num_tiles - 1 - i;
        const int stage = i & 1;
        cp_async_wait<0>();
        __syncthreads();
        if (tile > 0) issue_kv(tile - 1, stage ^ 1);
        compute_s(tile_a, k_addr(stage), KStep0{}, KStepEnd{});
        if (i < num_masked) {
          softmax_max(tile_a, tile, std::true_type{});
        } else {
          softmax_max(tile_a, tile, std::false_type{});
        }
        softmax_exp(tile_a);
        pv(k_addr(stage) + Cfg::kKTileBytes);
      }
    } else {
    // ---- overlapped loop. S of the first (highest) tile; K of the next one loads ----
    cp_async_wait<0>();
    __syncthreads();  // tile T-1 visible; every warp has read Q (stage 1 is free)
    if (num_tiles > 1) {
      issue_k(num_tiles - 2, 1);
      cp_async_commit();
    }
    compute_s(tile_a, k_addr(0), KStep0{}, KStepEnd{});

    // ---- main loop: tiles num_tiles-1 .. 0; the masked ones come first ----
    // Iteration i (tile n, slot i % 2): K_n and V_n sit in slot i % 2, K_{n-1} in
    // slot (i+1) % 2. After the barrier every warp is done with iteration i-1, so
    // K slot i % 2 (K_n, consumed by S_n last iteration) takes K_{n-2} and V slot
    // (i+1) % 2 (V_{n+1}) takes V_{n-1}; both are waited for at the next barrier.
    // One iteration; `cur` holds S of tile n, `next` receives S of tile n-1. The
    // loop runs two iterations per trip so the two score tiles swap roles without
    // register copies.
    auto iteration = [&](int i, ScoreTile& cur, ScoreTile& next) {
      const int tile = num_tiles - 1 - i;
      const int slot = i & 1;
      cp_async_wait<0>();
      __syncthreads();
      if (tile >= 1) issue_v(tile - 1, slot ^ 1);
      if (tile >= 2) issue_k(tile - 2, slot);
      cp_async_commit();
      auto step = [&](auto masked_tag) {
        if (tile >= 1) {
          compute_s(next, k_addr(slot ^ 1), KStep0{}, KStepHalf{});
          softmax_max(cur, tile, masked_tag);
          compute_s(next, k_addr(slot ^ 1), KStepHalf{}, KStepEnd{});
        } else {
          softmax_max(cur, tile, masked_tag);
        }
        softmax_exp(cur);
      };
      if (i < num_masked) {
        step(std::true_type{});
      } else {
        step(std::false_type{});
      }
      pv(k_addr(slot) + Cfg::kKTileBytes);
    };
    for (int i = 0; i < num_tiles; i += 2) {
      iteration(i, tile_a, tile_b);
      if (i + 1 < num_tiles) iteration(i + 1, tile_b, tile_a);
    }
    }
    __syncthreads();  // every warp is done reading the last tile: staging may overwrite it
  }

  // ---- epilogue ----
  // Rows that saw no key (sum 0) get out = 0 and lse = +inf.
  float inv_sum[2];
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
    constexpr float kLn2 = 0.69314718055994530942f;
    lse[r] = sum > 0.f ? (row_max[r] * scale_log2 + __log2f(sum)) * kLn2 : __int_as_float(0x7f800000);
  }

  // Each warp stages its own 16 rows (swizzled, conflict-free 4-byte writes).
#pragma unroll
  for (int nt = 0; nt < kNTilesO; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed =
          pack_float2<Elem>(o_acc[nt][2 * r] * inv_sum[r], o_acc[nt][2 * r + 1] * inv_sum[r]);
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + swizzled_offset<kDV>(row, nt * 8 + 2 * t)) = packed;
    }
  }
  __syncwarp();

  Storage* out_head = static_cast<Storage*>(params.out) +
                      static_cast<int64_t>(q_start + m0) * params.out_row_stride +
                      static_cast<int64_t>(head) * params.out_head_stride;
  constexpr int kChunksPerRow = kDV / 8;
#pragma unroll
  for (int j = 0; j < 16 * kChunksPerRow / 32; ++j) {
    const int idx = lane + 32 * j;
    const int row = warp * 16 + idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 8;
    if (m0 + row < s_q) {
      const uint4 value = *reinterpret_cast<const uint4*>(smem + swizzled_offset<kDV>(row, col));
      *reinterpret_cast<uint4*>(out_head + static_cast<int64_t>(row) * params.out_row_stride + col) =
          value;
    }
  }

  if (t == 0) {
    float* lse_head = params.lse + static_cast<int64_t>(head) * params.lse_head_stride + q_start;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row < s_q) lse_head[row] = lse[r];
    }
  }
}

template <typename Elem, int kDQK, int kDV, bool kIsCausal, int kNumWarps>
void launch_dense_prefill_fwd(const DensePrefillFwdParams& params) {
  using Cfg = Config<kDQK, kDV, kNumWarps>;
  auto kernel = dense_prefill_fwd_kernel<Elem, kDQK, kDV, kIsCausal, kNumWarps>;
  // Per launch, not cached: the attribute belongs to the current device.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  const dim3 grid(num_m_blocks(params.max_seqlen_q, Cfg::kBlockM), params.h_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, params.stream>>>(params);
}

template <typename Elem, int kDQK, int kDV, int kNumWarps>
void launch_dense_prefill_fwd_mask(const DensePrefillFwdParams& params) {
  if (params.is_causal) {
    launch_dense_prefill_fwd<Elem, kDQK, kDV, true, kNumWarps>(params);
  } else {
    launch_dense_prefill_fwd<Elem, kDQK, kDV, false, kNumWarps>(params);
  }
}

}  // namespace flash_mla::portable::dense_fwd

#include "kernel_4x32.cuh"  // the 4 warps x 32 rows CTA; uses the helpers above

namespace flash_mla::portable::dense_fwd {

template <DType kDType, int kDQK, int kDV>
void run_dense_prefill_fwd(const DensePrefillFwdParams& params, CtaLayout layout) {
  using Elem = typename std::conditional<kDType == DType::kBF16, BF16, FP16>::type;
  // The 4 x 16-row CTA is instantiated for d_qk <= 128 only (config.h:
  // choose_layout): at d = 192 it reads each K/V tile twice per query row and does
  // not fit its registers, so a forced 4 runs 8 warps there. The 4x32 CTA serves
  // every d_qk (one K/V stage at d = 192).
  if constexpr (kDQK <= 128) {
    if (layout == CtaLayout::kWarps4) {
      launch_dense_prefill_fwd_mask<Elem, kDQK, kDV, 4>(params);
      return;
    }
  }
  if (layout == CtaLayout::kWarps4x32) {
    if (params.is_causal) {
      launch_dense_prefill_fwd_4x32<Elem, kDQK, kDV, true>(params);
    } else {
      launch_dense_prefill_fwd_4x32<Elem, kDQK, kDV, false>(params);
    }
    return;
  }
  launch_dense_prefill_fwd_mask<Elem, kDQK, kDV, 8>(params);
}

}  // namespace flash_mla::portable::dense_fwd
