// A registry of the kernels compiled into the library, read by build_info().
//
// Each instantiation file registers the kernels it holds at load time:
//
//   FLASH_MLA_REGISTER_KERNEL(dense_prefill_fwd_bf16_d128, "dense_prefill_fwd",
//                             "bf16 d128 causal", kSmemBytes, kThreads);
//
// cuobjdump shows static shared memory only, so the dynamic shared memory each
// kernel asks for at launch is recorded here (a constexpr of the kernel's
// config), and the wheel verifier reads it from build_info().
#pragma once

#include <cstdint>
#include <string>

#include "limits.h"

namespace flash_mla {

struct KernelRecord {
  const char* op;             // API op the kernel serves, e.g. "dense_prefill_fwd"
  const char* variant;        // human-readable variant, e.g. "bf16 d128 causal"
  int64_t dynamic_smem_bytes; // what the launch passes as dynamic shared memory
  int threads_per_block;
  // False for a kernel that needs more shared memory than sm_120 has and is launched
  // only where the device allows it (its sm_120 build, if any, is never launched).
  bool runs_on_sm120 = true;
  // Space-separated pieces of the kernel's mangled symbol, all of which occur in it and
  // in no other kernel's, e.g. "24dense_bwd_main128_kernelI 4BF16ELi64ELi64E" (the
  // length-prefixed name keeps dense_bwd_main_kernel from matching main128): the wheel
  // check joins a cubin to its own record through them. "" joins by op name.
  const char* symbol = "";
};

// What one API op supports, as JSON mapping a feature name to the list of
// values it accepts, e.g. for "dense_prefill_fwd":
//   {"dtype": ["bf16", "fp16"], "head_dims": [[64, 64], [128, 128], [192, 128]]}
// build_info() reports it under "ops"; the Python dispatch asks it before
// choosing the native backend. The function builds the JSON from the op's constexpr
// capability tables (capabilities.h), which the C++ validation and dispatch also read.
struct OpCapability {
  const char* op;
  std::string (*capabilities_json)();
};

// Defined in csrc/common/kernel_registry.cpp; each returns its argument's index.
int register_kernel(const KernelRecord& record);
int kernel_count();
const KernelRecord& kernel_at(int index);

int register_op(const OpCapability& capability);
int op_count();
const OpCapability& op_at(int index);

}  // namespace flash_mla

// FLASH_MLA_REGISTER_KERNEL_SYMBOL names pieces of the kernel's mangled symbol
// (KernelRecord::symbol); FLASH_MLA_REGISTER_KERNEL leaves them empty (joined by op name).
#define FLASH_MLA_REGISTER_KERNEL(id, op, variant, smem_bytes, threads) \
  FLASH_MLA_REGISTER_KERNEL_SYMBOL(id, op, variant, smem_bytes, threads, "")

#define FLASH_MLA_REGISTER_KERNEL_SYMBOL(id, op, variant, smem_bytes, threads, symbol)     \
  static_assert((smem_bytes) <= ::flash_mla::kMaxSmemPerBlockSm120,                       \
                "kernel " #id " needs more shared memory than sm_120 allows (101376 B)"); \
  static const int flash_mla_kernel_record_##id = ::flash_mla::register_kernel(           \
      ::flash_mla::KernelRecord{op, variant, smem_bytes, threads, true, symbol})

// A kernel launched only on GPUs whose blocks may opt in to smem_bytes (more than
// sm_120's 99 KB, at most the 227 KB of H100/H200 and B200); build_info marks it so
// the wheel check does not hold sm_120 cubins to its size.
#define FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(id, op, variant, smem_bytes, threads, symbol) \
  static_assert((smem_bytes) <= ::flash_mla::kMaxSmemPerBlockLarge,                       \
                "kernel " #id " needs more shared memory than any GPU allows (232448 B)");  \
  static const int flash_mla_kernel_record_##id = ::flash_mla::register_kernel(            \
      ::flash_mla::KernelRecord{op, variant, smem_bytes, threads, false, symbol})

// The op name is an identifier, so the registry id and the reported name cannot differ:
//   FLASH_MLA_REGISTER_OP(dense_prefill_fwd, portable::dense_fwd::capabilities_json);
#define FLASH_MLA_REGISTER_OP(op, capabilities_json_fn) \
  static const int flash_mla_op_record_##op =            \
      ::flash_mla::register_op(::flash_mla::OpCapability{#op, capabilities_json_fn})
