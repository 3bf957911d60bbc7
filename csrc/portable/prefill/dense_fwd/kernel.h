// Launch entry of the portable dense MHA prefill forward (mma.sync + ldmatrix +
// cp.async: sm_80 .. sm_121). Declaration only, so the API layer includes no
// kernel code.
#pragma once

#include "../../../params.h"
#include "config.h"

namespace flash_mla::portable::dense_fwd {

// kDType: DType::kBF16 or kFP16; (kDQK, kDV) one of config.h's head-dim pairs;
// layout: config.h's CtaLayout (choose_layout; the 4-warp ones apply to d_qk <= 128,
// d = 192 always runs 8 warps). params.is_causal is switched inside. Launches on
// params.stream and never synchronises; the caller reads cudaGetLastError() afterwards.
template <DType kDType, int kDQK, int kDV>
void run_dense_prefill_fwd(const DensePrefillFwdParams& params, CtaLayout layout);

}  // namespace flash_mla::portable::dense_fwd
