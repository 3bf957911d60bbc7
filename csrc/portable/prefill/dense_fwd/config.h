// Tile sizes and shared-memory budget of the portable dense MHA prefill forward.
// The ONE place that decides them: the host dispatch (launch geometry, dynamic
// shared memory, kernel registry) and the kernel template both read these.
#pragma once

#include <cstdint>

#include "../../../common/limits.h"

namespace flash_mla::portable::dense_fwd {

// 128 query rows per CTA as 8 warps x 16 rows: each warp owns one m16 row slab,
// so softmax statistics never cross warps. (4 warps x 32 rows needs ~255
// registers at d = 192 and spills; SM120.md.)
constexpr int kBlockM = 128;
constexpr int kBlockN = 64;  // keys per K/V tile
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
static_assert(kBlockM == kNumWarps * 16, "one m16 slab per warp");

constexpr int kElemBytes = 2;  // bf16 / fp16

template <int kDQK, int kDV>
struct Config {
  static_assert((kDQK == 64 && kDV == 64) || (kDQK == 128 && kDV == 128) ||
                    (kDQK == 192 && kDV == 128),
                "supported (d_qk, d_v): (64, 64), (128, 128), (192, 128)");
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

  // d = 192: Q 48 KB + one stage (24 KB K + 16 KB V) = 88 KB = 90112 B: two K/V
  // stages fit only because Q shares its bytes with stage 1. A separate Q buffer
  // would need 128 KB.
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "forward tile exceeds sm_120's 99 KB");
  static_assert(kOBytes <= kSmemBytes, "output staging must fit in the K/V buffers");
};

static_assert(Config<192, 128>::kSmemBytes == 90112, "d=192 budget as documented");
static_assert(Config<128, 128>::kSmemBytes == 65536, "d=128 budget as documented");
static_assert(Config<64, 64>::kSmemBytes == 32768, "d=64 budget as documented");

// Grid: x = query blocks of the longest sequence, y = query heads, z = sequences.
// gridDim.y and gridDim.z are limited to 65535.
constexpr int kMaxGridYZ = 65535;

inline int num_m_blocks(int max_seqlen_q) { return (max_seqlen_q + kBlockM - 1) / kBlockM; }

}  // namespace flash_mla::portable::dense_fwd
