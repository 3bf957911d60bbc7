// ldmatrix wrappers: a warp loads 8x8 16-bit matrices from shared memory into
// mma fragments. Each lane supplies one row address (16 contiguous bytes):
// lanes 8i..8i+7 give rows 0..7 of matrix i. Without .trans, lane l receives
// elements (row l/4, cols 2(l%4), 2(l%4)+1) of each matrix: the A/B fragment
// order of mma.m16n8k16 when the matrix is stored k-contiguous. With .trans it
// receives (rows 2(l%4), 2(l%4)+1, col l/4): use it for a B operand stored
// n-contiguous (V in P.V, dO in dV += P^T dO).
// Addresses are 32-bit shared-window addresses (cvta_shared).
#pragma once

#include <cstdint>

namespace flash_mla::portable {

__device__ __forceinline__ uint32_t cvta_shared(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// x2: lanes 0..15 supply the addresses (lanes 16..31 must still hold valid ones).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr));
}

}  // namespace flash_mla::portable
