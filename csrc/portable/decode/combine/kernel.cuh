// Split-KV combine kernel (portable: plain loads, warp shuffles, exp2; runs on
// sm_80 through sm_120/121 from the same source).
//
// Global memory layout (CombineParams in csrc/params.h):
//   o_accum       fp32 [num_splits_total, s_q, h_q, d_v], contiguous
//   lse_accum     fp32 [num_splits_total, s_q, h_q], contiguous, log2; -inf = split saw no key
//   split_offsets int32 [batch + 1]: batch b owns splits [off[b], off[b+1]), both clamped to
//                 [0, num_splits_total] (and end >= start) so a bad tensor never reads out of bounds
//   attn_sink     fp32 [h_q], natural log, may be null
//   out           T [batch, s_q, h_q, d_v] at out_{batch,row,head}_stride, last dim contiguous
//   lse           fp32 [batch, s_q, h_q], contiguous, natural log, sink excluded; +inf = empty row
// skip_single_split: a batch that owns exactly one split is left untouched (dense decode
//   writes such a request's out and lse itself, without a partial).
// Shared memory: none (kDynamicSmemBytes = 0, no static shared arrays).
//
// Work split: warp w of block x merges row r = x * kWarpsPerBlock + w, where
// r = (b * s_q + s) * h_q + h. Warps are independent; there is no barrier.
//   Pass 1: the lanes stride over the row's splits, keeping a running max m and
//           sum of exp2(lse_i - m) each, then merge the 32 pairs with shuffles:
//           lse2 = m + log2(sum).
//   Pass 2: every lane walks the splits in order (same order on every run, so the
//           result is bit-deterministic), weight w_i = exp2(lse_i - lse2), and
//           accumulates w_i * o_accum[i] for its 4 columns of each 128-column chunk.
//           A split with w_i == 0 (lse -inf) is skipped without reading o_accum: an
//           empty split's partial output may be uninitialised or NaN.
// Epilogue: lse = lse2 * ln(2); with a sink, out *= exp(lse) / (exp(lse) + exp(sink))
//   = 1 / (1 + exp(sink - lse)) (sink +inf -> 0, -inf -> 1); the stored lse excludes
//   the sink. An empty row (no split, or every lse -inf) stores out 0, lse +inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../../params.h"
#include "../../common/element.cuh"
#include "config.h"
#include "kernel.h"

namespace flash_mla::combine {

// Four fp32 values rounded to T (bf16 or fp16) and packed for one 8-byte store.
template <typename T>
__device__ __forceinline__ uint2 pack4(float a, float b, float c, float d) {
  using Tag = typename std::conditional<std::is_same<T, __half>::value, portable::FP16,
                                        portable::BF16>::type;
  return make_uint2(portable::pack_float2<Tag>(a, b), portable::pack_float2<Tag>(c, d));
}

// Merge two (max, sum of exp2(x - max)) pairs; an all -inf side contributes 0.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty: avoid exp2(-inf - -inf) = NaN
  s = s * exp2f(m - mn) + s2 * exp2f(m2 - mn);
  m = mn;
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.s_q * p.h_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int h = static_cast<int>(row % p.h_q);
  const int64_t bs = row / p.h_q;  // b * s_q + s
  const int s = static_cast<int>(bs % p.s_q);
  const int b = static_cast<int>(bs / p.s_q);

  const int total = p.num_splits_total;
  const int start = min(max(p.split_offsets[b], 0), total);
  const int end = min(max(p.split_offsets[b + 1], start), total);
  if (p.skip_single_split && end - start == 1) return;  // the decode kernel wrote this batch

  // lse_accum / o_accum index of split i for this (s, h).
  const int64_t split_stride = static_cast<int64_t>(p.s_q) * p.h_q;
  const int64_t sh = static_cast<int64_t>(s) * p.h_q + h;

  // Pass 1: log2-sum-exp2 over the splits.
  float m = -INFINITY, sum = 0.f;
  for (int i = start + lane; i < end; i += 32) {
    const float x = p.lse_accum[i * split_stride + sh];
    merge_max_sum(m, sum, x, 1.f);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, sum, offset);
    merge_max_sum(m, sum, m2, s2);
  }
  const bool empty = (m == -INFINITY);
  const float lse2 = empty ? INFINITY : m + log2f(sum);

  // Pass 2: weighted sum of the partial outputs.
  float acc[kChunks][kColsPerLane];
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) acc[c][k] = 0.f;

  if (!empty) {
    // Not unrolled: the body is already 4 * kChunks loads wide, and unrolling made
    // ptxas spill on sm_80 (kChunks = 2) for no bandwidth gain.
#pragma unroll 1
    for (int i = start; i < end; ++i) {
      const float w = exp2f(p.lse_accum[i * split_stride + sh] - lse2);
      if (w == 0.f) continue;
      const float* src = p.o_accum + (i * split_stride + sh) * p.d_v;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int col = c * kColsPerChunk + lane * kColsPerLane;
        if (col < p.d_v) {
          const float4 v = *reinterpret_cast<const float4*>(src + col);
          acc[c][0] += w * v.x;
          acc[c][1] += w * v.y;
          acc[c][2] += w * v.z;
          acc[c][3] += w * v.w;
        }
      }
    }
  }

  const float lse_nat = empty ? INFINITY : lse2 * 0.69314718055994530942f;
  float scale = 1.f;
  if (p.attn_sink != nullptr && !empty) {
    scale = 1.f / (1.f + expf(p.attn_sink[h] - lse_nat));
  }

  T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_batch_stride +
           static_cast<int64_t>(s) * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col = c * kColsPerChunk + lane * kColsPerLane;
    if (col < p.d_v) {
      *reinterpret_cast<uint2*>(dst + col) = pack4<T>(
          acc[c][0] * scale, acc[c][1] * scale, acc[c][2] * scale, acc[c][3] * scale);
    }
  }
  if (lane == 0) p.lse[row] = lse_nat;
}

template <typename T, int kChunks>
void run_combine(const CombineParams& params) {
  static_assert(kChunks >= 1 && kChunks <= kMaxChunks, "d_v chunk count out of range");
  const int64_t rows = static_cast<int64_t>(params.batch) * params.s_q * params.h_q;
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  combine_kernel<T, kChunks><<<static_cast<unsigned>(blocks), kThreads,
                               static_cast<size_t>(kDynamicSmemBytes), params.stream>>>(params);
}

}  // namespace flash_mla::combine
