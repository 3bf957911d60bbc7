// Portable dense MHA prefill backward (FA2-style), built only from sm_120-legal
// instructions: mma.sync m16n8k16, ldmatrix, cp.async, shuffles, RED.
//
// Four launches on one stream (run_dense_prefill_bwd below):
//   1. preprocess (preprocess.cuh): delta = rowsum(dO * O) into the workspace,
//      dq_accum zeroed;
//   2. main kernel (this file's 8-warp CTA; kernel_4warp.cuh and kernel_128keys.cuh
//      hold the other two, config.h choose_layout picks one): one CTA per (key block
//      of kBlockN keys, 128 for the 128-key CTA, kv head, sequence); it loops over
//      every query head of the kv head's GQA group and over every query block that
//      sees its keys (causal: fully masked blocks are skipped), recomputing P from Q,
//      K and lse:
//        S^T  = K Q^T                  P^T = exp2(S^T * scale_log2 - lse * log2 e)
//        dP^T = V dO^T                 dS^T = P^T * (dP^T - delta)
//        dV  += P^T dO                 dK  += dS^T Q
//        dq_accum += dS K              (fp32 RED into the workspace)
//      where dV uses P, and dK and dQ use dS, rounded once to the input dtype
//      (config.h, kCompensatedDS: hi + lo parts in A/B builds).
//      dK and dV stay in registers for the whole CTA and are written once at the
//      end (times softmax_scale for dK): bit-deterministic, no atomics. dQ comes
//      from many CTAs through fp32 atomics: NOT bit-deterministic.
//   3. outside rows (outside_rows.cuh): dk = dv = 0 on rows before
//      cu_seqlens_k[0] or from cu_seqlens_k[batch] on (no sequence owns them);
//   4. convert (convert_dq.cuh): dq = softmax_scale * dq_accum, rounded.
//
// Global layout: q/dq [total_q, h_q, d_qk], k/dk [total_k, h_k, d_qk],
// v/dv [total_k, h_k, d_v], out/dout [total_q, h_q, d_v] (row and head strides
// free, multiples of 8 elements; last dim contiguous); lse at
// lse[h * lse_head_stride + t] (natural log, +inf = row sees nothing);
// workspace: see config.h.
//
// Shared memory (Config<d_qk, d_v>, all 16-bit tiles XOR-swizzled by
// common/swizzle.cuh): K, V (resident), Q, dO (one query block), P^T, dS^T
// ([kBlockN keys][kBlockM queries]), lse * log2 e and delta of the query block.
// d = 192 uses 98816 B.
//
// Warp roles: 8 warps, no producer warp. For S^T/dP^T/dV/dK warp w owns keys
// 16 * (w % 4) .. +16 and the column half w / 4 (queries for S^T/dP^T, head dims
// for dV/dK); for dQ it owns queries 16 * (w % 4) .. +16 and head-dim half w / 4.
//
// Barrier protocol per step (one step = one query block of one head):
//   B1  wait for this step's cp.async group, __syncthreads: Q, dO, lse, delta
//       visible; also every warp has finished the previous step's dQ product,
//       so P^T/dS^T may be overwritten.
//       S^T, dP^T in registers -> P^T, dS^T written to shared memory
//       (kCompensatedDS: P^T hi into the P^T buffer, P^T lo into the dS^T buffer;
//       dS stays in fp32 registers).
//   B2  __syncthreads: P^T visible.
//       dV += P^T dO (reads P^T [hi and lo], dO).
//   (kSeparateLo, d <= 128: all four hi / lo tiles are written before B2 and
//   B2a / B2b do not exist.)
//   kCompensatedDS only: B2a __syncthreads (P^T no longer read); dS^T hi into
//       the dS^T buffer, dS^T lo into the P^T buffer; B2b __syncthreads.
//       dK += dS^T Q (reads dS^T [hi and lo], Q).
//   B3  __syncthreads: Q, dO, lse, delta are free -> issue the next step's
//       cp.async loads (and lse/delta stores), overlapping the dQ product:
//       dq = dS K (reads dS^T hi [and lo] and K only), RED into dq_accum.
//   Deterministic dQ (p.dq_turns): before B3 thread 0 waits for this key block's turn
//   on the step's dq rows (every warp of the previous key block has passed); after its
//   REDs each warp passes its share (__syncwarp, then lane 0: fence + add).
// Epilogue: wait for all copies, __syncthreads, stage dK/dV (input dtype) in the
// K/V tiles, __syncthreads, 16-byte coalesced stores of the valid key rows.
#pragma once

#include <cstdint>

#include "../../../params.h"
#include "../../common/cp_async.cuh"
#include "../../common/element.cuh"
#include "../../common/ldmatrix.cuh"
#include "../../common/math.cuh"
#include "../../common/mma.cuh"
#include "../../common/swizzle.cuh"
#include "../../common/tile_copy.cuh"
#include "atomics.cuh"
#include "config.h"
#include "convert_dq.cuh"
#include "kernel.h"
#include "mask.cuh"
#include "outside_rows.cuh"
#include "preprocess.cuh"

namespace flash_mla::portable::dense_bwd {

constexpr float kLog2e = 1.4426950408889634f;

// Returns x through an opaque move. Values derived from it inside the step loop
// (shared/global addresses of every unrolled ldmatrix and cp.async) cannot be
// hoisted out of the loop, where they would pin ~100 registers for the whole
// CTA; recomputing them costs a few integer ops per step.
__device__ __forceinline__ int opaque(int x) {
  int y;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Writes the first rows_valid rows of a swizzled [kRows, kCols] shared tile to
// global memory, 16 bytes per thread per access (coalesced along a row).
template <int kRows, int kCols, int kCtaThreads = kThreads, typename Storage>
__device__ __forceinline__ void store_tile(Storage* gmem, int64_t row_stride, int rows_valid,
                                           const uint8_t* smem_tile, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kCtaThreads == 0, "tile chunks must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < kChunks / kCtaThreads; ++i) {
    const int idx = i * kCtaThreads + tid;
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * 8;
    if (r < rows_valid) {
      *reinterpret_cast<uint4*>(gmem + r * row_stride + c) =
          *reinterpret_cast<const uint4*>(smem_tile + swizzled_offset<kCols>(r, c));
    }
  }
}

// ldmatrix addresses into a swizzled tile (common/swizzle.cuh) for a lane that
// reads row `row` + dr and 16-byte chunk `chunk` + dc, where dr is a multiple of 8
// and dc an even number, both compile-time constants after unrolling. Because
// (x + 8m) ^ z = (x ^ z) + 8m for z < 8, four per-lane bases (dc % 8 = 0, 2, 4, 6)
// plus immediate offsets cover every (dr, dc): four registers per operand
// instead of one per unrolled ldmatrix (which the compiler hoists out of the step
// loop and then spills).
template <int kRowElems>
struct SwizzledAddr {
  uint32_t base[4];
  __device__ __forceinline__ SwizzledAddr(uint32_t tile, int row, int chunk) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      base[b] = tile + static_cast<uint32_t>(row * (kRowElems * 2) +
                                             (((chunk + 2 * b) ^ (row & 7)) << 4));
    }
  }
  __device__ __forceinline__ uint32_t at(int dr, int dc) const {
    return base[(dc >> 1) & 3] + static_cast<uint32_t>(dr * (kRowElems * 2) + ((dc & ~7) << 4));
  }
};

// acc[s][j] += A_s (16 x kK) * B (kK x 8 for each n8 tile j), for kSlabs m16 slabs of A
// (rows a_row0 + 16 s ..) that share every B fragment.
//   kATrans = false: A stored [m][k] (row-major) at rows a_row0..;
//            true:   A stored [k][m], columns a_row0.. are A's rows.
//   kBTrans = false: B stored [n][k] at rows n0..;  true: B stored [k][n], columns n0...
// Lane address offsets follow the fragment order of common/mma.cuh.
// kTwoA: acc += (A + A2) * B with A2 at a2_tile (same layout as A), sharing
// the B fragments (compensated dS: hi and lo parts).
template <typename Elem, int kK, int kNTiles, int kARowElems, int kBRowElems, bool kATrans,
          bool kBTrans, int kSlabs, bool kTwoA = false>
__device__ __forceinline__ void warp_gemm_slabs(float (&acc)[kSlabs][kNTiles][4],
                                                uint32_t a_tile, int a_row0, uint32_t b_tile,
                                                int n0, int lane, uint32_t a2_tile = 0) {
  static_assert(kNTiles % 2 == 0, "B fragments come two n8 tiles per ldmatrix.x4");
  static_assert(kK % 16 == 0, "k steps of 16");
  // (r1, c1): matrices ordered (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows
  // 0-7, chunk 1), (rows 8-15, chunk 1): A without .trans, B with .trans.
  // (r2, c2): (rows 0-7, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 0),
  // (rows 8-15, chunk 1): B without .trans, A with .trans.
  const int r1 = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c1 = lane >> 4;
  const int r2 = (lane & 7) + (lane >> 4) * 8;
  const int c2 = (lane >> 3) & 1;
  // Row / chunk origins must keep the (dr multiple of 8, dc even) contract.
  const SwizzledAddr<kARowElems> a_addr =
      kATrans ? SwizzledAddr<kARowElems>(a_tile, r2, (a_row0 >> 3) + c2)
              : SwizzledAddr<kARowElems>(a_tile, a_row0 + r1, c1);
  const SwizzledAddr<kBRowElems> b_addr =
      kBTrans ? SwizzledAddr<kBRowElems>(b_tile, r1, (n0 >> 3) + c1)
              : SwizzledAddr<kBRowElems>(b_tile, n0 + r2, c2);
  // The contraction runs in chunks of 64 (a rolled loop) with the 4 k16 steps of a
  // chunk unrolled: this bounds how many fragments the scheduler loads ahead
  // (d = 192 spilled on sm_120 with all 12 steps unrolled). A chunk moves the
  // A / B addresses by whole 128-byte column groups or by 64 rows, which keeps
  // SwizzledAddr's (dr % 8 == 0, dc even) contract.
  static_assert(kK % 64 == 0, "contraction in chunks of 64");
#pragma unroll 1
  for (int k0 = 0; k0 < kK; k0 += 64) {
    const uint32_t a_off = kATrans ? static_cast<uint32_t>(k0 * kARowElems * 2)
                                   : static_cast<uint32_t>((k0 >> 3) << 4);
    const uint32_t b_off = kBTrans ? static_cast<uint32_t>(k0 * kBRowElems * 2)
                                   : static_cast<uint32_t>((k0 >> 3) << 4);
#pragma unroll
    for (int kk = 0; kk < 64; kk += 16) {
      uint32_t a[kSlabs][4];
      uint32_t a2[kSlabs][4];
#pragma unroll
      for (int sl = 0; sl < kSlabs; ++sl) {
        // Slab sl: 16 more rows of A (kATrans: 2 more 16-byte chunks of its columns).
        if constexpr (kATrans) {
          const uint32_t addr = a_addr.at(kk, 2 * sl) + a_off;
          ldmatrix_x4_trans(a[sl], addr);
          if constexpr (kTwoA) ldmatrix_x4_trans(a2[sl], addr - a_tile + a2_tile);
        } else {
          const uint32_t addr = a_addr.at(16 * sl, kk >> 3) + a_off;
          ldmatrix_x4(a[sl], addr);
          if constexpr (kTwoA) ldmatrix_x4(a2[sl], addr - a_tile + a2_tile);
        }
      }
#pragma unroll
      for (int j = 0; j < kNTiles; j += 2) {
        uint32_t b[4];
        if constexpr (kBTrans) {
          ldmatrix_x4_trans(b, b_addr.at(kk, j) + b_off);
        } else {
          ldmatrix_x4(b, b_addr.at(j * 8, kk >> 3) + b_off);
        }
        const uint32_t b_lo[2] = {b[0], b[1]};
        const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
          mma_m16n8k16<Elem>(acc[sl][j], a[sl], b_lo);
          mma_m16n8k16<Elem>(acc[sl][j + 1], a[sl], b_hi);
          if constexpr (kTwoA) {
            mma_m16n8k16<Elem>(acc[sl][j], a2[sl], b_lo);
            mma_m16n8k16<Elem>(acc[sl][j + 1], a2[sl], b_hi);
          }
        }
      }
    }
  }
}

// One m16 slab of A: warp_gemm_slabs with kSlabs = 1.
template <typename Elem, int kK, int kNTiles, int kARowElems, int kBRowElems, bool kATrans,
          bool kBTrans, bool kTwoA = false>
__device__ __forceinline__ void warp_gemm(float (&acc)[kNTiles][4], uint32_t a_tile, int a_row0,
                                          uint32_t b_tile, int n0, int lane,
                                          uint32_t a2_tile = 0) {
  warp_gemm_slabs<Elem, kK, kNTiles, kARowElems, kBRowElems, kATrans, kBTrans, 1, kTwoA>(
      reinterpret_cast<float(&)[1][kNTiles][4]>(acc), a_tile, a_row0, b_tile, n0, lane, a2_tile);
}

// Stores accumulator fragments (16 rows from row0, kNTiles n8 tiles from col0),
// times `scale`, rounded to the input dtype, into a swizzled shared tile.
template <typename Elem, int kNTiles, int kRowElems>
__device__ __forceinline__ void store_acc_to_smem(uint8_t* tile, const float (&acc)[kNTiles][4],
                                                  int row0, int col0, float scale, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + g + half * 8;
      const int col = col0 + j * 8 + t * 2;
      *reinterpret_cast<uint32_t*>(tile + swizzled_offset<kRowElems>(row, col)) =
          pack_float2<Elem>(acc[j][2 * half] * scale, acc[j][2 * half + 1] * scale);
    }
  }
}

// Stores a [16 x kNTiles*8] accumulator block (row0, col0) of a [kBlockN][kBlockM]
// tile as two tiles in the input dtype: hi = round(x) and lo = round(x - hi), so
// hi + lo keeps ~16 significant bits (compensated products, config.h).
template <typename Elem, int kNTiles>
__device__ __forceinline__ void store_split_to_smem(uint8_t* tile_hi, uint8_t* tile_lo,
                                                    const float (&acc)[kNTiles][4], int row0,
                                                    int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + g + half * 8;
      const int col = col0 + j * 8 + t * 2;
      const uint32_t off = swizzled_offset<kBlockM>(row, col);
      const float x0 = acc[j][2 * half], x1 = acc[j][2 * half + 1];
      const uint32_t hi = pack_float2<Elem>(x0, x1);
      const float2 h = unpack_float2<Elem>(hi);
      *reinterpret_cast<uint32_t*>(tile_hi + off) = hi;
      *reinterpret_cast<uint32_t*>(tile_lo + off) = pack_float2<Elem>(x0 - h.x, x1 - h.y);
    }
  }
}

// Issues the cp.async copies of query head h's block at row m0 of the sequence
// (Q and dO tiles; rows past s_q become zeros) and stores its lse * log2(e) and
// delta into shared memory (+inf / 0 past s_q). kCtaThreads threads share it.
template <int kDQK, int kDV, int kCtaThreads, typename Storage>
__device__ __forceinline__ void load_query_block(const DensePrefillBwdParams& p, uint32_t sQ,
                                                 uint32_t sDO, float* s_lse, float* s_delta,
                                                 int h, int m0, int s_q, int q_begin, int tid) {
  const int m_valid = min(kBlockM, s_q - m0);
  const int64_t row = q_begin + m0;
  load_tile_async<kBlockM, kDQK, kCtaThreads>(
      sQ, static_cast<const Storage*>(p.q) + row * p.q_row_stride + h * p.q_head_stride,
      p.q_row_stride, 0, m_valid, tid);
  load_tile_async<kBlockM, kDV, kCtaThreads>(
      sDO, static_cast<const Storage*>(p.dout) + row * p.dout_row_stride + h * p.dout_head_stride,
      p.dout_row_stride, 0, m_valid, tid);
  if (tid < kBlockM) {
    // Plain loads: 4-byte cp.async copies of lse / delta were slower (docs/mha_bwd.md).
    const bool valid = tid < m_valid;
    const float* delta = static_cast<const float*>(p.workspace);
    // +inf marks a row outside the sequence (or one that sees no key): P = 0.
    const float lse = valid ? p.lse[h * p.lse_head_stride + row + tid] : INFINITY;
    s_lse[tid] = lse * kLog2e;
    s_delta[tid] = valid ? delta[h * delta_row_stride(p.total_q) + row + tid] : 0.f;
  }
}

// A CTA's key block, kv head and sequence, and the sequence's bounds clamped to the
// tensors so a malformed cu_seqlens can never index outside them. empty(): the
// block starts past its sequence's keys.
// The grid is (key blocks, kv heads, sequences) and the hardware starts CTAs in
// linear order L = x + X (y + Y z). By default L maps to exactly that (the key
// blocks of one (kv head, sequence) group run together and share its Q / dO reads in
// L2). With the causal mask and a grid of at most kLongestFirstWaves CTAs per SM, L
// maps key block slowest instead: the first key blocks of every group start first.
// They are the longest (every query block sees key block 0), and with few, long
// groups (GQA: each CTA loops over the group's query heads) the ones started last
// set the end of the launch. With many CTAs (h 128/128) or without the mask, the
// default order's L2 locality matters more, hence the rule (measurements in
// docs/mha_bwd.md, launch order).
// kKeys: the CTA's key-block size (kBlockN, or Config128's 128 keys).
struct KeyBlock {
  int kv_head, seq;
  int q_begin, s_q, k_begin, s_k, n0, n_valid;
  template <typename Mask, int kKeys = kBlockN>
  __device__ __forceinline__ static KeyBlock make(const DensePrefillBwdParams& p) {
    KeyBlock kb;
    const int n_block = coords<Mask>(p, blockIdx.x, kb.kv_head, kb.seq);
    kb.init<kKeys>(p, n_block);
    return kb;
  }
  // The same block again, for the epilogue: recomputed from the block index through
  // an opaque copy (two cached loads of cu_seqlens_k), so the compiler does not keep
  // the first one's values live through the step loop, where every register is
  // taken (kept live, they spill on sm_80).
  template <typename Mask, int kKeys = kBlockN>
  __device__ __forceinline__ static KeyBlock again(const DensePrefillBwdParams& p) {
    KeyBlock kb;
    const int x = opaque(static_cast<int>(blockIdx.x));
    const int n_block = coords<Mask>(p, x, kb.kv_head, kb.seq);
    kb.init<kKeys>(p, n_block);
    return kb;
  }
  // (key block, kv head, sequence) of CTA (x, blockIdx.y, blockIdx.z); see above.
  template <typename Mask>
  __device__ __forceinline__ static int coords(const DensePrefillBwdParams& p, int x,
                                               int& kv_head, int& seq) {
    if (Mask::kCausal) {
      const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
      if (ctas <= kLongestFirstWaves * static_cast<int64_t>(p.num_sms)) {
        // Few CTAs: 32-bit arithmetic is exact.
        const int groups = static_cast<int>(gridDim.y * gridDim.z);
        const int linear = x + static_cast<int>(gridDim.x) *
                                   static_cast<int>(blockIdx.y + gridDim.y * blockIdx.z);
        const int group = linear % groups;
        kv_head = group % static_cast<int>(gridDim.y);
        seq = group / static_cast<int>(gridDim.y);
        return linear / groups;
      }
    }
    kv_head = blockIdx.y;
    seq = blockIdx.z;
    return x;
  }
  template <int kKeys>
  __device__ __forceinline__ void init(const DensePrefillBwdParams& p, int n_block) {
    q_begin = min(max(p.cu_seqlens_q[seq], 0), p.total_q);
    s_q = max(min(p.cu_seqlens_q[seq + 1], p.total_q) - q_begin, 0);
    k_begin = min(max(p.cu_seqlens_k[seq], 0), p.total_k);
    s_k = max(min(p.cu_seqlens_k[seq + 1], p.total_k) - k_begin, 0);
    n0 = n_block * kKeys;
    n_valid = min(kKeys, s_k - n0);
  }
  __device__ __forceinline__ bool empty() const { return n0 >= s_k; }
};

// The steps of a key block: every query head of its kv head's GQA group times every
// 64-row query block that sees the block's keys (Mask::first_m_block on). Step s
// covers query head head(s) and the query block at row m0(s) of the sequence.
struct StepPlan {
  int first_head, group, m_first, per_head, count;
  template <typename Mask>
  __device__ __forceinline__ static StepPlan make(const DensePrefillBwdParams& p,
                                                  const KeyBlock& kb, int kv_head) {
    StepPlan s;
    s.group = p.h_q / p.h_k;
    s.first_head = kv_head * s.group;
    s.m_first = Mask::first_m_block(kb.n0, kb.s_q, kb.s_k);
    s.per_head = max((kb.s_q + kBlockM - 1) / kBlockM - s.m_first, 0);
    s.count = s.per_head * s.group;
    return s;
  }
  __device__ __forceinline__ int head(int step) const { return first_head + step / per_head; }
  __device__ __forceinline__ int m0(int step) const {
    return (m_first + step % per_head) * kBlockM;
  }
  // The same query blocks from the last down (the 8-warp CTA's order): under the
  // causal mask every key block of a sequence then starts at the same query block, so
  // with deterministic dQ (dq_turn_counter) no key block waits for a lower one's first
  // steps.
  __device__ __forceinline__ int m0_desc(int step) const {
    return (m_first + per_head - 1 - step % per_head) * kBlockM;
  }
};

// Deterministic dQ (p.dq_turns set; atomics.cuh): the turn counter of query block m0 of
// query head h in this CTA's sequence. The sequence index is recomputed from the block
// index (no loads), so the default path keeps nothing extra live. A key block's turn
// on a query block is its index n0 / kBlockN: the key blocks that touch a query block
// are blocks 0 .. n.
template <typename Mask>
__device__ __forceinline__ int* dq_turn_counter(const DensePrefillBwdParams& p, int q_begin,
                                                int m0, int h) {
  int kv_head, seq;
  KeyBlock::coords<Mask>(p, static_cast<int>(blockIdx.x), kv_head, seq);
  return p.dq_turns + (static_cast<int64_t>((q_begin + m0) / kBlockM) + seq) * p.h_q + h;
}

template <int kNTiles>
__device__ __forceinline__ void zero_acc(float (&acc)[kNTiles][4]) {
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Issues the cp.async copies of the block's K and V tiles (rows past the
// sequence become zeros); kCtaThreads threads share them.
template <int kDQK, int kDV, int kCtaThreads, typename Storage, int kKeys = kBlockN>
__device__ __forceinline__ void load_key_block(const DensePrefillBwdParams& p, uint32_t sK,
                                               uint32_t sV, const KeyBlock& kb, int kv_head,
                                               int tid) {
  const int64_t row = kb.k_begin + kb.n0;
  load_tile_async<kKeys, kDQK, kCtaThreads>(
      sK, static_cast<const Storage*>(p.k) + row * p.k_row_stride + kv_head * p.k_head_stride,
      p.k_row_stride, 0, kb.n_valid, tid);
  load_tile_async<kKeys, kDV, kCtaThreads>(
      sV, static_cast<const Storage*>(p.v) + row * p.v_row_stride + kv_head * p.v_head_stride,
      p.v_row_stride, 0, kb.n_valid, tid);
}

// Epilogue of the main kernels: waits for every copy, stages the warp's dK (times
// softmax_scale) and dV accumulators (kSlabs m16 slabs of key rows from key_row0,
// columns from dk_col0 / dv_col0) in the input dtype in the K and V tiles, and writes
// the block's valid key rows (kKeys of them at most) with 16-byte stores. Keys no
// query sees get zeros. kb: the block (KeyBlock::again, recomputed for the epilogue).
template <typename Elem, int kDQK, int kDV, int kCtaThreads, int kKeys, int kSlabs,
          int kDKTiles, int kDVTiles>
__device__ __forceinline__ void write_dk_dv_slabs(const DensePrefillBwdParams& p,
                                                  uint8_t* smem_k, uint8_t* smem_v,
                                                  const float (&acc_dk)[kSlabs][kDKTiles][4],
                                                  const float (&acc_dv)[kSlabs][kDVTiles][4],
                                                  int key_row0, int dk_col0, int dv_col0,
                                                  const KeyBlock& kb, int tid, int lane) {
  const int kv_head = kb.kv_head;
  using Storage = typename Elem::Storage;
  cp_async_wait<0>();  // K/V copies are still in flight when there were no steps
  __syncthreads();     // every warp is done reading K (dQ) before it is overwritten
#pragma unroll
  for (int sl = 0; sl < kSlabs; ++sl) {
    store_acc_to_smem<Elem, kDKTiles, kDQK>(smem_k, acc_dk[sl], key_row0 + 16 * sl, dk_col0,
                                            p.softmax_scale, lane);
    store_acc_to_smem<Elem, kDVTiles, kDV>(smem_v, acc_dv[sl], key_row0 + 16 * sl, dv_col0, 1.f,
                                           lane);
  }
  __syncthreads();
  const int64_t row = kb.k_begin + kb.n0;
  store_tile<kKeys, kDQK, kCtaThreads>(
      static_cast<Storage*>(p.dk) + row * p.dk_row_stride + kv_head * p.dk_head_stride,
      p.dk_row_stride, kb.n_valid, smem_k, tid);
  store_tile<kKeys, kDV, kCtaThreads>(
      static_cast<Storage*>(p.dv) + row * p.dv_row_stride + kv_head * p.dv_head_stride,
      p.dv_row_stride, kb.n_valid, smem_v, tid);
}

// One slab of kBlockN-key rows per warp (the 8-warp and 4-warp CTAs).
template <typename Elem, int kDQK, int kDV, int kCtaThreads, int kDKTiles, int kDVTiles>
__device__ __forceinline__ void write_dk_dv(const DensePrefillBwdParams& p, uint8_t* smem_k,
                                            uint8_t* smem_v, const float (&acc_dk)[kDKTiles][4],
                                            const float (&acc_dv)[kDVTiles][4], int key_row0,
                                            int dk_col0, int dv_col0, const KeyBlock& kb,
                                            int tid, int lane) {
  write_dk_dv_slabs<Elem, kDQK, kDV, kCtaThreads, kBlockN, 1>(
      p, smem_k, smem_v, reinterpret_cast<const float(&)[1][kDKTiles][4]>(acc_dk),
      reinterpret_cast<const float(&)[1][kDVTiles][4]>(acc_dv), key_row0, dk_col0, dv_col0, kb,
      tid, lane);
}

// In place: s (S^T = K Q^T, raw scores) becomes P^T = exp2(s * scale_log2 - lse2),
// for a warp's [16 keys from key_row0] x [kSTiles * 8 queries from s_col0]
// accumulators of the step (query block m0, key block n0). Hidden elements get P = 0
// (not exp2 of -inf - lse); rows with lse = +inf (no visible key, or past the
// sequence) get P = 0, never exp2(s - inf), which is NaN when s overflowed to +inf.
// kMaskTest = false: the caller knows the tile needs no mask (Mask::needs_mask is
// false), and the per-element test is not emitted.
template <typename Mask, int kSTiles, int kKeys = kBlockN, bool kMaskTest = true>
__device__ __forceinline__ void softmax_p(float (&s)[kSTiles][4], int key_row0, int s_col0,
                                          int m0, int n0, int s_q, int s_k, const float* s_lse,
                                          float scale_log2, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
  const bool check_mask = Mask::template needs_mask<kKeys>(m0, n0, s_q, s_k);
  // Element (j, e) is key key0 + (e / 2) * 8 and query q0 + 8 j + e % 2.
  const TileLimits lim = TileLimits::make(n0 + key_row0 + g, m0 + s_col0 + t4 * 2, s_q, s_k);
#pragma unroll
  for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qr = s_col0 + j * 8 + t4 * 2 + (e & 1);
      const float lse2 = s_lse[qr];
      float pv = exp2_approx(fmaf(s[j][e], scale_log2, -lse2));
      if (lse2 == INFINITY) pv = 0.f;
      if constexpr (kMaskTest) {
        const bool vis = lim.visible<Mask::kCausal>((e >> 1) * 8, j * 8 + (e & 1));
        if (check_mask && !vis) pv = 0.f;
      }
      s[j][e] = pv;
    }
  }
}

// In place: dp (dP^T = V dO^T) becomes dS^T = P^T * (dP^T - delta), p from softmax_p
// over the same tile.
template <int kSTiles>
__device__ __forceinline__ void ds_from_p(const float (&p)[kSTiles][4], float (&dp)[kSTiles][4],
                                          int s_col0, const float* s_delta, int lane) {
  const int t4 = lane & 3;
#pragma unroll
  for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dp[j][e] = p[j][e] * (dp[j][e] - s_delta[s_col0 + j * 8 + t4 * 2 + (e & 1)]);
    }
  }
}

template <typename Elem, int kDQK, int kDV, typename Mask>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    dense_bwd_main_kernel(const DensePrefillBwdParams p) {
  using Cfg = Config<kDQK, kDV>;
  using Storage = typename Elem::Storage;
  extern __shared__ __align__(128) uint8_t smem[];

  const KeyBlock kb = KeyBlock::make<Mask>(p);
  if (kb.empty()) return;  // past this sequence's keys: nothing to write
  const int kv_head = kb.kv_head;
  const int q_begin = kb.q_begin, s_q = kb.s_q, s_k = kb.s_k, n0 = kb.n0;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t4 = lane & 3;

  const uint32_t sK = cvta_shared(smem + Cfg::kOffK);
  const uint32_t sV = cvta_shared(smem + Cfg::kOffV);
  const uint32_t sQ = cvta_shared(smem + Cfg::kOffQ);
  const uint32_t sDO = cvta_shared(smem + Cfg::kOffDO);
  const uint32_t sP = cvta_shared(smem + Cfg::kOffP);
  const uint32_t sDS = cvta_shared(smem + Cfg::kOffDS);
  // Where the lo parts of P^T and dS^T are read (compensated products).
  const uint32_t sPLo = Cfg::kSeparateLo ? cvta_shared(smem + Cfg::kOffPLo) : sDS;
  const uint32_t sDSLo = Cfg::kSeparateLo ? cvta_shared(smem + Cfg::kOffDSLo) : sP;
  float* s_lse = reinterpret_cast<float*>(smem + Cfg::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + Cfg::kOffDelta);

  float* dq_accum = reinterpret_cast<float*>(static_cast<char*>(p.workspace) +
                                             dq_accum_offset(p.total_q, p.h_q));

  load_key_block<kDQK, kDV, kThreads, Storage>(p, sK, sV, kb, kv_head, tid);

  const StepPlan plan = StepPlan::make<Mask>(p, kb, kv_head);
  const int num_steps = plan.count;
  auto load_step = [&](int step) {
    load_query_block<kDQK, kDV, kThreads, Storage>(p, sQ, sDO, s_lse, s_delta, plan.head(step),
                                                   plan.m0_desc(step), s_q, q_begin, opaque(tid));
  };

  // Key-major warp tile: keys key_row0.. +16, columns (queries / head dims).
  const int key_row0 = (warp % kWarpRowsN) * 16;
  const int col_half_n = warp / kWarpRowsN;
  // Query-major warp tile for dQ.
  const int q_row0 = (warp % kWarpRowsM) * 16;
  const int col_half_m = warp / kWarpRowsM;

  constexpr int kSTiles = Cfg::kSCols / 8;
  constexpr int kDVTiles = Cfg::kDVCols / 8;
  constexpr int kDKTiles = Cfg::kDKCols / 8;
  constexpr int kDQTiles = Cfg::kDQCols / 8;
  float acc_dk[kDKTiles][4];
  float acc_dv[kDVTiles][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  if (num_steps > 0) load_step(0);
  cp_async_commit();  // K, V and step 0 in one group

  for (int step = 0; step < num_steps; ++step) {
    const int h = plan.head(step);
    const int m0 = plan.m0_desc(step);
    const int lane_s = opaque(lane);

    cp_async_wait<0>();
    __syncthreads();  // B1

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kSCols queries.
    const int s_col0 = col_half_n * Cfg::kSCols;
    float s[kSTiles][4];
    float dp[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
    }
    warp_gemm<Elem, kDQK, kSTiles, kDQK, kDQK, false, false>(s, sK, key_row0, sQ, s_col0, lane_s);
    warp_gemm<Elem, kDV, kSTiles, kDV, kDV, false, false>(dp, sV, key_row0, sDO, s_col0, lane_s);

    softmax_p<Mask, kSTiles>(s, key_row0, s_col0, m0, n0, s_q, s_k, s_lse, p.softmax_scale_log2,
                             lane);
    ds_from_p<kSTiles>(s, dp, s_col0, s_delta, lane);
    if constexpr (Cfg::kSeparateLo) {
      store_split_to_smem<Elem, kSTiles>(smem + Cfg::kOffP, smem + Cfg::kOffPLo, s, key_row0,
                                         s_col0, lane_s);
      store_split_to_smem<Elem, kSTiles>(smem + Cfg::kOffDS, smem + Cfg::kOffDSLo, dp, key_row0,
                                         s_col0, lane_s);
    } else if constexpr (kCompensatedDS) {
      // P as hi + lo: hi in the P^T buffer, lo in the dS^T buffer until dV is done.
      store_split_to_smem<Elem, kSTiles>(smem + Cfg::kOffP, smem + Cfg::kOffDS, s, key_row0,
                                         s_col0, lane_s);
    } else {
      store_acc_to_smem<Elem, kSTiles, kBlockM>(smem + Cfg::kOffP, s, key_row0, s_col0, 1.f,
                                                lane_s);
      store_acc_to_smem<Elem, kSTiles, kBlockM>(smem + Cfg::kOffDS, dp, key_row0, s_col0, 1.f,
                                                lane_s);
    }
    __syncthreads();  // B2

    // dV += P^T dO (contraction over the kBlockM queries).
    warp_gemm<Elem, kBlockM, kDVTiles, kBlockM, kDV, false, true, kCompensatedDS>(
        acc_dv, sP, key_row0, sDO, col_half_n * Cfg::kDVCols, lane_s, sPLo);
    if constexpr (kCompensatedDS && !Cfg::kSeparateLo) {
      __syncthreads();  // B2a: every warp is done reading P^T hi / lo
      // dS as hi + lo: hi in the dS^T buffer, lo in the P^T buffer.
      store_split_to_smem<Elem, kSTiles>(smem + Cfg::kOffDS, smem + Cfg::kOffP, dp, key_row0,
                                         s_col0, lane_s);
      __syncthreads();  // B2b: dS^T hi / lo visible
    }
    // dK += dS^T Q.
    warp_gemm<Elem, kBlockM, kDKTiles, kBlockM, kDQK, false, true, kCompensatedDS>(
        acc_dk, sDS, key_row0, sQ, col_half_n * Cfg::kDKCols, lane_s, sDSLo);
    // Deterministic dQ: wait until every warp of the previous key block has added into
    // these dq rows (each passes once: kNumWarps per key block); B3 then holds every
    // warp until the turn is ours.
    if (p.dq_turns != nullptr && tid == 0) {
      wait_turn(dq_turn_counter<Mask>(p, q_begin, m0, h), n0 / kBlockN * kNumWarps);
    }
    __syncthreads();  // B3

    if (step + 1 < num_steps) load_step(step + 1);
    cp_async_commit();

    // dq_accum += dS K (contraction over the kBlockN keys): A = dS read
    // transposed from dS^T, B = K read transposed.
    float dq[kDQTiles][4];
    zero_acc(dq);
    warp_gemm<Elem, kBlockN, kDQTiles, kBlockM, kDQK, true, true, kCompensatedDS>(
        dq, sDS, q_row0, sK, col_half_m * Cfg::kDQCols, lane_s, sDSLo);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int qr = m0 + q_row0 + g + half * 8;
      if (qr < s_q) {
        float* dst = dq_accum + (static_cast<int64_t>(q_begin + qr) * p.h_q + h) * kDQK +
                     col_half_m * Cfg::kDQCols + t4 * 2;
#pragma unroll
        for (int j = 0; j < kDQTiles; ++j) {
          red_add_f32x2(dst + j * 8, dq[j][2 * half], dq[j][2 * half + 1]);
        }
      }
    }
    // Deterministic dQ: this warp's share of the turn, once its lanes' REDs are ordered
    // before lane 0's release (__syncwarp); no CTA barrier.
    if (p.dq_turns != nullptr) {
      __syncwarp();
      if (lane == 0) pass_turn(dq_turn_counter<Mask>(p, q_begin, m0, h));
    }
  }

  write_dk_dv<Elem, kDQK, kDV, kThreads>(p, smem + Cfg::kOffK, smem + Cfg::kOffV, acc_dk, acc_dv,
                                         key_row0, col_half_n * Cfg::kDKCols,
                                         col_half_n * Cfg::kDVCols, KeyBlock::again<Mask>(p),
                                         tid, lane);
}

}  // namespace flash_mla::portable::dense_bwd

#include "kernel_4warp.cuh"
#include "kernel_128keys.cuh"

namespace flash_mla::portable::dense_bwd {

// One main-kernel launch: grid x = key blocks of the longest kv sequence, y = kv
// heads, z = sequences. Above 48 KB a kernel must opt in to its dynamic shared
// memory; set on every launch (cheap, and correct for whichever device is current:
// no process-wide "done" flag).
template <typename Kernel>
void launch_main(Kernel kernel, int threads, int smem_bytes, const DensePrefillBwdParams& p,
                 int keys_per_cta = kBlockN) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  const dim3 grid(num_n_blocks(p.max_seqlen_k, keys_per_cta), p.h_k, p.batch);
  kernel<<<grid, threads, smem_bytes, p.stream>>>(p);
}

template <typename Elem, int kDQK, int kDV, typename Mask>
void launch_main_for(const DensePrefillBwdParams& p, BwdLayout layout) {
  if constexpr (kDQK <= 128) {
    if (layout == BwdLayout::kWarps4) {
      launch_main(dense_bwd_main4_kernel<Elem, kDQK, kDV, Mask>, k4Threads,
                  Config4<kDQK, kDV>::kSmemBytes, p);
      return;
    }
    if (layout == BwdLayout::kKeys128) {
      launch_main(dense_bwd_main128_kernel<Elem, kDQK, kDV, Mask>, k128Threads,
                  Config128<kDQK, kDV>::kSmemBytes, p, kBlockN128);
      return;
    }
  }
  launch_main(dense_bwd_main_kernel<Elem, kDQK, kDV, Mask>, kThreads,
              Config<kDQK, kDV>::kSmemBytes, p);
}

template <typename Elem, int kDQK, int kDV>
void run_dense_prefill_bwd(const DensePrefillBwdParams& p, BwdLayout layout) {
  const int64_t rows = static_cast<int64_t>(p.total_q) * p.h_q;
  if (p.dq_turns != nullptr) {
    // Deterministic dQ: turn counters start at 0; only the 8-warp CTA takes turns.
    cudaMemsetAsync(p.dq_turns, 0, dq_turns_bytes(p.batch, p.total_q, p.h_q), p.stream);
    layout = BwdLayout::kWarps8;
  }
  if (rows > 0) {
    constexpr int kRowsPerBlock = kPreprocessThreads / (kDV / 8);
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    dense_bwd_preprocess_kernel<Elem, kDQK, kDV>
        <<<static_cast<unsigned>(blocks), kPreprocessThreads, 0, p.stream>>>(p);
  }
  if (p.batch > 0 && p.max_seqlen_k > 0 && p.h_k > 0) {
    if (p.is_causal) {
      launch_main_for<Elem, kDQK, kDV, CausalMask>(p, layout);
    } else {
      launch_main_for<Elem, kDQK, kDV, NoMask>(p, layout);
    }
  }
  if (p.total_k > 0 && p.h_k > 0) {
    dense_bwd_zero_outside_rows_kernel<typename Elem::Storage, kDQK, kDV>
        <<<kOutsideBlocks, kConvertThreads, 0, p.stream>>>(p);
  }
  if (rows > 0) {
    const int64_t chunks = rows * (kDQK / 8);
    const int64_t blocks = (chunks + kConvertThreads - 1) / kConvertThreads;
    dense_bwd_convert_dq_kernel<Elem, kDQK>
        <<<static_cast<unsigned>(blocks), kConvertThreads, 0, p.stream>>>(p);
  }
}

}  // namespace flash_mla::portable::dense_bwd
