// Split-KV schedule of the dense MLA decode: the constants of the rule, shared by the
// schedule kernel (kernel.cuh), the decode kernel that reads its output, the host
// dispatch (csrc/api/dense_decode.cu) and, restated for the CPU test, the Python model
// in tests/test_decode_schedule.py. The rule itself: docs/dense_decode.md, "Schedule".
#pragma once

#include <string>

#include "../../../common/capabilities.h"

namespace flash_mla::portable::decode_schedule {

// Tokens per KV block (the cache's page size); the schedule's work unit is one block.
constexpr int kPageSize = 64;

// Cost of starting a request (loading Q, filling the pipeline, writing the output), in
// blocks: it keeps a part from collecting many short requests at the price of one long one.
constexpr int kFixedCostBlocks = 2;

// Batch-invariant mode: request i is cut into pieces_i = min(ceil(n_i / 16), 4) pieces of
// ceil(n_i / pieces_i) blocks, a function of its own length only; part p serves piece
// p % 4 of request p / 4, so there are b * 4 parts and at most b * 4 splits.
constexpr int kInvariantChunkBlocks = 16;
constexpr int kInvariantMaxPieces = 4;

// One metadata row per part (int32).
constexpr int kMetaInts = 8;
enum MetaField : int {
  kBeginReq = 0,    // first request of the part; == batch: the part is empty
  kBeginBlock = 1,  // its first block in kBeginReq
  kEndReq = 2,      // last request of the part
  kEndBlock = 3,    // one past its last block in kEndReq (0: nothing of kEndReq)
  kFirstSplit = 4,  // split index of its piece of kBeginReq (later requests: split_offsets)
};

// One CTA computes the whole schedule: prefix sums over the batch in chunks of kThreads.
constexpr int kThreads = 256;

// The op "dense_decode_schedule" (its own tvm-ffi entry and kernel, so the wheel check
// joins the kernel to its own shared memory, not the decode kernel's) has no features
// to choose between: any batch of int32 lengths.
inline std::string capabilities_json() { return caps::JsonObject().str(); }

}  // namespace flash_mla::portable::decode_schedule
