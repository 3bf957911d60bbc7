// cp.async (sm_80+, also sm_120): 16-byte global -> shared copies that bypass
// registers, grouped with commit/wait so a tile can load while the previous one
// is being computed. .cg skips L1 (tiles are reused across CTAs through L2, not
// within one SM's L1).
#pragma once

#include <cstdint>

namespace flash_mla::portable {

// Copies 16 bytes when `valid`, else writes 16 zero bytes to shared memory and
// reads nothing from global memory (src-size 0), so rows past a sequence's end
// become zeros without touching memory outside the tensor. `gmem` must still be
// a valid-looking address; callers pass the tensor base for invalid rows.
__device__ __forceinline__ void cp_async_16_zfill(uint32_t smem_addr, const void* gmem,
                                                  bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

// The 8-byte form (.ca: .cg takes only 16 bytes), for rows that are only 8-byte aligned
// (the sparse decode's V4 cache pages); same zero-fill rule.
__device__ __forceinline__ void cp_async_8_zfill(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

// The 4-byte form, for int32 values whose rows have no wider alignment (the sparse decode's
// index rows, any topk and stride); same zero-fill rule.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Wait until at most N committed groups of this thread are still in flight.
// Other threads' copies become visible only after a barrier that follows.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace flash_mla::portable
