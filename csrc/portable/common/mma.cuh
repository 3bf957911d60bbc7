// Tensor-core matrix multiply-accumulate through mma.sync m16n8k16, the only
// bf16/fp16 MMA that every target of the portable kernels has (sm_80 .. sm_121).
//
// Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major), 4 x b32, each two elements along k:
//     a[0]: row g,   k 2t..2t+1      a[1]: row g+8, k 2t..2t+1
//     a[2]: row g,   k 2t+8..2t+9    a[3]: row g+8, k 2t+8..2t+9
//   B (16x8, "col": element (k, n) of B), 2 x b32:
//     b[0]: k 2t..2t+1, col g        b[1]: k 2t+8..2t+9, col g
//   C/D (16x8 fp32), 4 x f32:
//     c[0], c[1]: row g, cols 2t, 2t+1    c[2], c[3]: row g+8, cols 2t, 2t+1
// So the C fragments of two adjacent n-tiles, packed to 16-bit pairs, are exactly
// the A fragment of the next product (P in P.V needs no shuffles).
#pragma once

#include <cstdint>

#include "element.cuh"

namespace flash_mla::portable {

// D = A * B + D, fp32 accumulate. Elem picks the input type (bf16 or fp16).
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<BF16>(float (&d)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<FP16>(float (&d)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace flash_mla::portable
