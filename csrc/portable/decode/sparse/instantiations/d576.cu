// Portable sparse MLA decode, d_qk 576: the V32 cache (V = the first 512 dims).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::sparse_decode {

template void run_sparse_decode<576>(const SparseDecodeParams&);
FLASH_MLA_REGISTER_KERNEL(sparse_decode_bf16_d576, "sparse_decode", "bf16 d576 dv512 V32",
                          Layout<576>::kSmemBytes, kThreads);

}  // namespace flash_mla::portable::sparse_decode
