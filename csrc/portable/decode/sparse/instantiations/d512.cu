// Portable sparse MLA decode, d_qk 512: the V32_NO_ROPE, V4, V41 and V41_FP4 caches, in
// any pairing of main and extra pool (V = the first 512 dims).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::sparse_decode {

template void run_sparse_decode<512>(const SparseDecodeParams&);
FLASH_MLA_REGISTER_KERNEL(sparse_decode_bf16_d512, "sparse_decode",
                          "bf16 d512 dv512 V32_NO_ROPE|V4|V41|V41_FP4",
                          Layout<512>::kSmemBytes, kThreads);

}  // namespace flash_mla::portable::sparse_decode
