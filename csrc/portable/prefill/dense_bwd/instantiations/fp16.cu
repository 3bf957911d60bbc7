// Dense MHA prefill backward, fp16: the three (d_qk, d_v) pairs; causal and
// non-causal are switched inside run_dense_prefill_bwd.
#include "../kernel.cuh"

namespace flash_mla::portable::dense_bwd {

template void run_dense_prefill_bwd<FP16, 64, 64>(const DensePrefillBwdParams&, BwdLayout);
template void run_dense_prefill_bwd<FP16, 128, 128>(const DensePrefillBwdParams&, BwdLayout);
template void run_dense_prefill_bwd<FP16, 192, 128>(const DensePrefillBwdParams&, BwdLayout);

}  // namespace flash_mla::portable::dense_bwd
