// tvm-ffi entries of the sparse MLA decode (flash_mla_with_kvcache with indices, over a
// paged byte cache):
//
//   sparse_decode_num_parts(device, batch, s_q, h_q, d_qk, batch_invariant) -> int
//       schedule parts P for this problem on cuda:<device>; FLASH_MLA_SPARSE_DECODE_PARTS=n
//       forces P (tests: results must not depend on the number of SMs); ignored when
//       invariant. FLASH_MLA_SPARSE_DECODE_CTA=narrow|rowblock|rows64 forces the CTA (cta_for).
//       The schedule itself is the dense decode's kernel (dense_decode_schedule), run over
//       each request's key-list length (flash_mla/sparse_decode.py computes it on the GPU:
//       main limit rounded up to 16, plus the extra limit).
//   sparse_decode_fwd(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
//                     extra_indices, extra_topk_length, metadata, split_offsets, o_accum,
//                     lse_accum, out, lse, softmax_scale, kv_format, extra_kv_format) -> None
//       the decode kernel, then the split-KV combine (which applies the sink to split
//       requests), on the caller's stream. Optional tensors may be None; kv_format names
//       the main cache's format, extra_kv_format the extra pool's ("" without one).
//   sparse_decode_fwd_alloc(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
//                           extra_indices, extra_topk_length, metadata, split_offsets,
//                           softmax_scale, kv_format, extra_kv_format, batch_invariant)
//       -> (out, lse [b, s_q, h_q])
//       the same, with out, lse and the partials (S = P, or b + P unless batch_invariant)
//       from the caller's allocator (env_alloc.h); the per-call path of Python.
// Layouts: SparseDecodeParams in csrc/portable/decode/sparse/kernel.h; o_accum fp32
// [S, s_q, h_q, 512], lse_accum fp32 [S, s_q, h_q], lse fp32 [b, s_q, h_q] contiguous.
// Design: docs/sparse_decode.md. Validation happens in one function, in the order device,
// dtype, layout, shape, values; a wrong call raises ValueError or TypeError and never
// reaches a kernel. Index values are not checked (that would need a device sync): the
// kernel skips any index outside the cache.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/container/tuple.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include "../common/kernel_registry.h"
#include "../params.h"
#include "../portable/decode/combine/kernel.h"
#include "../portable/decode/sparse/config.h"
#include "../portable/decode/sparse/kernel.h"
#include "checks.h"
#include "env_alloc.h"
#include "launch.h"
#include "split_buffers.h"

namespace flash_mla::api {
namespace {

using tvm::ffi::Optional;
namespace sd = ::flash_mla::portable::sparse_decode;

FLASH_MLA_REGISTER_OP(sparse_decode, sd::capabilities_json);

int64_t forced_parts() { return forced_count("FLASH_MLA_SPARSE_DECODE_PARTS", 1 << 20); }

// The CTA for h_q on `device` (config.h choose_cta).
// FLASH_MLA_SPARSE_DECODE_CTA=narrow|rowblock|rows64 forces one, so each is tested and timed at
// any head count; read on every call (the schedule's part count and the launch), no
// process-wide state. Forcing rows64 where the device cannot run it raises.
sd::Cta cta_for(int device, int64_t h_q) {
  const int cc_major = device_attribute(device, cudaDevAttrComputeCapabilityMajor,
                                        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  const bool rows64_fits = sd::rows64::fits(cc_major, max_smem_per_block(device));
  const std::string forced = forced_variant("FLASH_MLA_SPARSE_DECODE_CTA");
  if (!forced.empty()) {
    if (forced == "narrow") return sd::Cta::kNarrow;
    if (forced == "rowblock") return sd::Cta::kRowBlock;
    if (forced == "rows64") {
      if (!rows64_fits) {
        TVM_FFI_THROW(ValueError)
            << "FLASH_MLA_SPARSE_DECODE_CTA=rows64 needs compute capability 9.x or 10.x and "
            << sd::rows64::Layout<576>::kSmemBytes << " bytes of shared memory per block, got "
            << "compute capability major " << cc_major << " and "
            << max_smem_per_block(device) << " bytes on cuda:" << device;
      }
      return sd::Cta::kRows64;
    }
    TVM_FFI_THROW(ValueError) << "FLASH_MLA_SPARSE_DECODE_CTA must be narrow, rowblock or rows64 "
                              << "(or unset), got '" << forced << "'";
  }
  return sd::choose_cta(static_cast<int>(h_q), rows64_fits);
}

int64_t sparse_decode_num_parts(int64_t device, int64_t batch, int64_t s_q, int64_t h_q,
                                int64_t d_qk, bool batch_invariant) {
  if (batch < 0 || s_q < 1 || s_q > sd::kMaxQueriesPerRequest || !sd::kHeadsQ.contains(h_q) ||
      (d_qk != 512 && d_qk != 576)) {
    TVM_FFI_THROW(ValueError) << "sparse_decode_num_parts needs batch >= 0, 1 <= s_q <= "
                              << sd::kMaxQueriesPerRequest << ", h_q in [" << sd::kHeadsQ.first
                              << ", " << sd::kHeadsQ.last << "] and d_qk 512 or 576, got batch="
                              << batch << ", s_q=" << s_q << ", h_q=" << h_q << ", d_qk=" << d_qk;
  }
  if (batch_invariant) {
    return sd::num_parts(0, 0, 0, static_cast<int>(batch), static_cast<int>(s_q),
                         static_cast<int>(h_q), static_cast<int>(d_qk), true,
                         cta_for(static_cast<int>(device), h_q));
  }
  const int64_t forced = forced_parts();
  if (forced > 0) return forced;
  const int dev = static_cast<int>(device);
  const int cc_major = device_attribute(dev, cudaDevAttrComputeCapabilityMajor,
                                        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  return sd::num_parts(num_sms(dev), max_smem_per_sm(dev), cc_major,
                       static_cast<int>(batch), static_cast<int>(s_q), static_cast<int>(h_q),
                       static_cast<int>(d_qk), false, cta_for(dev, h_q));
}

// A byte cache: uint8, int8 or float8_e4m3fn (8-bit, one lane).
bool is_byte_cache(const TensorView& t) {
  const DLDataType d = t.dtype();
  return d.bits == 8 && d.lanes == 1 &&
         (d.code == kDLUInt || d.code == kDLInt || d.code == kDLFloat8_e4m3fn);
}

// Format id of a name (config.h's order), or a ValueError naming `arg`.
int format_id(const std::string& name, const char* arg) {
  for (int i = 0; i < sd::kNumFormats; ++i) {
    if (name == sd::format_name(i)) return i;
  }
  std::string all;
  for (int i = 0; i < sd::kNumFormats; ++i) all += (i ? ", " : "") + std::string(sd::format_name(i));
  TVM_FFI_THROW(ValueError) << arg << " must be one of " << all << ", got '" << name << "'";
  return -1;
}

// One pool's checks after its dtype: layout, shape against its format, alignment; fills
// the pool's cache fields (indices and lengths are set by the caller).
sd::CachePool check_pool(const TensorView& cache, const char* cache_name, int format,
                         const char* format_arg, int64_t d_qk, const TensorView& indices,
                         const char* indices_name, int64_t b, int64_t s_q) {
  const sd::FormatInfo info = sd::format_info(format);
  check_ndim(cache, 4, cache_name, "[num_blocks, page_size, 1, bytes_per_token]");
  check_ndim(indices, 3, indices_name, "[b, s_q, topk]");
  check_last_dim_contiguous(indices, indices_name);
  if (indices.stride(0) < 0 || indices.stride(1) < 0) {
    TVM_FFI_THROW(ValueError) << indices_name << " must have non-negative strides, got strides "
                              << strides_str(indices);
  }
  const int64_t num_blocks = cache.size(0), page_size = cache.size(1);
  if (cache.size(2) != 1 || cache.size(3) != info.bytes_per_token) {
    TVM_FFI_THROW(ValueError) << cache_name << " must have shape [num_blocks, page_size, 1, "
                              << info.bytes_per_token << "] for " << format_arg << " '"
                              << sd::format_name(format) << "', got " << shape_str(cache);
  }
  if (info.d_qk != d_qk) {
    TVM_FFI_THROW(ValueError) << format_arg << " '" << sd::format_name(format) << "' holds d_qk "
                              << info.d_qk << " but q has head dim " << d_qk;
  }
  if (page_size < 1) {
    TVM_FFI_THROW(ValueError) << cache_name << " must have page size (dim 1) >= 1, got shape "
                              << shape_str(cache);
  }
  if (cache.stride(3) != 1 || (page_size > 1 && cache.stride(1) != info.bytes_per_token) ||
      cache.stride(0) < 0) {
    TVM_FFI_THROW(ValueError) << cache_name << " must hold a page's tokens back to back (strides ("
                              << "block, " << info.bytes_per_token << ", *, 1), block >= 0), got "
                              << "strides " << strides_str(cache);
  }
  if (num_blocks > 1 && cache.stride(0) % info.copy_bytes != 0) {
    TVM_FFI_THROW(ValueError) << cache_name << " must have a block stride (stride(0)) that is a "
                              << "multiple of " << info.copy_bytes << " bytes, got strides "
                              << strides_str(cache);
  }
  check_aligned(cache, info.copy_bytes, cache_name);
  if (indices.size(0) != b || indices.size(1) != s_q) {
    TVM_FFI_THROW(ValueError) << indices_name << " must have shape [b, s_q, topk] = [" << b << ", "
                              << s_q << ", topk] (b, s_q from q), got " << shape_str(indices);
  }
  sd::CachePool pool{};
  pool.cache = static_cast<const unsigned char*>(data_ptr(cache));
  pool.block_stride = cache.stride(0);
  pool.num_tokens = num_blocks * page_size;
  pool.page_size = narrow_to_int32(page_size, "page size (k_cache.shape[1])");
  pool.page_div = flash_mla::portable::make_fast_div(pool.page_size);  // page_size >= 1 (checked)
  pool.format = format;
  pool.topk = narrow_to_int32(indices.size(2), "topk (indices.shape[2])");
  pool.indices = static_cast<const int32_t*>(data_ptr(indices));
  pool.indices_batch_stride = indices.stride(0);
  pool.indices_row_stride = indices.stride(1);
  return pool;
}

void check_lengths(const TensorView& t, const char* name, int64_t b) {
  check_ndim(t, 1, name, "[b]");
  check_contiguous(t, name);
  check_shape(t, {b}, name, "[b] (b from q)");
}

// All checks of sparse_decode_fwd, in the order device, dtype, layout, shape, values.
sd::SparseDecodeParams validate_sparse_decode(
    const TensorView& q, const TensorView& k_cache, const TensorView& indices,
    const TensorView* topk_length, const TensorView* attn_sink, const TensorView* extra_k_cache,
    const TensorView* extra_indices, const TensorView* extra_topk_length,
    const TensorView& metadata, const TensorView& split_offsets, const TensorView& o_accum,
    const TensorView& lse_accum, const TensorView& out, const TensorView& lse,
    double softmax_scale, const std::string& kv_format, const std::string& extra_kv_format,
    sd::Cta* cta) {
  if ((extra_k_cache == nullptr) != (extra_indices == nullptr) ||
      (extra_topk_length != nullptr && extra_k_cache == nullptr) ||
      (extra_k_cache == nullptr) != extra_kv_format.empty()) {
    TVM_FFI_THROW(ValueError) << "extra_k_cache, extra_indices and extra_kv_format go together "
                              << "(extra_topk_length only with them), got extra_k_cache "
                              << (extra_k_cache ? "given" : "None") << ", extra_indices "
                              << (extra_indices ? "given" : "None") << ", extra_kv_format '"
                              << extra_kv_format << "'";
  }
  // --- device ---
  check_cuda(q, "q");
  check_same_device(k_cache, q, "k_cache", "q");
  check_same_device(indices, q, "indices", "q");
  if (topk_length) check_same_device(*topk_length, q, "topk_length", "q");
  if (attn_sink) check_same_device(*attn_sink, q, "attn_sink", "q");
  if (extra_k_cache) check_same_device(*extra_k_cache, q, "extra_k_cache", "q");
  if (extra_indices) check_same_device(*extra_indices, q, "extra_indices_in_kvcache", "q");
  if (extra_topk_length) check_same_device(*extra_topk_length, q, "extra_topk_length", "q");
  const SplitBuffers split{metadata, split_offsets, o_accum, lse_accum, "s_q, h_q"};
  split.check_devices(q);
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");

  // --- dtype ---
  check_dtype_in(q, sd::kDtypes, "q");
  const char* bytes = "uint8, int8 or float8_e4m3fn";
  check_dtype(k_cache, is_byte_cache(k_cache), "k_cache", bytes);
  check_dtype(indices, is_int32(indices), "indices", "int32");
  if (topk_length) check_dtype(*topk_length, is_int32(*topk_length), "topk_length", "int32");
  if (attn_sink) check_dtype(*attn_sink, is_fp32(*attn_sink), "attn_sink", "float32");
  if (extra_k_cache) check_dtype(*extra_k_cache, is_byte_cache(*extra_k_cache), "extra_k_cache", bytes);
  if (extra_indices) {
    check_dtype(*extra_indices, is_int32(*extra_indices), "extra_indices_in_kvcache", "int32");
  }
  if (extra_topk_length) {
    check_dtype(*extra_topk_length, is_int32(*extra_topk_length), "extra_topk_length", "int32");
  }
  split.check_dtypes();
  check_dtype(out, is_bf16(out), "out", "bfloat16 (same as q)");
  check_dtype(lse, is_fp32(lse), "lse", "float32");

  // --- layout and shape ---
  check_ndim(q, 4, "q", "[b, s_q, h_q, d_qk]");
  check_last_dim_contiguous(q, "q");
  check_chunk_strides(q, "q");
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2), d_qk = q.size(3);
  if (d_qk != 512 && d_qk != 576) {
    TVM_FFI_THROW(ValueError) << "q must have head dim (last dim) 576 or 512, got shape "
                              << shape_str(q);
  }
  if (!sd::kHeadsQ.contains(h_q)) {
    TVM_FFI_THROW(ValueError) << "q must have between " << sd::kHeadsQ.first << " and "
                              << sd::kHeadsQ.last << " heads (dim 2), got shape " << shape_str(q);
  }
  if (s_q < 1 || s_q > sd::kMaxQueriesPerRequest) {
    TVM_FFI_THROW(ValueError) << "q must have between 1 and " << sd::kMaxQueriesPerRequest
                              << " queries per request (dim 1), got shape " << shape_str(q);
  }
  sd::SparseDecodeParams p{};
  p.main = check_pool(k_cache, "k_cache", format_id(kv_format, "kv_format"), "kv_format", d_qk,
                      indices, "indices", b, s_q);
  if (topk_length) {
    check_lengths(*topk_length, "topk_length", b);
    p.main.topk_length = static_cast<const int32_t*>(data_ptr(*topk_length));
  }
  if (extra_k_cache) {
    p.extra = check_pool(*extra_k_cache, "extra_k_cache",
                         format_id(extra_kv_format, "extra_kv_format"), "extra_kv_format", d_qk,
                         *extra_indices, "extra_indices_in_kvcache", b, s_q);
    if (extra_topk_length) {
      check_lengths(*extra_topk_length, "extra_topk_length", b);
      p.extra.topk_length = static_cast<const int32_t*>(data_ptr(*extra_topk_length));
    }
  }
  if (attn_sink) {
    check_ndim(*attn_sink, 1, "attn_sink", "[h_q]");
    check_contiguous(*attn_sink, "attn_sink");
    check_shape(*attn_sink, {h_q}, "attn_sink", "[h_q] (h_q from q)");
  }
  split.check_layout();
  check_ndim(out, 4, "out", "[b, s_q, h_q, 512]");
  check_ndim(lse, 3, "lse", "[b, s_q, h_q]");
  check_contiguous(lse, "lse");
  check_last_dim_contiguous(out, "out");
  check_chunk_strides(out, "out");
  const int64_t parts = split.parts(), splits = split.splits();
  split.check_shapes(b, s_q, h_q, sd::kHeadDimV);
  check_shape(out, {b, s_q, h_q, sd::kHeadDimV}, "out", "[b, s_q, h_q, 512]");
  check_shape(lse, {b, s_q, h_q}, "lse", "[b, s_q, h_q]");

  // --- values ---
  check_positive_finite(softmax_scale, "softmax_scale");
  split.check_rows();
  *cta = cta_for(q.device().device_id, h_q);  // once per call: block size and launch agree
  const int m_blocks = sd::num_m_blocks(static_cast<int>(s_q), static_cast<int>(h_q), *cta);
  if (parts * m_blocks > INT32_MAX) {
    TVM_FFI_THROW(ValueError) << "tile_scheduler_metadata has " << parts << " parts, which with "
                              << m_blocks << " row blocks exceeds the grid limit of " << INT32_MAX
                              << " CTAs";
  }

  p.batch = narrow_to_int32(b, "q.shape[0] (b)");
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.num_head_blocks = sd::num_head_blocks(p.h_q, *cta);
  p.num_m_blocks = m_blocks;
  p.num_parts = static_cast<int>(parts);
  p.num_splits_total = narrow_to_int32(splits, "o_accum.shape[0] (num_splits_total)");
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q = data_ptr(q);
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.attn_sink = attn_sink ? static_cast<const float*>(data_ptr(*attn_sink)) : nullptr;
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

// The combine over the decode's partials, in its natural (s_q, h_q) orientation; it
// applies the sink to the requests it merges (the kernel applied it to direct ones).
CombineParams combine_params(const sd::SparseDecodeParams& p) {
  return combine_over_partials(p, /*heads_first=*/false, sd::kHeadDimV, DType::kBF16,
                               p.attn_sink);
}

const TensorView* optional_view(const Optional<TensorView>& t, TensorView& storage) {
  if (!t.has_value()) return nullptr;
  storage = t.value();
  return &storage;
}

void sparse_decode_fwd(TensorView q, TensorView k_cache, TensorView indices,
                       Optional<TensorView> topk_length, Optional<TensorView> attn_sink,
                       Optional<TensorView> extra_k_cache, Optional<TensorView> extra_indices,
                       Optional<TensorView> extra_topk_length, TensorView metadata,
                       TensorView split_offsets, TensorView o_accum, TensorView lse_accum,
                       TensorView out, TensorView lse, double softmax_scale,
                       tvm::ffi::String kv_format, tvm::ffi::String extra_kv_format) {
  TensorView s_len = q, s_sink = q, s_cache = q, s_idx = q, s_elen = q;
  sd::Cta cta = sd::Cta::kRowBlock;
  sd::SparseDecodeParams p = validate_sparse_decode(
      q, k_cache, indices, optional_view(topk_length, s_len), optional_view(attn_sink, s_sink),
      optional_view(extra_k_cache, s_cache), optional_view(extra_indices, s_idx),
      optional_view(extra_topk_length, s_elen), metadata, split_offsets, o_accum, lse_accum, out,
      lse, softmax_scale, std::string(kv_format), std::string(extra_kv_format), &cta);
  if (p.batch == 0) return;
  const int device = q.device().device_id;
  DeviceGuard guard(device);
  p.stream = current_stream(device);
  const bool one_slab = sd::slabs_for(p.h_q) == 1;
  if (cta == sd::Cta::kRows64) {
    q.size(3) == 576 ? sd::run_sparse_decode_64rows<576>(p) : sd::run_sparse_decode_64rows<512>(p);
  } else if (cta == sd::Cta::kNarrow) {
    q.size(3) == 576 ? sd::run_sparse_decode_narrow<576>(p) : sd::run_sparse_decode_narrow<512>(p);
  } else if (q.size(3) == 576) {
    one_slab ? sd::run_sparse_decode<576, 1>(p) : sd::run_sparse_decode<576, 2>(p);
  } else {
    one_slab ? sd::run_sparse_decode<512, 1>(p) : sd::run_sparse_decode<512, 2>(p);
  }
  check_launch("sparse_decode");
  combine::run_combine<__nv_bfloat16, 4>(combine_params(p));
  check_launch("combine (sparse decode)");
}

tvm::ffi::Tuple<Tensor, Tensor> sparse_decode_fwd_alloc(
    TensorView q, TensorView k_cache, TensorView indices, Optional<TensorView> topk_length,
    Optional<TensorView> attn_sink, Optional<TensorView> extra_k_cache,
    Optional<TensorView> extra_indices, Optional<TensorView> extra_topk_length,
    TensorView metadata, TensorView split_offsets, double softmax_scale,
    tvm::ffi::String kv_format, tvm::ffi::String extra_kv_format, bool batch_invariant) {
  require_env_allocator("sparse_decode_fwd_alloc");
  const DecodeSizes n = decode_sizes(q, metadata, batch_invariant, "[b, s_q, h_q, d_qk]");
  Tensor out = env_empty({n.b, n.s_q, n.h_q, sd::kHeadDimV}, q.dtype(), q.device());
  Tensor lse = env_empty({n.b, n.s_q, n.h_q}, kFloat32, q.device());
  const EnvPartials partials(n.splits, n.s_q, n.h_q, sd::kHeadDimV, q.device());
  sparse_decode_fwd(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                    extra_topk_length, metadata, split_offsets, partials.o_accum(),
                    partials.lse_accum(), out, lse, softmax_scale, kv_format, extra_kv_format);
  return tvm::ffi::Tuple<Tensor, Tensor>(out, lse);
}

}  // namespace
}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(sparse_decode_num_parts, flash_mla::api::sparse_decode_num_parts);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sparse_decode_fwd, flash_mla::api::sparse_decode_fwd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(sparse_decode_fwd_alloc, flash_mla::api::sparse_decode_fwd_alloc);
