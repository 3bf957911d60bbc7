// Tile shapes and shared-memory budgets of the portable dense MHA prefill forward.
// The ONE place that decides them: the host dispatch (launch geometry, dynamic
// shared memory, kernel registry) and the kernel template both read these.
#pragma once

#include <cstdint>

#include "../../../common/limits.h"

namespace flash_mla::portable::dense_fwd {

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 64;   // keys per K/V tile
constexpr int kElemBytes = 2;  // bf16 / fp16

// Two warp layouts of the same 128-row block (docs/mha_fwd.md has the arithmetic):
//  - kWarps8: 8 warps x 16 rows, Q in registers, K/V double-buffered with Q
//    aliased on stage 1. For GPUs with ~100 KB of shared memory per SM (sm_120/121,
//    sm_86/89): one CTA per SM, 8 warps to hide latency. 4 warps x 32 rows with Q
//    in registers would need ~255+ registers and spill (SM120.md).
//  - kWarps4: 4 warps x 32 rows, Q re-read from shared memory each tile, one K
//    and one V buffer (FA2 schedule). Each warp reads every K/V tile once, so
//    32-row warps halve the ldmatrix traffic; on Hopper (mma rate ~5x sm_120's per
//    SM) 16-row warps are bound by shared-memory bandwidth. Two CTAs per SM
//    overlap one's softmax with the other's MMAs. For GPUs with >= 160 KB per SM.
enum class WarpLayout : int { kWarps8 = 8, kWarps4 = 4 };

constexpr int kMinSmemPerSmForWarps4 = 160 * 1024;

template <int kDQK, int kDV, WarpLayout kLayout>
struct Config {
  static_assert((kDQK == 64 && kDV == 64) || (kDQK == 128 && kDV == 128) ||
                    (kDQK == 192 && kDV == 128),
                "supported (d_qk, d_v): (64, 64), (128, 128), (192, 128)");
  static constexpr int kHeadDimQK = kDQK;
  static constexpr int kHeadDimV = kDV;
  static constexpr int kNumWarps = static_cast<int>(kLayout);
  static constexpr int kThreads = kNumWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kNumWarps);  // m16 slabs per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr bool kQInRegisters = kLayout == WarpLayout::kWarps8;
  static_assert(kBlockM == kNumWarps * kWarpRows, "warps tile the block's rows");

  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kKTileBytes = kBlockN * kDQK * kElemBytes;
  static constexpr int kVTileBytes = kBlockN * kDV * kElemBytes;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kOBytes = kBlockM * kDV * kElemBytes;

  // Shared-memory byte layout.
  // kWarps8 (Q moves to registers before stage 1 is first filled):
  //   [0, kStageBytes)            stage 1: K tile then V tile; Q [0, kQBytes) aliased
  //   [kStage0Offset, +kStage)    stage 0: K tile then V tile
  // kWarps4 (Q stays resident):
  //   [0, kQBytes)                Q
  //   [kQBytes, +kKTileBytes)     K buffer
  //   [.., +kVTileBytes)          V buffer
  // Both: [0, kOBytes) output staging, after the last tile.
  static constexpr int kStage0Offset = kQBytes > kStageBytes ? kQBytes : kStageBytes;
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kQBytes + kKTileBytes;
  static constexpr int kSmemBytes =
      kQInRegisters ? kStage0Offset + kStageBytes : kQBytes + kStageBytes;

  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "forward tile exceeds sm_120's 99 KB");
  static_assert(kOBytes <= kSmemBytes, "output staging must fit in the K/V buffers");
};

// d = 192 budgets: kWarps8: Q 48 KB aliased on stage 1 + stage 0 (24 KB K + 16 KB V)
// = 88 KB; two stages fit only because Q shares stage 1's bytes (a separate Q would
// need 128 KB). kWarps4: Q 48 KB + one K and one V buffer = 88 KB (2 CTAs on an
// H100 SM, 176 of 228 KB).
static_assert(Config<192, 128, WarpLayout::kWarps8>::kSmemBytes == 90112, "documented budget");
static_assert(Config<128, 128, WarpLayout::kWarps8>::kSmemBytes == 65536, "documented budget");
static_assert(Config<64, 64, WarpLayout::kWarps8>::kSmemBytes == 32768, "documented budget");
static_assert(Config<192, 128, WarpLayout::kWarps4>::kSmemBytes == 90112, "documented budget");
static_assert(Config<128, 128, WarpLayout::kWarps4>::kSmemBytes == 65536, "documented budget");
static_assert(Config<64, 64, WarpLayout::kWarps4>::kSmemBytes == 32768, "documented budget");

// Grid: x = query blocks of the longest sequence, y = query heads, z = sequences.
// gridDim.y and gridDim.z are limited to 65535.
constexpr int kMaxGridYZ = 65535;

inline int num_m_blocks(int max_seqlen_q) { return (max_seqlen_q + kBlockM - 1) / kBlockM; }

// The layout for a GPU with `smem_per_sm` bytes of shared memory per SM.
inline WarpLayout choose_warp_layout(int smem_per_sm) {
  return smem_per_sm >= kMinSmemPerSmForWarps4 ? WarpLayout::kWarps4 : WarpLayout::kWarps8;
}

}  // namespace flash_mla::portable::dense_fwd
