"""Which dense-decode CTA the host dispatch picks, and how many CTAs it plans per SM.

choose_cta, num_m_blocks, ctas_per_sm and num_parts (csrc/portable/decode/dense/config.h)
are plain C++: this test compiles a small program against that header with the host C++
compiler and checks its answers. Up to 16 rows per kv head (h_q / h_k x s_q) take the
narrow 16-row CTA, more rows the 4-warp 32-row CTA (the wide CTA is off); two narrow CTAs
fit an A100 or H100 SM where only one 4-warp CTA fits an A100's; sm_120 runs one of each.
"""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include "portable/decode/dense/config.h"
int main() {
  namespace dec = flash_mla::portable::dense_decode;
  const int shapes[][3] = {{1, 8, 1}, {1, 16, 1}, {2, 8, 1}, {1, 32, 2}, {1, 17, 1},
                           {1, 32, 1}, {1, 64, 1}, {2, 128, 1}, {4, 63, 3}};
  for (const auto& s : shapes) {
    const dec::CtaShape cta = dec::choose_cta(s[0], s[1], s[2]);
    std::printf("cta %d %d %d %d %d\n", s[0], s[1], s[2], static_cast<int>(cta),
                dec::num_m_blocks(s[0], s[1], s[2], cta));
  }
  // Shared memory per SM of sm_120 (also sm_86/89), A100, H100 (also H200, B200).
  const int smem[] = {102400, 167936, 233472};
  const dec::CtaShape ctas[] = {dec::CtaShape::kWarps4, dec::CtaShape::kWarps8,
                                dec::CtaShape::kWarps4Rows16};
  for (int m : smem)
    for (dec::CtaShape c : ctas)
      std::printf("per_sm %d %d %d\n", m, static_cast<int>(c), dec::ctas_per_sm(m, c));
  // Parts on a 132-SM H100, b = 128: h_q 16 (narrow), 32 and 64 (4-warp), s_q 1, h_k 1.
  for (int h_q : {16, 32, 64}) {
    const dec::CtaShape c = dec::choose_cta(1, h_q, 1);
    std::printf("parts %d %d\n", h_q, dec::num_parts(132, 233472, 128, 1, h_q, 1, false, c));
  }
  return 0;
}
"""

NARROW, WARPS4, WIDE = 2, 0, 1  # CtaShape values: kWarps4, kWarps8, kWarps4Rows16
EXPECTED = [
    # (s_q, h_q, h_k) -> CTA, row blocks per kv head
    "cta 1 8 1 %d 1" % NARROW, "cta 1 16 1 %d 1" % NARROW, "cta 2 8 1 %d 1" % NARROW,
    "cta 1 32 2 %d 1" % NARROW, "cta 1 17 1 %d 1" % WARPS4, "cta 1 32 1 %d 1" % WARPS4,
    "cta 1 64 1 %d 2" % WARPS4, "cta 2 128 1 %d 8" % WARPS4, "cta 4 63 3 %d 3" % WARPS4,
    # (smem per SM, CTA) -> CTAs per SM
    "per_sm 102400 %d 1" % WARPS4, "per_sm 102400 %d 1" % WIDE, "per_sm 102400 %d 1" % NARROW,
    "per_sm 167936 %d 1" % WARPS4, "per_sm 167936 %d 1" % WIDE, "per_sm 167936 %d 2" % NARROW,
    "per_sm 233472 %d 2" % WARPS4, "per_sm 233472 %d 1" % WIDE, "per_sm 233472 %d 2" % NARROW,
    # h_q -> parts (two CTAs per SM; 64 heads are two row blocks)
    "parts 16 264", "parts 32 264", "parts 64 132",
]


def test_dense_decode_cta_choice(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "cta")
    assert out.splitlines() == EXPECTED
