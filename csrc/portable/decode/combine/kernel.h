// Split-KV combine: launch declaration only, so csrc/api/ never includes CUDA
// kernel code. Definitions: kernel.cuh, instantiated in instantiations/*.cu.
#pragma once

#include "../../../params.h"

namespace flash_mla::combine {

// Out is T = __nv_bfloat16 or __half; kChunks = chunks_for(params.d_v) (1..4).
// Launches on params.stream; the caller has validated params (api/combine.cu).
template <typename T, int kChunks>
void run_combine(const CombineParams& params);

}  // namespace flash_mla::combine
