// Split-KV combine, bf16 output: one kernel per 128-column chunk count (d_v <= 128,
// 256, 384, 512). The dispatch in csrc/api/combine.cu picks chunks_for(d_v).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::combine {

template void run_combine<__nv_bfloat16, 1>(const CombineParams&);
template void run_combine<__nv_bfloat16, 2>(const CombineParams&);
template void run_combine<__nv_bfloat16, 3>(const CombineParams&);
template void run_combine<__nv_bfloat16, 4>(const CombineParams&);

FLASH_MLA_REGISTER_KERNEL(combine_bf16_dv128, "combine", "bf16 d_v<=128", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_bf16_dv256, "combine", "bf16 d_v<=256", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_bf16_dv384, "combine", "bf16 d_v<=384", kDynamicSmemBytes, kThreads);
FLASH_MLA_REGISTER_KERNEL(combine_bf16_dv512, "combine", "bf16 d_v<=512", kDynamicSmemBytes, kThreads);

}  // namespace flash_mla::combine
