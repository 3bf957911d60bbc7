// Tile sizes, shared-memory budget and workspace layout of the portable dense MHA
// prefill backward. The ONE place that decides them: the host dispatch (grid,
// dynamic shared memory, kernel registry, workspace size) and the kernel
// templates all read these constants.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"
#include "../../../common/limits.h"

namespace flash_mla::portable::dense_bwd {

// What the op "dense_prefill_bwd" serves (common/capabilities.h): the API validates
// against these tables, dispatches over them (one instantiation per entry), and
// build_info reports them. Config / Config4 static_assert their head dims against it.
inline constexpr DType kDtypes[] = {DType::kBF16, DType::kFP16};
inline constexpr caps::HeadDims kHeadDims[] = {{64, 64}, {128, 128}, {192, 128}};

// build_info's "ops" entry: {"dtype": [...], "head_dims": [[64, 64], ...]}.
inline std::string capabilities_json() {
  return caps::JsonObject().field("dtype", kDtypes).field("head_dims", kHeadDims).str();
}

// One CTA owns kBlockN keys of one kv head of one sequence and loops over the
// kBlockM-row query blocks (and the query heads of its GQA group) that see them.
// 64 x 64 is the largest square tile whose K, V, Q, dO, P^T and dS^T all fit in
// 99 KB at d = 192 (see Config below); 64-element rows are also the narrowest the
// shared XOR swizzle (common/swizzle.cuh) serves, which P^T and dS^T need.
constexpr int kBlockM = 64;  // query rows per step
constexpr int kBlockN = 64;  // keys per CTA
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kElemBytes = 2;  // bf16 / fp16

// Warp grid of the key-major products (S^T = K Q^T, dP^T = V dO^T, dV, dK):
// 4 warps down the 64 keys (one m16 slab each) x 2 across the columns.
constexpr int kWarpRowsN = kBlockN / 16;
constexpr int kWarpColsN = kNumWarps / kWarpRowsN;
// Warp grid of the query-major product dQ = dS K: 4 x 2 likewise.
constexpr int kWarpRowsM = kBlockM / 16;
constexpr int kWarpColsM = kNumWarps / kWarpRowsM;
static_assert(kWarpRowsN * kWarpColsN == kNumWarps && kWarpRowsM * kWarpColsM == kNumWarps,
              "warp grids must use every warp");
static_assert(kBlockM % 64 == 0, "P^T / dS^T rows (kBlockM elements) must suit the swizzle");

// P and dS are rounded once to the input dtype before the products that read them (dV
// from P; dK and dQ from dS), as FA2 does: the numerics contract's rule for hostile
// inputs (at most 2x the error of plain PyTorch math, docs/numerics.md) holds with it.
// The compensated form splits each into hi = round(x) and lo = round(x - hi) and runs
// those products on both parts (two MMAs per fragment, 2 * d_qk + d_v more MMA work per
// (query, key) pair: 1.6x at d = 128); it kept an older, element-wise rule and is built
// only with -DFLASH_MLA_BWD_COMPENSATED, for A/B runs (docs/mha_bwd.md). Where its lo
// parts fit (d <= 128) they get tiles of their own; at d = 192 they reuse the P^T / dS^T
// buffers in turn, which costs two more barriers per step.
#if defined(FLASH_MLA_BWD_COMPENSATED)
constexpr bool kCompensatedDS = true;
#else
constexpr bool kCompensatedDS = false;
#endif

template <int kDQK, int kDV>
struct Config {
  static_assert(caps::contains(kHeadDims, caps::HeadDims{kDQK, kDV}),
                "(d_qk, d_v) must be listed in kHeadDims");
  static constexpr int kHeadDimQK = kDQK;
  static constexpr int kHeadDimV = kDV;

  // Shared-memory byte layout (all tiles XOR-swizzled, 16-bit elements):
  //   kOffK     K tile     [kBlockN, d_qk]  resident for the whole CTA; dK staging at the end
  //   kOffV     V tile     [kBlockN, d_v]   resident; dV staging at the end
  //   kOffQ     Q tile     [kBlockM, d_qk]  one query block, reloaded per step
  //   kOffDO    dO tile    [kBlockM, d_v]
  //   kOffP     P^T        [kBlockN, kBlockM]  rounded to the input dtype
  //   kOffDS    dS^T       [kBlockN, kBlockM]
  //   kOffLse   lse * log2(e) of the query block, fp32 [kBlockM] (+inf: row sees nothing)
  //   kOffDelta delta = rowsum(dO * O), fp32 [kBlockM]
  static constexpr int kKBytes = kBlockN * kDQK * kElemBytes;
  static constexpr int kVBytes = kBlockN * kDV * kElemBytes;
  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kDOBytes = kBlockM * kDV * kElemBytes;
  static constexpr int kPBytes = kBlockN * kBlockM * kElemBytes;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffQ = kOffV + kVBytes;
  static constexpr int kOffDO = kOffQ + kQBytes;
  static constexpr int kOffP = kOffDO + kDOBytes;
  static constexpr int kOffDS = kOffP + kPBytes;
  static constexpr int kOffLse = kOffDS + kPBytes;
  static constexpr int kOffDelta = kOffLse + kBlockM * 4;
  //   kOffPLo   P^T lo and dS^T lo, [kBlockN, kBlockM] each: only where they fit
  //   kOffDSLo  (d <= 128). Without them (d = 192) the lo parts take turns in the
  //             P^T / dS^T buffers at the cost of two more barriers per step.
  static constexpr int kOffPLo = kOffDelta + kBlockM * 4;
  static constexpr int kOffDSLo = kOffPLo + kPBytes;
  static constexpr bool kSeparateLo =
      kCompensatedDS && kOffDSLo + kPBytes <= kMaxSmemPerBlockSm120;
  static constexpr int kSmemBytes = kSeparateLo ? kOffDSLo + kPBytes : kOffPLo;

  // d = 192: 24 KB K + 16 KB V + 24 KB Q + 16 KB dO + 8 KB P^T + 8 KB dS^T + 512 B
  // = 98816 B, 2560 B under sm_120's 101376 B. No room for a second Q/dO stage:
  // the next block's Q/dO load overlaps the dQ product instead (kernel.cuh).
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "backward tile exceeds sm_120's 99 KB");
  static_assert(kOffK % 128 == 0 && kOffV % 128 == 0 && kOffQ % 128 == 0 && kOffDO % 128 == 0 &&
                    kOffP % 128 == 0 && kOffDS % 128 == 0 && kOffLse % 16 == 0 &&
                    kOffPLo % 128 == 0,
                "tiles must start on 128-byte boundaries for the swizzle");

  // Per-warp accumulator columns (mma n8 tiles) of each product.
  static constexpr int kDVCols = kDV / kWarpColsN;    // dV columns per warp
  static constexpr int kDKCols = kDQK / kWarpColsN;   // dK columns per warp
  static constexpr int kSCols = kBlockM / kWarpColsN; // S^T / dP^T query columns per warp
  static constexpr int kDQCols = kDQK / kWarpColsM;   // dQ columns per warp
  static_assert(kDVCols % 16 == 0 && kDKCols % 16 == 0 && kSCols % 16 == 0 && kDQCols % 16 == 0,
                "B fragments are loaded two n8 tiles at a time");
};

static_assert(Config<192, 128>::kSmemBytes == 98816, "d=192 budget as documented");
static_assert(Config<128, 128>::kSmemBytes == (kCompensatedDS ? 98816 : 82432), "d=128 budget");
static_assert(Config<64, 64>::kSmemBytes == (kCompensatedDS ? 66048 : 49664), "d=64 budget");


// ---------------------------------------------------------------------------
// The 4-warp CTA (kernel_4warp.cuh): same 64 x 64 step, same grid, masks and
// workspace; warp w owns keys 16w .. 16w + 15 for S^T, dP^T, dV and dK, so P^T and
// dS^T feed dV and dK straight from registers (the mma C layout is the next mma's A
// layout) and only dS^T goes through shared memory (for dQ). Two CTAs share an SM
// where shared memory allows (H100/H200: 2 x 82 KB at d = 128); their barriers
// drift apart, so one CTA's loads and exp2 overlap the other's MMAs. d <= 128 only:
// at d = 192 the dK accumulator alone is 96 registers per thread, and the rest of
// the step no longer fits beside it without spills.
// ---------------------------------------------------------------------------
constexpr int k4Warps = 4;
constexpr int k4Threads = k4Warps * 32;
static_assert(k4Warps * 16 == kBlockN, "4-warp CTA: one 16-key slab per warp");

template <int kDQK, int kDV>
struct Config4 {
  static_assert(caps::contains(kHeadDims, caps::HeadDims{kDQK, kDV}) && kDQK <= 128,
                "the 4-warp backward serves the listed head dims with d_qk <= 128");
  // Shared-memory byte layout (XOR-swizzled 16-bit tiles, as Config):
  //   kOffK, kOffV   K [kBlockN, d_qk], V [kBlockN, d_v]: resident; dK / dV staging at the end
  //   kOffQ, kOffDO  Q [kBlockM, d_qk], dO [kBlockM, d_v]: one query block per step
  //   kOffDS         dS^T hi [kBlockN, kBlockM] (the only product that crosses warps: dQ)
  //   kOffDSLo       dS^T lo (kCompensatedDS only)
  //   kOffLse, kOffDelta  fp32 [kBlockM] each
  static constexpr int kKBytes = kBlockN * kDQK * kElemBytes;
  static constexpr int kVBytes = kBlockN * kDV * kElemBytes;
  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kDOBytes = kBlockM * kDV * kElemBytes;
  static constexpr int kDSBytes = kBlockN * kBlockM * kElemBytes;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffQ = kOffV + kVBytes;
  static constexpr int kOffDO = kOffQ + kQBytes;
  static constexpr int kOffDS = kOffDO + kDOBytes;
  static constexpr int kOffDSLo = kOffDS + kDSBytes;
  static constexpr int kOffLse = kOffDSLo + (kCompensatedDS ? kDSBytes : 0);
  static constexpr int kOffDelta = kOffLse + kBlockM * 4;
  static constexpr int kSmemBytes = kOffDelta + kBlockM * 4;
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm120, "4-warp backward tile exceeds 99 KB");
  // Shared memory per SM that two of these CTAs need; at d = 64 (2 x 49664 B) they fit
  // sm_120's (and sm_86/89's) 100 KB, so the CTA is built for sm_120 there
  // (kernel_4warp.cuh) and choose_layout picks it; at d = 128 it is not.
  static constexpr int kSmemPerSmForTwo = smem_per_sm_for(2, kSmemBytes);
  static constexpr bool kTwoFitSm120 = kSmemPerSmForTwo <= kSmemPerSmSm120;
  static_assert(kOffQ % 128 == 0 && kOffDO % 128 == 0 && kOffDS % 128 == 0 &&
                    kOffDSLo % 128 == 0 && kOffLse % 16 == 0,
                "tiles must start on 128-byte boundaries for the swizzle");
  // Queries per S^T / dP^T pass (kernel_4warp.cuh): the dK / dV accumulators take
  // d registers per thread (128 at d = 128). Passes of 32 fit 255 registers with no
  // spills on every target since a pass computes P and dV before dP (at most two of
  // S^T, P^T, dP^T, dS^T live) and the mask test keeps two ints per thread (mask.cuh).
  // Fewer, longer passes re-read K and V less often; one pass of 64 spills.
  static constexpr int kPassM = 32;
  static_assert(kBlockM % kPassM == 0 && kPassM % 16 == 0, "passes of whole k16 steps");
  // dQ = dS K: warp w owns query rows 32 * (w % 2) .. +32 (two m16 slabs) and head
  // dims (w / 2) * kDQCols .. +kDQCols, computed kDQPassCols at a time (fewer live
  // accumulators; K fragments are read once either way, dS^T once per pass).
  static constexpr int kDQCols = kDQK / 2;
  static constexpr int kDQPassCols = 32;
  static_assert(kDQCols % kDQPassCols == 0, "dQ passes must tile the warp's head dims");
};

static_assert(Config4<128, 128>::kSmemBytes == (kCompensatedDS ? 82432 : 74240), "d=128 budget");
static_assert(Config4<64, 64>::kSmemBytes == (kCompensatedDS ? 49664 : 41472), "d=64 budget");
static_assert(Config4<64, 64>::kTwoFitSm120 && !Config4<128, 128>::kTwoFitSm120,
              "two 4-warp CTAs fit a 100 KB SM at d = 64 only");

// ---------------------------------------------------------------------------
// The 128-key CTA (kernel_128keys.cuh): 8 warps own 128 keys, so each warp's tiles
// are 32 x 32 (S^T, dP^T, dQ) and 32 x d/2 (dV, dK), FA2's tiling: every K / Q / V / dO
// fragment read from shared memory feeds two m16 slabs, against one in the 16-row
// tiles of the other CTAs, and one Q / dO load and one set of dQ reductions serve twice
// the keys. P^T and dS^T both go through shared memory, and the query block is
// double-buffered. d = 128 needs 164864 B, more than the 99 KB of sm_120 (and sm_86/89):
// this CTA runs only where a block may opt in to that much (H100/H200, B200, A100) and
// its build for those targets is a trap at d = 128.
// ---------------------------------------------------------------------------
constexpr int kBlockN128 = 128;
constexpr int k128Warps = 8;
constexpr int k128Threads = k128Warps * 32;

template <int kDQK, int kDV>
struct Config128 {
  static_assert(caps::contains(kHeadDims, caps::HeadDims{kDQK, kDV}) && kDQK <= 128,
                "the 128-key backward serves the listed head dims with d_qk <= 128");
  // Shared-memory byte layout (XOR-swizzled 16-bit tiles, as Config):
  //   kOffK, kOffV   K [128, d_qk], V [128, d_v]: resident; dK / dV staging at the end
  //   kOffP, kOffDS  P^T, dS^T [128, kBlockM], rounded to the input dtype
  //   kStages stages of one query block, kStageBytes apart, from kOffStage:
  //     Q [kBlockM, d_qk], dO [kBlockM, d_v], lse and delta fp32 [kBlockM] each.
  //     Step i reads stage i % 2 while step i + 1's copies land in the other, issued
  //     after step i's P^T / dS^T barrier, so they overlap dV, dK and dQ and the third
  //     barrier per step (the one that freed a single stage) is gone.
  static constexpr int kStages = 2;
  static constexpr int kKBytes = kBlockN128 * kDQK * kElemBytes;
  static constexpr int kVBytes = kBlockN128 * kDV * kElemBytes;
  static constexpr int kQBytes = kBlockM * kDQK * kElemBytes;
  static constexpr int kDOBytes = kBlockM * kDV * kElemBytes;
  static constexpr int kPBytes = kBlockN128 * kBlockM * kElemBytes;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffP = kOffV + kVBytes;
  static constexpr int kOffDS = kOffP + kPBytes;
  static constexpr int kOffStage = kOffDS + kPBytes;
  // Offsets within a stage.
  static constexpr int kOffQ = 0;
  static constexpr int kOffDO = kOffQ + kQBytes;
  static constexpr int kOffLse = kOffDO + kDOBytes;
  static constexpr int kOffDelta = kOffLse + kBlockM * 4;
  static constexpr int kStageBytes = kOffDelta + kBlockM * 4;
  static constexpr int kSmemBytes = kOffStage + kStages * kStageBytes;
  static_assert(kSmemBytes <= kMaxSmemPerBlockLarge, "128-key backward tile exceeds 227 KB");
  static_assert(kStages == 2, "kernel_128keys.cuh alternates two stages");
  static_assert(kOffP % 128 == 0 && kOffDS % 128 == 0 && kOffStage % 128 == 0 &&
                    kStageBytes % 128 == 0 && kOffDO % 128 == 0 && kOffLse % 16 == 0,
                "tiles must start on 128-byte boundaries for the swizzle");
  // Warp w: keys 32 (w % 4) .. +32 (two m16 slabs) for S^T, dP^T, dV and dK, with
  // queries 32 (w / 4) .. +32 (S^T, dP^T) and head dims (w / 4) d / 2 .. +d / 2 (dV, dK);
  // for dQ queries 32 (w % 2) .. +32 and head dims (w / 2) d_qk / 4 .. +d_qk / 4.
  static constexpr int kSCols = kBlockM / 2;
  static constexpr int kDVCols = kDV / 2;
  static constexpr int kDKCols = kDQK / 2;
  static constexpr int kDQCols = kDQK / 4;
  static_assert(kSCols % 16 == 0 && kDVCols % 16 == 0 && kDKCols % 16 == 0 && kDQCols % 16 == 0,
                "B fragments are loaded two n8 tiles at a time");
};

static_assert(Config128<128, 128>::kSmemBytes == 164864, "d=128 budget");
static_assert(Config128<64, 64>::kSmemBytes == 99328, "d=64 budget (fits sm_120's 99 KB)");

// CTA layouts (FLASH_MLA_DENSE_BWD_WARPS=8|4|8x128 forces one; csrc/api): at d = 128 the
// 128-key CTA where one block may have its 164864 B (H100/H200, B200, A100: 1.25x the
// 4-warp CTA's speed on the H100); else the 4-warp CTA where two fit an SM and
// d <= 128 (2 x (74240 + 1024) B at d = 128; 2 x (41472 + 1024) B at d = 64: also
// sm_120/121 and sm_86/89 with 100 KB); the 8-warp CTA otherwise. Two 4-warp CTAs per SM
// were faster than one 8-warp CTA on the H100 at both head dims, causal or not (the
// causal GQA case thanks to KeyBlock's longest-first order); the measurements are in
// docs/mha_bwd.md, and benchmarks/bench_layouts.py repeats them on the local GPU.
enum class BwdLayout : int { kWarps8 = 8, kWarps4 = 4, kKeys128 = 128 };

// Bytes of shared memory per SM that two 4-warp CTAs need at d_qk (0 where d_qk has no
// 4-warp CTA). The 4-warp kernel is only ever launched where they fit.
inline int min_smem_per_sm_4warps(int d_qk) {
  if (d_qk == 64) return Config4<64, 64>::kSmemPerSmForTwo;
  if (d_qk == 128) return Config4<128, 128>::kSmemPerSmForTwo;
  return 0;
}

// Shared memory one block of the 128-key CTA asks for at d_qk (0 where d_qk has none).
inline int smem_per_block_128keys(int d_qk) {
  if (d_qk == 64) return Config128<64, 64>::kSmemBytes;
  if (d_qk == 128) return Config128<128, 128>::kSmemBytes;
  return 0;
}

inline BwdLayout choose_layout(int smem_per_sm, int smem_per_block, int d_qk) {
  if (d_qk > 128) return BwdLayout::kWarps8;
  if (d_qk == 128 && smem_per_block >= smem_per_block_128keys(d_qk)) return BwdLayout::kKeys128;
  return smem_per_sm >= min_smem_per_sm_4warps(d_qk) ? BwdLayout::kWarps4 : BwdLayout::kWarps8;
}

// One CTA (8 warps) per SM as the register cap: capped for two CTAs (128 registers
// per thread) ptxas spills at d >= 128; uncapped the kernels need well over 128
// registers and do not spill (docs/mha_bwd.md, resources). On sm_120 one CTA per SM
// is also all that the 100 KB of shared memory allows for d >= 128.
constexpr int kMinBlocksPerSm = 1;

// Block sizes of the preprocess (delta, dq_accum zeroing) and dQ convert kernels.
constexpr int kPreprocessThreads = 256;
constexpr int kConvertThreads = 256;

// Causal launches of at most this many CTAs per SM start the longest key blocks
// first (kernel.cuh, KeyBlock).
constexpr int kLongestFirstWaves = 8;

// Grid: x = key blocks of the longest kv sequence, y = kv heads, z = sequences.
constexpr int kMaxGridYZ = 65535;
inline int num_n_blocks(int max_seqlen_k, int keys_per_cta = kBlockN) {
  return (max_seqlen_k + keys_per_cta - 1) / keys_per_cta;
}

// ---------------------------------------------------------------------------
// Workspace (constexpr so device code calls them too): three pieces, each starting
// on a 256-byte boundary.
//   delta     [h_q, total_q_padded]   rowsum(dO * O); head h's row starts at h * padded
//   dq_accum  [total_q, h_q, d_qk]    dQ / softmax_scale accumulated with fp32 atomics
//   dq_turns  [query blocks, h_q]     int32 turn counters of the deterministic dQ (zeroed
//                                     by the host before the main kernel; unused otherwise)
// ---------------------------------------------------------------------------
constexpr int64_t kWorkspaceAlign = 256;
constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
// Rows padded to 64 floats = 256 bytes, so every head's delta row is aligned.
constexpr int64_t delta_row_stride(int64_t total_q) { return align_up(total_q, 64); }
constexpr int64_t delta_bytes(int64_t total_q, int64_t h_q) {
  return align_up(h_q * delta_row_stride(total_q) * 4, kWorkspaceAlign);
}
constexpr int64_t dq_accum_offset(int64_t total_q, int64_t h_q) {
  return delta_bytes(total_q, h_q);
}
constexpr int64_t dq_accum_bytes(int64_t total_q, int64_t h_q, int64_t d_qk) {
  return align_up(total_q * h_q * d_qk * 4, kWorkspaceAlign);
}
// Query blocks over all sequences: a sequence's block at row m0 is numbered
// (q_begin + m0) / kBlockM + seq, which is unique because sequences occupy disjoint
// rows (each later sequence starts at or after the previous one's last block start,
// and the + seq term separates two blocks that share a 64-row window).
constexpr int64_t dq_turn_blocks(int64_t batch, int64_t total_q) {
  return (total_q + kBlockM - 1) / kBlockM + batch;
}
constexpr int64_t dq_turns_offset(int64_t total_q, int64_t h_q, int64_t d_qk) {
  return dq_accum_offset(total_q, h_q) + dq_accum_bytes(total_q, h_q, d_qk);
}
constexpr int64_t dq_turns_bytes(int64_t batch, int64_t total_q, int64_t h_q) {
  return align_up(dq_turn_blocks(batch, total_q) * h_q * 4, kWorkspaceAlign);
}
constexpr int64_t workspace_bytes(int64_t batch, int64_t total_q, int64_t h_q, int64_t d_qk) {
  return dq_turns_offset(total_q, h_q, d_qk) + dq_turns_bytes(batch, total_q, h_q);
}

}  // namespace flash_mla::portable::dense_bwd
