"""Which dense-decode CTA the host dispatch picks, and how many CTAs it plans per SM.

choose_cta, num_m_blocks, ctas_per_sm and num_parts (csrc/portable/decode/dense/config.h)
are plain C++: this test compiles a small program against that header with the host C++
compiler and checks its answers. Up to 16 rows per kv head (h_q / h_k x s_q) take the
narrow 16-row CTA; more than 32 rows the 64-row CTA where the device runs it (H100/H200,
B200), else the 4-warp 32-row CTA, which also takes 17 to 32 rows (the 8-warp
Q-in-registers CTA is off); two narrow CTAs fit an A100 or H100 SM where only one 4-warp
CTA fits an A100's; sm_120 runs one of each; one 64-row CTA fills an SM.
"""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include <utility>
#include "portable/decode/dense/config.h"
int main() {
  namespace dec = flash_mla::portable::dense_decode;
  const int shapes[][3] = {{1, 8, 1}, {1, 16, 1}, {2, 8, 1}, {1, 32, 2}, {1, 17, 1},
                           {1, 32, 1}, {1, 64, 1}, {2, 128, 1}, {4, 63, 3}};
  for (bool fits : {false, true}) {
    for (const auto& s : shapes) {
      const dec::CtaShape cta = dec::choose_cta(s[0], s[1], s[2], fits);
      std::printf("cta %d %d %d %d %d %d\n", fits, s[0], s[1], s[2], static_cast<int>(cta),
                  dec::num_m_blocks(s[0], s[1], s[2], cta));
    }
  }
  // Where the 64-row CTA runs: compute capability 9.x / 10.x with 227 KB blocks.
  for (const auto& d : {std::make_pair(9, 232448), std::make_pair(10, 232448),
                        std::make_pair(12, 101376), std::make_pair(8, 232448),
                        std::make_pair(9, 200000)})
    std::printf("fits %d %d %d\n", d.first, d.second, dec::rows64::fits(d.first, d.second));
  // Shared memory per SM of sm_120 (also sm_86/89), A100, H100 (also H200, B200).
  const int smem[] = {102400, 167936, 233472};
  const dec::CtaShape ctas[] = {dec::CtaShape::kWarps4, dec::CtaShape::kWarps8,
                                dec::CtaShape::kWarps4Rows16, dec::CtaShape::kWarps8Rows64};
  for (int m : smem)
    for (dec::CtaShape c : ctas)
      std::printf("per_sm %d %d %d\n", m, static_cast<int>(c), dec::ctas_per_sm(m, c));
  // Parts on a 132-SM H100, b = 128, h_k 1: h_q 16 (narrow), 32 (4-warp), 64 and 128
  // (64-row) at s_q 1, 128 at s_q 2; and h_q 64 with the 4-warp CTA (a device without the
  // 64-row CTA's shared memory).
  for (const auto& s : {std::make_pair(1, 16), std::make_pair(1, 32), std::make_pair(1, 64),
                        std::make_pair(1, 128), std::make_pair(2, 128)}) {
    const dec::CtaShape c = dec::choose_cta(s.first, s.second, 1, true);
    std::printf("parts %d %d %d\n", s.first, s.second,
                dec::num_parts(132, 233472, 128, s.first, s.second, 1, false, c));
  }
  std::printf("parts4 64 %d\n",
              dec::num_parts(132, 233472, 128, 1, 64, 1, false, dec::CtaShape::kWarps4));
  return 0;
}
"""

WARPS4, WIDE, NARROW, ROWS64 = 0, 1, 2, 3  # CtaShape values, in declaration order
_SHAPES = [(1, 8, 1), (1, 16, 1), (2, 8, 1), (1, 32, 2), (1, 17, 1), (1, 32, 1), (1, 64, 1),
           (2, 128, 1), (4, 63, 3)]
# (s_q, h_q, h_k) -> (CTA, row blocks per kv head) without and with the 64-row CTA
_WITHOUT = [(NARROW, 1), (NARROW, 1), (NARROW, 1), (NARROW, 1), (WARPS4, 1), (WARPS4, 1),
            (WARPS4, 2), (WARPS4, 8), (WARPS4, 3)]
_WITH = [(NARROW, 1), (NARROW, 1), (NARROW, 1), (NARROW, 1), (WARPS4, 1), (WARPS4, 1),
         (ROWS64, 1), (ROWS64, 4), (ROWS64, 2)]
EXPECTED = (
    ["cta 0 %d %d %d %d %d" % (s + c) for s, c in zip(_SHAPES, _WITHOUT)]
    + ["cta 1 %d %d %d %d %d" % (s + c) for s, c in zip(_SHAPES, _WITH)]
    # (compute capability major, opt-in bytes per block) -> the 64-row CTA runs
    + ["fits 9 232448 1", "fits 10 232448 1", "fits 12 101376 0", "fits 8 232448 0",
       "fits 9 200000 0"]
    # (smem per SM, CTA) -> CTAs per SM
    + ["per_sm 102400 %d 1" % WARPS4, "per_sm 102400 %d 1" % WIDE,
       "per_sm 102400 %d 1" % NARROW, "per_sm 102400 %d 1" % ROWS64,
       "per_sm 167936 %d 1" % WARPS4, "per_sm 167936 %d 1" % WIDE,
       "per_sm 167936 %d 2" % NARROW, "per_sm 167936 %d 1" % ROWS64,
       "per_sm 233472 %d 2" % WARPS4, "per_sm 233472 %d 1" % WIDE,
       "per_sm 233472 %d 2" % NARROW, "per_sm 233472 %d 1" % ROWS64]
    # (s_q, h_q) -> parts: two narrow or 4-warp CTAs per SM, one 64-row CTA
    + ["parts 1 16 264", "parts 1 32 264", "parts 1 64 132", "parts 1 128 66",
       "parts 2 128 33", "parts4 64 132"]
)


def test_dense_decode_cta_choice(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "cta")
    assert out.splitlines() == EXPECTED
