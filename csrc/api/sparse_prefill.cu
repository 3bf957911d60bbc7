// tvm-ffi entry of the sparse MLA prefill (flash_mla_sparse_fwd):
//
//   sparse_prefill_fwd(q, kv, indices, topk_length_or_None, attn_sink_or_None, out,
//                      max_logits, lse, sm_scale, d_v) -> None
//       q bf16 [s_q, h_q, d_qk] (d_qk 512 or 576), kv bf16 [s_kv, 1, d_qk], indices int32
//       [s_q, 1, topk], topk_length int32 [s_q], attn_sink fp32 [h_q]; writes out bf16
//       [s_q, h_q, 512], max_logits and lse fp32 [s_q, h_q] (natural log) on the caller's
//       stream. An index < 0 or >= s_kv is skipped (never read).
//   The CTA: the wide one (8 warps, 64 heads) where h_q > 32 and the device's blocks may opt
//   in to its shared memory, else the 32-head row block (config.h choose_cta);
//   FLASH_MLA_SPARSE_PREFILL_CTA=wide|rowblock forces one (cta_for).
// Layouts: SparsePrefillParams in csrc/portable/prefill/sparse/kernel.h; design:
// docs/sparse_prefill.md. Validation happens in one function, in the order device, dtype,
// layout, shape, values; a wrong call raises ValueError or TypeError and never reaches the
// kernel.
#include <cstdint>
#include <iterator>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include "../common/capabilities.h"
#include "../common/kernel_registry.h"
#include "../portable/prefill/sparse/config.h"
#include "../portable/prefill/sparse/kernel.h"
#include "checks.h"
#include "launch.h"

namespace flash_mla::api {
namespace {

using tvm::ffi::Optional;
namespace sp = ::flash_mla::portable::sparse_prefill;

FLASH_MLA_REGISTER_OP(sparse_prefill, sp::capabilities_json);

// The CTA for this call (config.h choose_cta). FLASH_MLA_SPARSE_PREFILL_CTA=wide|rowblock
// forces one, so both are tested and timed at any head count where the device allows; read
// on every call, no process-wide state.
sp::Cta cta_for(int device, int h_q, int d_qk) {
  const int cc_major = device_attribute(device, cudaDevAttrComputeCapabilityMajor,
                                        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  const int smem_per_block = max_smem_per_block(device);
  const bool wide_fits = sp::wide_fits(cc_major, smem_per_block, d_qk);
  const std::string forced = forced_variant("FLASH_MLA_SPARSE_PREFILL_CTA");
  if (!forced.empty()) {
    if (forced == "rowblock") return sp::Cta::kRowBlock;
    if (forced == "wide") {
      if (!wide_fits) {
        TVM_FFI_THROW(ValueError)
            << "FLASH_MLA_SPARSE_PREFILL_CTA=wide needs a compute capability 9.x or 10.x GPU "
            << "whose blocks may use " << sp::wide_smem_bytes(d_qk)
            << " bytes of shared memory at d_qk " << d_qk << ", this one is " << cc_major
            << ".x and allows " << smem_per_block;
      }
      return sp::Cta::kWide;
    }
    TVM_FFI_THROW(ValueError) << "FLASH_MLA_SPARSE_PREFILL_CTA must be wide or rowblock (or "
                              << "unset), got '" << forced << "'";
  }
  return sp::choose_cta(h_q, wide_fits);
}

// All checks of sparse_prefill_fwd, in the order device, dtype, layout, shape, values.
sp::SparsePrefillParams validate_sparse_prefill(
    const TensorView& q, const TensorView& kv, const TensorView& indices,
    const TensorView* topk_length, const TensorView* attn_sink, const TensorView& out,
    const TensorView& max_logits, const TensorView& lse, double sm_scale, int64_t d_v) {
  // --- device ---
  check_cuda(q, "q");
  check_same_device(kv, q, "kv", "q");
  check_same_device(indices, q, "indices", "q");
  if (topk_length) check_same_device(*topk_length, q, "topk_length", "q");
  if (attn_sink) check_same_device(*attn_sink, q, "attn_sink", "q");
  check_same_device(out, q, "out", "q");
  check_same_device(max_logits, q, "max_logits", "q");
  check_same_device(lse, q, "lse", "q");

  // --- dtype ---
  check_dtype_in(q, sp::kDtypes, "q");
  check_dtype(kv, is_bf16(kv), "kv", "bfloat16 (same as q)");
  check_dtype(indices, is_int32(indices), "indices", "int32");
  if (topk_length) check_dtype(*topk_length, is_int32(*topk_length), "topk_length", "int32");
  if (attn_sink) check_dtype(*attn_sink, is_fp32(*attn_sink), "attn_sink", "float32");
  check_dtype(out, is_bf16(out), "out", "bfloat16 (same as q)");
  check_dtype(max_logits, is_fp32(max_logits), "max_logits", "float32");
  check_dtype(lse, is_fp32(lse), "lse", "float32");

  // --- layout ---
  check_ndim(q, 3, "q", "[s_q, h_q, d_qk]");
  check_ndim(kv, 3, "kv", "[s_kv, 1, d_qk]");
  check_ndim(indices, 3, "indices", "[s_q, 1, topk]");
  if (topk_length) check_ndim(*topk_length, 1, "topk_length", "[s_q]");
  if (attn_sink) check_ndim(*attn_sink, 1, "attn_sink", "[h_q]");
  check_ndim(out, 3, "out", "[s_q, h_q, 512]");
  check_ndim(max_logits, 2, "max_logits", "[s_q, h_q]");
  check_ndim(lse, 2, "lse", "[s_q, h_q]");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(kv, "kv");
  check_last_dim_contiguous(indices, "indices");
  check_last_dim_contiguous(out, "out");
  check_chunk_strides(q, "q");
  check_chunk_strides(kv, "kv");
  check_chunk_strides(out, "out");
  check_row_stride_non_negative(indices, "indices");
  if (topk_length) check_contiguous(*topk_length, "topk_length");
  if (attn_sink) check_contiguous(*attn_sink, "attn_sink");
  check_contiguous(max_logits, "max_logits");
  check_contiguous(lse, "lse");

  // --- shape ---
  const int64_t s_q = q.size(0), h_q = q.size(1), d_qk = q.size(2);
  const int64_t s_kv = kv.size(0), topk = indices.size(2);
  if (d_qk < 0 || d_qk > INT32_MAX || !caps::contains(sp::kHeadDimsQK, static_cast<int>(d_qk))) {
    TVM_FFI_THROW(ValueError) << "q must have head dim (last dim) " << caps::listed(sp::kHeadDimsQK, " or ")
                              << ", got shape " << shape_str(q);
  }
  if (!sp::kHeadsQ.contains(h_q)) {
    TVM_FFI_THROW(ValueError) << "q must have between " << sp::kHeadsQ.first << " and "
                              << sp::kHeadsQ.last << " heads (dim 1), got shape " << shape_str(q);
  }
  check_shape(kv, {s_kv, 1, d_qk}, "kv", "[s_kv, 1, d_qk] (d_qk from q)");
  check_shape(indices, {s_q, 1, topk}, "indices", "[s_q, 1, topk] (s_q from q)");
  if (topk_length) check_shape(*topk_length, {s_q}, "topk_length", "[s_q] (s_q from q)");
  if (attn_sink) check_shape(*attn_sink, {h_q}, "attn_sink", "[h_q] (h_q from q)");
  check_shape(out, {s_q, h_q, sp::kHeadDimV}, "out", "[s_q, h_q, 512] (s_q, h_q from q)");
  check_shape(max_logits, {s_q, h_q}, "max_logits", "[s_q, h_q] (from q)");
  check_shape(lse, {s_q, h_q}, "lse", "[s_q, h_q] (from q)");

  // --- values ---
  if (d_v != sp::kHeadDimV) {
    TVM_FFI_THROW(ValueError) << "d_v must be " << sp::kHeadDimV << ", got " << d_v;
  }
  check_positive_finite(sm_scale, "sm_scale");

  sp::SparsePrefillParams p{};
  p.s_q = narrow_to_int32(s_q, "q.shape[0] (s_q)");
  p.h_q = static_cast<int>(h_q);
  p.s_kv = narrow_to_int32(s_kv, "kv.shape[0] (s_kv)");
  p.topk = narrow_to_int32(topk, "indices.shape[2] (topk)");
  p.softmax_scale = static_cast<float>(sm_scale);
  p.softmax_scale_log2 = static_cast<float>(sm_scale * 1.4426950408889634);
  p.q = data_ptr(q);
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.kv = data_ptr(kv);
  p.kv_row_stride = kv.stride(0);
  p.indices = static_cast<const int32_t*>(data_ptr(indices));
  p.indices_row_stride = indices.stride(0);
  p.topk_length = topk_length ? static_cast<const int32_t*>(data_ptr(*topk_length)) : nullptr;
  p.attn_sink = attn_sink ? static_cast<const float*>(data_ptr(*attn_sink)) : nullptr;
  p.out = data_ptr(out);
  p.out_row_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.max_logits = static_cast<float*>(data_ptr(max_logits));
  p.lse = static_cast<float*>(data_ptr(lse));
  return p;
}

void sparse_prefill_fwd(TensorView q, TensorView kv, TensorView indices,
                        Optional<TensorView> topk_length, Optional<TensorView> attn_sink,
                        TensorView out, TensorView max_logits, TensorView lse, double sm_scale,
                        int64_t d_v) {
  const TensorView* lengths = nullptr;
  const TensorView* sink = nullptr;
  TensorView lengths_view = topk_length.has_value() ? topk_length.value() : q;
  TensorView sink_view = attn_sink.has_value() ? attn_sink.value() : q;
  if (topk_length.has_value()) lengths = &lengths_view;
  if (attn_sink.has_value()) sink = &sink_view;
  sp::SparsePrefillParams p = validate_sparse_prefill(q, kv, indices, lengths, sink, out,
                                                      max_logits, lse, sm_scale, d_v);
  if (p.s_q == 0) return;
  const int device = q.device().device_id;
  DeviceGuard guard(device);
  p.stream = current_stream(device);
  const int d_qk = static_cast<int>(q.size(2));
  const sp::Cta cta = cta_for(device, p.h_q, d_qk);
  p.num_head_blocks = sp::num_head_blocks(p.h_q, cta);
  const int64_t items = static_cast<int64_t>(p.s_q) * p.num_head_blocks;
  p.num_ctas = static_cast<int>(items < INT32_MAX ? items : INT32_MAX);
  caps::for_each_entry<std::size(sp::kHeadDimsQK)>([&](auto i) {
    constexpr int kDimQK = sp::kHeadDimsQK[decltype(i)::value];
    if (d_qk != kDimQK) return;
    if (cta == sp::Cta::kWide) {
      sp::run_sparse_prefill_wide<kDimQK>(p);
    } else {
      sp::run_sparse_prefill<kDimQK>(p);
    }
  });
  check_launch("sparse_prefill");
}

}  // namespace
}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sparse_prefill_fwd, flash_mla::api::sparse_prefill_fwd);
