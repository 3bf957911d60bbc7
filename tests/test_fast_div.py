"""The multiply-shift division by a fixed divisor (csrc/portable/common/fast_div.h) that the
sparse decode's gather uses for token -> (page, offset): a host program compiled against the
header compares fast_div with the / operator for every divisor up to 4100, divisors around
powers of two and the largest int32, and dividends at every edge (0, multiples of d and their
neighbours, the largest int32) plus pseudo-random ones. A wrong multiplier or shift for any
divisor shows up as a mismatch line."""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include <vector>
#include "portable/common/fast_div.h"
int main() {
  namespace p = flash_mla::portable;
  std::vector<int32_t> divisors;
  for (int32_t d = 1; d <= 4100; ++d) divisors.push_back(d);
  for (int s = 12; s <= 30; ++s)
    for (int32_t k : {-1, 0, 1}) divisors.push_back((int32_t{1} << s) + k);
  for (int32_t d : {65537, 12345678, 1000000007, 2147483646, 2147483647}) divisors.push_back(d);
  uint64_t state = 88172645463325252ull;
  auto next = [&]() { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; };
  long checked = 0, bad = 0;
  for (int32_t d : divisors) {
    const p::FastDiv f = p::make_fast_div(d);
    std::vector<int64_t> ns = {0, 1, 2, 2147483647, 2147483646, 2147483647 - d};
    for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{1000}, int64_t{2147483647 / d}})
      for (int64_t e : {-1, 0, 1}) ns.push_back(k * d + e);
    for (int i = 0; i < 200; ++i) ns.push_back(static_cast<int64_t>(next() % 2147483648ull));
    for (int64_t n : ns) {
      if (n < 0 || n > 2147483647) continue;
      ++checked;
      const int q = p::fast_div(f, static_cast<int>(n));
      if (q != n / d) {
        if (++bad <= 5) std::printf("mismatch d=%d n=%lld got %d want %lld\n", d,
                                    static_cast<long long>(n), q, static_cast<long long>(n / d));
      }
    }
  }
  std::printf("checked %ld bad %ld\n", checked, bad);
  return 0;
}
"""


def test_fast_div_matches_integer_division(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "fast_div")
    last = out.strip().splitlines()[-1]
    checked, bad = int(last.split()[1]), int(last.split()[3])
    assert bad == 0, out
    assert checked > 4100 * 200, out  # every divisor ran its random dividends too
