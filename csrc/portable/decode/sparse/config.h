// Tile sizes, shared-memory layout and capabilities of the portable sparse MLA decode
// (flash_mla_with_kvcache with indices, over a byte cache). The ONE place that decides
// them: the API entry (csrc/api/sparse_decode.cu: validation, launch geometry, schedule
// parts, registry) and the kernel (kernel.cuh) both read these. The byte formats are
// formats.cuh's policies. Reasoning and byte arithmetic: docs/sparse_decode.md.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"
#include "../../../common/limits.h"
#include "../../common/mla_row_block_layout.h"
#include "../schedule/config.h"

namespace flash_mla::portable::sparse_decode {

constexpr int kHeadDimV = 512;  // V = the first 512 dequantised dims of a token
constexpr int kElemBytes = 2;   // q, the dequantised tiles and out are bf16

// Cache formats, in the order of the public names (flash_mla.quant.FORMAT_NAMES). The
// integer is what the kernel's parameters carry; the names are what build_info publishes.
enum class KvFormat : int { kV32 = 0, kV32NoRope = 1, kV4 = 2, kV41 = 3, kV41Fp4 = 4 };
constexpr int kNumFormats = 5;

// What the op "sparse_decode" serves (common/capabilities.h): q dtype, the cache formats
// of the main and of the extra pool (any pairing with the same d_qk), and h_q in [1, 128].
// Any topk >= 1, any page size, any s_q (the grid loops over schedule parts).
inline constexpr DType kDtypes[] = {DType::kBF16};
inline constexpr caps::IntRange kHeadsQ{1, 128, 1};

inline const char* format_name(int id) {
  switch (id) {
    case 0: return "V32";
    case 1: return "V32_NO_ROPE";
    case 2: return "V4";
    case 3: return "V41";
    case 4: return "V41_FP4";
    default: return "?";
  }
}

struct FormatInfo {
  int bytes_per_token;
  int d_qk;
  int copy_bytes;  // cp.async chunk: 16, or 8 where a page's rows are only 8-byte aligned
};

// Bytes per token, d_qk and copy granularity of each format (formats.cuh has the layouts).
constexpr FormatInfo format_info(int id) {
  return id == 0   ? FormatInfo{656, 576, 16}
         : id == 1 ? FormatInfo{528, 512, 16}
         : id == 2 ? FormatInfo{584, 512, 8}
         : id == 3 ? FormatInfo{528, 512, 16}
                   : FormatInfo{288, 512, 16};
}

inline std::string capabilities_json() {
  std::string names = "[";
  for (int i = 0; i < kNumFormats; ++i) {
    names += (i ? ", \"" : "\"") + std::string(format_name(i)) + "\"";
  }
  names += "]";
  std::string json = caps::JsonObject().field("dtype", kDtypes).field("h_q", kHeadsQ).str();
  json.pop_back();  // the two format fields are lists of names
  return json + ", \"kv_format\": " + names + ", \"extra_kv_format\": " + names + "}";
}

// CTA: 4 warps; its rows are 16 x kSlabs heads of one query (heads past h_q are zero rows,
// never written): kSlabs = 1 (16 heads) when h_q <= 16, else 2 (32 heads); its keys are one
// schedule piece of the request's index list, 16 tokens per tile (mla_row_block.cuh's
// steps, instantiated for the slab count). One slab halves the MMAs, the softmax rows and
// the O registers of the tensor-parallel head counts 1..16.
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 32;  // rows at most (two slabs); the per-row arrays are this long
constexpr int slabs_for(int h_q) { return h_q <= 16 ? 1 : 2; }
constexpr int kBlockN = 16;
constexpr int kRawStages = 3;  // cp.async ring of raw cache bytes
// The schedule's unit is kPositionsPerBlock index positions; the main pool's list is
// padded to a multiple of kBlockN so that no tile mixes the two pools.
constexpr int kPositionsPerBlock = decode_schedule::kPageSize;
static_assert(kPositionsPerBlock % kBlockN == 0, "a piece starts on a tile boundary");

// The Q block, the dequantised tile and the raw ring for one d_qk and slab count (then the
// row-block steps' pieces: Layout below). Only the Q block depends on the slabs; the small
// per-row pieces keep their two-slab size.
template <int kDimQK, int kSlabs>
struct Tiles {
  // Raw bytes of one token in the ring: the largest format of this d_qk, rounded up to
  // 16 bytes (cp.async destinations are 16-byte aligned): 656 for d 576; 592 for 512
  // (V4's 576 + 8 bytes are the widest).
  static constexpr int kRawRowBytes = kDimQK == 576 ? 656 : 592;
  static constexpr int kQBytes = 16 * kSlabs * kDimQK * kElemBytes;  // 36864 | 32768 (2 slabs)
  static constexpr int kTileBytes = kBlockN * kDimQK * kElemBytes;    // 18432 | 16384, swizzled
  static constexpr int kRawStageBytes = kBlockN * kRawRowBytes;       // 10496 | 9472
  static constexpr int kTileOffset = kQBytes;                          // dequantised tile (bf16)
  static constexpr int kRawOffset = kTileOffset + kTileBytes;
  static constexpr int kEnd = kRawOffset + kRawStages * kRawStageBytes;
};

// Shared-memory byte layout (kernel.cuh's header comment gives the protocol): the tiles,
// the row-block steps' pieces (S partials, P, per-row rescale and output scale, softmax
// state: mla_row_block_layout.h), the valid flags and the piece record.
template <int kDimQK, int kSlabs>
struct Layout : Tiles<kDimQK, kSlabs>, mla_row_block::Scratch<Tiles<kDimQK, kSlabs>::kEnd> {
  using Steps = mla_row_block::Scratch<Tiles<kDimQK, kSlabs>::kEnd>;
  // Per raw stage and token, 1 when the token is valid ([3][16] bytes).
  static constexpr int kValidOffset = Steps::kScratchEnd;
  // The current piece's record (kernel.cuh's Piece, 32 bytes).
  static constexpr int kPieceOffset = kValidOffset + kRawStages * kBlockN;
  // Ring of index values: a tile's 16 int32, copied kIndexLead tiles ahead of its gather.
  static constexpr int kIndexStages = 3;
  static constexpr int kIndexLead = 4;
  static constexpr int kIndexOffset = kPieceOffset + 32;
  static constexpr int kSmemBytes = kIndexOffset + kIndexStages * kBlockN * 4;
};

static_assert(Layout<576, 2>::kSmemBytes == 95120, "sparse decode budget as in docs/sparse_decode.md");
static_assert(Layout<512, 2>::kSmemBytes == 85904, "sparse decode budget as in docs/sparse_decode.md");
static_assert(Layout<576, 1>::kSmemBytes == 76688, "sparse decode budget as in docs/sparse_decode.md");
static_assert(Layout<512, 1>::kSmemBytes == 69520, "sparse decode budget as in docs/sparse_decode.md");
static_assert(Layout<576, 2>::kSmemBytes <= kMaxSmemPerBlockSm120, "tile exceeds sm_120's 99 KB");
static_assert(Layout<512, 2>::kSmemBytes <= kMaxSmemPerBlockSm120, "tile exceeds sm_120's 99 KB");
static_assert(format_info(0).bytes_per_token <= Layout<576, 2>::kRawRowBytes &&
                  format_info(2).bytes_per_token <= Layout<512, 2>::kRawRowBytes,
              "a raw row holds the widest token");

// The narrow CTA (kernel_narrow.cuh): 4 warps, 16 rows, Q in registers, each warp
// dequantising only its own dims; one barrier per tile. Byte layout: two dequantised bf16
// tiles (buffer 1 stages Q at a piece's start), a 3-stage raw ring, the double-buffered S
// partials ([2][warp][n-tile][lane] float4), a 3-stage ring of index values (a tile's 16
// int32, copied 5 tiles ahead of its gather), the valid flags ([4 stages][4 warps] bytes,
// bit k of warp w's byte: token 4 w + k) and the piece record. Kept at most 76800 B, so
// three CTAs share an H100 SM (228 KB, 1 KB reserved per block); sm_120's 100 KB SM holds
// one either way.
template <int kDimQK>
struct NarrowLayout {
  static constexpr int kRawRowBytes = Tiles<kDimQK, 1>::kRawRowBytes;
  static constexpr int kRawStages = 3;
  static constexpr int kIndexStages = 3;
  static constexpr int kIndexLead = 5;   // tiles between a tile's index copy and its gather
  static constexpr int kFlagStages = 4;  // tile i+3's flags never overwrite a mask being read
  static constexpr int kRawStageBytes = kBlockN * kRawRowBytes;
  static constexpr int kTileBytes = kBlockN * kDimQK * kElemBytes;  // 18432 | 16384
  static constexpr int kTileOffset = 0;
  static constexpr int kRawOffset = 2 * kTileBytes;
  static constexpr int kPartialOffset = kRawOffset + kRawStages * kRawStageBytes;
  static constexpr int kPartialBytes = 2 * kNumWarps * 2 * 32 * 16;
  static constexpr int kIndexOffset = kPartialOffset + kPartialBytes;
  static constexpr int kFlagOffset = kIndexOffset + kIndexStages * kBlockN * 4;
  // The current piece's record (kernel.cuh's Piece, 32 bytes): read back by the tile loop,
  // so it stays out of the registers beside Q and O.
  static constexpr int kPieceOffset = kFlagOffset + kFlagStages * kNumWarps;
  static constexpr int kSmemBytes = kPieceOffset + 32;
};
static_assert(NarrowLayout<576>::kSmemBytes == 76784, "narrow sparse decode budget as in docs/sparse_decode.md");
static_assert(NarrowLayout<512>::kSmemBytes == 69616, "narrow sparse decode budget as in docs/sparse_decode.md");
static_assert(NarrowLayout<576>::kSmemBytes <= kMaxSmemPerBlockSm120, "tile exceeds sm_120's 99 KB");
static_assert(3 * (NarrowLayout<576>::kSmemBytes + kReservedSmemPerBlock) <= 228 * 1024,
              "three narrow CTAs share an H100 SM");

// The 64-row CTA (kernel_64rows.cuh): 8 warps, 64 heads of one query, 64-position tiles
// (four of the 16-position tiles above, so a tile may change pools only at a 16-position
// boundary); the dense decode's 64-row CTA with a dequantisation step. It needs about 195 KB
// of shared memory, so it exists only where a block may opt in to that (H100/H200, B200).
// Byte layout: Q [64][d] | one dequantised tile [64][d] (bf16, swizzled) | one raw stage
// [64][raw row] | P [64][64] bf16 | per-half row maxima [2][64] and sums [2][64] | rescale
// [64] | output scale [64] | valid bytes [2 stages][8 warps] | the piece record.
namespace rows64 {
constexpr int kNumWarps = 8;
constexpr int kThreads = kNumWarps * 32;
constexpr int kBlockM = 64;                  // heads of one query
constexpr int kBlockN = 64;                  // positions per tile: one schedule block
constexpr int kSubTiles = kBlockN / sparse_decode::kBlockN;  // piece_of's 16-position tiles
constexpr int kSlabsO = kBlockM / 16;
constexpr int kColsPerWarp = kHeadDimV / kNumWarps;  // 64
constexpr int kTokensPerWarp = kBlockN / kNumWarps;  // warp w gathers tokens [8 w, 8 w + 8)
constexpr int kThreadsPerToken = 32 / kTokensPerWarp;  // 4
constexpr int kFlagStages = 2;  // tile i + 1's flags are written while tile i's are read

template <int kDimQK>
struct Layout {
  static constexpr int kRawRowBytes = Tiles<kDimQK, 1>::kRawRowBytes;  // 656 | 592
  static constexpr int kQBytes = kBlockM * kDimQK * kElemBytes;        // 73728 | 65536
  static constexpr int kTileBytes = kBlockN * kDimQK * kElemBytes;     // 73728 | 65536
  static constexpr int kRawBytes = kBlockN * kRawRowBytes;             // 41984 | 37888
  static constexpr int kTileOffset = kQBytes;
  static constexpr int kRawOffset = kTileOffset + kTileBytes;
  static constexpr int kPOffset = kRawOffset + kRawBytes;              // P [64][64] bf16
  static constexpr int kPBytes = kBlockM * kBlockN * kElemBytes;       // 8192, swizzled
  static constexpr int kHalfMaxOffset = kPOffset + kPBytes;            // [2 halves][64] fp32
  static constexpr int kHalfSumOffset = kHalfMaxOffset + 2 * kBlockM * 4;
  static constexpr int kRescaleOffset = kHalfSumOffset + 2 * kBlockM * 4;  // [64] fp32
  static constexpr int kOutScaleOffset = kRescaleOffset + kBlockM * 4;    // [64] fp32
  static constexpr int kFlagOffset = kOutScaleOffset + kBlockM * 4;  // [2][8 warps] bytes
  static constexpr int kPieceOffset = kFlagOffset + kFlagStages * kNumWarps;  // 32 bytes
  static constexpr int kSmemBytes = kPieceOffset + 32;
};
static_assert(Layout<576>::kSmemBytes == 199216 && Layout<512>::kSmemBytes == 178736,
              "64-row sparse decode budget as in docs/sparse_decode.md");
static_assert(Layout<576>::kSmemBytes <= kMaxSmemPerBlockLarge, "64-row sparse decode over 227 KB");
static_assert(format_info(0).bytes_per_token <= Layout<576>::kRawRowBytes &&
                  format_info(2).bytes_per_token <= Layout<512>::kRawRowBytes,
              "a raw row holds the widest token");

// Whether a device can run it: compute capability 9.x or 10.x (the targets whose cubin
// holds its body; elsewhere it is a trap) and blocks that may opt in to its shared memory.
inline bool fits(int cc_major, int max_smem_per_block_optin) {
  return (cc_major == 9 || cc_major == 10) && max_smem_per_block_optin >= Layout<576>::kSmemBytes;
}
}  // namespace rows64

// Which CTA runs a call: the narrow one up to 16 heads (one 16-row block per query); above
// 32 heads the 64-row CTA where the device runs it (rows64::fits), which gathers and
// dequantises each token once for 64 heads instead of once per 32; otherwise the row-block
// CTA of kernel.cuh (16 x slabs_for(h_q) rows). Each serves any h_q
// (FLASH_MLA_SPARSE_DECODE_CTA forces one, csrc/api/sparse_decode.cu).
enum class Cta { kRowBlock, kNarrow, kRows64 };
constexpr Cta choose_cta(int h_q, bool rows64_fits) {
  return h_q <= 16 ? Cta::kNarrow : h_q > 32 && rows64_fits ? Cta::kRows64 : Cta::kRowBlock;
}
constexpr int block_rows(Cta cta, int h_q) {
  return cta == Cta::kNarrow ? 16 : cta == Cta::kRows64 ? rows64::kBlockM : 16 * slabs_for(h_q);
}

constexpr int kMaxQueriesPerRequest = 1 << 16;

// Head blocks per query and row blocks (CTAs per schedule part), for the CTA's block rows.
inline int num_head_blocks(int h_q, Cta cta) {
  const int rows = block_rows(cta, h_q);
  return (h_q + rows - 1) / rows;
}
inline int num_m_blocks(int s_q, int h_q, Cta cta) { return s_q * num_head_blocks(h_q, cta); }

inline int smem_bytes(int d_qk, int slabs) {
  if (d_qk == 576) return slabs == 1 ? Layout<576, 1>::kSmemBytes : Layout<576, 2>::kSmemBytes;
  return slabs == 1 ? Layout<512, 1>::kSmemBytes : Layout<512, 2>::kSmemBytes;
}
inline int smem_bytes(int d_qk, int h_q, Cta cta) {
  if (cta == Cta::kRows64) {
    return d_qk == 576 ? rows64::Layout<576>::kSmemBytes : rows64::Layout<512>::kSmemBytes;
  }
  if (cta == Cta::kNarrow) {
    return d_qk == 576 ? NarrowLayout<576>::kSmemBytes : NarrowLayout<512>::kSmemBytes;
  }
  return smem_bytes(d_qk, slabs_for(h_q));
}

// Resident CTAs per SM the launch bounds promise ptxas to fit by registers: with one slab
// the O accumulators are half as many, and three CTAs of 128 threads fit an SM's 64K
// registers at <= 168 each.
constexpr int min_ctas_per_sm(int slabs) { return slabs == 1 ? 3 : 1; }

// CTAs of 128 threads that fit an SM's registers when each thread uses what the launch
// bounds allow (at most 255): 3 with one slab, 2 with two.
constexpr int kRegistersPerSm = 65536;
constexpr int ctas_by_registers(int slabs) {
  const int per_thread = kRegistersPerSm / (kThreads * min_ctas_per_sm(slabs));
  return kRegistersPerSm / (kThreads * (per_thread < 255 ? per_thread : 255));
}
static_assert(ctas_by_registers(1) == 3 && ctas_by_registers(2) == 2, "register budget");

// Narrow CTAs an SM's registers hold: three on sm_90, whose launch bound asks ptxas for
// three (<= 168 registers a thread; kernel_narrow.cuh), two elsewhere (bound two).
constexpr int kNarrowCtasPerSm90 = 3;
constexpr int narrow_ctas_by_registers(int cc_major) { return cc_major == 9 ? kNarrowCtasPerSm90 : 2; }

// CTAs that fit one SM of compute capability cc_major: by shared memory (1 on sm_120, 2 or 3
// on an H100) and by registers.
inline int ctas_per_sm(int smem_per_sm, int d_qk, int h_q, Cta cta, int cc_major) {
  int n = smem_per_sm / (smem_bytes(d_qk, h_q, cta) + kReservedSmemPerBlock);
  // The 64-row CTA's 256 threads use about 250 registers each: one fills an SM.
  const int by_registers = cta == Cta::kRows64   ? 1
                           : cta == Cta::kNarrow ? narrow_ctas_by_registers(cc_major)
                                                 : ctas_by_registers(slabs_for(h_q));
  if (n > by_registers) n = by_registers;
  return n > 0 ? n : 1;
}

// Schedule parts: enough CTAs (parts x row blocks) to fill every SM once, or, in
// batch-invariant mode, one part per (request, piece) as the dense decode does.
inline int num_parts(int num_sms, int smem_per_sm, int cc_major, int batch, int s_q, int h_q,
                     int d_qk, bool batch_invariant, Cta cta) {
  if (batch_invariant) {
    const int64_t parts = static_cast<int64_t>(batch) * decode_schedule::kInvariantMaxPieces;
    return static_cast<int>(parts > 0 ? parts : 1);
  }
  const int64_t per_part = num_m_blocks(s_q, h_q, cta);
  const int64_t slots =
      static_cast<int64_t>(num_sms) * ctas_per_sm(smem_per_sm, d_qk, h_q, cta, cc_major);
  const int64_t parts = slots / per_part;
  return static_cast<int>(parts > 0 ? parts : 1);
}

}  // namespace flash_mla::portable::sparse_decode
