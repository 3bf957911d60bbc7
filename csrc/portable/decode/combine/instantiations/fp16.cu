// Split-KV combine, fp16 output: one kernel per 128-column chunk count (d_v <= 128,
// 256, 384, 512). The dispatch in csrc/api/combine.cu picks chunks_for(d_v).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::combine {

template void run_combine<__half, 1>(const CombineParams&);
template void run_combine<__half, 2>(const CombineParams&);
template void run_combine<__half, 3>(const CombineParams&);
template void run_combine<__half, 4>(const CombineParams&);

FLASH_MLA_REGISTER_KERNEL(combine_fp16_dv128, "combine", "fp16 d_v<=128", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_fp16_dv256, "combine", "fp16 d_v<=256", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_fp16_dv384, "combine", "fp16 d_v<=384", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_fp16_dv512, "combine", "fp16 d_v<=512", kDynamicSmemBytes, kThreads);

}  // namespace flash_mla::combine
