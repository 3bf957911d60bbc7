// Portable dense MLA decode, bf16 (causal and not: switched inside run_dense_decode).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::dense_decode {

template void run_dense_decode<DType::kBF16>(const DenseDecodeParams&, CtaShape);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_bf16, "dense_decode",
                                 "bf16 d576 dv512, causal|full", kSmemBytes, kThreads,
                                 "19dense_decode_kernelI 4BF16E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_wide_bf16, "dense_decode",
                                 "bf16 d576 dv512 wide (over 32 rows per kv head), causal|full",
                                 kWideSmemBytes, kWideThreads, "24dense_decode_wide_kernelI 4BF16E");

}  // namespace flash_mla::portable::dense_decode
