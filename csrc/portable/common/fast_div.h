// Division by a divisor that is fixed for a whole launch (a cache's page size), as a
// multiply-high, an add and a shift: the host computes the multiplier once per call, and a
// kernel saves the ~35 instructions of a 32-bit integer division for each token it gathers.
// Granlund and Montgomery's round-up method, for dividends in [0, 2^31) and divisors in
// [1, 2^31): with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1,
// n / d = (umulhi(n, m) + n) >> l. umulhi(n, m) < n, so the sum fits 32 bits. Plain C++ for
// the host (tests/test_fast_div.py compiles it with the host compiler); fast_div() is also a
// device function under nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASH_MLA_FAST_DIV_HD __host__ __device__ __forceinline__
#else
#define FLASH_MLA_FAST_DIV_HD inline
#endif

namespace flash_mla::portable {

struct FastDiv {
  uint32_t mul;  // m (1 for a power of two)
  int shift;     // l
};

// d must be in [1, 2^31); the callers validate it first.
inline FastDiv make_fast_div(int32_t d) {
  int shift = 0;
  while ((int64_t{1} << shift) < d) ++shift;
  // (2^l - d) < d <= 2^31, so the product stays below 2^63 and m below 2^32.
  const uint64_t excess = (uint64_t{1} << shift) - static_cast<uint64_t>(d);
  const uint64_t mul = (excess << 32) / static_cast<uint64_t>(d) + 1;
  return FastDiv{static_cast<uint32_t>(mul), shift};
}

// n / d for n in [0, 2^31).
FLASH_MLA_FAST_DIV_HD int fast_div(const FastDiv& f, int n) {
  const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
  const uint32_t hi = __umulhi(u, f.mul);
#else
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * f.mul) >> 32);
#endif
  return static_cast<int>((hi + u) >> f.shift);
}

}  // namespace flash_mla::portable

#undef FLASH_MLA_FAST_DIV_HD
