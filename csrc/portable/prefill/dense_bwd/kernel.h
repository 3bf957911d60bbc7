// Launch entry of the portable dense MHA prefill backward (mma.sync, sm_80+ and
// sm_120). Declaration only, so the API layer stays free of kernel code.
#pragma once

#include "../../../params.h"

namespace flash_mla::portable {
struct BF16;  // element tags, defined in common/element.cuh
struct FP16;
}  // namespace flash_mla::portable

namespace flash_mla::portable::dense_bwd {

enum class BwdLayout : int;  // config.h

// Elem: flash_mla::portable::BF16 or FP16; causal is switched inside the
// instantiation. Launches four kernels on params.stream (preprocess, main,
// outside rows, dQ convert); never synchronises. params.workspace must hold
// workspace_bytes(batch, total_q, h_q, d_qk) bytes (config.h). layout picks the main
// kernel's CTA (config.h choose_layout); kWarps4 at d_qk = 192 runs the 8-warp CTA.
template <typename Elem, int kDQK, int kDV>
void run_dense_prefill_bwd(const DensePrefillBwdParams& params, BwdLayout layout);

}  // namespace flash_mla::portable::dense_bwd
