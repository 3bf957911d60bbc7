// Split-KV schedule of the dense MLA decode (docs/dense_decode.md, "Schedule"). One CTA of
// kThreads threads; plain loads/stores, warp shuffles and a shared-memory scan, so it runs
// on every target. Its exact rule is restated in Python by tests/test_decode_schedule.py.
//
// Global memory (DenseDecodeScheduleParams):
//   seqlens        int32 [b]           read once per request (negative = empty)
//   metadata       int32 [P, 8]        per part: begin_req, begin_block, end_req, end_block,
//                                      first_split, 0, 0, 0; begin_req == b: empty part
//   split_offsets  int32 [b + 1]       exclusive prefix sum of the pieces per request
// Shared memory: kThreads / 32 int64 for the scan (static).
//
// Normal mode. Request i has n_i = ceil(s_k / 64) blocks and costs c_i = n_i + F (F =
// kFixedCostBlocks; 0 when n_i = 0). Laid end to end, request i occupies positions
// [start_i, start_i + c_i) (its fixed cost first, then its blocks); per = max(1,
// ceil(total / P)); part p takes positions [p per, min((p + 1) per, total)). Request i
// has pieces = last_part - first_part + 1 with first_part = (start_i + F) / per (the part
// holding its first block) and last_part = (start_i + c_i - 1) / per.
// Barriers: (1) every part is first written as empty; the scans' barriers order those
// stores before the per-request threads fill in the begin/end fields of the parts that
// overlap their request (each field of a part has exactly one writer). (2) In
// batch-invariant mode a final barrier makes split_offsets visible before the per-part
// threads read it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../../params.h"
#include "config.h"
#include "kernel.h"

namespace flash_mla::portable::decode_schedule {

constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int blocks_of(int seqlen) {
  return seqlen > 0 ? static_cast<int>((static_cast<int64_t>(seqlen) + kPageSize - 1) / kPageSize)
                    : 0;
}

__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Pieces of a request of n blocks in batch-invariant mode, and blocks per piece.
__device__ __forceinline__ void invariant_pieces(int n, int& pieces, int& size) {
  if (n == 0) {
    pieces = size = 0;
    return;
  }
  pieces = min((n + kInvariantChunkBlocks - 1) / kInvariantChunkBlocks, kInvariantMaxPieces);
  size = (n + pieces - 1) / pieces;
}

// Exclusive prefix sum over the CTA (thread order); `total` receives the CTA's sum.
// Every thread must call it (it has barriers).
__device__ int64_t block_exclusive_scan(int64_t value, int64_t& total, int64_t* warp_sums) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarps; offset *= 2) {
      const int64_t up = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += up;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  const int64_t result = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - value;
  total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

__global__ void __launch_bounds__(kThreads) dense_decode_schedule_kernel(
    const __grid_constant__ DenseDecodeScheduleParams p) {
  __shared__ int64_t warp_sums[kWarps];
  const int tid = threadIdx.x;
  const int b = p.batch;
  const int num_parts = p.num_parts;

  for (int q = tid; q < num_parts; q += kThreads) {
    int32_t* row = p.metadata + static_cast<int64_t>(q) * kMetaInts;
#pragma unroll
    for (int k = 0; k < kMetaInts; ++k) row[k] = 0;
    row[kBeginReq] = b;
    row[kEndReq] = b;
  }

  // Total cost (normal mode only; the invariant cut needs none).
  int64_t total = 0;
  if (!p.batch_invariant) {
    for (int base = 0; base < b; base += kThreads) {
      const int i = base + tid;
      const int n = i < b ? blocks_of(p.seqlens[i]) : 0;
      int64_t chunk_total;
      block_exclusive_scan(n > 0 ? n + kFixedCostBlocks : 0, chunk_total, warp_sums);
      total += chunk_total;
    }
  }
  const int64_t per = total > 0 ? (total + num_parts - 1) / num_parts : 1;

  // Starts and split counts, chunk by chunk; the request's thread fills its parts.
  int64_t start_carry = 0, split_carry = 0;
  for (int base = 0; base < b; base += kThreads) {
    const int i = base + tid;
    const int n = i < b ? blocks_of(p.seqlens[i]) : 0;
    const int64_t cost = (!p.batch_invariant && n > 0) ? n + kFixedCostBlocks : 0;
    int64_t chunk_cost;
    const int64_t start = start_carry + block_exclusive_scan(cost, chunk_cost, warp_sums);
    int64_t splits = 0, first_part = 0;
    if (p.batch_invariant) {
      int size;
      int pieces;
      invariant_pieces(n, pieces, size);
      splits = pieces;
    } else if (n > 0) {
      first_part = (start + kFixedCostBlocks) / per;
      splits = (start + cost - 1) / per - first_part + 1;
    }
    int64_t chunk_splits;
    const int64_t offset = split_carry + block_exclusive_scan(splits, chunk_splits, warp_sums);
    if (i < b) p.split_offsets[i] = static_cast<int32_t>(offset);
    if (!p.batch_invariant && n > 0) {
      const int64_t end = start + cost;
      for (int64_t q = start / per; q <= (end - 1) / per && q < num_parts; ++q) {
        const int64_t x0 = q * per;
        const int64_t x1 = min64(x0 + per, total);
        int32_t* row = p.metadata + q * kMetaInts;
        if (x0 >= start && x0 < end) {
          row[kBeginReq] = i;
          row[kBeginBlock] = static_cast<int32_t>(max64(0, x0 - start - kFixedCostBlocks));
          row[kFirstSplit] = static_cast<int32_t>(offset + max64(0, q - first_part));
        }
        if (x1 > start && x1 <= end) {
          row[kEndReq] = i;
          row[kEndBlock] = static_cast<int32_t>(
              min64(n, max64(0, x1 - start - kFixedCostBlocks)));
        }
      }
    }
    start_carry += chunk_cost;
    split_carry += chunk_splits;
  }
  if (tid == 0) p.split_offsets[b] = static_cast<int32_t>(split_carry);

  if (p.batch_invariant) {
    __syncthreads();  // split_offsets written by every request's thread
    for (int q = tid; q < num_parts; q += kThreads) {
      const int req = q / kInvariantMaxPieces;
      const int piece = q % kInvariantMaxPieces;
      if (req >= b) continue;
      const int n = blocks_of(p.seqlens[req]);
      int pieces, size;
      invariant_pieces(n, pieces, size);
      if (piece >= pieces) continue;
      int32_t* row = p.metadata + static_cast<int64_t>(q) * kMetaInts;
      row[kBeginReq] = req;
      row[kBeginBlock] = piece * size;
      row[kEndReq] = req;
      row[kEndBlock] = min(n, (piece + 1) * size);
      row[kFirstSplit] = p.split_offsets[req] + piece;
    }
  }
}

void run_dense_decode_schedule(const DenseDecodeScheduleParams& params) {
  dense_decode_schedule_kernel<<<1, kThreads, 0, params.stream>>>(params);
}

}  // namespace flash_mla::portable::decode_schedule
