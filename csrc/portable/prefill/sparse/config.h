// Tile sizes, shared-memory layout and capabilities of the portable sparse MLA prefill
// (flash_mla_sparse_fwd). The ONE place that decides them: the API entry
// (csrc/api/sparse_prefill.cu: validation, launch geometry, registry) and the kernel
// (kernel.cuh) both read these. Reasoning and byte arithmetic: docs/sparse_prefill.md.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"
#include "../../../common/limits.h"
#include "../../common/mla_row_block_layout.h"

namespace flash_mla::portable::sparse_prefill {

constexpr int kHeadDimV = 512;  // V = the first 512 dims of the gathered kv row
constexpr int kElemBytes = 2;   // bf16

// What the op "sparse_prefill" serves (common/capabilities.h): dtypes, d_qk and h_q in
// [1, 128]; any topk >= 1, any s_q (the grid loops over work items).
inline constexpr DType kDtypes[] = {DType::kBF16};
inline constexpr int kHeadDimsQK[] = {512, 576};
inline constexpr caps::IntRange kHeadsQ{1, 128, 1};

inline std::string capabilities_json() {
  return caps::JsonObject()
      .field("dtype", kDtypes)
      .field("d_qk", kHeadDimsQK)
      .field("h_q", kHeadsQ)
      .str();
}

// CTA: 4 warps; the 32 heads [32 hb, 32 hb + 32) of one query are its rows (a block of
// fewer heads zero-fills the rest); its topk gathered kv rows are the keys, 16 per tile,
// in a 3-stage cp.async ring.
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 32;
constexpr int kBlockN = 16;
constexpr int kStages = 3;

// The Q block and the KV stage ring (then the row-block steps' pieces: Layout below).
template <int kDimQK>
struct Tiles {
  static constexpr int kQBytes = kBlockM * kDimQK * kElemBytes;      // 36864 | 32768, swizzled
  static constexpr int kTileBytes = kBlockN * kDimQK * kElemBytes;   // 18432 | 16384, swizzled
  static constexpr int kStagesOffset = kQBytes;
  static constexpr int kEnd = kStagesOffset + kStages * kTileBytes;
};

// Shared-memory byte layout for one d_qk (kernel.cuh's header comment gives the protocol):
// the tiles, the row-block steps' pieces (S partials, P, per-row rescale and output scale,
// softmax state: mla_row_block_layout.h), then the valid masks.
template <int kDimQK>
struct Layout : Tiles<kDimQK>, mla_row_block::Scratch<Tiles<kDimQK>::kEnd> {
  using Steps = mla_row_block::Scratch<Tiles<kDimQK>::kEnd>;
  // Per stage, the bit mask of the tile's tokens that are valid (index in [0, s_kv) and
  // inside topk_length): bit j = token j of the tile.
  static constexpr int kValidOffset = Steps::kScratchEnd;
  static constexpr int kSmemBytes = kValidOffset + 16;
};

static_assert(Layout<576>::kSmemBytes == 100240, "sparse prefill budget as in docs/sparse_prefill.md");
static_assert(Layout<512>::kSmemBytes == 90000, "sparse prefill budget as in docs/sparse_prefill.md");
static_assert(Layout<576>::kSmemBytes <= kMaxSmemPerBlockSm120, "tile exceeds sm_120's 99 KB");
static_assert(Layout<512>::kSmemBytes <= kMaxSmemPerBlockSm120, "tile exceeds sm_120's 99 KB");

// Head blocks per query.
inline int num_head_blocks(int h_q) { return (h_q + kBlockM - 1) / kBlockM; }

}  // namespace flash_mla::portable::sparse_prefill
