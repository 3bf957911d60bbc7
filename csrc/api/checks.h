// Argument checks shared by every tvm-ffi entry point.
//
// Each check throws tvm-ffi's ValueError or TypeError (surfacing in Python as
// the builtin exceptions) with a sentence naming the argument, what was expected
// and what was given, e.g.
//   "q must be a CUDA tensor, got a tensor on device type 1 (cpu)".
// Entry points validate in a fixed order: device, dtype, layout, shape, values.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include "../common/capabilities.h"
#include "../params.h"

namespace flash_mla::api {

using tvm::ffi::TensorView;

inline std::string dtype_name(DLDataType t) {
  if (t.lanes != 1) return "vector dtype";
  switch (t.code) {
    case kDLBfloat: return t.bits == 16 ? "bfloat16" : "bfloat" + std::to_string(t.bits);
    case kDLFloat: return "float" + std::to_string(t.bits);
    case kDLInt: return "int" + std::to_string(t.bits);
    case kDLUInt: return "uint" + std::to_string(t.bits);
    default: return "dtype code " + std::to_string(t.code) + " bits " + std::to_string(t.bits);
  }
}

inline bool is_dtype(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}
inline bool is_bf16(const TensorView& t) { return is_dtype(t, kDLBfloat, 16); }
inline bool is_fp16(const TensorView& t) { return is_dtype(t, kDLFloat, 16); }
inline bool is_fp32(const TensorView& t) { return is_dtype(t, kDLFloat, 32); }
inline bool is_int32(const TensorView& t) { return is_dtype(t, kDLInt, 32); }
inline bool is_uint8(const TensorView& t) { return is_dtype(t, kDLUInt, 8); }

inline std::string shape_str(const TensorView& t) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << (t.ndim() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string strides_str(const TensorView& t) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.stride(i);
  os << (t.ndim() == 1 ? ",)" : ")");
  return os.str();
}

// The element pointer (DLPack allows a byte offset on top of data).
inline void* data_ptr(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

inline void check_cuda(const TensorView& t, const char* name) {
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << name << " must be a CUDA tensor, got a tensor on device type "
                              << t.device().device_type;
  }
}

inline void check_same_device(const TensorView& t, const TensorView& ref, const char* name,
                              const char* ref_name) {
  if (t.device().device_type != ref.device().device_type ||
      t.device().device_id != ref.device().device_id) {
    TVM_FFI_THROW(ValueError) << name << " must be on the same device as " << ref_name
                              << " (cuda:" << ref.device().device_id << "), got device type "
                              << t.device().device_type << " id " << t.device().device_id;
  }
}

inline void check_dtype(const TensorView& t, bool ok, const char* name, const char* expected) {
  if (!ok) {
    TVM_FFI_THROW(TypeError) << name << " must have dtype " << expected << ", got "
                             << dtype_name(t.dtype());
  }
}

inline void check_ndim(const TensorView& t, int ndim, const char* name, const char* layout) {
  if (t.ndim() != ndim) {
    TVM_FFI_THROW(ValueError) << name << " must be " << ndim << "-D " << layout << ", got shape "
                              << shape_str(t);
  }
}

inline void check_shape(const TensorView& t, std::initializer_list<int64_t> expected,
                        const char* name, const char* layout) {
  bool ok = t.ndim() == static_cast<int32_t>(expected.size());
  int i = 0;
  for (int64_t e : expected) {
    if (ok && t.size(i) != e) ok = false;
    ++i;
  }
  if (!ok) {
    std::ostringstream want;
    want << "(";
    i = 0;
    for (int64_t e : expected) want << (i++ ? ", " : "") << e;
    want << ")";
    TVM_FFI_THROW(ValueError) << name << " must have shape " << want.str() << " " << layout
                              << ", got " << shape_str(t);
  }
}

inline void check_last_dim_contiguous(const TensorView& t, const char* name) {
  if (t.ndim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1) {
    TVM_FFI_THROW(ValueError) << name << " must have a contiguous last dimension (stride 1), "
                              << "got strides " << strides_str(t);
  }
}

inline void check_contiguous(const TensorView& t, const char* name) {
  int64_t expected = 1;
  for (int i = t.ndim() - 1; i >= 0; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) {
      TVM_FFI_THROW(ValueError) << name << " must be contiguous, got shape " << shape_str(t)
                                << " with strides " << strides_str(t);
    }
    expected *= t.size(i);
  }
}

// Pointers handed to cp.async / vector loads must be 16-byte aligned.
inline void check_aligned(const TensorView& t, int64_t bytes, const char* name) {
  if (reinterpret_cast<uintptr_t>(data_ptr(t)) % static_cast<uintptr_t>(bytes) != 0) {
    TVM_FFI_THROW(ValueError) << name << " must start at a " << bytes
                              << "-byte aligned address, got a pointer offset by "
                              << reinterpret_cast<uintptr_t>(data_ptr(t)) % bytes << " bytes";
  }
}

// cp.async moves 16-byte chunks: every stride but the last must be a multiple of 8
// elements and the data 16-byte aligned.
inline void check_chunk_strides(const TensorView& t, const char* name) {
  for (int i = 0; i + 1 < t.ndim(); ++i) {
    if (t.stride(i) < 0 || t.stride(i) % 8 != 0) {
      TVM_FFI_THROW(ValueError) << name << " must have non-negative strides that are multiples "
                                << "of 8 elements (16 bytes) in every dimension but the last, got "
                                << "strides " << strides_str(t);
    }
  }
  check_aligned(t, 16, name);
}

// Tables the kernels index by row (block_table, indices): rows at increasing addresses.
inline void check_row_stride_non_negative(const TensorView& t, const char* name) {
  if (t.stride(0) < 0) {
    TVM_FFI_THROW(ValueError) << name << " must have a non-negative row stride, got strides "
                              << strides_str(t);
  }
}

// A softmax scale: the kernels fold it into base-2 exponents and rely on it being > 0.
inline void check_positive_finite(double value, const char* name) {
  if (!(std::isfinite(value) && value > 0.0)) {
    TVM_FFI_THROW(ValueError) << name << " must be positive and finite, got " << value;
  }
}

// The kernels' element type of t; false when t's dtype is none of them.
inline bool element_dtype(const TensorView& t, DType* out) {
  if (is_bf16(t)) {
    *out = DType::kBF16;
  } else if (is_fp16(t)) {
    *out = DType::kFP16;
  } else {
    return false;
  }
  return true;
}

// t's dtype must be one of an op's capability table (its config.h's kDtypes); returns it.
template <std::size_t N>
DType check_dtype_in(const TensorView& t, const DType (&table)[N], const char* name) {
  DType dtype{};
  if (!element_dtype(t, &dtype) || !caps::contains(table, dtype)) {
    TVM_FFI_THROW(TypeError) << name << " must have dtype " << caps::listed(table, " or ")
                             << ", got " << dtype_name(t.dtype());
  }
  return dtype;
}

// Narrow a 64-bit size or stride that a kernel indexes with 32-bit math.
inline int32_t narrow_to_int32(int64_t value, const char* what) {
  if (value < 0 || value > INT32_MAX) {
    TVM_FFI_THROW(ValueError) << what << " must fit in 32 bits (0.." << INT32_MAX << "), got "
                              << value;
  }
  return static_cast<int32_t>(value);
}

}  // namespace flash_mla::api
