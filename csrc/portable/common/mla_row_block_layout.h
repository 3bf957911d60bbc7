// The tile and shared-memory constants of the MLA row-block steps (mla_row_block.cuh), in a
// header without device code, so that a kernel's config.h (read by its API entry too) can
// lay out its shared memory with them.
#pragma once

namespace flash_mla::portable::mla_row_block {

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kSlabs = 2;
constexpr int kBlockM = 16 * kSlabs;  // rows
constexpr int kBlockN = 16;           // tokens per KV tile
constexpr int kHeadDimV = 512;
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;  // 128
constexpr int kNTilesO = kColsPerWarp / 8;           // 16

// Bytes of the fixed-size pieces (the Q block and KV tiles depend on kDimQK).
constexpr int kSPartialBytes = (kNumWarps - 1) * kBlockM * kBlockN * 4;  // 6144
constexpr int kPBytes = kBlockM * kBlockN * 2;                            // 1024
constexpr int kRowFloatBytes = kBlockM * 4;                               // 128
constexpr int kRowSumBytes = kBlockM * 4 * 4;                             // 512

// The pieces the steps keep in shared memory beside the Q block and the KV tiles, laid out
// from byte kBase (a kernel's Layout places them after its tiles): the S partials of warps
// 1..3, P [32][16] in the input dtype, the per-row rescale factors of the current tile, the
// per-row output scale of the epilogue, and warp 0's softmax state (per row the running
// max, per (row, quad lane) the partial running sum). kScratchEnd: one past the last of them.
template <int kBase>
struct Scratch {
  static constexpr int kSPartialOffset = kBase;
  static constexpr int kPOffset = kSPartialOffset + kSPartialBytes;
  static constexpr int kRescaleOffset = kPOffset + kPBytes;
  static constexpr int kOutScaleOffset = kRescaleOffset + kRowFloatBytes;
  static constexpr int kRowMaxOffset = kOutScaleOffset + kRowFloatBytes;
  static constexpr int kRowSumOffset = kRowMaxOffset + kRowFloatBytes;
  static constexpr int kScratchEnd = kRowSumOffset + kRowSumBytes;
};

}  // namespace flash_mla::portable::mla_row_block
