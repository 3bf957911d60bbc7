"""Backward numerics under both rules of the numerics contract: this library, torch SDPA
(flash and cuDNN backends) and plain bf16 PyTorch, each checked on the same problems.

Why: the backward's speed target compares this library with SDPA's flash backend.
This script shows what each one's dq, dk and dv look like under the checks the GPU
tests apply (flash_mla.testing): the element rule (MHA prefill: an element passes when
abs_err < 1e-3 OR rel_err < 8.01/128; cos_diff <= 7e-6) and the plain-math rule (max
error at most 2x that of plain bf16 PyTorch, flash_mla.oracle.plain_mha_bwd), so the
speed ratio can be read with the numerics next to it.

Each problem (b sequences of s tokens, h_q = h_k heads, bf16 randn q, k, v, dout,
seeded: hostile inputs) is run as a user runs it:
- "flash_mla": flash_mla.flash_attn_varlen_func forward + backward (autograd);
- "sdpa_flash" / "sdpa_cudnn": F.scaled_dot_product_attention forward + backward
  under torch.nn.attention.sdpa_kernel (a backend that refuses the shape is n/a);
- "plain": autograd through the plain bf16 PyTorch forward (the rule's baseline; fp32
  scores and softmax, P cast to bf16, P.V in bf16).
Two float64 references (flash_mla.oracle.mha_bwd):
- "kernel": given the out that backend's own forward stored (bf16): the backward as a
  function of (out, lse), the GPU tests' contract;
- "exact": the true gradient (delta from the exact out). Every backward here forms
  delta = rowsum(dO * out) from a bf16 out, so on causal rows with few keys even an
  exact out rounded to bf16 moves some small dq / dk elements past the element rule
  (docs/mha_bwd.md); this column shows by how much for each backend.

Per backend, reference and gradient it prints the elements outside both element bounds,
the worst element as a multiple of the bound (min(abs_err / abs_tol, rel_err / rel_tol);
> 1 fails), cos_diff and the error as a multiple of plain's (> 2 fails the plain-math
rule), and writes bwd_numerics.json under --out.

Usage: python benchmarks/bwd_numerics.py --out DIR [--seqlens 1024 4096] [--heads 8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

GRADS = ("dq", "dk", "dv")


def bounds(what: str):
    """(abs_tol, rel_tol, cos_tol) of the element rule's MHA row, as the tests use them."""
    from flash_mla.testing import TOLERANCES

    return TOLERANCES["mha_prefill"][what]


def judge(torch, got, ref, what: str, name: str, plain=None) -> Dict:
    """Both rules for one gradient against ``ref``: the element rule ("pass", "bad",
    "worst", "cos_diff") and, when ``plain`` is given, the plain-math rule ("plain_pass",
    "vs_plain": max error as a multiple of plain's)."""
    from flash_mla.testing import compare, compare_plain

    abs_tol, rel_tol, cos_tol = bounds(what)
    report = compare(got, ref, abs_tol=abs_tol, rel_tol=rel_tol, cos_tol=cos_tol, name=name)
    # The worst element as a multiple of the bound: min(abs_err / abs_tol, rel_err /
    # rel_tol), > 1 fails (compare's relative error uses the same 1e-6 floor).
    err = (got.double() - ref.double()).abs()
    rel = err / (ref.double().abs() + 1e-6)
    worst = float(torch.minimum(err / abs_tol, rel / rel_tol).max()) if err.numel() else 0.0
    result = {"pass": report.passed, "bad": report.num_failed, "worst": round(worst, 3),
              "cos_diff": report.cos_diff}
    if plain is not None:
        rule2 = compare_plain(got, ref, plain, cos_tol=cos_tol, name=name)
        result.update(plain_pass=rule2.passed, vs_plain=round(rule2.ratio, 3))
    return result


def run_problem(torch, b: int, s: int, h: int, d: int, causal: bool, seed: int) -> Dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flash_mla import flash_attn_varlen_func, oracle

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dt)

    q, k, v, dout = randn(b * s, h, d), randn(b * s, h, d), randn(b * s, h, d), randn(b * s, h, d)
    cu = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * s
    scale = d ** -0.5

    def exact_grads(out):
        return oracle.mha_bwd(dout, q, k, v, out, cu, cu, scale, causal)

    exact = exact_grads(None)
    plain = oracle.plain_mha_bwd(dout, q, k, v, cu, cu, scale, causal)
    results: Dict[str, Optional[Dict]] = {}

    def record(name: str, grads, out) -> None:
        refs = {"kernel": exact_grads(out), "exact": exact}
        results[name] = {
            ref_name: {g: judge(torch, a, r, g, f"{name} {g} vs {ref_name}", p)
                       for g, a, r, p in zip(GRADS, grads, ref, plain)}
            for ref_name, ref in refs.items()}

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o, _ = flash_attn_varlen_func(*leaves, cu, cu, s, s, softmax_scale=scale, causal=causal)
    record("flash_mla", torch.autograd.grad(o, leaves, dout), o.detach())

    def bshd(t):  # [b*s, h, d] -> [b, h, s, d]
        return t.view(b, s, h, d).transpose(1, 2)

    def packed(t):  # [b, h, s, d] -> [b*s, h, d]
        return t.transpose(1, 2).reshape(b * s, h, d)

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        leaves = [bshd(t).detach().clone().requires_grad_(True) for t in (q, k, v)]
        try:
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale)
                grads = torch.autograd.grad(o, leaves, bshd(dout))
        except RuntimeError as err:  # the backend refuses this shape or GPU
            results[name] = None
            print(f"  {name}: n/a ({str(err).splitlines()[0][:120]})", flush=True)
            continue
        record(name, [packed(g) for g in grads], packed(o.detach()))

    record("plain", plain, oracle.plain_mha_fwd(q, k, v, cu, cu, scale, causal))
    return results


def print_rows(shape: str, results: Dict[str, Optional[Dict]]) -> None:
    for name, refs in results.items():
        if refs is None:
            continue
        for ref_name, grads in refs.items():
            cells = "  ".join(f"{g} {'PASS' if r['pass'] else 'FAIL'} bad={r['bad']:<4d} "
                              f"worst={r['worst']:<6.2f} cos={r['cos_diff']:.1e} "
                              f"x_plain={r['vs_plain']:<5.2f}"
                              for g, r in grads.items())
            print(f"{shape:<24s} {name:<20s} {ref_name:<6s} {cells}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bwd_numerics.json")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=8, help="h_q = h_k")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="d_qk = d_v")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bwd_numerics: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    abs_tol, rel_tol, cos_tol = bounds("dq")
    print(f"device: {device}; torch {torch.__version__}; bound (dq, dk, dv): abs {abs_tol} or "
          f"rel {rel_tol:.4f}, cos_diff <= {cos_tol}", flush=True)
    rows = []
    problems = [(s, d, c) for s in args.seqlens for d in args.dims for c in (False, True)]
    for i, (s, d, causal) in enumerate(problems, 1):
        shape = f"b{args.batch} s{s} h{args.heads} d{d} {'causal' if causal else 'full'}"
        print(f"[{i}/{len(problems)}] {shape}", flush=True)
        results = run_problem(torch, args.batch, s, args.heads, d, causal, args.seed)
        print_rows(shape, results)
        rows.append({"shape": shape, "results": results})
        torch.cuda.empty_cache()

    summary = {}
    for name in rows[0]["results"]:
        ran = [r["results"][name] for r in rows if r["results"].get(name) is not None]
        for ref_name in ("kernel", "exact"):
            checks = [x[ref_name] for x in ran]
            summary[f"{name} vs {ref_name}"] = {
                "problems": len(checks),
                "failed": sum(not all(g["pass"] for g in c.values()) for c in checks),
                "bad_elements": sum(g["bad"] for c in checks for g in c.values()),
                "plain_rule_failed": sum(not all(g["plain_pass"] for g in c.values()) for c in checks),
                "worst_vs_plain": max((g["vs_plain"] for c in checks for g in c.values()), default=0.0)}
    print("\nsummary (element rule: problems with any gradient outside the bound; plain-math "
          "rule: problems with any gradient over 2x plain's error):")
    for key, sm in summary.items():
        print(f"  {key:<30s} element {sm['failed']}/{sm['problems']} problems fail, "
              f"{sm['bad_elements']} elements outside the bound; plain-math "
              f"{sm['plain_rule_failed']}/{sm['problems']} fail, worst {sm['worst_vs_plain']:.2f}x plain")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bwd_numerics.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "rows": rows, "summary": summary},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
