// Capability tables: what each API op supports, written once as constexpr arrays in the
// config.h of the op's kernel and read by everything that needs the answer:
//   - the op's validation in csrc/api/<op>.cu (contains(), listed() for the message),
//   - its dispatch (for_each_entry() instantiates exactly the listed entries, so an entry
//     without an instantiation file fails to link and a listed value can never fall
//     through to another kernel),
//   - build_info()'s "ops" JSON (JsonObject), which the Python dispatch reads before it
//     chooses the native backend; so Python never restates a table either.
//
// One name per op, unchanged from Python to the kernel registry: the op name is the
// Python dispatch's op, the build_info "ops" key, the FLASH_MLA_REGISTER_OP id and the op
// of its FLASH_MLA_REGISTER_KERNEL records; its tvm-ffi entries start with it:
//   combine            entries: combine
//                      api/combine.cu, table: portable/decode/combine/config.h
//   dense_decode       entries: dense_decode_num_parts, dense_decode_schedule,
//                      dense_decode_fwd (decode, then the combine)
//                      api/dense_decode.cu, table: portable/decode/dense/config.h
//   dense_prefill_fwd  entries: dense_prefill_fwd, dense_prefill_fwd_workspace_bytes
//                      api/dense_prefill_fwd.cu, table: portable/prefill/dense_fwd/config.h
//   dense_prefill_bwd  entries: dense_prefill_bwd, dense_prefill_bwd_deterministic,
//                      dense_prefill_bwd_workspace_bytes
//                      api/dense_prefill_bwd.cu, table: portable/prefill/dense_bwd/config.h
//   sparse_decode      entries: sparse_decode_num_parts, sparse_decode_fwd (decode, then
//                      the combine); its schedule is dense_decode_schedule's kernel
//                      api/sparse_decode.cu, table: portable/decode/sparse/config.h
//   sparse_prefill     entries: sparse_prefill_fwd
//                      api/sparse_prefill.cu, table: portable/prefill/sparse/config.h
// A new op adds its row here, its tables to its config.h, a capabilities_json() built
// from them, and FLASH_MLA_REGISTER_OP(<op name>, <its capabilities_json>) in its API file.
//
// Host and device code may include this header (no CUDA headers): config.h files do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "dtype.h"

namespace flash_mla::caps {

// A (d_qk, d_v) pair of an attention kernel; JSON [d_qk, d_v].
struct HeadDims {
  int d_qk;
  int d_v;
};

constexpr bool operator==(HeadDims a, HeadDims b) { return a.d_qk == b.d_qk && a.d_v == b.d_v; }

// Every multiple of `step` in [first, last]; JSON: the expanded list, so the Python side
// tests membership the same way for every feature.
struct IntRange {
  int first;
  int last;
  int step;
  constexpr bool contains(int64_t v) const {
    return v >= first && v <= last && (v - first) % step == 0;
  }
};

template <typename T, std::size_t N>
constexpr bool contains(const T (&table)[N], T value) {
  for (std::size_t i = 0; i < N; ++i) {
    if (table[i] == value) return true;
  }
  return false;
}

// Head dims as a caller passed them (64-bit tensor sizes: no narrowing before the test).
template <std::size_t N>
constexpr bool contains(const HeadDims (&table)[N], int64_t d_qk, int64_t d_v) {
  for (std::size_t i = 0; i < N; ++i) {
    if (table[i].d_qk == d_qk && table[i].d_v == d_v) return true;
  }
  return false;
}

// Calls f(std::integral_constant<std::size_t, I>{}) for every index I of a table of N
// entries; f reads table[I] in a constant expression to pick a template instance.
template <typename F, std::size_t... I>
void for_each_index(F& f, std::index_sequence<I...>) {
  (f(std::integral_constant<std::size_t, I>{}), ...);
}
template <std::size_t N, typename F>
void for_each_entry(F&& f) {
  for_each_index(f, std::make_index_sequence<N>{});
}

// --- text for error messages: "bfloat16 or float16", "(64, 64), (128, 128)" ---------

inline std::string to_text(DType t) { return dtype_torch_name(t); }
inline std::string to_text(HeadDims h) {
  return "(" + std::to_string(h.d_qk) + ", " + std::to_string(h.d_v) + ")";
}
inline std::string to_text(int v) { return std::to_string(v); }

template <typename T, std::size_t N>
std::string listed(const T (&table)[N], const char* last_separator = ", ") {
  std::string out;
  for (std::size_t i = 0; i < N; ++i) {
    if (i > 0) out += (i + 1 == N) ? last_separator : ", ";
    out += to_text(table[i]);
  }
  return out;
}

// --- JSON for build_info ----------------------------------------------------------

inline std::string to_json(DType t) { return std::string("\"") + dtype_key(t) + "\""; }
inline std::string to_json(HeadDims h) {
  return "[" + std::to_string(h.d_qk) + ", " + std::to_string(h.d_v) + "]";
}
inline std::string to_json(int v) { return std::to_string(v); }

template <typename T, std::size_t N>
std::string to_json(const T (&table)[N]) {
  std::string out = "[";
  for (std::size_t i = 0; i < N; ++i) out += (i ? ", " : "") + to_json(table[i]);
  return out + "]";
}

inline std::string to_json(IntRange r) {
  std::string out = "[";
  for (int v = r.first; v <= r.last; v += r.step) out += (v == r.first ? "" : ", ") + to_json(v);
  return out + "]";
}

// {"feature": [values], ...} in the order the fields are added.
class JsonObject {
 public:
  template <typename Table>
  JsonObject& field(const char* name, const Table& table) {
    text_ += (text_.empty() ? "{\"" : ", \"") + std::string(name) + "\": " + to_json(table);
    return *this;
  }
  std::string str() const { return text_.empty() ? "{}" : text_ + "}"; }

 private:
  std::string text_;
};

}  // namespace flash_mla::caps
