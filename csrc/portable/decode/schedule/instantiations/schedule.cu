// The dense-decode split-KV schedule kernel (one instance: it has no template axes).
#include "../../../../common/kernel_registry.h"
#include "../kernel.cuh"

namespace flash_mla::portable::decode_schedule {

FLASH_MLA_REGISTER_KERNEL(dense_decode_schedule, "dense_decode_schedule", "split-KV schedule",
                          0, kThreads);

}  // namespace flash_mla::portable::decode_schedule
