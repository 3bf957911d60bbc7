// Wide CTA of the portable sparse MLA prefill (8 warps, 64 heads), bf16, d_qk 576; launched
// only where a block may opt in to its shared memory (H100/H200, B200).
#include "../../../../common/kernel_registry.h"
#include "../kernel_wide.cuh"

namespace flash_mla::portable::sparse_prefill {

template void run_sparse_prefill_wide<576>(const SparsePrefillParams&);
FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(sparse_prefill_wide_bf16_d576, "sparse_prefill",
                                     "wide bf16 d576 dv512", wide::Layout<576>::kSmemBytes,
                                     wide::kThreads, "26sparse_prefill_wide_kernelILi576E");

}  // namespace flash_mla::portable::sparse_prefill
