// Tile sizes and shared-memory budget of the portable dense MHA prefill forward.
// The ONE place that decides them: the host dispatch (launch geometry, dynamic
// shared memory, kernel registry) and the kernel template both read these.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"
#include "../../../common/limits.h"

namespace flash_mla::portable::dense_fwd {

// What the op "dense_prefill_fwd" serves (common/capabilities.h): the API validates
// against these tables, dispatches over them (one instantiation per entry), and
// build_info reports them. Config / WideConfig static_assert their head dims against it.
inline constexpr DType kDtypes[] = {DType::kBF16, DType::kFP16};
inline constexpr caps::HeadDims kHeadDims[] = {{64, 64}, {128, 128}, {192, 128}};

// build_info's "ops" entry: {"dtype": [...], "head_dims": [[64, 64], ...]}.
inline std::string capabilities_json() {
  return caps::JsonObject().field("dtype", kDtypes).field("head_dims", kHeadDims).str();
}

constexpr int kBlockN = 64;  // keys per K/V tile
constexpr int kElemBytes = 2;  // bf16 / fp16

// Each warp owns one m16 slab of query rows (16 rows), so softmax statistics
// never cross warps. A CTA has kNumWarps warps and kBlockM = 16 * kNumWarps rows;
// the per-warp code is the same for both 16-row sizes:
//  - 8 warps, 128 rows: for GPUs with ~100 KB of shared memory per SM (sm_120/121,
//    sm_86/89) at d >= 128, where one CTA fits per SM and needs 8 warps to hide latency.
//  - 4 warps, 64 rows: for GPUs with 160-195 KB per SM (A100) at d_qk = 128
//    (H100/H200 and sm_100, and d = 64 everywhere, take the 4x32 CTA below). Two
//    CTAs share an SM (registers allow 2 x 128 threads x <= 255) and their barriers
//    drift apart, so one CTA's softmax overlaps the other's MMAs; with one 8-warp
//    CTA per SM all warps meet at every tile's barrier. Not built for d = 192: there
//    64-row blocks load every K/V tile twice as often per query row, which costs
//    more than the overlap gains (docs/mha_fwd.md).
//  - 4 warps x 32 rows, 128 rows ("4x32", FA2's layout; WideConfig below): each
//    warp owns two m16 slabs, so every K/V ldmatrix fragment feeds two MMAs. Q stays
//    in shared memory and is re-read with ldmatrix per k-step (Q in registers as
//    well does not fit next to S and O at d >= 128). Two K/V stages at d_qk <= 128,
//    one at d = 192 (WideConfig).
constexpr int kMinSmemPerSmForFourWarps = 160 * 1024;

// CTA layouts (FLASH_MLA_DENSE_FWD_WARPS=8|4|4x32 forces one; csrc/api; choose_layout
// below WideConfig).
enum class CtaLayout : int { kWarps8 = 8, kWarps4 = 4, kWarps4x32 = 432 };

template <int kDQK, int kDV, int kNumWarps_>
struct Config {
  static_assert(kNumWarps_ == 8 || kNumWarps_ == 4, "8 or 4 warps");
  static constexpr int kNumWarps = kNumWarps_;
  static constexpr int kThreads = kNumWarps * 32;
  static constexpr int kBlockM = 16 * kNumWarps;  // query rows per CTA
  static_assert(caps::contains(kHeadDims, caps::HeadDims{kDQK, kDV}),
                "(d_qk, d_v) must be listed in kHeadDims");
  static constexpr int kHeadDimQK = kDQK;
  static constexpr int kHeadDimV = kDV;

  // Shared-memory byte layout (see kernel.cuh for the protocol):
  //   [0, kStageBytes)                     stage 1 (K tile, then V tile)
  //   [0, kQBytes)                         Q tile, aliased on stage 1: Q is moved
  //                                        to registers before stage 1 is first filled
  //   [kStage0Offset, +kStageBytes)        stage 0
  //   [0, kOBytes)                         output staging, aliased after the last tile
  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kKTileBytes = kBlockN * kDQK * kElemBytes;
  static constexpr int kVTileBytes = kBlockN * kDV * kElemBytes;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kStage0Offset = kQBytes > kStageBytes ? kQBytes : kStageBytes;
  static constexpr int kOBytes = kBlockM * kDV * kElemBytes;
  static constexpr int kSmemBytes = kStage0Offset + kStageBytes;

  // d = 192, 8 warps: Q 48 KB + one stage (24 KB K + 16 KB V) = 88 KB = 90112 B:
  // two K/V stages fit only because Q shares its bytes with stage 1. A separate Q
  // buffer would need 128 KB. (No 4-warp CTA at d = 192: see choose_layout.)
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "forward tile exceeds sm_120's 99 KB");
  static_assert(kOBytes <= kSmemBytes, "output staging must fit in the K/V buffers");
};

static_assert(Config<192, 128, 8>::kSmemBytes == 90112, "d=192 budget as documented");
static_assert(Config<128, 128, 8>::kSmemBytes == 65536, "d=128 budget as documented");
static_assert(Config<64, 64, 8>::kSmemBytes == 32768, "d=64 budget as documented");
static_assert(Config<128, 128, 4>::kSmemBytes == 65536, "d=128 budget as documented");
static_assert(Config<64, 64, 4>::kSmemBytes == 32768, "d=64 budget as documented");

// 4 warps x 32 rows. Q has its own buffer (it is re-read every tile):
//   [0, kQBytes)                          Q tile [128][d_qk]
//   [kStage0Offset, +kStageBytes)         stage 0 (K tile, then V tile)
//   [+kStageStride, +kStageBytes)         stage 1 (two-stage form only)
//   [kScalarOffset, +kScalarBytes)        CTA-uniform loop values (64 B)
//   [0, kOBytes)                          output staging, aliased after the last tile
// d = 128: 32768 + 2 x 32768 + 64 = 98368 B (fits sm_120's 99 KB; two CTAs per SM where
// an SM has 228 KB).
// d = 192: two stages would need 49152 + 2 x 40960 = 131072 B, so one stage:
// 49152 + 40960 + 64 = 90176 B. Its next tile is copied once every warp is done with
// the current one (kernel_4x32.cuh); the other CTA on the SM computes meanwhile.
template <int kDQK, int kDV>
struct WideConfig {
  // K/V stages: two where they fit 99 KB (d_qk <= 128); one at d = 192.
  static constexpr int kStages = kDQK <= 128 ? 2 : 1;
  static_assert(caps::contains(kHeadDims, caps::HeadDims{kDQK, kDV}),
                "(d_qk, d_v) must be listed in kHeadDims");
  static constexpr int kNumWarps = 4;
  static constexpr int kThreads = 128;
  static constexpr int kSlabs = 2;  // m16 slabs per warp
  static constexpr int kBlockM = 16 * kSlabs * kNumWarps;
  static constexpr int kHeadDimQK = kDQK;
  static constexpr int kHeadDimV = kDV;
  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kKTileBytes = kBlockN * kDQK * kElemBytes;
  static constexpr int kVTileBytes = kBlockN * kDV * kElemBytes;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kStage0Offset = kQBytes;
  // Tile n lives in stage n % 2 at kStage0Offset + (n & 1) * kStageStride.
  static constexpr int kStageStride = (kStages - 1) * kStageBytes;
  static constexpr int kOBytes = kBlockM * kDV * kElemBytes;
  // CTA-uniform values of the tile loop (kernel_4x32.cuh's CtaScalars: two
  // pointers, the first masked tile, the mask policy), kept out of registers.
  static constexpr int kScalarOffset = kQBytes + kStages * kStageBytes;
  static constexpr int kScalarBytes = 64;
  static constexpr int kSmemBytes = kScalarOffset + kScalarBytes;
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "forward tile exceeds sm_120's 99 KB");
  static_assert(kOBytes <= kSmemBytes, "output staging must fit in the Q/K/V buffers");
};

static_assert(WideConfig<128, 128>::kSmemBytes == 98368, "d=128 4x32 budget as documented");
static_assert(WideConfig<64, 64>::kSmemBytes == 49216, "d=64 4x32 budget as documented");
static_assert(WideConfig<192, 128>::kSmemBytes == 90176, "d=192 4x32 budget as documented");

// Shared memory per SM that two 4x32 CTAs need at d_qk (1 KB per CTA is reserved):
// d = 128 198784 B, d = 192 182400 B (H100/H200, B200: 228 KB), d = 64 100480 B (also
// A100's 164 KB and the 100 KB of sm_120/121 and sm_86/89).
inline int min_smem_per_sm_4x32(int d_qk) {
  const int bytes = d_qk == 64    ? WideConfig<64, 64>::kSmemBytes
                    : d_qk == 128 ? WideConfig<128, 128>::kSmemBytes
                                  : WideConfig<192, 128>::kSmemBytes;
  return smem_per_sm_for(2, bytes);
}
static_assert(smem_per_sm_for(2, WideConfig<64, 64>::kSmemBytes) <= kSmemPerSmSm120,
              "two d=64 4x32 CTAs fit a 100 KB SM");

// The 4x32 CTA where two fit an SM (their barriers drift apart, as with the 4-warp
// CTA), at every d_qk: it does half the K/V shared-memory reads per MMA of the 16-row
// layouts, and on the H100 it was the fastest layout at every d_qk, causal or not
// (docs/mha_fwd.md has the measurements; benchmarks/bench_layouts.py repeats them on
// the local GPU). Otherwise the 4-warp CTA where two fit (A100 at d = 128), else the
// 8-warp CTA (sm_120 at d >= 128, one CTA per SM).
inline CtaLayout choose_layout(int smem_per_sm, int d_qk) {
  if (smem_per_sm >= min_smem_per_sm_4x32(d_qk)) return CtaLayout::kWarps4x32;
  return smem_per_sm >= kMinSmemPerSmForFourWarps && d_qk <= 128 ? CtaLayout::kWarps4
                                                                  : CtaLayout::kWarps8;
}

// Grid: x = query blocks of the longest sequence, y = query heads, z = sequences.
// gridDim.y and gridDim.z are limited to 65535.
constexpr int kMaxGridYZ = 65535;

inline int num_m_blocks(int max_seqlen_q, int block_m) {
  return (max_seqlen_q + block_m - 1) / block_m;
}

}  // namespace flash_mla::portable::dense_fwd
