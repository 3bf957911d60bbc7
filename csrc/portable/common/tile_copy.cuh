// Global -> shared tile copies shared by the portable kernels: every thread of the
// CTA issues 16-byte cp.async chunks into an XOR-swizzled tile (swizzle.cuh).
#pragma once

#include <cstdint>

#include "cp_async.cuh"
#include "swizzle.cuh"

namespace flash_mla::portable {

// Copies rows [first_row, first_row + kRows) of a [*, kCols] tensor (row r at
// base + r * row_stride) into a swizzled shared tile at smem_tile; tile rows
// >= valid_rows become zeros and read nothing from global memory. kCtaThreads
// threads (the whole CTA, thread index tid) share the copy.
template <int kRows, int kCols, int kCtaThreads, typename Storage>
__device__ __forceinline__ void load_tile_async(uint32_t smem_tile, const Storage* base,
                                                int64_t row_stride, int first_row, int valid_rows,
                                                int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kCtaThreads == 0, "tile copy must divide evenly over the CTA");
#pragma unroll
  for (int j = 0; j < kChunks / kCtaThreads; ++j) {
    const int idx = tid + j * kCtaThreads;
    const int row = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 8;
    const bool valid = row < valid_rows;
    const Storage* src =
        valid ? base + static_cast<int64_t>(first_row + row) * row_stride + col : base;
    cp_async_16_zfill(smem_tile + swizzled_offset<kCols>(row, col), src, valid);
  }
}

}  // namespace flash_mla::portable
