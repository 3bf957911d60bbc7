// Tile sizes, shared-memory budget and capabilities of the portable dense MLA decode.
// The ONE place that decides them: the host dispatch (csrc/api/dense_decode.cu: launch
// geometry, dynamic shared memory, number of schedule parts, registry) and the kernel
// (kernel.cuh) both read these. Reasoning and byte arithmetic: docs/dense_decode.md.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"
#include "../../../common/limits.h"
#include "../schedule/config.h"

namespace flash_mla::portable::dense_decode {

constexpr int kHeadDimQK = 576;  // 512 latent + 64 RoPE dims
constexpr int kHeadDimV = 512;   // V = the first 512 dims of the same cache row
constexpr int kPageSize = decode_schedule::kPageSize;
constexpr int kElemBytes = 2;    // bf16 / fp16

// What the op "dense_decode" serves (common/capabilities.h): dtypes and query heads.
// Any h_k >= 1 that divides h_q is accepted; rows per kv head are cut into kBlockM blocks.
inline constexpr DType kDtypes[] = {DType::kBF16, DType::kFP16};
inline constexpr caps::IntRange kHeadsQ{1, 128, 1};
constexpr int kMaxQueriesPerRequest = 1 << 16;  // s_q bound that keeps row indices in int32

inline std::string capabilities_json() {
  return caps::JsonObject().field("dtype", kDtypes).field("h_q", kHeadsQ).str();
}

// CTA: 4 warps; 32 query rows (two m16 slabs) of one kv head; KV tiles of 16 tokens.
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kSlabs = 2;
constexpr int kBlockM = 16 * kSlabs;
constexpr int kBlockN = 16;
constexpr int kStages = 3;
static_assert(kPageSize % kBlockN == 0, "a KV tile must not straddle two pages");

// S = Q K^T: warp w sums dims [w * kDimsPerWarp, (w + 1) * kDimsPerWarp).
constexpr int kDimsPerWarp = kHeadDimQK / kNumWarps;  // 144
constexpr int kKStepsPerWarp = kDimsPerWarp / 16;     // 9
static_assert(kDimsPerWarp % 16 == 0, "whole k-steps per warp");
// O += P V: warp w owns output columns [w * kColsPerWarp, (w + 1) * kColsPerWarp).
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;  // 128
constexpr int kNTilesO = kColsPerWarp / 8;           // 16

// Shared-memory byte layout (kernel.cuh's header comment gives the protocol):
constexpr int kQBytes = kBlockM * kHeadDimQK * kElemBytes;             // 36864, swizzled
constexpr int kTileBytes = kBlockN * kHeadDimQK * kElemBytes;          // 18432, swizzled
constexpr int kStagesOffset = kQBytes;
constexpr int kSPartialOffset = kStagesOffset + kStages * kTileBytes;  // warps 1..3's S sums
constexpr int kSPartialBytes = (kNumWarps - 1) * kBlockM * kBlockN * 4;  // 6144
constexpr int kPOffset = kSPartialOffset + kSPartialBytes;             // P [32][16], input dtype
constexpr int kPBytes = kBlockM * kBlockN * kElemBytes;                // 1024
constexpr int kRescaleOffset = kPOffset + kPBytes;                     // [32] fp32 per tile
constexpr int kInvSumOffset = kRescaleOffset + kBlockM * 4;            // [32] fp32, epilogue
// Softmax state of warp 0 (kept here, not in registers: every thread of the CTA would
// carry the registers, and sm_120's build spilled with them): per row the visible-key
// bound (int32) and running max (fp32), per (row, quad lane) the partial running sum.
constexpr int kRowLimitOffset = kInvSumOffset + kBlockM * 4;
constexpr int kRowMaxOffset = kRowLimitOffset + kBlockM * 4;
constexpr int kRowSumOffset = kRowMaxOffset + kBlockM * 4;
constexpr int kSmemBytes = kRowSumOffset + kBlockM * 4 * 4;
static_assert(kSmemBytes == 100352, "decode budget as documented in docs/dense_decode.md");
static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "dense decode tile exceeds sm_120's 99 KB");

// Wide CTA for many rows per kv head (kernel_wide.cuh): the same 32-row block, 8 warps.
// Warp w = 2 kg + s: S partial of slab s over dims [144 kg, 144 kg + 144) with its Q
// fragments in registers (9 k-steps x 4 = 36), then, after one exchange of the four
// partials of its slab, the slab's softmax (the four warps of a slab compute it
// identically) and O for slab s x columns [128 kg, 128 kg + 128) (64 fp32), P staying
// in registers. The next tile's S partial is computed before this tile's softmax (the
// partials are double-buffered), so one barrier per tile suffices and its MMAs overlap
// the softmax. Q does not live in shared memory (staged through the ring's last two
// stages at the start of a piece), so the ring has 4 stages. Arithmetic:
// docs/dense_decode.md.
// Off by default: measured on an H100 (docs/dense_decode.md, 2026-12-06) it was slower
// than the 4-warp kernel on every benchmark shape (0.35 vs 0.41 of copy bandwidth at
// h_q = 64; 0.19 vs 0.24 of the mma.sync peak at h_q = 128, s_q = 2). It stays built and
// tested (FLASH_MLA_DENSE_DECODE_WARPS=8 forces it) as the base for the next attempt.
constexpr bool kWideEnabled = false;  // false: every shape takes the 4-warp kernel
constexpr int kWideNumWarps = 8;
constexpr int kWideThreads = kWideNumWarps * 32;
constexpr int kWideKGroups = kWideNumWarps / kSlabs;                  // 4
constexpr int kWideKStepsPerWarp = kHeadDimQK / 16 / kWideKGroups;    // 9
constexpr int kWideColsPerWarp = kHeadDimV / kWideKGroups;            // 128
constexpr int kWideNTilesO = kWideColsPerWarp / 8;                    // 16
constexpr int kWideStages = 4;
static_assert(kHeadDimQK % (16 * kWideKGroups) == 0, "whole k-steps per warp");
// Q [32][576] staged in stages 2..3 while tiles 0 and 1 land in stages 0 and 1.
constexpr int kWideQStageOffset = 2 * kTileBytes;
static_assert(kWideStages == 4 && 2 * kTileBytes == kQBytes, "Q is staged in stages 2..3");
constexpr int kWideSPartialOffset = kWideStages * kTileBytes;         // [2][warp][n-tile][lane] float4
constexpr int kWideSPartialBytes = 2 * kWideNumWarps * 2 * 32 * 16;   // 16384
constexpr int kWideSmemBytes = kWideSPartialOffset + kWideSPartialBytes;
static_assert(kWideSmemBytes == 90112, "wide decode budget as documented in docs/dense_decode.md");
static_assert(kWideSmemBytes <= kMaxSmemPerBlockSm120, "wide dense decode tile exceeds sm_120's 99 KB");

// The one place that picks the CTA shape: with kWideEnabled, more than one 32-row block
// per kv head (h_q / h_k x s_q > 32) would take the wide CTA; one block or fewer stays on
// the 4-warp kernel. Either serves every shape (the
// host may force one: FLASH_MLA_DENSE_DECODE_WARPS in csrc/api/dense_decode.cu).
enum class CtaShape { kWarps4, kWarps8 };

inline CtaShape choose_cta(int s_q, int h_q, int h_k) {
  const int64_t rows = static_cast<int64_t>(s_q) * (h_q / h_k);
  return kWideEnabled && rows > kBlockM ? CtaShape::kWarps8 : CtaShape::kWarps4;
}

// Row blocks per kv head for s_q queries of h_q / h_k heads each.
inline int num_m_blocks(int s_q, int h_q, int h_k) {
  const int64_t rows = static_cast<int64_t>(s_q) * (h_q / h_k);
  return static_cast<int>((rows + kBlockM - 1) / kBlockM);
}

// CTAs of this kernel that fit one SM's shared memory (1 on sm_120, 2 on an H100).
inline int ctas_per_sm(int smem_per_sm) {
  const int n = smem_per_sm / (kSmemBytes + kReservedSmemPerBlock);
  return n > 0 ? n : 1;
}

// The wide CTA's 256 threads use more than 128 registers each (ptxas: 188..246 by
// target), so one CTA fills an SM's 64K registers whatever its shared memory allows.
constexpr int kWideCtasPerSm = 1;

// Schedule parts: enough CTAs (parts x h_k x row blocks) to fill every SM once, or, in
// batch-invariant mode, one part per (request, piece).
inline int num_parts(int num_sms, int smem_per_sm, int batch, int s_q, int h_q, int h_k,
                     bool batch_invariant, CtaShape cta) {
  if (batch_invariant) {
    const int64_t parts = static_cast<int64_t>(batch) * decode_schedule::kInvariantMaxPieces;
    return static_cast<int>(parts > 0 ? parts : 1);
  }
  const int64_t per_part = static_cast<int64_t>(h_k) * num_m_blocks(s_q, h_q, h_k);
  const int per_sm = cta == CtaShape::kWarps8 ? kWideCtasPerSm : ctas_per_sm(smem_per_sm);
  const int64_t slots = static_cast<int64_t>(num_sms) * per_sm;
  const int64_t parts = slots / per_part;
  return static_cast<int>(parts > 0 ? parts : 1);
}

}  // namespace flash_mla::portable::dense_decode
