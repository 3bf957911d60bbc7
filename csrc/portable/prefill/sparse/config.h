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

// ---- The wide CTA (kernel_wide.cuh): 8 warps, 64 heads, 64-token tiles ----
// For GPUs whose blocks may opt in to about 226 KB (H100/H200, B200): every gathered K / V
// fragment feeds 64 rows instead of 32, a tile is 64 tokens (three barriers per 64 keys
// instead of per 16), and the softmax runs in all 8 warps. Never launched on sm_80/86/89/120
// (the kernel traps there; the entry checks the device's opt-in limit).
enum class Cta { kRowBlock, kWide };

namespace wide {
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 64;           // heads of one query
constexpr int kBlockN = 64;           // gathered tokens per tile
constexpr int kStages = 2;            // tile i + 1 is copied while tile i is computed
constexpr int kSlabsO = kBlockM / 16; // every warp's O covers all 64 rows
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;  // 64 output columns per warp
constexpr int kRowsPerCopyWarp = kBlockN / kNumWarps; // warp w gathers tile rows [8w, 8w + 8)

// Shared-memory byte layout (kernel_wide.cuh's header comment gives the protocol).
template <int kDimQK>
struct Layout {
  static constexpr int kQBytes = kBlockM * kDimQK * kElemBytes;     // 73728 | 65536, swizzled
  static constexpr int kTileBytes = kBlockN * kDimQK * kElemBytes;  // 73728 | 65536, swizzled
  static constexpr int kStagesOffset = kQBytes;
  static constexpr int kPOffset = kStagesOffset + kStages * kTileBytes;  // P [64][64] bf16
  static constexpr int kPBytes = kBlockM * kBlockN * kElemBytes;         // 8192, swizzled
  // Per token half (the two S warps of a row slab), per row: the tile's partial row max,
  // then (epilogue) the partial row sum.
  static constexpr int kHalfMaxOffset = kPOffset + kPBytes;
  static constexpr int kHalfSumOffset = kHalfMaxOffset + 2 * kBlockM * 4;
  static constexpr int kRescaleOffset = kHalfSumOffset + 2 * kBlockM * 4;  // [64] fp32
  static constexpr int kOutScaleOffset = kRescaleOffset + kBlockM * 4;    // [64] fp32
  // Per stage, one byte per copying warp: bit j = token 8w + j of the tile is valid.
  static constexpr int kValidOffset = kOutScaleOffset + kBlockM * 4;
  static constexpr int kSmemBytes = kValidOffset + kStages * kNumWarps;
};
static_assert(Layout<576>::kSmemBytes == 230928, "wide CTA budget as in docs/sparse_prefill.md");
static_assert(Layout<512>::kSmemBytes == 206352, "wide CTA budget as in docs/sparse_prefill.md");
static_assert(Layout<576>::kSmemBytes <= kMaxSmemPerBlockLarge, "wide CTA exceeds 227 KB");
}  // namespace wide

inline int wide_smem_bytes(int d_qk) {
  return d_qk == 576 ? wide::Layout<576>::kSmemBytes : wide::Layout<512>::kSmemBytes;
}

// Whether the wide CTA can run on a device: its blocks may opt in to the layout, and its
// compute capability is one whose cubin holds the kernel's body (sm_90, sm_100 family; on
// every other target the body is a trap, kernel_wide.cuh).
inline bool wide_fits(int cc_major, int max_smem_per_block_optin, int d_qk) {
  return (cc_major == 9 || cc_major == 10) && max_smem_per_block_optin >= wide_smem_bytes(d_qk);
}

// The CTA for h_q where the device allows both: the wide one once a query has more heads
// than one 32-row block (at h_q <= 32 its extra rows would be zeros).
inline Cta choose_cta(int h_q, bool wide_fits) {
  return wide_fits && h_q > kBlockM ? Cta::kWide : Cta::kRowBlock;
}

// Head blocks per query.
inline int num_head_blocks(int h_q, Cta cta) {
  const int rows = cta == Cta::kWide ? wide::kBlockM : kBlockM;
  return (h_q + rows - 1) / rows;
}

}  // namespace flash_mla::portable::sparse_prefill
