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

// Q-in-registers CTAs (kernel_wide.cuh), one template over the slab count: 4 warps per
// slab, a block of 16 x kSlabs rows. Warp w = kSlabs kg + s: S partial of slab s over dims
// [144 kg, 144 kg + 144) with its Q fragments in registers (9 k-steps x 4 = 36), then,
// after one exchange of the four partials of its slab, the slab's softmax (the four warps
// of a slab compute it identically) and O for slab s x columns [128 kg, 128 kg + 128) (64
// fp32), P staying in registers. The next tile's S partial is computed before this tile's
// softmax (the partials are double-buffered), so one barrier per tile suffices and its
// MMAs overlap the softmax. Q does not live in shared memory (staged through the ring's
// stages 2.. at the start of a piece), so the ring has 4 stages. Arithmetic:
// docs/dense_decode.md.
//   kSlabs = 2, the "wide" CTA (8 warps, 32 rows): measured on an H100 (2026-12-06) it was
//     slower than the 4-warp kernel on every benchmark shape (0.35 vs 0.41 of copy
//     bandwidth at h_q = 64; 0.19 vs 0.24 of the mma.sync peak at h_q = 128, s_q = 2): its
//     256 threads fill an SM's registers, so one CTA per SM. Off by default; it stays built
//     and tested (FLASH_MLA_DENSE_DECODE_WARPS=8 forces it).
//   kSlabs = 1, the "narrow" CTA (4 warps, 16 rows): two fit an H100 SM, and a 16-row block
//     costs half the MMAs of the 4-warp kernel's 32-row one (choose_cta below).
template <int kSlabsT>
struct QRegCta {
  static constexpr int kSlabs = kSlabsT;
  static constexpr int kNumWarps = 4 * kSlabs;
  static constexpr int kThreads = kNumWarps * 32;
  static constexpr int kBlockM = 16 * kSlabs;
  static constexpr int kKGroups = 4;
  static constexpr int kKStepsPerWarp = kHeadDimQK / 16 / kKGroups;  // 9
  static constexpr int kColsPerWarp = kHeadDimV / kKGroups;          // 128
  static constexpr int kNTilesO = kColsPerWarp / 8;                  // 16
  static constexpr int kStages = 4;
  // Q [16 kSlabs][576] staged from stage 2 on while tiles 0 and 1 land in stages 0 and 1.
  static constexpr int kQStageOffset = 2 * kTileBytes;
  static constexpr int kSPartialOffset = kStages * kTileBytes;       // [2][warp][n-tile][lane] float4
  static constexpr int kSPartialBytes = 2 * kNumWarps * 2 * 32 * 16;
  static constexpr int kSmemBytes = kSPartialOffset + kSPartialBytes;
  static_assert(kHeadDimQK % (16 * kKGroups) == 0, "whole k-steps per warp");
  static_assert(kBlockM * kHeadDimQK * kElemBytes <= (kStages - 2) * kTileBytes,
                "Q is staged in the stages past tiles 0 and 1");
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "Q-in-registers decode tile exceeds sm_120's 99 KB");
};
using WideCta = QRegCta<2>;
using NarrowCta = QRegCta<1>;
static_assert(WideCta::kSmemBytes == 90112, "wide decode budget as documented in docs/dense_decode.md");
static_assert(NarrowCta::kSmemBytes == 81920, "narrow decode budget as documented in docs/dense_decode.md");
constexpr bool kWideEnabled = false;  // false: the 8-warp Q-in-registers CTA runs only when forced

// The CTA shapes; choose_cta (below) picks one. Every CTA serves every shape (the host may
// force one: FLASH_MLA_DENSE_DECODE_WARPS in csrc/api/dense_decode.cu).
enum class CtaShape { kWarps4, kWarps8, kWarps4Rows16, kWarps8Rows64 };

// The 64-row CTA (kernel_64rows.cuh; FLASH_MLA_DENSE_DECODE_WARPS=8x64): 8 warps, 64 rows of
// one kv head, one 64-token page per tile, the sparse prefill's wide CTA applied to paged
// dense keys (docs/dense_decode.md). Only where a block may opt in to its 231168 B (H100/
// H200, B200); the kernel traps on every other target.
namespace rows64 {
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 64;
constexpr int kBlockN = kPageSize;      // one page per tile
constexpr int kStages = 2;              // tile i + 1 is copied while tile i is computed
constexpr int kSlabsO = kBlockM / 16;   // every warp's O covers all 64 rows
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;    // 64
constexpr int kRowsPerCopyWarp = kBlockN / kNumWarps;  // warp w copies tokens [8w, 8w + 8)
constexpr int kQBytes = kBlockM * kHeadDimQK * kElemBytes;     // 73728, swizzled
constexpr int kTileBytes = kBlockN * kHeadDimQK * kElemBytes;  // 73728, swizzled
constexpr int kStagesOffset = kQBytes;
constexpr int kPOffset = kStagesOffset + kStages * kTileBytes;  // P [64][64], input dtype
constexpr int kPBytes = kBlockM * kBlockN * kElemBytes;         // 8192, swizzled
constexpr int kHalfMaxOffset = kPOffset + kPBytes;              // [2 halves][64] fp32
constexpr int kHalfSumOffset = kHalfMaxOffset + 2 * kBlockM * 4;
constexpr int kRescaleOffset = kHalfSumOffset + 2 * kBlockM * 4;  // [64] fp32
constexpr int kInvSumOffset = kRescaleOffset + kBlockM * 4;       // [64] fp32, epilogue
// Per row, the visible-key bound of the piece (int32): in shared memory, not registers,
// because the causal build spilled with two more live registers per thread.
constexpr int kRowLimitOffset = kInvSumOffset + kBlockM * 4;
constexpr int kSmemBytes = kRowLimitOffset + kBlockM * 4;
static_assert(kSmemBytes == 231168, "64-row decode budget as documented in docs/dense_decode.md");
static_assert(kSmemBytes <= kMaxSmemPerBlockLarge, "64-row decode CTA exceeds 227 KB");
static_assert(kBlockN == 64, "the tile is one 64-token page");

// Whether a device can run it: compute capability 9.x or 10.x (the targets whose cubin
// holds its body) and blocks that may opt in to its shared memory.
inline bool fits(int cc_major, int max_smem_per_block_optin) {
  return (cc_major == 9 || cc_major == 10) && max_smem_per_block_optin >= kSmemBytes;
}
}  // namespace rows64

inline int64_t rows_per_kv_head(int s_q, int h_q, int h_k) {
  return static_cast<int64_t>(s_q) * (h_q / h_k);
}

// The one place that picks the CTA shape, by rows per kv head (h_q / h_k x s_q):
// - up to 16: the narrow CTA;
// - more than 32, where the device runs it (rows64::fits): the 64-row CTA, which reads each
//   key once for 64 rows where the 4-warp kernel's 32-row blocks read it once per block
//   (H100: 1.50x at h_q 64, 1.56x at h_q 128 s_q 2; docs/dense_decode.md);
// - the rest the 4-warp kernel (with kWideEnabled, the 8-warp Q-in-registers CTA would take
//   more than one 32-row block per kv head).
inline CtaShape choose_cta(int s_q, int h_q, int h_k, bool rows64_fits) {
  const int64_t rows = rows_per_kv_head(s_q, h_q, h_k);
  if (rows <= NarrowCta::kBlockM) return CtaShape::kWarps4Rows16;
  if (rows > kBlockM && rows64_fits) return CtaShape::kWarps8Rows64;
  return kWideEnabled && rows > kBlockM ? CtaShape::kWarps8 : CtaShape::kWarps4;
}

inline int block_rows(CtaShape cta) {
  if (cta == CtaShape::kWarps8Rows64) return rows64::kBlockM;
  return cta == CtaShape::kWarps4Rows16 ? NarrowCta::kBlockM : kBlockM;
}

// Row blocks per kv head for s_q queries of h_q / h_k heads each, in the CTA's block size.
inline int num_m_blocks(int s_q, int h_q, int h_k, CtaShape cta) {
  const int m = block_rows(cta);
  return static_cast<int>((rows_per_kv_head(s_q, h_q, h_k) + m - 1) / m);
}

// CTAs that fit one SM (1 on sm_120 for each, 2 of the 4-warp or the narrow CTA on an
// H100). The wide CTA's 256 threads use more than 128 registers each (ptxas: 188..246 by
// target), so one fills an SM's 64K registers whatever its shared memory allows; the
// narrow CTA's 128 threads stay under 256 registers, so its shared memory decides.
inline int ctas_per_sm(int smem_per_sm, CtaShape cta) {
  if (cta == CtaShape::kWarps8 || cta == CtaShape::kWarps8Rows64) return 1;
  const int bytes = cta == CtaShape::kWarps4Rows16 ? NarrowCta::kSmemBytes : kSmemBytes;
  const int n = smem_per_sm / (bytes + kReservedSmemPerBlock);
  return n > 0 ? n : 1;
}

// Schedule parts: enough CTAs (parts x h_k x row blocks) to fill every SM once, or, in
// batch-invariant mode, one part per (request, piece).
inline int num_parts(int num_sms, int smem_per_sm, int batch, int s_q, int h_q, int h_k,
                     bool batch_invariant, CtaShape cta) {
  if (batch_invariant) {
    const int64_t parts = static_cast<int64_t>(batch) * decode_schedule::kInvariantMaxPieces;
    return static_cast<int>(parts > 0 ? parts : 1);
  }
  const int64_t per_part = static_cast<int64_t>(h_k) * num_m_blocks(s_q, h_q, h_k, cta);
  const int64_t slots = static_cast<int64_t>(num_sms) * ctas_per_sm(smem_per_sm, cta);
  const int64_t parts = slots / per_part;
  return static_cast<int>(parts > 0 ? parts : 1);
}

}  // namespace flash_mla::portable::dense_decode
