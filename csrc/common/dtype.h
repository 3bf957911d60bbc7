// The element types the kernels read and write. A header of its own (no CUDA headers)
// so the capability tables (capabilities.h) and host-only programs can name them.
#pragma once

#include <cstdint>

namespace flash_mla {

// Stored in the params structs (params.h), so the values are part of their layout.
enum class DType : int32_t { kBF16 = 0, kFP16 = 1 };

// The key a capability table reports for a dtype ("dtype" lists in build_info's "ops";
// the Python dispatch asks with the same keys) and the name torch gives it, which the
// API's error messages use.
constexpr const char* dtype_key(DType t) { return t == DType::kBF16 ? "bf16" : "fp16"; }
constexpr const char* dtype_torch_name(DType t) {
  return t == DType::kBF16 ? "bfloat16" : "float16";
}

}  // namespace flash_mla
