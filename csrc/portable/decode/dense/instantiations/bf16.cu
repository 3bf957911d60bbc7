// Portable dense MLA decode, bf16 (causal and not: switched inside run_dense_decode).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::dense_decode {

template void run_dense_decode<DType::kBF16>(const DenseDecodeParams&, CtaShape);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_bf16, "dense_decode",
                                 "bf16 d576 dv512, causal|full", kSmemBytes, kThreads,
                                 "19dense_decode_kernelI 4BF16E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_wide_bf16, "dense_decode",
                                 "bf16 d576 dv512 wide (8 warps, 32 rows, Q in registers), causal|full",
                                 WideCta::kSmemBytes, WideCta::kThreads,
                                 "24dense_decode_wide_kernelI 4BF16E ELi2EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_narrow_bf16, "dense_decode",
                                 "bf16 d576 dv512 narrow (4 warps, 16 rows, Q in registers), causal|full",
                                 NarrowCta::kSmemBytes, NarrowCta::kThreads,
                                 "24dense_decode_wide_kernelI 4BF16E ELi1EEEv");

FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(dense_decode_64rows_bf16, "dense_decode",
                                     "bf16 d576 dv512 64 rows (8 warps, 64-token pages), causal|full",
                                     rows64::kSmemBytes, rows64::kThreads,
                                     "26dense_decode_64rows_kernelI 4BF16E");

}  // namespace flash_mla::portable::dense_decode
