// Hardware limits every portable kernel is held to (see shared/SM120.md).
#pragma once

namespace flash_mla {

// Largest dynamic + static shared memory one block may use on sm_120/121
// (99 KB). Portable kernels static_assert against this so a tile tuned for
// Hopper's 227 KB cannot reach an RTX 50xx build.
constexpr int kMaxSmemPerBlockSm120 = 101376;

}  // namespace flash_mla
