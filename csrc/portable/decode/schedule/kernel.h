// Launch entry of the dense-decode split-KV schedule (declaration only, so the API layer
// includes no kernel code).
#pragma once

#include "../../../params.h"
#include "config.h"

namespace flash_mla::portable::decode_schedule {

// Fills params.metadata [num_parts, kMetaInts] and params.split_offsets [batch + 1] from
// params.seqlens on params.stream; one CTA, no host synchronisation (CUDA-graph safe).
void run_dense_decode_schedule(const DenseDecodeScheduleParams& params);

}  // namespace flash_mla::portable::decode_schedule
