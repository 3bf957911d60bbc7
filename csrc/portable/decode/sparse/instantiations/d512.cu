// Portable sparse MLA decode, d_qk 512: the V32_NO_ROPE, V4, V41 and V41_FP4 caches, in
// any pairing of main and extra pool (V = the first 512 dims): the row-block CTA with one
// slab (h_q <= 16) and two, the narrow CTA and the 64-row CTA (its body only on sm_90 /
// sm_100, a trap elsewhere).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"
#include "../kernel_64rows.cuh"
#include "../kernel_narrow.cuh"

namespace flash_mla::portable::sparse_decode {

template void run_sparse_decode<512, 1>(const SparseDecodeParams&);
template void run_sparse_decode<512, 2>(const SparseDecodeParams&);
template void run_sparse_decode_narrow<512>(const SparseDecodeParams&);
template void run_sparse_decode_64rows<512>(const SparseDecodeParams&);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d512_m16, "sparse_decode",
                                 "bf16 d512 dv512 V32_NO_ROPE|V4|V41|V41_FP4 16 rows",
                                 (Layout<512, 1>::kSmemBytes), kThreads,
                                 "20sparse_decode_kernelILi512ELi1E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d512_m32, "sparse_decode",
                                 "bf16 d512 dv512 V32_NO_ROPE|V4|V41|V41_FP4 32 rows",
                                 (Layout<512, 2>::kSmemBytes), kThreads,
                                 "20sparse_decode_kernelILi512ELi2E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d512_narrow, "sparse_decode",
                                 "bf16 d512 dv512 V32_NO_ROPE|V4|V41|V41_FP4 16 rows narrow",
                                 (NarrowLayout<512>::kSmemBytes), kThreads,
                                 "27sparse_decode_narrow_kernelILi512E");
FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(sparse_decode_bf16_d512_rows64, "sparse_decode",
                                     "bf16 d512 dv512 V32_NO_ROPE|V4|V41|V41_FP4 64 rows",
                                     (rows64::Layout<512>::kSmemBytes), rows64::kThreads,
                                     "27sparse_decode_64rows_kernelILi512E");

}  // namespace flash_mla::portable::sparse_decode
