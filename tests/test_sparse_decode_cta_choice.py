"""Which sparse-decode CTA the host dispatch picks, its row blocks and CTAs per SM.

choose_cta, num_head_blocks, ctas_per_sm and num_parts (csrc/portable/decode/sparse/config.h)
are plain C++: this test compiles a small program against that header with the host C++
compiler and checks its answers. Up to 16 heads take the narrow 16-row CTA, more heads the
row-block CTA (16 rows per slab, two slabs above 16 heads). The narrow CTA's shared memory
admits three per H100 SM (and its sm_90 build's registers three), two per A100 SM, one per
sm_120 SM; on other compute capabilities its registers admit two.
"""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include "portable/decode/sparse/config.h"
int main() {
  namespace sd = flash_mla::portable::sparse_decode;
  for (int h_q : {1, 8, 16, 17, 32, 64, 128}) {
    const sd::Cta cta = sd::choose_cta(h_q);
    std::printf("cta %d %d %d %d\n", h_q, static_cast<int>(cta), sd::num_head_blocks(h_q, cta),
                sd::num_head_blocks(h_q, sd::Cta::kNarrow));
  }
  // Shared memory per SM of sm_120 (also sm_86/89), A100, H100 (also H200, B200), with the
  // compute capability major of each.
  const int smem[][2] = {{102400, 12}, {167936, 8}, {233472, 9}, {233472, 10}};
  for (const auto& m : smem)
    for (int d_qk : {512, 576})
      std::printf("per_sm %d %d %d %d %d\n", m[0], m[1], d_qk,
                  sd::ctas_per_sm(m[0], d_qk, 16, sd::Cta::kNarrow, m[1]),
                  sd::ctas_per_sm(m[0], d_qk, 16, sd::Cta::kRowBlock, m[1]));
  // Parts on a 132-SM H100, b = 128, s_q 1, d_qk 576: h_q 16 (narrow), 32 (row block, 2 slabs).
  for (int h_q : {16, 32})
    std::printf("parts %d %d\n", h_q,
                sd::num_parts(132, 233472, 9, 128, 1, h_q, 576, false, sd::choose_cta(h_q)));
  return 0;
}
"""

ROWBLOCK, NARROW = 0, 1  # Cta values
EXPECTED = [
    # h_q -> CTA, head blocks of that CTA, head blocks of the narrow CTA
    "cta 1 %d 1 1" % NARROW, "cta 8 %d 1 1" % NARROW, "cta 16 %d 1 1" % NARROW,
    "cta 17 %d 1 2" % ROWBLOCK, "cta 32 %d 1 2" % ROWBLOCK, "cta 64 %d 2 4" % ROWBLOCK,
    "cta 128 %d 4 8" % ROWBLOCK,
    # (smem per SM, cc major, d_qk) -> narrow CTAs per SM, row-block (one slab) CTAs per SM
    "per_sm 102400 12 512 1 1", "per_sm 102400 12 576 1 1",
    "per_sm 167936 8 512 2 2", "per_sm 167936 8 576 2 2",
    "per_sm 233472 9 512 3 3", "per_sm 233472 9 576 3 3",
    "per_sm 233472 10 512 2 3", "per_sm 233472 10 576 2 3",
    # h_q -> parts: three narrow CTAs per SM; two-slab row blocks by registers two
    "parts 16 396", "parts 32 264",
]


def test_sparse_decode_cta_choice(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "cta")
    assert out.splitlines() == EXPECTED
