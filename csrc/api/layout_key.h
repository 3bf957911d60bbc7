// The layout key of a decode call's tensors, for the Python repeat path
// (flash_mla/_repeat_call.py). A holder's first native call records the key of its tensors
// (dense_decode_layout_key); every later call passes that key back to a *_repeat entry, which
// compares it here before doing anything else and returns None on any difference, so that
// Python takes the full, validating path. Building the same key in Python (shape, strides,
// dtype and device of four tensors, then a tuple compare) cost about 2.7 us per call on the
// H100's host (docs/dense_decode.md, "Host time of an eager call"); here it is a loop over
// integers the call has converted anyway.
//
// Per tensor, in order: ndim, the shape, the strides, dtype (code, bits, lanes), device
// (type, id). Data pointers are not part of it: the checks that read one (a cache's
// alignment) are redone by the entry's own validation on every call.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>

namespace flash_mla::api {

using tvm::ffi::TensorView;

// Calls f(value) for every integer of t's part of the key, in key order.
template <typename F>
inline void for_each_layout_value(const TensorView& t, F&& f) {
  const int ndim = t.ndim();
  f(ndim);
  for (int i = 0; i < ndim; ++i) f(t.size(i));
  for (int i = 0; i < ndim; ++i) f(t.stride(i));
  const DLDataType dtype = t.dtype();
  f(dtype.code);
  f(dtype.bits);
  f(dtype.lanes);
  const DLDevice device = t.device();
  f(device.device_type);
  f(device.device_id);
}

inline tvm::ffi::Shape layout_key(std::initializer_list<const TensorView*> tensors) {
  std::vector<int64_t> key;
  for (const TensorView* t : tensors) {
    for_each_layout_value(*t, [&](int64_t v) { key.push_back(v); });
  }
  return tvm::ffi::Shape(std::move(key));
}

// Whether `key` (from layout_key) describes exactly these tensors.
inline bool matches_layout_key(const tvm::ffi::Shape& key,
                               std::initializer_list<const TensorView*> tensors) {
  const int64_t* k = key.data();
  const int64_t n = static_cast<int64_t>(key.size());
  int64_t at = 0;
  bool same = true;
  for (const TensorView* t : tensors) {
    for_each_layout_value(*t, [&](int64_t v) {
      same = same && at < n && k[at] == v;
      ++at;
    });
  }
  return same && at == n;
}

}  // namespace flash_mla::api
