"""Small dense decode cases for compute-sanitizer (memcheck, racecheck): varlen requests with
zero-length ones, causal and full, GQA, batch-invariant mode, NaN in unused cache slots and
huge block-table entries (make_paged_kv_cache), split and direct requests (5 schedule
parts); rows per kv head 8 and 16 (the narrow CTA), 18 (the 4-warp CTA) and 128 / 256 (more
row blocks). Each result is checked against float64 math (flash_mla.oracle) by the element
rule; exit 1 on a mismatch. SMALL_CASES_FROM / SMALL_CASES pick a slice of the cases;
FLASH_MLA_DENSE_DECODE_WARPS forces a CTA for all of them.

    compute-sanitizer --tool racecheck python benchmarks/sanitize_dense_decode.py
"""
import os
import sys

import torch

os.environ.setdefault("FLASH_MLA_BACKEND", "native")
os.environ.setdefault("FLASH_MLA_DENSE_DECODE_PARTS", "5")
import flash_mla  # noqa: E402
from flash_mla import oracle  # noqa: E402
from flash_mla.testing import check_op_close, make_paged_kv_cache  # noqa: E402

# (dtype, causal, batch invariant, h_q, h_k, s_q)
CASES = ((torch.bfloat16, True, False, 8, 2, 2),
         (torch.float16, False, False, 16, 1, 1),
         (torch.bfloat16, True, False, 18, 2, 2),
         (torch.float16, False, True, 18, 2, 2),
         (torch.bfloat16, True, False, 128, 1, 2),
         (torch.float16, False, False, 64, 1, 2))

fails = 0
first = int(os.environ.get("SMALL_CASES_FROM", 0))
last = int(os.environ.get("SMALL_CASES", len(CASES)))
for dtype, causal, inv, h_q, h_k, s_q in CASES[first:last]:
    gen = torch.Generator().manual_seed(1)
    seqlens = [300, 0, 65, 1, 1000]
    cache = make_paged_kv_cache(seqlens, h_k=h_k, dtype=dtype, device="cuda", generator=gen,
                                std=0.1)
    q = (torch.randn(5, s_q, h_q, 576, generator=gen) / 10).clamp(-1, 1).to(dtype).cuda()
    meta = flash_mla.get_mla_metadata()[0]
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache.k_cache, cache.block_table,
                                                cache.cache_seqlens, 512, meta, causal=causal,
                                                enable_batch_invariant=inv)
    torch.cuda.synchronize()
    exact_out, exact_lse = oracle.dense_decode(q, cache.k_cache, cache.block_table, seqlens, 512,
                                               576 ** -0.5, causal)
    for what, got, exact in (("out", out, exact_out), ("lse", lse, exact_lse)):
        try:
            check_op_close("dense_decode", what, got, exact, name=f"h_q {h_q} {what}")
        except AssertionError as e:
            fails += 1
            print("FAIL", dtype, causal, inv, h_q, h_k, s_q, what, str(e)[:400])
    print(dtype, "causal" if causal else "full", "invariant" if inv else "", "h_q", h_q, "h_k",
          h_k, "s_q", s_q, "done", flush=True)
print("small_case failures:", fails)
sys.exit(1 if fails else 0)
