// Launch entry of the portable dense MHA prefill forward (mma.sync + ldmatrix +
// cp.async: sm_80 .. sm_121). Declaration only, so the API layer includes no
// kernel code.
#pragma once

#include "../../../params.h"

namespace flash_mla::portable::dense_fwd {

// kDType: DType::kBF16 or kFP16; (kDQK, kDV) one of config.h's head-dim pairs;
// num_warps 8 or 4 (config.h: choose_num_warps). params.is_causal is switched inside. Launches on params.stream and never
// synchronises; the caller reads cudaGetLastError() afterwards.
template <DType kDType, int kDQK, int kDV>
void run_dense_prefill_fwd(const DensePrefillFwdParams& params, int num_warps);

}  // namespace flash_mla::portable::dense_fwd
