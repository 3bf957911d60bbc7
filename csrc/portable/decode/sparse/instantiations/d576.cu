// Portable sparse MLA decode, d_qk 576: the V32 cache (V = the first 512 dims): the row-block
// CTA with one slab (h_q <= 16) and two, the narrow CTA and the 64-row CTA (its body only
// on sm_90 / sm_100, a trap elsewhere).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"
#include "../kernel_64rows.cuh"
#include "../kernel_narrow.cuh"

namespace flash_mla::portable::sparse_decode {

template void run_sparse_decode<576, 1>(const SparseDecodeParams&);
template void run_sparse_decode<576, 2>(const SparseDecodeParams&);
template void run_sparse_decode_narrow<576>(const SparseDecodeParams&);
template void run_sparse_decode_64rows<576>(const SparseDecodeParams&);
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d576_m16, "sparse_decode",
                                 "bf16 d576 dv512 V32 16 rows",
                                 (Layout<576, 1>::kSmemBytes), kThreads,
                                 "20sparse_decode_kernelILi576ELi1E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d576_m32, "sparse_decode",
                                 "bf16 d576 dv512 V32 32 rows",
                                 (Layout<576, 2>::kSmemBytes), kThreads,
                                 "20sparse_decode_kernelILi576ELi2E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(sparse_decode_bf16_d576_narrow, "sparse_decode",
                                 "bf16 d576 dv512 V32 16 rows narrow",
                                 (NarrowLayout<576>::kSmemBytes), kThreads,
                                 "27sparse_decode_narrow_kernelILi576E");
FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(sparse_decode_bf16_d576_rows64, "sparse_decode",
                                     "bf16 d576 dv512 V32 64 rows",
                                     (rows64::Layout<576>::kSmemBytes), rows64::kThreads,
                                     "27sparse_decode_64rows_kernelILi576E");

}  // namespace flash_mla::portable::sparse_decode
