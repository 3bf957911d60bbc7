// Portable dense prefill forward, (d_qk, d_v) = (128, 128): bf16 and fp16, causal
// and not (the causal switch is inside run_dense_prefill_fwd).
#include "../kernel.cuh"

namespace flash_mla::portable::dense_fwd {
template void run_dense_prefill_fwd<DType::kBF16, 128, 128>(const DensePrefillFwdParams&, CtaLayout);
template void run_dense_prefill_fwd<DType::kFP16, 128, 128>(const DensePrefillFwdParams&, CtaLayout);
}  // namespace flash_mla::portable::dense_fwd
