// tvm-ffi entry point build_info() -> str: what this library was built with and
// what it holds, as JSON. Needs no GPU (it only reads compile-time constants and
// the kernel registry), so the Python loader can call it on any machine:
//   {"version": "0.1.0", "cuda_version": "13.0", "targets": ["80", "90a", "120f"],
//    "ptx": "120", "compiler": "gcc 12.2", "tensormap_alignment": 128,
//    "kernels": [{"op": "combine", "variant": "bf16 d_v<=512",
//                 "dynamic_smem_bytes": 0, "threads": 128, "runs_on_sm120": true,
//                 "symbol": ""}, ...],
//    "ops": {"combine": {"dtype": ["bf16", "fp16"], ...}, ...}}
// FLASH_MLA_VERSION, FLASH_MLA_TARGETS (targets joined by '_') and FLASH_MLA_PTX
// are pp-numbers set by the build (flash_mla_build/build.py) and stringified here,
// which needs no quoting on any shell.
//
// Also env_allocator_available(any tensor) -> bool: whether the caller's framework
// installed its DLPack tensor allocator for the call (env_alloc.h), which the entries
// that allocate their own outputs need. Python asks on each native call that takes the
// full path (flash_mla/_native.py env_allocator_available).
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include "../common/kernel_registry.h"
#include "env_alloc.h"

#define FLASH_MLA_STR_(x) #x
#define FLASH_MLA_STR(x) FLASH_MLA_STR_(x)

#ifndef FLASH_MLA_VERSION
#define FLASH_MLA_VERSION 0.0.0
#endif
#ifndef FLASH_MLA_TARGETS
#define FLASH_MLA_TARGETS 0
#endif
#ifndef FLASH_MLA_PTX
#define FLASH_MLA_PTX 0
#endif

namespace flash_mla::api {

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string targets_json() {
  const std::string all = FLASH_MLA_STR(FLASH_MLA_TARGETS);
  std::string out = "[";
  size_t start = 0;
  bool first = true;
  while (start <= all.size()) {
    size_t end = all.find('_', start);
    if (end == std::string::npos) end = all.size();
    const std::string name = all.substr(start, end - start);
    if (!name.empty() && name != "0") {
      out += (first ? "" : ", ") + json_string(name);
      first = false;
    }
    start = end + 1;
  }
  return out + "]";
}

std::string compiler_name() {
#if defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#elif defined(__clang__)
  return "clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__);
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  return "unknown";
#endif
}

std::string build_info() {
  const std::string ptx = FLASH_MLA_STR(FLASH_MLA_PTX);
  std::string json = "{";
  json += "\"version\": " + json_string(FLASH_MLA_STR(FLASH_MLA_VERSION));
  json += ", \"cuda_version\": " + json_string(std::to_string(CUDART_VERSION / 1000) + "." +
                                               std::to_string((CUDART_VERSION % 1000) / 10));
  json += ", \"targets\": " + targets_json();
  json += ", \"ptx\": " + (ptx == "0" ? std::string("null") : json_string(ptx));
  json += ", \"compiler\": " + json_string(compiler_name());
  // 64 under MSVC with the patch layer's cuda.h fix, 128 with CUDA 13 headers as shipped.
  json += ", \"tensormap_alignment\": " + std::to_string(alignof(CUtensorMap));
  json += ", \"kernels\": [";
  for (int i = 0; i < kernel_count(); ++i) {
    const KernelRecord& k = kernel_at(i);
    json += (i ? ", " : "");
    json += "{\"op\": " + json_string(k.op) + ", \"variant\": " + json_string(k.variant) +
            ", \"dynamic_smem_bytes\": " + std::to_string(k.dynamic_smem_bytes) +
            ", \"threads\": " + std::to_string(k.threads_per_block) +
            ", \"runs_on_sm120\": " + (k.runs_on_sm120 ? "true" : "false") +
            ", \"symbol\": " + json_string(k.symbol ? k.symbol : "") + "}";
  }
  json += "], \"ops\": {";
  for (int i = 0; i < op_count(); ++i) {
    const OpCapability& op = op_at(i);
    json += (i ? ", " : "");
    json += json_string(op.op) + ": " + op.capabilities_json();
  }
  json += "}}";
  return json;
}

// `any`: a tensor of the caller's framework; passing it is what installs the allocator.
bool env_allocator_available(tvm::ffi::TensorView any) {
  static_cast<void>(any);
  return env_allocator_set();
}

}  // namespace

}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(build_info, flash_mla::api::build_info);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(env_allocator_available, flash_mla::api::env_allocator_available);
