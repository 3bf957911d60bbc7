// A kernel's opt-in to more than 48 KB of dynamic shared memory (and, for the decode
// kernels, the largest shared-memory carveout), set once per (kernel, device).
//
// The attributes belong to the device that is current when they are set, so the record
// is a per-kernel mask with one bit per device, never one "initialised" flag: a process
// driving several GPUs sets them on each. Devices past 63 have no bit and set them at
// every launch. Why not per launch: each cudaFuncSetAttribute costs host time on every
// eager decode call, whose whole budget is about 15 us (docs/dense_decode.md).
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

namespace flash_mla::portable {

// kKernel: the __global__ function; kSmemBytes: its dynamic shared memory; kMaxCarveout:
// also prefer the largest shared-memory carveout (several CTAs per SM). A failed set is
// not recorded (the next launch tries again) and is left in cudaGetLastError, where the
// entry's post-launch check reports it.
template <auto kKernel, int kSmemBytes, bool kMaxCarveout>
void opt_in_smem() {
  static std::atomic<uint64_t> devices_done{0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (devices_done.load(std::memory_order_acquire) & bit) != 0) return;
  cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err == cudaSuccess && kMaxCarveout) {
    err = cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
  }
  if (err == cudaSuccess) devices_done.fetch_or(bit, std::memory_order_acq_rel);
}

}  // namespace flash_mla::portable
