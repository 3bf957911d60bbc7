// Launch entry of the portable dense MLA decode (mma.sync + ldmatrix + cp.async: sm_80 ..
// sm_121). Declaration only, so the API layer includes no kernel code.
#pragma once

#include "../../../params.h"
#include "config.h"

namespace flash_mla::portable::dense_decode {

// kDType: one of config.h's kDtypes; cta: the CTA shape (config.h choose_cta, or one the
// host forces: both serve every shape). Launches the decode over every (part, kv head, row
// block) on params.stream (causal switched inside) and never synchronises; the caller
// launches the combine afterwards and reads cudaGetLastError().
template <DType kDType>
void run_dense_decode(const DenseDecodeParams& params, CtaShape cta);

}  // namespace flash_mla::portable::dense_decode
