// tvm-ffi entries of the dense MHA prefill forward (FlashMLA's
// flash_mla.cuda.dense_prefill_fwd, same positional signature):
//
//   dense_prefill_fwd(workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
//                     mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv,
//                     is_varlen) -> None
//   dense_prefill_fwd_workspace_bytes(batch, total_q, total_k, h_q, h_k, d_qk, d_v) -> int
//
// The forward needs no scratch memory (no split-KV, no atomics): the workspace
// size is 0 and the workspace argument is only validated, kept for FlashMLA
// compatibility. The kernel always reads cu_seqlens, which is right for fixed-
// length batches too, so is_varlen is accepted and needs no separate path.
// max_seqlen_q / max_seqlen_kv must be upper bounds of the per-sequence lengths
// (the grid covers max_seqlen_q; checking it would need a device sync).
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include "../common/kernel_registry.h"
#include "../params.h"
#include "../portable/prefill/dense_fwd/config.h"
#include "../portable/prefill/dense_fwd/kernel.h"
#include "checks.h"
#include "launch.h"

namespace flash_mla::api {
namespace {

namespace fwd = ::flash_mla::portable::dense_fwd;

// Kernels compiled into the library, with the dynamic shared memory they launch
// with (each record stands for the causal and the non-causal instance) and the pieces
// of their mangled symbol (KernelRecord::symbol: template, element type, head dims and,
// for the 8- and 4-warp CTAs, the warp count).
template <int kDQK, int kDV, int kWarps>
constexpr int kFwdSmem = fwd::Config<kDQK, kDV, kWarps>::kSmemBytes;
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d64_w8, "dense_prefill_fwd", "bf16 d64 dv64 8 warps, causal|full", (kFwdSmem<64, 64, 8>), 256, "24dense_prefill_fwd_kernelI 4BF16ELi64ELi64E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d64_w8, "dense_prefill_fwd", "fp16 d64 dv64 8 warps, causal|full", (kFwdSmem<64, 64, 8>), 256, "24dense_prefill_fwd_kernelI 4FP16ELi64ELi64E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d128_w8, "dense_prefill_fwd", "bf16 d128 dv128 8 warps, causal|full", (kFwdSmem<128, 128, 8>), 256, "24dense_prefill_fwd_kernelI 4BF16ELi128ELi128E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d128_w8, "dense_prefill_fwd", "fp16 d128 dv128 8 warps, causal|full", (kFwdSmem<128, 128, 8>), 256, "24dense_prefill_fwd_kernelI 4FP16ELi128ELi128E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d192_w8, "dense_prefill_fwd", "bf16 d192 dv128 8 warps, causal|full", (kFwdSmem<192, 128, 8>), 256, "24dense_prefill_fwd_kernelI 4BF16ELi192ELi128E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d192_w8, "dense_prefill_fwd", "fp16 d192 dv128 8 warps, causal|full", (kFwdSmem<192, 128, 8>), 256, "24dense_prefill_fwd_kernelI 4FP16ELi192ELi128E ELi8EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d64_w4, "dense_prefill_fwd", "bf16 d64 dv64 4 warps, causal|full", (kFwdSmem<64, 64, 4>), 128, "24dense_prefill_fwd_kernelI 4BF16ELi64ELi64E ELi4EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d64_w4, "dense_prefill_fwd", "fp16 d64 dv64 4 warps, causal|full", (kFwdSmem<64, 64, 4>), 128, "24dense_prefill_fwd_kernelI 4FP16ELi64ELi64E ELi4EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d128_w4, "dense_prefill_fwd", "bf16 d128 dv128 4 warps, causal|full", (kFwdSmem<128, 128, 4>), 128, "24dense_prefill_fwd_kernelI 4BF16ELi128ELi128E ELi4EEEv");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d128_w4, "dense_prefill_fwd", "fp16 d128 dv128 4 warps, causal|full", (kFwdSmem<128, 128, 4>), 128, "24dense_prefill_fwd_kernelI 4FP16ELi128ELi128E ELi4EEEv");
template <int kDQK, int kDV>
constexpr int kFwdSmem4x32 = fwd::WideConfig<kDQK, kDV>::kSmemBytes;
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d64_w4x32, "dense_prefill_fwd", "bf16 d64 dv64 4 warps x 32 rows, causal|full", (kFwdSmem4x32<64, 64>), 128, "29dense_prefill_fwd_4x32_kernelI 4BF16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d64_w4x32, "dense_prefill_fwd", "fp16 d64 dv64 4 warps x 32 rows, causal|full", (kFwdSmem4x32<64, 64>), 128, "29dense_prefill_fwd_4x32_kernelI 4FP16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d128_w4x32, "dense_prefill_fwd", "bf16 d128 dv128 4 warps x 32 rows, causal|full", (kFwdSmem4x32<128, 128>), 128, "29dense_prefill_fwd_4x32_kernelI 4BF16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d128_w4x32, "dense_prefill_fwd", "fp16 d128 dv128 4 warps x 32 rows, causal|full", (kFwdSmem4x32<128, 128>), 128, "29dense_prefill_fwd_4x32_kernelI 4FP16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_bf16_d192_w4x32, "dense_prefill_fwd", "bf16 d192 dv128 4 warps x 32 rows, causal|full", (kFwdSmem4x32<192, 128>), 128, "29dense_prefill_fwd_4x32_kernelI 4BF16ELi192ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_fwd_fp16_d192_w4x32, "dense_prefill_fwd", "fp16 d192 dv128 4 warps x 32 rows, causal|full", (kFwdSmem4x32<192, 128>), 128, "29dense_prefill_fwd_4x32_kernelI 4FP16ELi192ELi128E");

FLASH_MLA_REGISTER_OP(dense_prefill_fwd, fwd::capabilities_json);

// cp.async moves 16-byte chunks: every row/head stride must be a multiple of 8
// elements and the data 16-byte aligned.
void check_row_head_strides(const TensorView& t, const char* name) {
  for (int i = 0; i < 2; ++i) {
    if (t.stride(i) < 0 || t.stride(i) % 8 != 0) {
      TVM_FFI_THROW(ValueError) << name << " must have non-negative row and head strides that are "
                                << "multiples of 8 elements (16 bytes), got strides "
                                << strides_str(t);
    }
  }
  check_aligned(t, 16, name);
}

int64_t fwd_workspace_bytes(int64_t batch, int64_t total_q, int64_t total_k, int64_t h_q,
                            int64_t h_k, int64_t d_qk, int64_t d_v) {
  if (batch < 0 || total_q < 0 || total_k < 0 || h_q < 1 || h_k < 1) {
    TVM_FFI_THROW(ValueError) << "dense_prefill_fwd_workspace_bytes needs batch, total_q, total_k "
                              << ">= 0 and h_q, h_k >= 1, got batch=" << batch << ", total_q="
                              << total_q << ", total_k=" << total_k << ", h_q=" << h_q
                              << ", h_k=" << h_k;
  }
  if (!caps::contains(fwd::kHeadDims, d_qk, d_v)) {
    TVM_FFI_THROW(ValueError) << "(d_qk, d_v) must be one of " << caps::listed(fwd::kHeadDims)
                              << ", got (" << d_qk << ", " << d_v << ")";
  }
  return 0;  // no split-KV partials, no dQ-style accumulators in the forward
}

// All checks of dense_prefill_fwd, in the order device, dtype, layout, shape, values.
DensePrefillFwdParams validate_dense_prefill_fwd(
    const TensorView& workspace, const TensorView& q, const TensorView& k, const TensorView& v,
    const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_kv, const TensorView& out,
    const TensorView& lse, int64_t mask_mode_code, double softmax_scale, int64_t max_seqlen_q,
    int64_t max_seqlen_kv) {
  // --- device ---
  check_cuda(q, "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_same_device(cu_seqlens_q, q, "cu_seqlens_q", "q");
  check_same_device(cu_seqlens_kv, q, "cu_seqlens_kv", "q");
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");
  check_same_device(workspace, q, "workspace", "q");

  // --- dtype ---
  const DType dtype = check_dtype_in(q, fwd::kDtypes, "q");
  const std::string q_dtype = std::string(dtype_torch_name(dtype)) + " (same as q)";
  const DLDataType qd = q.dtype();
  auto same_as_q = [&](const TensorView& t) {
    return t.dtype().code == qd.code && t.dtype().bits == qd.bits && t.dtype().lanes == qd.lanes;
  };
  check_dtype(k, same_as_q(k), "k", q_dtype.c_str());
  check_dtype(v, same_as_q(v), "v", q_dtype.c_str());
  check_dtype(out, same_as_q(out), "out", q_dtype.c_str());
  check_dtype(lse, is_fp32(lse), "lse", "float32");
  check_dtype(cu_seqlens_q, is_int32(cu_seqlens_q), "cu_seqlens_q", "int32");
  check_dtype(cu_seqlens_kv, is_int32(cu_seqlens_kv), "cu_seqlens_kv", "int32");
  check_dtype(workspace, is_uint8(workspace), "workspace", "uint8");

  // --- layout ---
  check_ndim(q, 3, "q", "[total_q, h_q, d_qk]");
  check_ndim(k, 3, "k", "[total_k, h_k, d_qk]");
  check_ndim(v, 3, "v", "[total_k, h_k, d_v]");
  check_ndim(out, 3, "out", "[total_q, h_q, d_v]");
  check_ndim(lse, 2, "lse", "[total_q, h_q]");
  check_ndim(cu_seqlens_q, 1, "cu_seqlens_q", "[batch + 1]");
  check_ndim(cu_seqlens_kv, 1, "cu_seqlens_kv", "[batch + 1]");
  check_ndim(workspace, 1, "workspace", "[bytes]");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_last_dim_contiguous(out, "out");
  check_row_head_strides(q, "q");
  check_row_head_strides(k, "k");
  check_row_head_strides(v, "v");
  check_row_head_strides(out, "out");
  check_contiguous(cu_seqlens_q, "cu_seqlens_q");
  check_contiguous(cu_seqlens_kv, "cu_seqlens_kv");
  if (lse.size(0) > 1 && lse.stride(0) != 1) {
    TVM_FFI_THROW(ValueError) << "lse must be the [total_q, h_q] transpose of a contiguous [h_q, "
                              << "total_q] buffer (stride(0) == 1), got strides " << strides_str(lse);
  }
  if (lse.size(1) > 1 && lse.stride(1) < lse.size(0)) {
    TVM_FFI_THROW(ValueError) << "lse heads must not overlap: stride(1) must be >= total_q = "
                              << lse.size(0) << ", got strides " << strides_str(lse);
  }

  // --- shape ---
  const int64_t total_q = q.size(0), h_q = q.size(1), d_qk = q.size(2);
  const int64_t total_k = k.size(0), h_k = k.size(1), d_v = v.size(2);
  if (!caps::contains(fwd::kHeadDims, d_qk, d_v)) {
    TVM_FFI_THROW(ValueError) << "(d_qk, d_v) from q and v must be one of "
                              << caps::listed(fwd::kHeadDims) << ", got (" << d_qk << ", " << d_v
                              << ") from q shape " << shape_str(q) << " and v shape "
                              << shape_str(v);
  }
  check_shape(k, {total_k, h_k, d_qk}, "k", "[total_k, h_k, d_qk] (d_qk from q)");
  check_shape(v, {total_k, h_k, d_v}, "v", "[total_k, h_k, d_v] (total_k, h_k from k)");
  if (h_q < 1 || h_k < 1 || h_q % h_k != 0) {
    TVM_FFI_THROW(ValueError) << "q heads must be a positive multiple of k heads, got h_q = " << h_q
                              << " (q shape " << shape_str(q) << ") and h_k = " << h_k
                              << " (k shape " << shape_str(k) << ")";
  }
  if (h_q > fwd::kMaxGridYZ) {
    TVM_FFI_THROW(ValueError) << "q may have at most " << fwd::kMaxGridYZ << " heads, got " << h_q;
  }
  check_shape(out, {total_q, h_q, d_v}, "out", "[total_q, h_q, d_v]");
  check_shape(lse, {total_q, h_q}, "lse", "[total_q, h_q]");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  if (batch < 0) {
    TVM_FFI_THROW(ValueError) << "cu_seqlens_q must have batch + 1 >= 1 entries, got shape "
                              << shape_str(cu_seqlens_q);
  }
  check_shape(cu_seqlens_kv, {batch + 1}, "cu_seqlens_kv", "[batch + 1] (batch from cu_seqlens_q)");
  if (batch > fwd::kMaxGridYZ) {
    TVM_FFI_THROW(ValueError) << "cu_seqlens_q may describe at most " << fwd::kMaxGridYZ
                              << " sequences, got " << batch;
  }

  // --- values ---
  if (mask_mode_code != 0 && mask_mode_code != 1) {
    TVM_FFI_THROW(ValueError) << "mask_mode_code must be 0 (no mask) or 1 (causal), got "
                              << mask_mode_code;
  }
  if (!std::isfinite(softmax_scale)) {
    TVM_FFI_THROW(ValueError) << "softmax_scale must be finite, got " << softmax_scale;
  }
  const int32_t max_q = narrow_to_int32(max_seqlen_q, "max_seqlen_q");
  const int32_t max_k = narrow_to_int32(max_seqlen_kv, "max_seqlen_kv");
  const int64_t need = fwd_workspace_bytes(batch, total_q, total_k, h_q, h_k, d_qk, d_v);
  if (workspace.size(0) < need) {
    TVM_FFI_THROW(ValueError) << "workspace must hold at least " << need
                              << " bytes (dense_prefill_fwd_workspace_bytes), got "
                              << workspace.size(0);
  }

  DensePrefillFwdParams p{};
  p.batch = static_cast<int>(batch);
  p.total_q = narrow_to_int32(total_q, "total_q (q.shape[0])");
  p.total_k = narrow_to_int32(total_k, "total_k (k.shape[0])");
  p.h_q = static_cast<int>(h_q);
  p.h_k = static_cast<int>(h_k);
  p.d_qk = static_cast<int>(d_qk);
  p.d_v = static_cast<int>(d_v);
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.is_causal = mask_mode_code == 1;
  p.dtype = dtype;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q = data_ptr(q);
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k = data_ptr(k);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v = data_ptr(v);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_seqlens_q = static_cast<const int32_t*>(data_ptr(cu_seqlens_q));
  p.cu_seqlens_k = static_cast<const int32_t*>(data_ptr(cu_seqlens_kv));
  p.out = data_ptr(out);
  p.out_row_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.lse = static_cast<float*>(data_ptr(lse));
  p.lse_head_stride = lse.stride(1);
  return p;
}

// One kernel instance per kHeadDims entry (validation admitted only listed pairs).
template <DType kDType>
void dispatch_head_dims(const DensePrefillFwdParams& p, fwd::CtaLayout layout) {
  caps::for_each_entry<std::size(fwd::kHeadDims)>([&](auto i) {
    constexpr caps::HeadDims kDims = fwd::kHeadDims[decltype(i)::value];
    if (p.d_qk == kDims.d_qk && p.d_v == kDims.d_v) {
      fwd::run_dense_prefill_fwd<kDType, kDims.d_qk, kDims.d_v>(p, layout);
    }
  });
}

// CTA layout for `device` and d_qk (config.h: choose_layout). The environment
// variable FLASH_MLA_DENSE_FWD_WARPS=8|4|4x32 forces one, so all are tested on one
// GPU (the 8-warp CTA, sm_120's, is validated on Hopper that way; 4 applies to
// d_qk <= 128 only, 4x32 to every d_qk); it is read on every call, no process-wide state.
fwd::CtaLayout layout_for(int device, int d_qk) {
  const std::string forced = forced_variant("FLASH_MLA_DENSE_FWD_WARPS");
  if (!forced.empty()) {
    if (forced == "8") return fwd::CtaLayout::kWarps8;
    if (forced == "4") return fwd::CtaLayout::kWarps4;
    if (forced == "4x32") return fwd::CtaLayout::kWarps4x32;
    TVM_FFI_THROW(ValueError) << "FLASH_MLA_DENSE_FWD_WARPS must be 8, 4 or 4x32 (or unset), got '"
                              << forced << "'";
  }
  return fwd::choose_layout(max_smem_per_sm(device), d_qk);
}

void dense_prefill_fwd(TensorView workspace, TensorView q, TensorView k, TensorView v,
                       TensorView cu_seqlens_q, TensorView cu_seqlens_kv, TensorView out,
                       TensorView lse, int64_t mask_mode_code, double softmax_scale,
                       int64_t max_seqlen_q, int64_t max_seqlen_kv, bool is_varlen) {
  (void)is_varlen;  // see the file comment: cu_seqlens are always read
  DensePrefillFwdParams p =
      validate_dense_prefill_fwd(workspace, q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
                                 mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv);
  if (p.batch == 0 || p.total_q == 0 || p.max_seqlen_q == 0) return;  // nothing to write

  const int device = q.device().device_id;
  DeviceGuard guard(device);
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device);
  p.stream = current_stream(device);

  const fwd::CtaLayout layout = layout_for(device, p.d_qk);
  caps::for_each_entry<std::size(fwd::kDtypes)>([&](auto i) {
    constexpr DType kDType = fwd::kDtypes[decltype(i)::value];
    if (p.dtype == kDType) dispatch_head_dims<kDType>(p, layout);
  });
  check_launch("dense_prefill_fwd");
}

}  // namespace
}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_prefill_fwd, flash_mla::api::dense_prefill_fwd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_prefill_fwd_workspace_bytes, flash_mla::api::fwd_workspace_bytes);
