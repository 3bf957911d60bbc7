// fp32 reductions into global memory for the dQ accumulator.
#pragma once

namespace flash_mla::portable::dense_bwd {

// *addr += a, *(addr + 1) += b; addr 8-byte aligned. sm_90+ (sm_120 included)
// has a two-wide red.global, which halves the number of L2 atomic requests;
// older targets fall back to two scalar reductions. The result is unused, so
// this compiles to RED, not ATOM. Order of additions across CTAs is not fixed:
// the sums are not bit-reproducible.
__device__ __forceinline__ void red_add_f32x2(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b)
               : "memory");
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
#endif
}

}  // namespace flash_mla::portable::dense_bwd
