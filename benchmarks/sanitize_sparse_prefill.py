"""Small sparse prefill cases for compute-sanitizer (memcheck, racecheck): hostile std-1
inputs, every invalid-index candidate, an all-invalid row, topk_length with NaN kv rows past
it, a sink, topk > s_kv, odd h_q (3: the row block; 37 and 100: the wide CTA where the GPU
allows it), non-contiguous q and kv, d_qk 576 and 512. Each result is checked against
float64 math: out by the plain-math rule, max_logits and lse by the element rule; exit 1 on
a mismatch. FLASH_MLA_SPARSE_PREFILL_CTA=rowblock (or wide) runs every case on that CTA.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_sparse_prefill.py
"""
import os
import sys

os.environ.setdefault("FLASH_MLA_BACKEND", "native")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

from flash_mla import flash_mla_sparse_fwd, oracle  # noqa: E402
from flash_mla.testing import check_op_close, check_plain_rule, make_noncontiguous  # noqa: E402
from tests.test_sparse_prefill_gpu import _problem  # noqa: E402

fails = 0
for d_qk, h_q, s_kv, topk in ((576, 3, 40, 70), (512, 37, 300, 45), (576, 100, 500, 200)):
    p = _problem(9, h_q, d_qk, s_kv, topk, seed=d_qk, std=1.0, lengths=True, sink=True,
                 invalid_every=4)
    idx = p.indices.clone()
    idx[4, 0, :] = -1
    p = p._replace(indices=idx)
    out, ml, lse = flash_mla_sparse_fwd(make_noncontiguous(p.q), make_noncontiguous(p.kv),
                                        p.indices, p.scale, 512, attn_sink=p.sink,
                                        topk_length=p.topk_length)
    torch.cuda.synchronize()
    lengths = p.topk_length.tolist()
    eo, em, el = oracle.sparse_prefill(p.q, p.kv, p.indices, p.scale, 512, sink=p.sink,
                                       topk_length=lengths)
    plain = oracle.plain_sparse_prefill(p.q, p.kv, p.indices, p.scale, 512, sink=p.sink,
                                        topk_length=lengths)
    checks = ((lambda: check_plain_rule(out, eo, plain, "sparse_prefill", "out"), "out"),
              (lambda: check_op_close("sparse_prefill", "max_logits", ml, em), "max_logits"),
              (lambda: check_op_close("sparse_prefill", "lse", lse, el), "lse"))
    for check, what in checks:
        try:
            check()
        except AssertionError as e:
            fails += 1
            print("FAIL", d_qk, h_q, what, str(e)[:400])
    print("d_qk", d_qk, "h_q", h_q, "s_kv", s_kv, "topk", topk, "done", flush=True)
print("small_case failures:", fails)
sys.exit(1 if fails else 0)
