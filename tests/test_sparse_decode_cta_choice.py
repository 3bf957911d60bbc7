"""Which sparse-decode CTA the host dispatch picks, its row blocks and CTAs per SM.

choose_cta, num_head_blocks, ctas_per_sm and num_parts (csrc/portable/decode/sparse/config.h)
are plain C++: this test compiles a small program against that header with the host C++
compiler and checks its answers. Up to 16 heads take the narrow 16-row CTA; above 32 heads
the 64-row CTA where the device runs it (compute capability 9.x / 10.x with its shared memory:
rows64::fits); the rest the row-block CTA (16 rows per slab, two slabs above 16 heads). The
narrow CTA's shared memory admits three per H100 SM (and its sm_90 build's registers three),
two per A100 SM, one per sm_120 SM; on other compute capabilities its registers admit two.
The 64-row CTA fills an SM.
"""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include "portable/decode/sparse/config.h"
int main() {
  namespace sd = flash_mla::portable::sparse_decode;
  for (bool fits : {false, true})
    for (int h_q : {1, 8, 16, 17, 32, 33, 64, 65, 128}) {
      const sd::Cta cta = sd::choose_cta(h_q, fits);
      std::printf("cta %d %d %d %d %d\n", fits, h_q, static_cast<int>(cta),
                  sd::num_head_blocks(h_q, cta), sd::num_head_blocks(h_q, sd::Cta::kNarrow));
    }
  // (compute capability major, opt-in bytes per block): sm_120, A100, H100, B200, an H100
  // whose opt-in limit were one byte short.
  const int optin[][2] = {{12, 101376}, {8, 166912}, {9, 232448}, {10, 232448},
                          {9, sd::rows64::Layout<576>::kSmemBytes - 1}};
  for (const auto& o : optin)
    std::printf("fits %d %d %d\n", o[0], o[1], sd::rows64::fits(o[0], o[1]));
  // Shared memory per SM of sm_120 (also sm_86/89), A100, H100 (also H200, B200), with the
  // compute capability major of each.
  const int smem[][2] = {{102400, 12}, {167936, 8}, {233472, 9}, {233472, 10}};
  for (const auto& m : smem)
    for (int d_qk : {512, 576})
      std::printf("per_sm %d %d %d %d %d\n", m[0], m[1], d_qk,
                  sd::ctas_per_sm(m[0], d_qk, 16, sd::Cta::kNarrow, m[1]),
                  sd::ctas_per_sm(m[0], d_qk, 16, sd::Cta::kRowBlock, m[1]));
  for (int d_qk : {512, 576})
    std::printf("per_sm_rows64 %d %d\n", d_qk,
                sd::ctas_per_sm(233472, d_qk, 128, sd::Cta::kRows64, 9));
  // Parts on a 132-SM H100, b = 128, s_q 1, d_qk 576: h_q 16 (narrow), 32 (row block, 2
  // slabs), 64 and 128 (64-row CTA: one per SM, 1 and 2 row blocks per part); s_q 2, h_q 128:
  // 4 row blocks per part.
  for (int h_q : {16, 32, 64, 128})
    std::printf("parts %d %d\n", h_q,
                sd::num_parts(132, 233472, 9, 128, 1, h_q, 576, false, sd::choose_cta(h_q, true)));
  std::printf("parts s_q 2 %d\n",
              sd::num_parts(132, 233472, 9, 128, 2, 128, 576, false, sd::choose_cta(128, true)));
  return 0;
}
"""

ROWBLOCK, NARROW, ROWS64 = 0, 1, 2  # Cta values
EXPECTED = [
    # (rows64 fits, h_q) -> CTA, head blocks of that CTA, head blocks of the narrow CTA
    "cta 0 1 %d 1 1" % NARROW, "cta 0 8 %d 1 1" % NARROW, "cta 0 16 %d 1 1" % NARROW,
    "cta 0 17 %d 1 2" % ROWBLOCK, "cta 0 32 %d 1 2" % ROWBLOCK, "cta 0 33 %d 2 3" % ROWBLOCK,
    "cta 0 64 %d 2 4" % ROWBLOCK, "cta 0 65 %d 3 5" % ROWBLOCK, "cta 0 128 %d 4 8" % ROWBLOCK,
    "cta 1 1 %d 1 1" % NARROW, "cta 1 8 %d 1 1" % NARROW, "cta 1 16 %d 1 1" % NARROW,
    "cta 1 17 %d 1 2" % ROWBLOCK, "cta 1 32 %d 1 2" % ROWBLOCK, "cta 1 33 %d 1 3" % ROWS64,
    "cta 1 64 %d 1 4" % ROWS64, "cta 1 65 %d 2 5" % ROWS64, "cta 1 128 %d 2 8" % ROWS64,
    # (compute capability major, opt-in bytes) -> whether the 64-row CTA runs there
    "fits 12 101376 0", "fits 8 166912 0", "fits 9 232448 1", "fits 10 232448 1",
    "fits 9 199215 0",
    # (smem per SM, cc major, d_qk) -> narrow CTAs per SM, row-block (one slab) CTAs per SM
    "per_sm 102400 12 512 1 1", "per_sm 102400 12 576 1 1",
    "per_sm 167936 8 512 2 2", "per_sm 167936 8 576 2 2",
    "per_sm 233472 9 512 3 3", "per_sm 233472 9 576 3 3",
    "per_sm 233472 10 512 2 3", "per_sm 233472 10 576 2 3",
    # d_qk -> 64-row CTAs per H100 SM
    "per_sm_rows64 512 1", "per_sm_rows64 576 1",
    # h_q -> parts: three narrow CTAs per SM; two-slab row blocks by registers two; one
    # 64-row CTA per SM
    "parts 16 396", "parts 32 264", "parts 64 132", "parts 128 66", "parts s_q 2 33",
]


def test_sparse_decode_cta_choice(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "cta")
    assert out.splitlines() == EXPECTED
