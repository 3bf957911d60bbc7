// Split-KV combine: the tile constants and the capability table shared by the host
// dispatch and validation (csrc/api/combine.cu) and the kernel (kernel.cuh), so they
// cannot drift.
#pragma once

#include <cstdint>
#include <string>

#include "../../../common/capabilities.h"

namespace flash_mla::combine {

// One warp merges one (batch, query, head) row; four warps per block keep the
// block small enough that even a decode with b * s_q * h_q = 64 rows fills 16 SMs,
// while a block still amortises its launch over four rows.
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;

// Each lane owns 4 consecutive output columns (one float4 of o_accum) per chunk of
// 128 columns, so d_v must be a multiple of 4; four chunks cover d_v = 512.
constexpr int kColsPerLane = 4;
constexpr int kColsPerChunk = 32 * kColsPerLane;  // 128
constexpr int kMaxChunks = 4;
constexpr int kMaxDv = kColsPerChunk * kMaxChunks;  // 512

// No shared memory: partial LSEs are reduced with warp shuffles and the
// weighted sum stays in registers (16 floats per lane at d_v = 512).
constexpr int64_t kDynamicSmemBytes = 0;

// Number of 128-column chunks for a head dim (host and device use the same rule).
constexpr int chunks_for(int d_v) { return (d_v + kColsPerChunk - 1) / kColsPerChunk; }

// What the op "combine" serves (common/capabilities.h): the output dtypes, and every d_v
// that whole float4 column groups tile, up to what kMaxChunks chunks cover.
inline constexpr DType kDtypes[] = {DType::kBF16, DType::kFP16};
inline constexpr caps::IntRange kDvs{kColsPerLane, kMaxDv, kColsPerLane};
static_assert(chunks_for(kDvs.first) == 1 && chunks_for(kDvs.last) == kMaxChunks,
              "every listed d_v has a chunk-count instance");

// build_info's "ops" entry: {"dtype": ["bf16", "fp16"], "d_v": [4, 8, ..., 512]}.
inline std::string capabilities_json() {
  return caps::JsonObject().field("dtype", kDtypes).field("d_v", kDvs).str();
}

}  // namespace flash_mla::combine
