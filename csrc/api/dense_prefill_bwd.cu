// tvm-ffi entry points of the dense MHA prefill backward:
//
//   dense_prefill_bwd(workspace, dout, q, k, v, out, lse, cu_seqlens_q,
//                     cu_seqlens_kv, dq, dk, dv, mask_mode_code, softmax_scale,
//                     max_seqlen_q, max_seqlen_kv, is_varlen) -> None
//   dense_prefill_bwd_deterministic(same arguments) -> None
//   dense_prefill_bwd_workspace_bytes(batch, total_q, total_k, h_q, h_k, d_qk,
//                                     d_v) -> int   (serves both)
//
// Determinism: dk and dv are bit-identical across repeated runs (each element is
// written once by the one CTA that owns its key block, after summing over the
// whole GQA group in a fixed order). dense_prefill_bwd's dq is NOT bit-deterministic:
// it is summed in fp32 with atomics over key blocks (order varies between runs), then
// rounded. dense_prefill_bwd_deterministic runs the 8-warp CTA whose key blocks add
// into each query block's dq rows in key-block order (turn counters in the
// workspace), so dq is bit-identical too.
//
// is_varlen is accepted for FlashMLA compatibility; the sequences are always
// the ones cu_seqlens_q / cu_seqlens_kv describe (a fixed-length batch is the
// special case of evenly spaced offsets).
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include "../common/kernel_registry.h"
#include "../params.h"
#include "../portable/prefill/dense_bwd/config.h"
#include "../portable/prefill/dense_bwd/kernel.h"
#include "checks.h"
#include "launch.h"

namespace flash_mla::api {

namespace bwd = ::flash_mla::portable::dense_bwd;

namespace {

// The kernels load and store 16 bytes at a time: every row and head stride must
// be a multiple of 8 elements and every base pointer 16-byte aligned.
void check_vector_strides(const TensorView& t, const char* name) {
  for (int i = 0; i + 1 < t.ndim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) {
      TVM_FFI_THROW(ValueError) << name << " must have strides that are multiples of 8 elements "
                                << "(16 bytes) in every dimension but the last, got strides "
                                << strides_str(t);
    }
  }
  check_aligned(t, 16, name);
}

// One validation function for the op, in the fixed order: device, dtype,
// layout, shape, values.
DensePrefillBwdParams validate_dense_prefill_bwd(
    const TensorView& workspace, const TensorView& dout, const TensorView& q,
    const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
    const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_kv, const TensorView& dq,
    const TensorView& dk, const TensorView& dv, int64_t mask_mode_code, double softmax_scale,
    int64_t max_seqlen_q, int64_t max_seqlen_kv) {
  // Device.
  check_cuda(q, "q");
  const std::pair<const TensorView*, const char*> all[] = {
      {&workspace, "workspace"}, {&dout, "dout"}, {&k, "k"}, {&v, "v"},
      {&out, "out"}, {&lse, "lse"}, {&cu_seqlens_q, "cu_seqlens_q"},
      {&cu_seqlens_kv, "cu_seqlens_kv"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
  for (const auto& [t, name] : all) {
    check_cuda(*t, name);
    check_same_device(*t, q, name, "q");
  }

  // Dtype.
  const DType dtype = check_dtype_in(q, bwd::kDtypes, "q");
  const std::string elem = std::string(dtype_torch_name(dtype)) + " (the dtype of q)";
  const std::pair<const TensorView*, const char*> same_as_q[] = {
      {&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
  for (const auto& [t, name] : same_as_q) {
    DType other{};
    check_dtype(*t, element_dtype(*t, &other) && other == dtype, name, elem.c_str());
  }
  check_dtype(lse, is_fp32(lse), "lse", "float32");
  check_dtype(cu_seqlens_q, is_int32(cu_seqlens_q), "cu_seqlens_q", "int32");
  check_dtype(cu_seqlens_kv, is_int32(cu_seqlens_kv), "cu_seqlens_kv", "int32");
  check_dtype(workspace, is_uint8(workspace), "workspace", "uint8");

  // Layout (ranks first, so strides can be read).
  check_ndim(q, 3, "q", "[total_q, h_q, d_qk]");
  check_ndim(k, 3, "k", "[total_k, h_k, d_qk]");
  check_ndim(v, 3, "v", "[total_k, h_k, d_v]");
  check_ndim(out, 3, "out", "[total_q, h_q, d_v]");
  check_ndim(dout, 3, "dout", "[total_q, h_q, d_v]");
  check_ndim(dq, 3, "dq", "[total_q, h_q, d_qk]");
  check_ndim(dk, 3, "dk", "[total_k, h_k, d_qk]");
  check_ndim(dv, 3, "dv", "[total_k, h_k, d_v]");
  check_ndim(lse, 2, "lse", "[total_q, h_q]");
  check_ndim(cu_seqlens_q, 1, "cu_seqlens_q", "[batch + 1]");
  check_ndim(cu_seqlens_kv, 1, "cu_seqlens_kv", "[batch + 1]");
  check_ndim(workspace, 1, "workspace", "[bytes]");
  const std::pair<const TensorView*, const char*> vectors[] = {
      {&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "dout"},
      {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
  for (const auto& [t, name] : vectors) {
    check_last_dim_contiguous(*t, name);
    check_vector_strides(*t, name);
  }
  check_contiguous(cu_seqlens_q, "cu_seqlens_q");
  check_contiguous(cu_seqlens_kv, "cu_seqlens_kv");
  check_contiguous(workspace, "workspace");
  check_aligned(workspace, bwd::kWorkspaceAlign, "workspace");
  if (lse.size(0) > 1 && lse.stride(0) != 1) {
    TVM_FFI_THROW(ValueError) << "lse must be the [total_q, h_q] transpose of a contiguous "
                              << "[h_q, total_q] buffer (stride(0) == 1), got strides "
                              << strides_str(lse);
  }

  // Shape.
  const int64_t total_q = q.size(0), h_q = q.size(1), d_qk = q.size(2);
  const int64_t total_k = k.size(0), h_k = k.size(1), d_v = v.size(2);
  if (!caps::contains(bwd::kHeadDims, d_qk, d_v)) {
    TVM_FFI_THROW(ValueError) << "(d_qk, d_v) = (q.shape[2], v.shape[2]) must be one of "
                              << caps::listed(bwd::kHeadDims) << ", got (" << d_qk << ", " << d_v
                              << ")";
  }
  check_shape(k, {total_k, h_k, d_qk}, "k", "[total_k, h_k, d_qk]");
  check_shape(v, {total_k, h_k, d_v}, "v", "[total_k, h_k, d_v]");
  if (h_k < 1 || h_q < 1 || h_q % h_k != 0) {
    TVM_FFI_THROW(ValueError) << "h_q (q.shape[1]) must be a positive multiple of h_k (k.shape[1]), "
                              << "got h_q = " << h_q << ", h_k = " << h_k;
  }
  if (h_k > bwd::kMaxGridYZ) {
    TVM_FFI_THROW(ValueError) << "h_k (k.shape[1]) must be at most " << bwd::kMaxGridYZ
                              << ", got " << h_k;
  }
  check_shape(out, {total_q, h_q, d_v}, "out", "[total_q, h_q, d_v]");
  check_shape(dout, {total_q, h_q, d_v}, "dout", "[total_q, h_q, d_v]");
  check_shape(dq, {total_q, h_q, d_qk}, "dq", "[total_q, h_q, d_qk]");
  check_shape(dk, {total_k, h_k, d_qk}, "dk", "[total_k, h_k, d_qk]");
  check_shape(dv, {total_k, h_k, d_v}, "dv", "[total_k, h_k, d_v]");
  check_shape(lse, {total_q, h_q}, "lse", "[total_q, h_q]");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  if (batch < 0) {
    TVM_FFI_THROW(ValueError) << "cu_seqlens_q must have at least one element ([batch + 1]), "
                              << "got shape " << shape_str(cu_seqlens_q);
  }
  check_shape(cu_seqlens_kv, {batch + 1}, "cu_seqlens_kv", "[batch + 1] (as cu_seqlens_q)");
  if (batch > bwd::kMaxGridYZ) {
    TVM_FFI_THROW(ValueError) << "batch (cu_seqlens_q.shape[0] - 1) must be at most "
                              << bwd::kMaxGridYZ << ", got " << batch;
  }
  const int64_t needed = bwd::workspace_bytes(batch, total_q, h_q, d_qk);
  if (workspace.size(0) < needed) {
    TVM_FFI_THROW(ValueError) << "workspace must hold at least " << needed
                              << " bytes (dense_prefill_bwd_workspace_bytes), got "
                              << workspace.size(0);
  }

  // Values.
  if (mask_mode_code != 0 && mask_mode_code != 1) {
    TVM_FFI_THROW(ValueError) << "mask_mode_code must be 0 (no mask) or 1 (causal), got "
                              << mask_mode_code;
  }
  if (!std::isfinite(softmax_scale) || softmax_scale <= 0) {
    TVM_FFI_THROW(ValueError) << "softmax_scale must be a finite positive number, got "
                              << softmax_scale;
  }
  if (max_seqlen_q < 0 || max_seqlen_kv < 0) {
    TVM_FFI_THROW(ValueError) << "max_seqlen_q and max_seqlen_kv must be >= 0, got "
                              << max_seqlen_q << " and " << max_seqlen_kv;
  }

  DensePrefillBwdParams p{};
  p.batch = static_cast<int>(batch);
  p.total_q = narrow_to_int32(total_q, "total_q (q.shape[0])");
  p.total_k = narrow_to_int32(total_k, "total_k (k.shape[0])");
  p.h_q = static_cast<int>(h_q);
  p.h_k = static_cast<int>(h_k);
  p.d_qk = static_cast<int>(d_qk);
  p.d_v = static_cast<int>(d_v);
  p.max_seqlen_q = narrow_to_int32(max_seqlen_q, "max_seqlen_q");
  p.max_seqlen_k = narrow_to_int32(max_seqlen_kv, "max_seqlen_kv");
  p.is_causal = mask_mode_code == 1;
  p.dtype = dtype;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.q = data_ptr(q);       p.q_row_stride = q.stride(0);       p.q_head_stride = q.stride(1);
  p.k = data_ptr(k);       p.k_row_stride = k.stride(0);       p.k_head_stride = k.stride(1);
  p.v = data_ptr(v);       p.v_row_stride = v.stride(0);       p.v_head_stride = v.stride(1);
  p.out = data_ptr(out);   p.out_row_stride = out.stride(0);   p.out_head_stride = out.stride(1);
  p.dout = data_ptr(dout); p.dout_row_stride = dout.stride(0); p.dout_head_stride = dout.stride(1);
  p.lse = static_cast<const float*>(data_ptr(lse));
  p.lse_head_stride = lse.stride(1);
  p.cu_seqlens_q = static_cast<const int32_t*>(data_ptr(cu_seqlens_q));
  p.cu_seqlens_k = static_cast<const int32_t*>(data_ptr(cu_seqlens_kv));
  p.dq = data_ptr(dq);     p.dq_row_stride = dq.stride(0);     p.dq_head_stride = dq.stride(1);
  p.dk = data_ptr(dk);     p.dk_row_stride = dk.stride(0);     p.dk_head_stride = dk.stride(1);
  p.dv = data_ptr(dv);     p.dv_row_stride = dv.stride(0);     p.dv_head_stride = dv.stride(1);
  p.workspace = data_ptr(workspace);
  p.workspace_bytes = workspace.size(0);
  return p;
}

// The element tag the kernels take for a capability-table dtype.
template <DType kDType>
using ElementTag = std::conditional_t<kDType == DType::kBF16, portable::BF16, portable::FP16>;

// One kernel instance per kHeadDims entry (validation admitted only listed pairs).
template <DType kDType>
void dispatch_head_dims(const DensePrefillBwdParams& p, bwd::BwdLayout layout) {
  caps::for_each_entry<std::size(bwd::kHeadDims)>([&](auto i) {
    constexpr caps::HeadDims kDims = bwd::kHeadDims[decltype(i)::value];
    if (p.d_qk == kDims.d_qk && p.d_v == kDims.d_v) {
      bwd::run_dense_prefill_bwd<ElementTag<kDType>, kDims.d_qk, kDims.d_v>(p, layout);
    }
  });
}

// Main-kernel CTA for `device` and the problem (config.h: choose_layout). The environment
// variable FLASH_MLA_DENSE_BWD_WARPS=8|4|8x128 forces one (8 warps x 64 keys, 4 warps x
// 64 keys, 8 warps x 128 keys), so all are tested on one GPU (the 8-warp CTA, sm_120's at
// d = 128, is validated on Hopper that way; 4 and 8x128 apply to d_qk <= 128 only,
// d_qk = 192 always runs 8 warps x 64 keys); read on every call.
bwd::BwdLayout layout_for(int device, int d_qk) {
  const int smem_per_sm = max_smem_per_sm(device);
  const int smem_per_block = max_smem_per_block(device);
  const std::string forced = forced_variant("FLASH_MLA_DENSE_BWD_WARPS");
  if (!forced.empty()) {
    if (forced == "8") return bwd::BwdLayout::kWarps8;
    if (forced == "8x128") {
      const int needed = bwd::smem_per_block_128keys(d_qk);
      if (smem_per_block < needed) {
        TVM_FFI_THROW(ValueError)
            << "FLASH_MLA_DENSE_BWD_WARPS=8x128 needs a GPU whose blocks may use " << needed
            << " bytes of shared memory at d_qk " << d_qk << ", this one allows "
            << smem_per_block;
      }
      return bwd::BwdLayout::kKeys128;
    }
    if (forced == "4") {
      const int needed = bwd::min_smem_per_sm_4warps(d_qk);
      if (smem_per_sm < needed) {
        TVM_FFI_THROW(ValueError)
            << "FLASH_MLA_DENSE_BWD_WARPS=4 needs a GPU with at least " << needed
            << " bytes of shared memory per SM at d_qk " << d_qk
            << " (two 4-warp CTAs), this one has " << smem_per_sm;
      }
      return bwd::BwdLayout::kWarps4;
    }
    TVM_FFI_THROW(ValueError)
        << "FLASH_MLA_DENSE_BWD_WARPS must be 8, 4 or 8x128 (or unset), got '" << forced << "'";
  }
  return bwd::choose_layout(smem_per_sm, smem_per_block, d_qk);
}

// The backward into preallocated dq / dk / dv; deterministic: see the file comment.
void run_bwd(TensorView workspace, TensorView dout, TensorView q, TensorView k, TensorView v,
             TensorView out, TensorView lse, TensorView cu_seqlens_q, TensorView cu_seqlens_kv,
             TensorView dq, TensorView dk, TensorView dv, int64_t mask_mode_code,
             double softmax_scale, int64_t max_seqlen_q, int64_t max_seqlen_kv,
             bool deterministic) {
  DensePrefillBwdParams p = validate_dense_prefill_bwd(
      workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
      mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv);
  const int device = q.device().device_id;
  DeviceGuard guard(device);
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device);
  p.stream = current_stream(device);

  // Deterministic: the 8-warp CTA with turn-taking dQ (kernel.cuh); otherwise the
  // layout of layout_for (the environment override included).
  if (deterministic) {
    p.dq_turns = reinterpret_cast<int*>(static_cast<char*>(p.workspace) +
                                        bwd::dq_turns_offset(p.total_q, p.h_q, p.d_qk));
  }
  const bwd::BwdLayout layout =
      deterministic ? bwd::BwdLayout::kWarps8 : layout_for(device, p.d_qk);
  caps::for_each_entry<std::size(bwd::kDtypes)>([&](auto i) {
    constexpr DType kDType = bwd::kDtypes[decltype(i)::value];
    if (p.dtype == kDType) dispatch_head_dims<kDType>(p, layout);
  });
  check_launch("dense_prefill_bwd");
}

}  // namespace

void dense_prefill_bwd(TensorView workspace, TensorView dout, TensorView q, TensorView k,
                       TensorView v, TensorView out, TensorView lse, TensorView cu_seqlens_q,
                       TensorView cu_seqlens_kv, TensorView dq, TensorView dk, TensorView dv,
                       int64_t mask_mode_code, double softmax_scale, int64_t max_seqlen_q,
                       int64_t max_seqlen_kv, bool is_varlen) {
  (void)is_varlen;  // see the file comment
  run_bwd(workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
          mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, false);
}

void dense_prefill_bwd_deterministic(TensorView workspace, TensorView dout, TensorView q,
                                     TensorView k, TensorView v, TensorView out, TensorView lse,
                                     TensorView cu_seqlens_q, TensorView cu_seqlens_kv,
                                     TensorView dq, TensorView dk, TensorView dv,
                                     int64_t mask_mode_code, double softmax_scale,
                                     int64_t max_seqlen_q, int64_t max_seqlen_kv,
                                     bool is_varlen) {
  (void)is_varlen;
  run_bwd(workspace, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_kv, dq, dk, dv,
          mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, true);
}

int64_t dense_prefill_bwd_workspace_bytes(int64_t batch, int64_t total_q, int64_t total_k,
                                          int64_t h_q, int64_t h_k, int64_t d_qk, int64_t d_v) {
  (void)total_k;
  (void)h_k;
  (void)d_v;
  if (batch < 0 || total_q < 0 || h_q < 0 || d_qk < 0) {
    TVM_FFI_THROW(ValueError) << "dense_prefill_bwd_workspace_bytes needs non-negative sizes, got "
                              << "batch = " << batch << ", total_q = " << total_q
                              << ", h_q = " << h_q << ", d_qk = " << d_qk;
  }
  return bwd::workspace_bytes(batch, total_q, h_q, d_qk);
}

}  // namespace flash_mla::api

TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_prefill_bwd, flash_mla::api::dense_prefill_bwd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_prefill_bwd_deterministic,
                              flash_mla::api::dense_prefill_bwd_deterministic);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(dense_prefill_bwd_workspace_bytes,
                              flash_mla::api::dense_prefill_bwd_workspace_bytes);

namespace {
namespace bwd_cfg = ::flash_mla::portable::dense_bwd;
// Main kernels (causal and non-causal share the shared-memory size). The symbol pieces
// are the kernel template's length-prefixed name and its element type and head dims
// (KernelRecord::symbol). The preprocess, outside-rows and dQ convert kernels use no
// dynamic shared memory.
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_bf16_d64, "dense_prefill_bwd",
    "main bf16 d_qk64 d_v64", (bwd_cfg::Config<64, 64>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4BF16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_bf16_d128, "dense_prefill_bwd",
    "main bf16 d_qk128 d_v128", (bwd_cfg::Config<128, 128>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4BF16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_bf16_d192, "dense_prefill_bwd",
    "main bf16 d_qk192 d_v128", (bwd_cfg::Config<192, 128>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4BF16ELi192ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_fp16_d64, "dense_prefill_bwd",
    "main fp16 d_qk64 d_v64", (bwd_cfg::Config<64, 64>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4FP16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_fp16_d128, "dense_prefill_bwd",
    "main fp16 d_qk128 d_v128", (bwd_cfg::Config<128, 128>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4FP16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main_fp16_d192, "dense_prefill_bwd",
    "main fp16 d_qk192 d_v128", (bwd_cfg::Config<192, 128>::kSmemBytes), bwd_cfg::kThreads,
    "21dense_bwd_main_kernelI 4FP16ELi192ELi128E");
// The 4-warp main kernels (d_qk <= 128; Config4).
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main4_bf16_d64, "dense_prefill_bwd",
    "main 4-warp bf16 d_qk64 d_v64", (bwd_cfg::Config4<64, 64>::kSmemBytes), bwd_cfg::k4Threads,
    "22dense_bwd_main4_kernelI 4BF16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main4_bf16_d128, "dense_prefill_bwd",
    "main 4-warp bf16 d_qk128 d_v128", (bwd_cfg::Config4<128, 128>::kSmemBytes), bwd_cfg::k4Threads,
    "22dense_bwd_main4_kernelI 4BF16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main4_fp16_d64, "dense_prefill_bwd",
    "main 4-warp fp16 d_qk64 d_v64", (bwd_cfg::Config4<64, 64>::kSmemBytes), bwd_cfg::k4Threads,
    "22dense_bwd_main4_kernelI 4FP16ELi64ELi64E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main4_fp16_d128, "dense_prefill_bwd",
    "main 4-warp fp16 d_qk128 d_v128", (bwd_cfg::Config4<128, 128>::kSmemBytes), bwd_cfg::k4Threads,
    "22dense_bwd_main4_kernelI 4FP16ELi128ELi128E");
// The 128-key main kernels (d_qk <= 128; Config128): d = 128 needs more than 99 KB and
// runs only where a block may opt in to it (layout_for).
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main128_bf16_d64, "dense_prefill_bwd",
    "main 128-key bf16 d_qk64 d_v64", (bwd_cfg::Config128<64, 64>::kSmemBytes),
    bwd_cfg::k128Threads, "24dense_bwd_main128_kernelI 4BF16ELi64ELi64E");
FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(dense_prefill_bwd_main128_bf16_d128, "dense_prefill_bwd",
    "main 128-key bf16 d_qk128 d_v128", (bwd_cfg::Config128<128, 128>::kSmemBytes),
    bwd_cfg::k128Threads, "24dense_bwd_main128_kernelI 4BF16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_main128_fp16_d64, "dense_prefill_bwd",
    "main 128-key fp16 d_qk64 d_v64", (bwd_cfg::Config128<64, 64>::kSmemBytes),
    bwd_cfg::k128Threads, "24dense_bwd_main128_kernelI 4FP16ELi64ELi64E");
FLASH_MLA_REGISTER_LARGE_SMEM_KERNEL(dense_prefill_bwd_main128_fp16_d128, "dense_prefill_bwd",
    "main 128-key fp16 d_qk128 d_v128", (bwd_cfg::Config128<128, 128>::kSmemBytes),
    bwd_cfg::k128Threads, "24dense_bwd_main128_kernelI 4FP16ELi128ELi128E");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_preprocess, "dense_prefill_bwd",
    "preprocess delta (all dtypes, head dims)", 0, bwd_cfg::kPreprocessThreads,
    "27dense_bwd_preprocess_kernelI");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_outside_rows, "dense_prefill_bwd",
    "zero dk, dv outside every sequence (all dtypes, head dims)", 0, bwd_cfg::kConvertThreads,
    "34dense_bwd_zero_outside_rows_kernelI");
FLASH_MLA_REGISTER_KERNEL_SYMBOL(dense_prefill_bwd_convert_dq, "dense_prefill_bwd",
    "convert dq (all dtypes, head dims)", 0, bwd_cfg::kConvertThreads,
    "27dense_bwd_convert_dq_kernelI");
FLASH_MLA_REGISTER_OP(dense_prefill_bwd, bwd_cfg::capabilities_json);
}  // namespace
