// Output and scratch tensors allocated by the caller's framework from inside an entry.
//
// When Python calls an entry with torch tensors, tvm-ffi installs torch's DLPack tensor
// allocator for the duration of the call (torch's caching allocator, on the current
// stream, inside a CUDA graph capture its private pool), and converts returned tensors
// back to torch.Tensor. An entry that allocates its outputs this way saves the Python
// torch.empty calls, about 4.4 us each on the H100 (docs/dense_decode.md, "Host time").
// A framework without that allocator leaves it unset: the entries that need it raise,
// and the Python side asks env_allocator_available first and allocates itself instead.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

namespace flash_mla::api {

using tvm::ffi::Tensor;

inline bool env_allocator_set() { return TVMFFIEnvGetDLPackManagedTensorAllocator() != nullptr; }

// Raises RuntimeError naming `entry` when the caller's framework installed no allocator.
inline void require_env_allocator(const char* entry) {
  if (!env_allocator_set()) {
    TVM_FFI_THROW(RuntimeError) << entry << " allocates its outputs through the caller's "
                                << "DLPack tensor allocator, and this caller installed none; "
                                << "call the entry that takes preallocated buffers instead";
  }
}

// An uninitialised tensor from the caller's allocator.
inline Tensor env_empty(std::initializer_list<int64_t> shape, DLDataType dtype, DLDevice device) {
  return Tensor::FromEnvAlloc(TVMFFIEnvTensorAlloc, tvm::ffi::ShapeView(shape), dtype, device);
}

inline constexpr DLDataType kFloat32{kDLFloat, 32, 1};

}  // namespace flash_mla::api
