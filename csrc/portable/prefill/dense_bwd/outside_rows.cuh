// dk / dv rows that belong to no sequence (before cu_seqlens_k[0] or from
// cu_seqlens_k[batch] on) have gradient 0: the main kernel never visits them, so
// this small grid-stride kernel writes the zeros (callers often pass
// torch.empty outputs). Rows inside sequences are left alone, and so are
// zero-length sequences, which own no rows.
#pragma once

#include <cstdint>

#include "../../../params.h"
#include "config.h"

namespace flash_mla::portable::dense_bwd {

constexpr int kOutsideBlocks = 32;  // the rows are usually none or few

template <typename Storage, int kDQK, int kDV>
__global__ void __launch_bounds__(kConvertThreads)
    dense_bwd_zero_outside_rows_kernel(const DensePrefillBwdParams p) {
  const int first = min(max(p.cu_seqlens_k[0], 0), p.total_k);
  const int last = max(min(p.cu_seqlens_k[p.batch], p.total_k), first);
  const int64_t outside = static_cast<int64_t>(first) + (p.total_k - last);
  constexpr int kChunksK = kDQK / 8;
  constexpr int kChunksRow = (kDQK + kDV) / 8;  // dk chunks, then dv chunks
  const int64_t total = outside * p.h_k * kChunksRow;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kConvertThreads) {
    const int c = static_cast<int>(i % kChunksRow);
    const int64_t rh = i / kChunksRow;
    const int h = static_cast<int>(rh % p.h_k);
    const int64_t r = rh / p.h_k;
    const int64_t row = r < first ? r : last + (r - first);
    Storage* dst = c < kChunksK
                       ? static_cast<Storage*>(p.dk) + row * p.dk_row_stride + h * p.dk_head_stride +
                             c * 8
                       : static_cast<Storage*>(p.dv) + row * p.dv_row_stride + h * p.dv_head_stride +
                             (c - kChunksK) * 8;
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

}  // namespace flash_mla::portable::dense_bwd
