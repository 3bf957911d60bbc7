// Masking policies of the backward, from the point of view of one key block
// [n0, n0 + kKeys) of a sequence with s_q queries and s_k keys (kKeys: the CTA's
// key block, kBlockN or Config128's 128).
// Causal is bottom-right aligned: query r sees keys [0, s_k - s_q + r].
//   first_m_block(): the first query block with any row that sees the key block
//                    (earlier blocks are skipped, not masked);
//   needs_mask():    whether a (query block, key block) pair has any element the
//                    policy hides, so fully visible pairs skip the per-element test;
//   kCausal:         the per-element test is TileLimits::visible<Mask::kCausal>.
// Keys >= s_k are hidden by every policy; query rows >= s_q are handled by the
// caller (lse = +inf).
#pragma once

#include "config.h"

namespace flash_mla::portable::dense_bwd {

// The per-element test for one thread's accumulator elements, as offsets (dk, dq)
// from its first key key0 and query q0 (positions within the sequence): key0 + dk
// is visible to q0 + dq iff dk < keys_left and, causal, dk - dq <= diag. Two ints per
// thread instead of a position per element: this form (and computing the test
// before the `check_mask &&`) is what let the 4-warp CTA's 32-query passes fit 255
// registers without spills on every target (nvcc 13.0).
struct TileLimits {
  int keys_left;  // s_k - key0
  int diag;       // s_k - s_q + q0 - key0
  __device__ __forceinline__ static TileLimits make(int key0, int q0, int s_q, int s_k) {
    return {s_k - key0, s_k - s_q + q0 - key0};
  }
  template <bool kCausal>
  __device__ __forceinline__ bool visible(int dk, int dq) const {
    bool vis = dk < keys_left;
    if constexpr (kCausal) vis = vis && dk - dq <= diag;
    return vis;
  }
};

struct NoMask {
  static constexpr bool kCausal = false;
  __device__ __forceinline__ static int first_m_block(int /*n0*/, int /*s_q*/, int /*s_k*/) {
    return 0;
  }
  template <int kKeys = kBlockN>
  __device__ __forceinline__ static bool needs_mask(int /*m0*/, int n0, int /*s_q*/, int s_k) {
    return n0 + kKeys > s_k;
  }
};

struct CausalMask {
  static constexpr bool kCausal = true;
  __device__ __forceinline__ static int first_m_block(int n0, int s_q, int s_k) {
    // Row r sees key n0 iff r >= n0 - (s_k - s_q).
    const int first_row = n0 - (s_k - s_q);
    return first_row <= 0 ? 0 : first_row / kBlockM;
  }
  template <int kKeys = kBlockN>
  __device__ __forceinline__ static bool needs_mask(int m0, int n0, int s_q, int s_k) {
    // Fully visible iff the block's first row sees the block's last key.
    return n0 + kKeys > s_k || n0 + kKeys - 1 > s_k - s_q + m0;
  }
};

}  // namespace flash_mla::portable::dense_bwd
