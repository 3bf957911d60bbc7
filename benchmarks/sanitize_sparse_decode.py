"""Small sparse decode cases for compute-sanitizer (memcheck, racecheck): every cache
format as the main pool, four main/extra pairings, attn_sink, topk_length (0 included),
invalid index candidates, 1 to 7 schedule parts (FLASH_MLA_SPARSE_DECODE_PARTS), h_q 3, 8,
16 (the narrow CTA) and 33, 64 (the 64-row CTA where the GPU runs it, else the row-block CTA
with two slabs), page sizes 1, 2, 61, 64, 69; each result checked against float64 math
(flash_mla.oracle) by the element rule. Exit 1 on a mismatch.
FLASH_MLA_SPARSE_DECODE_CTA=narrow (or rowblock, rows64) runs every case on that CTA.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_sparse_decode.py
"""
import os
import sys

import torch

os.environ.setdefault("FLASH_MLA_BACKEND", "native")
import flash_mla  # noqa: E402
from flash_mla import oracle, quant  # noqa: E402
from flash_mla.testing import check_op_close  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
fails = 0
for fmt, extra_fmt, page, h_q, s_q, parts in [("V32", "V32", 64, 16, 2, "3"), ("V4", "V41_FP4", 61, 8, 1, "5"),
                                              ("V41", "V32_NO_ROPE", 2, 33, 1, "1"), ("V41_FP4", None, 69, 64, 3, "2"),
                                              ("V32_NO_ROPE", "V4", 1, 3, 1, "7")]:
    os.environ["FLASH_MLA_SPARSE_DECODE_PARTS"] = parts
    d = quant.FORMATS[fmt].d_qk
    b, nb, topk = 3, 7, 45
    kv = (torch.randn(nb, page, 1, d) / 10).to(torch.bfloat16)
    cache = quant.quantize_kv(kv, fmt).to(dev)
    n_tok = nb * page
    idx = torch.randint(0, n_tok, (b, s_q, topk), dtype=torch.int32)
    idx[0, 0, :5] = torch.tensor([-1, -123456, n_tok, 2**31 - 1, -2**31], dtype=torch.int32)
    idx = idx.to(dev)
    lens = torch.tensor([topk, 17, 0], dtype=torch.int32, device=dev)
    q = (torch.randn(b, s_q, h_q, d) / 10).clamp(-1, 1).to(torch.bfloat16).to(dev)
    sink = torch.randn(h_q, device=dev)
    kw = dict(indices=idx, topk_length=lens, attn_sink=sink, kv_format=fmt)
    pools = [(cache, idx, lens.tolist(), fmt)]
    if extra_fmt is not None:
        nb2, page2, etopk = 3, 5, 20
        kv2 = (torch.randn(nb2, page2, 1, d) / 10).to(torch.bfloat16)
        cache2 = quant.quantize_kv(kv2, extra_fmt).to(dev)
        idx2 = torch.randint(-2, nb2 * page2 + 2, (b, s_q, etopk), dtype=torch.int32, device=dev)
        elens = torch.tensor([3, etopk, 0], dtype=torch.int32, device=dev)
        kw.update(extra_k_cache=cache2, extra_indices_in_kvcache=idx2, extra_topk_length=elens,
                  extra_kv_format=extra_fmt)
        pools.append((cache2, idx2, elens.tolist(), extra_fmt))
    meta = flash_mla.get_mla_metadata()[0]
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, **kw)
    torch.cuda.synchronize()
    ex_out, ex_lse = oracle.sparse_decode(q, pools, d ** -0.5, 512, sink)
    for what, a, r in (("out", out, ex_out), ("lse", lse, ex_lse.transpose(1, 2))):
        try:
            check_op_close("sparse_decode", what, a, r, name=f"{fmt}+{extra_fmt} {what}")
        except AssertionError as e:
            fails += 1
            print("FAIL", fmt, extra_fmt, what, str(e)[:400])
    print(fmt, extra_fmt, "page", page, "h_q", h_q, "s_q", s_q, "parts", parts, "done", flush=True)
print("small_case failures:", fails)
sys.exit(1 if fails else 0)
