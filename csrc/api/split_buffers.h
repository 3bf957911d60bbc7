// The split-KV buffers a decode entry takes beside its own tensors: the schedule
// (tile_scheduler_metadata int32 [P, 8], num_splits = split offsets int32 [b + 1]) and the
// fp32 partials (o_accum [S, d1, d2, 512], lse_accum [S, d1, d2]; (d1, d2) is (h_q, s_q)
// for the dense decode and (s_q, h_q) for the sparse decode). Their checks, one call per
// phase of the entry's fixed order (device, dtype, layout, shape, values), with messages
// that name the arguments as the Python API passes them.
#pragma once

#include <cstdint>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>

#include "../params.h"
#include "../portable/decode/schedule/config.h"
#include "checks.h"
#include "env_alloc.h"

namespace flash_mla::api {

// The combine over a decode's fp32 partials into its out / lse (both decode params carry
// the same field names). heads_first: the partials' row dims are (h_q, s_q), as the dense
// decode writes them, so the combine sees (s_q, h_q) swapped, out's strides with them.
// A request with one split was written directly by the decode (skip_single_split).
template <typename DecodeParams>
CombineParams combine_over_partials(const DecodeParams& p, bool heads_first, int d_v,
                                    DType out_dtype, const float* attn_sink) {
  CombineParams c{};
  c.batch = p.batch;
  c.s_q = heads_first ? p.h_q : p.s_q;
  c.h_q = heads_first ? p.s_q : p.h_q;
  c.d_v = d_v;
  c.num_splits_total = p.num_splits_total;
  c.out_dtype = out_dtype;
  c.skip_single_split = true;
  c.o_accum = p.o_accum;
  c.lse_accum = p.lse_accum;
  c.split_offsets = p.split_offsets;
  c.attn_sink = attn_sink;
  c.out = p.out;
  c.out_batch_stride = p.out_batch_stride;
  c.out_row_stride = heads_first ? p.out_head_stride : p.out_row_stride;
  c.out_head_stride = heads_first ? p.out_row_stride : p.out_head_stride;
  c.lse = p.lse;
  c.stream = p.stream;
  return c;
}

struct SplitBuffers {
  const TensorView& metadata;
  const TensorView& split_offsets;
  const TensorView& o_accum;
  const TensorView& lse_accum;
  const char* rows;  // the partials' row dims for messages: "h_q, s_q" or "s_q, h_q"

  void check_devices(const TensorView& q) const {
    check_same_device(metadata, q, "tile_scheduler_metadata", "q");
    check_same_device(split_offsets, q, "num_splits", "q");
    check_same_device(o_accum, q, "o_accum", "q");
    check_same_device(lse_accum, q, "lse_accum", "q");
  }

  void check_dtypes() const {
    check_dtype(metadata, is_int32(metadata), "tile_scheduler_metadata", "int32");
    check_dtype(split_offsets, is_int32(split_offsets), "num_splits", "int32");
    check_dtype(o_accum, is_fp32(o_accum), "o_accum", "float32");
    check_dtype(lse_accum, is_fp32(lse_accum), "lse_accum", "float32");
  }

  void check_layout() const {
    check_ndim(metadata, 2, "tile_scheduler_metadata", "[num_parts, 8]");
    check_ndim(split_offsets, 1, "num_splits", "[b + 1]");
    const std::string rows_s(rows);
    check_ndim(o_accum, 4, "o_accum", ("[num_splits_total, " + rows_s + ", 512]").c_str());
    check_ndim(lse_accum, 3, "lse_accum", ("[num_splits_total, " + rows_s + "]").c_str());
    check_contiguous(metadata, "tile_scheduler_metadata");
    check_contiguous(split_offsets, "num_splits");
    check_contiguous(o_accum, "o_accum");
    check_contiguous(lse_accum, "lse_accum");
    check_aligned(o_accum, 16, "o_accum");
  }

  int64_t parts() const { return metadata.size(0); }
  int64_t splits() const { return o_accum.size(0); }

  // b: requests; (d1, d2): the partials' row dims, in the order of `rows`; d_v: 512.
  void check_shapes(int64_t b, int64_t d1, int64_t d2, int64_t d_v) const {
    const std::string rows_s(rows);
    check_shape(metadata, {parts(), portable::decode_schedule::kMetaInts},
                "tile_scheduler_metadata", "[num_parts, 8]");
    check_shape(split_offsets, {b + 1}, "num_splits", "[b + 1] (b from q)");
    check_shape(o_accum, {splits(), d1, d2, d_v}, "o_accum",
                ("[num_splits_total, " + rows_s + ", 512] (" + rows_s + " from q)").c_str());
    check_shape(lse_accum, {splits(), d1, d2}, "lse_accum",
                ("[num_splits_total, " + rows_s + "]").c_str());
  }

  void check_rows() const {
    if (parts() < 1 || splits() < 1) {
      TVM_FFI_THROW(ValueError) << "tile_scheduler_metadata and o_accum must have at least one "
                                << "row, got shapes " << shape_str(metadata) << " and "
                                << shape_str(o_accum);
    }
  }
};

// What an allocating decode entry sizes its outputs and partials by, read before its full
// validation: b, s_q, h_q from q [b, s_q, h_q, d_qk] and the split count from the schedule
// (P parts: P in batch-invariant mode, else b + P). Checks q and the schedule just far
// enough to read them; the entry then validates every tensor, the allocated ones included.
struct DecodeSizes {
  int64_t b, s_q, h_q, splits;
};
inline DecodeSizes decode_sizes(const TensorView& q, const TensorView& metadata,
                                bool batch_invariant, const char* q_layout) {
  check_cuda(q, "q");
  check_ndim(q, 4, "q", q_layout);
  check_ndim(metadata, 2, "tile_scheduler_metadata", "[num_parts, 8]");
  const int64_t b = q.size(0), parts = metadata.size(0);
  return DecodeSizes{b, q.size(1), q.size(2), batch_invariant ? parts : b + parts};
}

// The fp32 partials of an allocating decode entry: o_accum [S, d1, d2, d_v] and lse_accum
// [S, d1, d2], contiguous, as two views of ONE allocation from the caller's allocator (each
// allocation costs about 1.4 us of host time; docs/dense_decode.md). o_accum comes first, so
// it keeps the allocation's alignment; lse_accum follows at a multiple of d_v floats.
class EnvPartials {
 public:
  EnvPartials(int64_t splits, int64_t d1, int64_t d2, int64_t d_v, DLDevice device)
      : scratch_(env_empty({splits * d1 * d2 * (d_v + 1)}, kFloat32, device)),
        o_shape_{splits, d1, d2, d_v},
        o_strides_{d1 * d2 * d_v, d2 * d_v, d_v, 1},
        l_shape_{splits, d1, d2},
        l_strides_{d1 * d2, d2, 1} {
    float* base = static_cast<float*>(scratch_.data_ptr());
    o_ = view(base, o_shape_, o_strides_, 4);
    l_ = view(base + splits * d1 * d2 * d_v, l_shape_, l_strides_, 3);
  }
  EnvPartials(const EnvPartials&) = delete;
  EnvPartials& operator=(const EnvPartials&) = delete;

  TensorView o_accum() const { return TensorView(&o_); }
  TensorView lse_accum() const { return TensorView(&l_); }

 private:
  DLTensor view(float* data, int64_t* shape, int64_t* strides, int ndim) const {
    DLTensor t{};
    t.data = data;
    t.device = scratch_.device();
    t.ndim = ndim;
    t.dtype = kFloat32;
    t.shape = shape;
    t.strides = strides;
    t.byte_offset = 0;
    return t;
  }

  Tensor scratch_;  // owns the memory until the entry returns (stream-ordered reuse after)
  int64_t o_shape_[4], o_strides_[4], l_shape_[3], l_strides_[3];
  DLTensor o_{}, l_{};
};

}  // namespace flash_mla::api
