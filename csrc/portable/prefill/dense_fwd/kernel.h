// Launch entry of the portable dense MHA prefill forward (mma.sync + ldmatrix +
// cp.async: sm_80 .. sm_121). Declaration only, so the API layer includes no
// kernel code.
#pragma once

#include "../../../params.h"
#include "config.h"

namespace flash_mla::portable::dense_fwd {

// kDType: DType::kBF16 or kFP16; (kDQK, kDV) one of config.h's head-dim pairs;
// layout: config.h's CtaLayout (choose_layout; the 4 x 16-row CTA exists for d_qk <= 128
// only, so a forced 4 at d = 192 runs 8 warps; 4x32 serves every d_qk).
// params.is_causal is switched inside. Launches on
// params.stream and never synchronises; the caller reads cudaGetLastError() afterwards.
template <DType kDType, int kDQK, int kDV>
void run_dense_prefill_fwd(const DensePrefillFwdParams& params, CtaLayout layout);

}  // namespace flash_mla::portable::dense_fwd
