// tvm-ffi entries of the dense MLA decode (flash_mla_with_kvcache without indices):
//
//   dense_decode_num_parts(device, batch, s_q, h_q, h_k, batch_invariant) -> int
//       schedule parts P for this problem on cuda:<device> (the first call sizes the
//       schedule and partial buffers with it); FLASH_MLA_DENSE_DECODE_PARTS=n forces P
//       (tests: results must not depend on the number of SMs); ignored when invariant.
//       FLASH_MLA_DENSE_DECODE_WARPS=4|8|4x16|8x64 forces the CTA shape (cta_for below).
//   dense_decode_schedule(cache_seqlens, metadata, split_offsets, batch_invariant) -> None
//       metadata int32 [P, 8] and split_offsets int32 [b + 1] from cache_seqlens, on the
//       GPU (no host synchronisation; capturable in a CUDA graph).
//   dense_decode_fwd(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
//                    o_accum, lse_accum, out, lse, softmax_scale, causal) -> None
//       the decode kernel, then the split-KV combine, on the caller's stream.
//   dense_decode_fwd_alloc(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
//                          softmax_scale, causal, batch_invariant) -> (out, lse)
//       the same, with out, lse and the partials (S = P, or b + P unless batch_invariant)
//       allocated through the caller's allocator (env_alloc.h); the per-call path of Python.
//   dense_decode_layout_key(q, k_cache, block_table, cache_seqlens) -> Shape
//       the layout key of a call's tensors (layout_key.h), recorded by Python's repeat path.
//   dense_decode_fwd_repeat(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
//                           softmax_scale, causal, batch_invariant, key) -> (out, lse) | None
//       dense_decode_fwd_alloc for a call that repeats a recorded one: None, before any
//       other work, when the tensors' layouts differ from `key` (Python then takes the full
//       path, which validates and raises exactly as a first call would).
// Layouts: DenseDecodeParams in csrc/params.h; design: docs/dense_decode.md. o_accum
// fp32 [S, h_q, s_q, 512] and lse_accum fp32 [S, h_q, s_q] are head-major, so the combine,
// called with its (s_q, h_q) roles swapped, writes lse as a contiguous [b, h_q, s_q].
// Validation happens in one function per entry, in the order device, dtype, layout,
// shape, values; a wrong call raises ValueError or TypeError and never reaches a kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/container/tuple.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include "../common/kernel_registry.h"
#include "../params.h"
#include "../portable/decode/combine/kernel.h"
#include "../portable/decode/dense/config.h"
#include "../portable/decode/dense/kernel.h"
#include "../portable/decode/schedule/config.h"
#include "../portable/decode/schedule/kernel.h"
#include "checks.h"
#include "env_alloc.h"
#include "launch.h"
#include "layout_key.h"
#include "split_buffers.h"

namespace flash_mla::api {
namespace {

namespace dec = ::flash_mla::portable::dense_decode;
namespace sched = ::flash_mla::portable::decode_schedule;

FLASH_MLA_REGISTER_OP(dense_decode, dec::capabilities_json);
FLASH_MLA_REGISTER_OP(dense_decode_schedule, sched::capabilities_json);

int64_t forced_parts() { return forced_count("FLASH_MLA_DENSE_DECODE_PARTS", 1 << 20); }

// CTA shape for (s_q, h_q, h_k) on `device` (config.h: choose_cta).
// FLASH_MLA_DENSE_DECODE_WARPS=4|8|4x16|8x64 forces one (the 4-warp 32-row CTA, the
// Q-in-registers 8-warp CTA, the narrow 16-row CTA, the 64-row CTA), so each is tested and
// timed on one GPU at any shape; it is read on every call (the schedule's part count and
// the launch), no process-wide state. Forcing 8x64 where the device cannot run it raises.
dec::CtaShape cta_for(int device, int64_t s_q, int64_t h_q, int64_t h_k) {
  const int cc_major = device_attribute(device, cudaDevAttrComputeCapabilityMajor,
                                        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  const int smem_per_block = max_smem_per_block(device);
  const bool rows64_fits = dec::rows64::fits(cc_major, smem_per_block);
  const std::string forced = forced_variant("FLASH_MLA_DENSE_DECODE_WARPS");
  if (!forced.empty()) {
    if (forced == "4") return dec::CtaShape::kWarps4;
    if (forced == "8") return dec::CtaShape::kWarps8;
    if (forced == "4x16") return dec::CtaShape::kWarps4Rows16;
    if (forced == "8x64") {
      if (!rows64_fits) {
        TVM_FFI_THROW(ValueError)
            << "FLASH_MLA_DENSE_DECODE_WARPS=8x64 needs a compute capability 9.x or 10.x GPU "
            << "whose blocks may use " << dec::rows64::kSmemBytes << " bytes of shared memory, "
            << "this one is " << cc_major << ".x and allows " << smem_per_block;
      }
      return dec::CtaShape::kWarps8Rows64;
    }
    TVM_FFI_THROW(ValueError) << "FLASH_MLA_DENSE_DECODE_WARPS must be 4, 8, 4x16 or 8x64 (or "
                              << "unset), got '" << forced << "'";
  }
  return dec::choose_cta(static_cast<int>(s_q), static_cast<int>(h_q), static_cast<int>(h_k),
                         rows64_fits);
}

int64_t dense_decode_num_parts(int64_t device, int64_t batch, int64_t s_q, int64_t h_q,
                               int64_t h_k, bool batch_invariant) {
  if (batch < 0 || s_q < 1 || h_q < 1 || h_k < 1 || h_q % h_k != 0 ||
      s_q > dec::kMaxQueriesPerRequest) {
    TVM_FFI_THROW(ValueError) << "dense_decode_num_parts needs batch >= 0, 1 <= s_q <= "
                              << dec::kMaxQueriesPerRequest << " and h_k >= 1 dividing h_q, got "
                              << "batch=" << batch << ", s_q=" << s_q << ", h_q=" << h_q
                              << ", h_k=" << h_k;
  }
  if (batch_invariant) {
    return dec::num_parts(0, 0, static_cast<int>(batch), static_cast<int>(s_q),
                          static_cast<int>(h_q), static_cast<int>(h_k), true,
                          dec::CtaShape::kWarps4);
  }
  const int64_t forced = forced_parts();
  if (forced > 0) return forced;
  const int dev = static_cast<int>(device);
  return dec::num_parts(num_sms(dev), max_smem_per_sm(dev),
                        static_cast<int>(batch), static_cast<int>(s_q), static_cast<int>(h_q),
                        static_cast<int>(h_k), false, cta_for(dev, s_q, h_q, h_k));
}

DenseDecodeScheduleParams validate_schedule(const TensorView& cache_seqlens,
                                            const TensorView& metadata,
                                            const TensorView& split_offsets, bool invariant) {
  check_cuda(cache_seqlens, "cache_seqlens");
  check_same_device(metadata, cache_seqlens, "tile_scheduler_metadata", "cache_seqlens");
  check_same_device(split_offsets, cache_seqlens, "num_splits", "cache_seqlens");
  check_dtype(cache_seqlens, is_int32(cache_seqlens), "cache_seqlens", "int32");
  check_dtype(metadata, is_int32(metadata), "tile_scheduler_metadata", "int32");
  check_dtype(split_offsets, is_int32(split_offsets), "num_splits", "int32");
  check_ndim(cache_seqlens, 1, "cache_seqlens", "[b]");
  check_ndim(metadata, 2, "tile_scheduler_metadata", "[num_parts, 8]");
  check_ndim(split_offsets, 1, "num_splits", "[b + 1]");
  check_contiguous(cache_seqlens, "cache_seqlens");
  check_contiguous(metadata, "tile_scheduler_metadata");
  check_contiguous(split_offsets, "num_splits");
  const int64_t batch = cache_seqlens.size(0);
  const int64_t parts = metadata.size(0);
  check_shape(metadata, {parts, sched::kMetaInts}, "tile_scheduler_metadata", "[num_parts, 8]");
  check_shape(split_offsets, {batch + 1}, "num_splits", "[b + 1] (b = cache_seqlens.shape[0])");
  if (parts < 1) {
    TVM_FFI_THROW(ValueError) << "tile_scheduler_metadata must have at least one part (row), got "
                              << "shape " << shape_str(metadata);
  }
  DenseDecodeScheduleParams p{};
  p.batch = narrow_to_int32(batch, "cache_seqlens.shape[0] (b)");
  p.num_parts = narrow_to_int32(parts, "tile_scheduler_metadata.shape[0] (num_parts)");
  p.batch_invariant = invariant;
  p.seqlens = static_cast<const int32_t*>(data_ptr(cache_seqlens));
  p.metadata = static_cast<int32_t*>(data_ptr(metadata));
  p.split_offsets = static_cast<int32_t*>(data_ptr(split_offsets));
  return p;
}

void dense_decode_schedule(TensorView cache_seqlens, TensorView metadata, TensorView split_offsets,
                           bool batch_invariant) {
  DenseDecodeScheduleParams p =
      validate_schedule(cache_seqlens, metadata, split_offsets, batch_invariant);
  const int device = cache_seqlens.device().device_id;
  DeviceGuard guard(device);
  p.stream = current_stream(device);
  sched::run_dense_decode_schedule(p);
  check_launch("dense_decode_schedule");
}

// All checks of dense_decode_fwd, in the order device, dtype, layout, shape, values.
DenseDecodeParams validate_dense_decode(const TensorView& q, const TensorView& k_cache,
                                        const TensorView& block_table,
                                        const TensorView& cache_seqlens,
                                        const TensorView& metadata,
                                        const TensorView& split_offsets,
                                        const TensorView& o_accum, const TensorView& lse_accum,
                                        const TensorView& out, const TensorView& lse,
                                        double softmax_scale, bool causal,
                                        dec::CtaShape* cta) {
  // --- device ---
  check_cuda(q, "q");
  check_same_device(k_cache, q, "k_cache", "q");
  check_same_device(block_table, q, "block_table", "q");
  check_same_device(cache_seqlens, q, "cache_seqlens", "q");
  const SplitBuffers split{metadata, split_offsets, o_accum, lse_accum, "h_q, s_q"};
  split.check_devices(q);
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");

  // --- dtype ---
  const DType dtype = check_dtype_in(q, dec::kDtypes, "q");
  const char* q_dtype = dtype == DType::kBF16 ? "bfloat16 (same as q)" : "float16 (same as q)";
  auto same_as_q = [&](const TensorView& t) {
    DType d{};
    return element_dtype(t, &d) && d == dtype;
  };
  check_dtype(k_cache, same_as_q(k_cache), "k_cache", q_dtype);
  check_dtype(out, same_as_q(out), "out", q_dtype);
  check_dtype(block_table, is_int32(block_table), "block_table", "int32");
  check_dtype(cache_seqlens, is_int32(cache_seqlens), "cache_seqlens", "int32");
  split.check_dtypes();
  check_dtype(lse, is_fp32(lse), "lse", "float32");

  // --- layout ---
  check_ndim(q, 4, "q", "[b, s_q, h_q, 576]");
  check_ndim(k_cache, 4, "k_cache", "[num_blocks, 64, h_k, 576]");
  check_ndim(block_table, 2, "block_table", "[b, max_blocks]");
  check_ndim(cache_seqlens, 1, "cache_seqlens", "[b]");
  split.check_layout();
  check_ndim(out, 4, "out", "[b, s_q, h_q, 512]");
  check_ndim(lse, 3, "lse", "[b, h_q, s_q]");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(block_table, "block_table");
  check_last_dim_contiguous(out, "out");
  check_chunk_strides(q, "q");
  check_chunk_strides(k_cache, "k_cache");
  check_chunk_strides(out, "out");
  check_row_stride_non_negative(block_table, "block_table");
  check_contiguous(cache_seqlens, "cache_seqlens");
  check_contiguous(lse, "lse");

  // --- shape ---
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const int64_t num_cache_blocks = k_cache.size(0), h_k = k_cache.size(2);
  const int64_t splits = split.splits(), parts = split.parts();
  check_shape(q, {b, s_q, h_q, dec::kHeadDimQK}, "q", "[b, s_q, h_q, 576]");
  check_shape(k_cache, {num_cache_blocks, dec::kPageSize, h_k, dec::kHeadDimQK}, "k_cache",
              "[num_blocks, 64, h_k, 576] (page size 64)");
  if (!dec::kHeadsQ.contains(static_cast<int>(h_q < 0 || h_q > INT32_MAX ? 0 : h_q))) {
    TVM_FFI_THROW(ValueError) << "q must have between " << dec::kHeadsQ.first << " and "
                              << dec::kHeadsQ.last << " heads (dim 2), got shape " << shape_str(q);
  }
  if (h_k < 1 || h_q % h_k != 0) {
    TVM_FFI_THROW(ValueError) << "k_cache heads (dim 2) must divide q's " << h_q
                              << " heads, got k_cache shape " << shape_str(k_cache);
  }
  check_shape(block_table, {b, block_table.size(1)}, "block_table", "[b, max_blocks] (b from q)");
  check_shape(cache_seqlens, {b}, "cache_seqlens", "[b] (b from q)");
  split.check_shapes(b, h_q, s_q, dec::kHeadDimV);
  check_shape(out, {b, s_q, h_q, dec::kHeadDimV}, "out", "[b, s_q, h_q, 512]");
  check_shape(lse, {b, h_q, s_q}, "lse", "[b, h_q, s_q]");

  // --- values ---
  if (s_q < 1 || s_q > dec::kMaxQueriesPerRequest) {
    TVM_FFI_THROW(ValueError) << "q must have between 1 and " << dec::kMaxQueriesPerRequest
                              << " queries per request (dim 1), got shape " << shape_str(q);
  }
  check_positive_finite(softmax_scale, "softmax_scale");
  split.check_rows();
  *cta = cta_for(q.device().device_id, s_q, h_q, h_k);  // once per call: block size = launch
  const int m_blocks = dec::num_m_blocks(static_cast<int>(s_q), static_cast<int>(h_q),
                                         static_cast<int>(h_k), *cta);
  const int64_t ctas = parts * h_k * m_blocks;
  if (ctas > INT32_MAX) {
    TVM_FFI_THROW(ValueError) << "tile_scheduler_metadata has " << parts << " parts, which with "
                              << h_k << " kv heads and " << m_blocks << " row blocks exceeds the "
                              << "grid limit of " << INT32_MAX << " CTAs";
  }

  DenseDecodeParams p{};
  p.batch = narrow_to_int32(b, "q.shape[0] (b)");
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_k = static_cast<int>(h_k);
  p.num_m_blocks = m_blocks;
  p.num_parts = static_cast<int>(parts);
  p.num_splits_total = narrow_to_int32(splits, "o_accum.shape[0] (num_splits_total)");
  p.num_cache_blocks = narrow_to_int32(num_cache_blocks, "k_cache.shape[0] (num_blocks)");
  p.max_blocks_per_seq = narrow_to_int32(block_table.size(1), "block_table.shape[1]");
  p.is_causal = causal;
  p.dtype = dtype;
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q = data_ptr(q);
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_cache = data_ptr(k_cache);
  p.k_block_stride = k_cache.stride(0);
  p.k_token_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.block_table = static_cast<const int32_t*>(data_ptr(block_table));
  p.block_table_stride = block_table.stride(0);
  p.seqlens = static_cast<const int32_t*>(data_ptr(cache_seqlens));
  p.metadata = static_cast<const int32_t*>(data_ptr(metadata));
  p.split_offsets = static_cast<const int32_t*>(data_ptr(split_offsets));
  p.out = data_ptr(out);
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  p.lse = static_cast<float*>(data_ptr(lse));
  p.o_accum = static_cast<float*>(data_ptr(o_accum));
  p.lse_accum = static_cast<float*>(data_ptr(lse_accum));
  return p;
}

// The combine over the decode's partials: (s_q, h_q) swapped, see the file comment.
CombineParams combine_params(const DenseDecodeParams& p) {
  return combine_over_partials(p, /*heads_first=*/true, dec::kHeadDimV, p.dtype, nullptr);
}

void dense_decode_fwd(TensorView q, TensorView k_cache, TensorView block_table,
                      TensorView cache_seqlens, TensorView metadata, TensorView split_offsets,
                      TensorView o_accum, TensorView lse_accum, TensorView out, TensorView lse,
                      double softmax_scale, bool causal) {
  dec::CtaShape cta = dec::CtaShape::kWarps4;
  DenseDecodeParams p =
      validate_dense_decode(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
                            o_accum, lse_accum, out, lse, softmax_scale, causal, &cta);
  if (p.batch == 0) return;
  const int device = q.device().device_id;
  DeviceGuard guard(device);
  p.stream = current_stream(device);
  if (p.dtype == DType::kBF16) {
    dec::run_dense_decode<DType::kBF16>(p, cta);
  } else {
    dec::run_dense_decode<DType::kFP16>(p, cta);
  }
  check_launch("dense_decode");
  const CombineParams c = combine_params(p);
  if (p.dtype == DType::kBF16) {
    combine::run_combine<__nv_bfloat16, 4>(c);
  } else {
    combine::run_combine<__half, 4>(c);
  }
  check_launch("combine (dense decode)");
}

tvm::ffi::Tuple<Tensor, Tensor> dense_decode_fwd_alloc(
    TensorView q, TensorView k_cache, TensorView block_table, TensorView cache_seqlens,
    TensorView metadata, TensorView split_offsets, double softmax_scale, bool causal,
    bool batch_invariant) {
  require_env_allocator("dense_decode_fwd_alloc");
  const DecodeSizes n = decode_sizes(q, metadata, batch_invariant, "[b, s_q, h_q, 576]");
  Tensor out = env_empty({n.b, n.s_q, n.h_q, dec::kHeadDimV}, q.dtype(), q.device());
  Tensor lse = env_empty({n.b, n.h_q, n.s_q}, kFloat32, q.device());
  const EnvPartials partials(n.splits, n.h_q, n.s_q, dec::kHeadDimV, q.device());
  dense_decode_fwd(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
                   partials.o_accum(), partials.lse_accum(), out, lse, softmax_scale, causal);
  return tvm::ffi::Tuple<Tensor, Tensor>(out, lse);
}

tvm::ffi::Shape dense_decode_layout_key(TensorView q, TensorView k_cache,
                                        TensorView block_table, TensorView cache_seqlens) {
  return layout_key({&q, &k_cache, &block_table, &cache_seqlens});
}

tvm::ffi::Optional<tvm::ffi::Tuple<Tensor, Tensor>> dense_decode_fwd_repeat(
    TensorView q, TensorView k_cache, TensorView block_table, TensorView cache_seqlens,
    TensorView metadata, TensorView split_offsets, double softmax_scale, bool causal,
    bool batch_invariant, tvm::ffi::Shape key) {
  if (!matches_layout_key(key, {&q, &k_cache, &block_table, &cache_seqlens})) {
    return tvm::ffi::Optional<tvm::ffi::Tuple<Tensor, Tensor>>();
  }
  return dense_decode_fwd_alloc(q, k_cache, block_table, cache_seqlens, metadata, split_offsets,
                                softmax_scale, causal, batch_invariant);
}

}  // namespace
}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_num_parts, flash_mla::api::dense_decode_num_parts);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_schedule, flash_mla::api::dense_decode_schedule);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_fwd, flash_mla::api::dense_decode_fwd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_fwd_alloc, flash_mla::api::dense_decode_fwd_alloc);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_layout_key,
                              flash_mla::api::dense_decode_layout_key);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_decode_fwd_repeat,
                              flash_mla::api::dense_decode_fwd_repeat);
