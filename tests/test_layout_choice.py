"""Which MHA CTA layout the host dispatch picks for a GPU's shared memory.

choose_layout (csrc/portable/prefill/dense_{fwd,bwd}/config.h) is plain C++: this
test compiles a small program against those headers with the host C++ compiler and
checks its answers for the parts the wheel serves. A 4-warp or 4x32 CTA is picked
only where two fit an SM, so sm_120/121 (and sm_86/89), with 100 KB per SM, get them
at d = 64 only; the 8-warp CTAs serve them otherwise. The backward's 128-key CTA
(164864 B at d = 128) is picked at d = 128 where one block may opt in to that much:
A100, H100/H200, B200.
"""
from __future__ import annotations

from tests._tools import run_host_program

PROGRAM = r"""
#include <cstdio>
#include "portable/prefill/dense_bwd/config.h"
#include "portable/prefill/dense_fwd/config.h"
int main() {
  namespace bwd = flash_mla::portable::dense_bwd;
  namespace fwd = flash_mla::portable::dense_fwd;
  // (per SM, per block opt-in) of sm_120 (and sm_86/89), A100, H100 (also H200, B200).
  const int smem[][2] = {{102400, 101376}, {167936, 166912}, {233472, 232448}};
  const int dims[] = {64, 128, 192};
  for (const auto& s : smem)
    for (int d : dims)
      std::printf("%d %d %d %d\n", s[0], d, static_cast<int>(fwd::choose_layout(s[0], d)),
                  static_cast<int>(bwd::choose_layout(s[0], s[1], d)));
  return 0;
}
"""

# (shared memory per SM, d_qk) -> (forward layout, backward layout); 432 is 4x32, 128
# the backward's 128-key CTA.
SM120 = 102400  # also sm_86 / sm_89
A100 = 167936
H100 = 233472  # also H200 and B200
EXPECTED = {
    (SM120, 64): (432, 4), (SM120, 128): (8, 8), (SM120, 192): (8, 8),
    (A100, 64): (432, 4), (A100, 128): (4, 128), (A100, 192): (8, 8),
    (H100, 64): (432, 4), (H100, 128): (432, 128), (H100, 192): (432, 8),
}


def test_layout_per_gpu(tmp_path):
    out = run_host_program(PROGRAM, tmp_path, "layout")
    got = {}
    for line in out.splitlines():
        smem, d, fwd, bwd = (int(x) for x in line.split())
        got[(smem, d)] = (fwd, bwd)
    assert got == EXPECTED
