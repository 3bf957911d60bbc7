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

#include "limits.h"

namespace flash_mla {

struct KernelRecord {
  const char* op;             // API op the kernel serves, e.g. "dense_prefill_fwd"
  const char* variant;        // human-readable variant, e.g. "bf16 d128 causal"
  int64_t dynamic_smem_bytes; // what the launch passes as dynamic shared memory
  int threads_per_block;
};

// Defined in csrc/common/kernel_registry.cpp; returns its argument's index.
int register_kernel(const KernelRecord& record);
int kernel_count();
const KernelRecord& kernel_at(int index);

}  // namespace flash_mla

#define FLASH_MLA_REGISTER_KERNEL(id, op, variant, smem_bytes, threads)                  \
  static_assert((smem_bytes) <= ::flash_mla::kMaxSmemPerBlockSm120,                       \
                "kernel " #id " needs more shared memory than sm_120 allows (101376 B)"); \
  static const int flash_mla_kernel_record_##id =                                         \
      ::flash_mla::register_kernel(::flash_mla::KernelRecord{op, variant, smem_bytes, threads})
