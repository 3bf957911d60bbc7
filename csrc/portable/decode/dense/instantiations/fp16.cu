// Portable dense MLA decode, fp16 (causal and not: switched inside run_dense_decode).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::dense_decode {

template void run_dense_decode<DType::kFP16>(const DenseDecodeParams&, CtaShape);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_fp16, "dense_decode",
                                 "fp16 d576 dv512, causal|full", kSmemBytes, kThreads,
                                 "19dense_decode_kernelI 4FP16E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_decode_wide_fp16, "dense_decode",
                                 "fp16 d576 dv512 wide (over 32 rows per kv head), causal|full",
                                 kWideSmemBytes, kWideThreads, "24dense_decode_wide_kernelI 4FP16E");

}  // namespace flash_mla::portable::dense_decode
