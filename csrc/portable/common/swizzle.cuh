// XOR swizzle for shared-memory tiles of 16-bit elements whose rows are a
// multiple of 64 elements (128 bytes) long. A row is split into 16-byte chunks;
// chunk c of row r is stored at chunk (c ^ (r % 8)) within its 128-byte group.
// Eight consecutive rows reading the same logical chunk (one ldmatrix 8x8
// matrix, or cp.async of a column of chunks) then hit eight distinct 16-byte
// slots of a 128-byte span: all 32 banks once, no conflicts, no padding bytes
// (padding would cost 1/8 more shared memory we do not have at d = 192 on sm_120).
#pragma once

#include <cstdint>

namespace flash_mla::portable {

// Byte offset of (row, col) in a swizzled tile with kRowElems 16-bit elements per
// row. col must be a multiple of 8 for a 16-byte access (ldmatrix row, cp.async).
template <int kRowElems>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int col) {
  static_assert(kRowElems % 64 == 0, "swizzled rows must be multiples of 64 elements");
  const int chunk = col >> 3;
  const int swizzled = chunk ^ (row & 7);
  return static_cast<uint32_t>(row * (kRowElems * 2) + swizzled * 16 + (col & 7) * 2);
}

}  // namespace flash_mla::portable
