// Small math helpers for the online softmax: base-2 exponent and quad
// (4-lane) reductions over the lanes that share an mma accumulator row.
#pragma once

namespace flash_mla::portable {

// 2^x on the SFU. ftz: denormal results flush to zero, which changes nothing
// after the fp32 row sum; exp2(-inf) = 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Lanes 4i..4i+3 hold the same accumulator rows (g = lane / 4): reduce over them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace flash_mla::portable
