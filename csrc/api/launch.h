// Launch helpers shared by the tvm-ffi entry points: the caller's stream, a
// scoped device switch, and the post-launch error check.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include <cuda_runtime.h>

#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

namespace flash_mla::api {

// The stream the caller is on (torch's current stream when called from torch).
inline cudaStream_t current_stream(int device_id) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
}

// Makes `device_id` current for the launch and restores the caller's device, so a
// call with tensors on cuda:1 works while cuda:0 is current (per call, no
// process-wide state).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device_id) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_id) check(cudaSetDevice(device_id), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      TVM_FFI_THROW(RuntimeError) << what << " failed: " << cudaGetErrorString(err);
    }
  }

 private:
  int previous_ = 0;
};

// One integer attribute of `device`; a failed query raises with `what` in the message.
inline int device_attribute(int device, cudaDeviceAttr attribute, const char* what) {
  int value = 0;
  DeviceGuard::check(cudaDeviceGetAttribute(&value, attribute, device), what);
  return value;
}

// Streaming multiprocessors of `device` (sizes the decode schedules' parts).
inline int num_sms(int device) {
  return device_attribute(device, cudaDevAttrMultiProcessorCount,
                          "cudaDeviceGetAttribute(MultiProcessorCount)");
}

// Shared memory per SM of `device` in bytes (picks a CTA layout that fits twice).
inline int max_smem_per_sm(int device) {
  return device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                          "cudaDeviceGetAttribute(MaxSharedMemoryPerMultiprocessor)");
}

// Shared memory one block of `device` may opt in to, in bytes (picks CTAs larger than
// sm_120's 99 KB only where they fit).
inline int max_smem_per_block(int device) {
  return device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
}

// The value of an environment variable that forces a kernel variant for tests and
// A/B runs (FLASH_MLA_DENSE_FWD_WARPS, FLASH_MLA_DENSE_BWD_WARPS); "" when unset or
// empty. Read on every call: no process-wide state.
inline std::string forced_variant(const char* variable) {
  const char* value = std::getenv(variable);
  return value == nullptr ? std::string() : std::string(value);
}

// A count forced through an environment variable for tests (FLASH_MLA_DENSE_DECODE_PARTS,
// FLASH_MLA_SPARSE_DECODE_PARTS): 0 when unset or empty, else an integer in [1, max], or a
// ValueError naming the variable.
inline int64_t forced_count(const char* variable, int64_t max) {
  const std::string forced = forced_variant(variable);
  if (forced.empty()) return 0;
  char* end = nullptr;
  const long long value = std::strtoll(forced.c_str(), &end, 10);
  if (end == forced.c_str() || *end != '\0' || value < 1 || value > max) {
    TVM_FFI_THROW(ValueError) << variable << " must be an integer in [1, " << max
                              << "] (or unset), got '" << forced << "'";
  }
  return value;
}

// Raises RuntimeError naming the kernel when its launch failed.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "launch of " << kernel << " failed: " << cudaGetErrorString(err);
  }
}

}  // namespace flash_mla::api
