// tvm-ffi entry point of the split-KV combine:
//   combine(o_accum, lse_accum, split_offsets, attn_sink_or_None, out, lse) -> None
// Semantics and layouts: CombineParams in csrc/params.h and the header comment of
// csrc/portable/decode/combine/kernel.cuh. Validation happens here, in one function, in the
// order device, dtype, layout, shape, values; a wrong call raises ValueError or
// TypeError and never reaches the kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <iterator>
#include <type_traits>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include "../common/kernel_registry.h"
#include "../params.h"
#include "../portable/decode/combine/config.h"
#include "../portable/decode/combine/kernel.h"
#include "checks.h"
#include "launch.h"

namespace flash_mla::api {

namespace {

using tvm::ffi::Optional;

FLASH_MLA_REGISTER_OP(combine, combine::capabilities_json);

CombineParams validate_combine(const TensorView& o_accum, const TensorView& lse_accum,
                               const TensorView& split_offsets, const TensorView* attn_sink,
                               const TensorView& out, const TensorView& lse) {
  // Device: everything on o_accum's CUDA device.
  check_cuda(o_accum, "o_accum");
  check_same_device(lse_accum, o_accum, "lse_accum", "o_accum");
  check_same_device(split_offsets, o_accum, "split_offsets", "o_accum");
  if (attn_sink) check_same_device(*attn_sink, o_accum, "attn_sink", "o_accum");
  check_same_device(out, o_accum, "out", "o_accum");
  check_same_device(lse, o_accum, "lse", "o_accum");

  // Dtype.
  check_dtype(o_accum, is_fp32(o_accum), "o_accum", "float32");
  check_dtype(lse_accum, is_fp32(lse_accum), "lse_accum", "float32");
  check_dtype(split_offsets, is_int32(split_offsets), "split_offsets", "int32");
  if (attn_sink) check_dtype(*attn_sink, is_fp32(*attn_sink), "attn_sink", "float32");
  const DType out_dtype = check_dtype_in(out, combine::kDtypes, "out");
  check_dtype(lse, is_fp32(lse), "lse", "float32");

  // Layout.
  check_ndim(o_accum, 4, "o_accum", "[num_splits_total, s_q, h_q, d_v]");
  check_ndim(lse_accum, 3, "lse_accum", "[num_splits_total, s_q, h_q]");
  check_ndim(split_offsets, 1, "split_offsets", "[batch + 1]");
  if (attn_sink) check_ndim(*attn_sink, 1, "attn_sink", "[h_q]");
  check_ndim(out, 4, "out", "[batch, s_q, h_q, d_v]");
  check_ndim(lse, 3, "lse", "[batch, s_q, h_q]");
  check_contiguous(o_accum, "o_accum");
  check_contiguous(lse_accum, "lse_accum");
  check_contiguous(split_offsets, "split_offsets");
  if (attn_sink) check_contiguous(*attn_sink, "attn_sink");
  check_last_dim_contiguous(out, "out");
  check_contiguous(lse, "lse");

  // Shape: o_accum fixes (splits, s_q, h_q, d_v); out fixes batch.
  const int64_t splits = o_accum.size(0), s_q = o_accum.size(1), h_q = o_accum.size(2),
                d_v = o_accum.size(3), batch = out.size(0);
  check_shape(lse_accum, {splits, s_q, h_q}, "lse_accum",
              "[num_splits_total, s_q, h_q] matching o_accum");
  check_shape(split_offsets, {batch + 1}, "split_offsets", "[batch + 1] with batch = out.shape[0]");
  if (attn_sink) check_shape(*attn_sink, {h_q}, "attn_sink", "[h_q] matching o_accum");
  check_shape(out, {batch, s_q, h_q, d_v}, "out", "[batch, s_q, h_q, d_v] matching o_accum");
  check_shape(lse, {batch, s_q, h_q}, "lse", "[batch, s_q, h_q] matching out");

  // Values: d_v and alignment for the float4 loads and 8-byte stores.
  if (!combine::kDvs.contains(d_v)) {
    TVM_FFI_THROW(ValueError) << "o_accum's last dimension d_v must be a multiple of "
                              << combine::kDvs.step << " between " << combine::kDvs.first
                              << " and " << combine::kDvs.last << ", got " << d_v;
  }
  check_aligned(o_accum, 16, "o_accum");
  check_aligned(out, 8, "out");
  for (int i = 0; i < 3; ++i) {
    if (out.size(i) > 1 && out.stride(i) % combine::kColsPerLane != 0) {
      TVM_FFI_THROW(ValueError) << "out must have strides that are multiples of "
                                << combine::kColsPerLane << " elements (8-byte stores), got strides "
                                << strides_str(out);
    }
  }
  const int64_t rows = batch * s_q * h_q;
  const int64_t max_rows = static_cast<int64_t>(INT32_MAX) * combine::kWarpsPerBlock;
  if (rows > max_rows) {
    TVM_FFI_THROW(ValueError) << "out must have at most " << max_rows
                              << " rows (batch * s_q * h_q) for the combine grid, got " << rows;
  }

  CombineParams p{};
  p.batch = narrow_to_int32(batch, "out.shape[0] (batch)");
  p.s_q = narrow_to_int32(s_q, "o_accum.shape[1] (s_q)");
  p.h_q = narrow_to_int32(h_q, "o_accum.shape[2] (h_q)");
  p.d_v = static_cast<int>(d_v);
  p.num_splits_total = narrow_to_int32(splits, "o_accum.shape[0] (num_splits_total)");
  p.out_dtype = out_dtype;
  p.o_accum = static_cast<const float*>(data_ptr(o_accum));
  p.lse_accum = static_cast<const float*>(data_ptr(lse_accum));
  p.split_offsets = static_cast<const int32_t*>(data_ptr(split_offsets));
  p.attn_sink = attn_sink ? static_cast<const float*>(data_ptr(*attn_sink)) : nullptr;
  p.out = data_ptr(out);
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  p.lse = static_cast<float*>(data_ptr(lse));
  return p;
}

// The CUDA element type of a capability-table dtype.
template <DType kDType>
using OutElement = std::conditional_t<kDType == DType::kBF16, __nv_bfloat16, __half>;

// One instance per (table dtype, chunk count): the chunk count comes from d_v, which
// validation held to kDvs, so 1..kMaxChunks covers every call.
template <DType kDType>
void dispatch_chunks(const CombineParams& p) {
  caps::for_each_entry<combine::kMaxChunks>([&](auto i) {
    constexpr int kChunks = static_cast<int>(decltype(i)::value) + 1;
    if (combine::chunks_for(p.d_v) == kChunks) combine::run_combine<OutElement<kDType>, kChunks>(p);
  });
}

void combine(TensorView o_accum, TensorView lse_accum, TensorView split_offsets,
             Optional<TensorView> attn_sink, TensorView out, TensorView lse) {
  const TensorView* sink = nullptr;
  TensorView sink_view = attn_sink.has_value() ? attn_sink.value() : o_accum;
  if (attn_sink.has_value()) sink = &sink_view;
  CombineParams p = validate_combine(o_accum, lse_accum, split_offsets, sink, out, lse);
  if (static_cast<int64_t>(p.batch) * p.s_q * p.h_q == 0) return;
  const int device = o_accum.device().device_id;
  DeviceGuard guard(device);
  p.stream = current_stream(device);
  caps::for_each_entry<std::size(combine::kDtypes)>([&](auto i) {
    constexpr DType kDType = combine::kDtypes[decltype(i)::value];
    if (p.out_dtype == kDType) dispatch_chunks<kDType>(p);
  });
  check_launch("combine_kernel");
}

}  // namespace

}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(combine, flash_mla::api::combine);
