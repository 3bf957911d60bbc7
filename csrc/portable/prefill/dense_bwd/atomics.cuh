// fp32 reductions into global memory for the dQ accumulator.
#pragma once

namespace flash_mla::portable::dense_bwd {

// *addr += a, *(addr + 1) += b; addr 8-byte aligned. sm_90+ (sm_120 included)
// has a two-wide red.global, which halves the number of L2 atomic requests;
// older targets fall back to two scalar reductions. The result is unused, so
// this compiles to RED, not ATOM. Order of additions across CTAs is not fixed:
// the sums are not bit-reproducible (unless the CTAs take turns: wait_turn below).
__device__ __forceinline__ void red_add_f32x2(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b)
               : "memory");
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
#endif
}

// Turn taking for the deterministic dQ (kernel.cuh): the key blocks of a sequence add
// into one query block's dq rows in key-block order. One thread of the CTA waits until
// the block's counter reaches `mine` (the CTA's key block times its warps: the key
// blocks that touch a query block are always blocks 0 .. n, causal or not), then the
// CTA adds and each warp's pass_turn increments it. Acquire / release in the manner of
// a semaphore-ordered split-K: waiter: ld.acquire spin, then __syncthreads; passer (per
// warp): __syncwarp, then fence + relaxed add by lane 0. CTAs start in block order (the
// grid's x, or the longest-first numbering, runs key blocks in increasing order), so
// the previous turn is always resident or done; the 8-warp CTA visits query blocks from
// the last down (StepPlan::m0_desc), so under the causal mask all key blocks start at
// the same query block and move in step. Should a wait ever last kTurnTimeoutNs (a
// malformed cu_seqlens whose sequences overlap, or a GPU that schedules CTAs out of
// order), the CTA adds anyway: dq is still the right sum, only not bit-reproducible.
constexpr unsigned long long kTurnTimeoutNs = 10ull * 1000 * 1000 * 1000;

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void wait_turn(const int* turn, int mine) {
  const unsigned long long start = global_timer_ns();
  for (;;) {
    int seen;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(seen) : "l"(turn) : "memory");
    if (seen >= mine || global_timer_ns() - start > kTurnTimeoutNs) return;
    __nanosleep(100);
  }
}

__device__ __forceinline__ void pass_turn(int* turn) {
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.s32 [%0], 1;" ::"l"(turn)
               : "memory");
}

}  // namespace flash_mla::portable::dense_bwd
