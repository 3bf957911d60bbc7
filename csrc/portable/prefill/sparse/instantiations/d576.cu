// Portable sparse MLA prefill, bf16, d_qk 576 (V = the first 512 dims).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::sparse_prefill {

template void run_sparse_prefill<576>(const SparsePrefillParams&);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_prefill_bf16_d576, "sparse_prefill",
                                 "bf16 d576 dv512", Layout<576>::kSmemBytes, kThreads,
                                 "21sparse_prefill_kernelILi576E");

}  // namespace flash_mla::portable::sparse_prefill
