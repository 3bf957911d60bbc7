// Hardware limits every portable kernel is held to: the smallest shared memory of the
// GPUs the portable kernels serve (sm_120/121 consumer Blackwell, also sm_86/89).
#pragma once

namespace flash_mla {

// Largest dynamic + static shared memory one block may use on sm_120/121
// (99 KB). Portable kernels static_assert against this so a tile tuned for
// Hopper's 227 KB cannot reach an RTX 50xx build.
constexpr int kMaxSmemPerBlockSm120 = 101376;

// Largest shared memory one block may opt in to on H100/H200 and B200 (227 KB). Only
// kernels that the dispatch sends to GPUs reporting at least their size (the
// backward's 128-key CTA) are held to this instead of kMaxSmemPerBlockSm120.
constexpr int kMaxSmemPerBlockLarge = 232448;

// Shared memory per SM on sm_120/121 (100 KB; the same on sm_86/89), and what the
// hardware reserves per resident block.
constexpr int kSmemPerSmSm120 = 102400;
constexpr int kReservedSmemPerBlock = 1024;

// Shared memory per SM that `blocks` resident blocks of `block_bytes` each need: they
// fit an SM when this is at most its capacity.
constexpr int smem_per_sm_for(int blocks, int block_bytes) {
  return blocks * (block_bytes + kReservedSmemPerBlock);
}

}  // namespace flash_mla
