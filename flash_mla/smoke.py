"""Forward/backward smoke test: ``python -m flash_mla.smoke [--device cpu|cuda]``.

Runs small problems through the public API and compares each output with float64
math written out plainly in this file (not the library's reference; the backward
uses the forward's rounded out for delta, as the kernels do), at SPEC.md's
tolerances (flash_mla.testing.TOLERANCES, rule in flash_mla.testing.compare):

- dense MHA prefill, bf16, causal, GQA (h_q 8, h_k 2), varlen with a zero-length
  sequence and seqlen_q != seqlen_k: out, lse, then dq, dk, dv via autograd;
- dense decode, bf16, s_q 2 causal, paged cache with NaN in every unused slot and
  a zero-length sequence: out, lse;
- sparse FP8 decode (V3.2 cache, 656 B/token, NaN bytes in every slot not read),
  invalid (-1) indices and topk_length: out, lse.

Prints the native library's build line (or why there is none), then a table: op,
backend used, device, max abs error, cos diff, PASS/FAIL. Exit status 0 when every
row passes, 1 otherwise. Default device: cuda when available, else cpu (reference
backend).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Row = Dict[str, str]


# --------------------------------------------------------------------------- float64 math

def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _round64(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """t rounded to dtype (nearest) and back to float64; t itself when dtype is None."""
    return t if dtype is None else t.to(dtype).to(torch.float64)


def _attend64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
              scale: float, p_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [h, m, d], k [h, n, d], v [h, n, dv], visible bool [h or 1, m, n] -> (out [h, m, dv],
    lse [h, m]). Rows that see nothing give out 0, lse +inf, and no gradient (their
    logits are zeroed before the softmax and their probabilities multiplied by 0).

    p_dtype None: exact. bf16/fp16: the native kernels' contract (SPEC.md numerics), the
    unnormalised probabilities exp(s - rowmax) rounded to p_dtype before P.V and
    normalised by the sum of the unrounded ones."""
    logits = torch.einsum("hmd,hnd->hmn", q, k) * scale
    any_row = visible.any(dim=-1, keepdim=True)
    safe = torch.where(visible, logits, torch.full_like(logits, float("-inf")))
    safe = torch.where(any_row, safe, torch.zeros_like(safe))
    row_max = safe.amax(dim=-1, keepdim=True) if safe.shape[-1] else torch.zeros_like(safe[..., :1])
    unnormalised = torch.exp(safe - row_max) * any_row
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    row_sum = torch.where(any_row, row_sum, torch.ones_like(row_sum))
    out = torch.einsum("hmn,hnd->hmd", _round64(unnormalised, p_dtype), v) / row_sum
    lse = torch.where(any_row.squeeze(-1), torch.logsumexp(safe, dim=-1),
                      torch.full(logits.shape[:-1], float("inf"), dtype=logits.dtype))
    return out, lse


def _mha64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: Sequence[int],
           lens_k: Sequence[int], scale: float, causal: bool,
           p_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Varlen MHA in float64 (differentiable): q [total_q, h_q, d], k/v [total_k, h_k, *].
    p_dtype as in _attend64."""
    h_q, h_k = q.shape[1], k.shape[1]
    group = h_q // h_k
    outs, lses = [], []
    q0 = k0 = 0
    for s_q, s_k in zip(lens_q, lens_k):
        qs = q[q0:q0 + s_q].transpose(0, 1)                                   # [h_q, s_q, d]
        ks = k[k0:k0 + s_k].transpose(0, 1).repeat_interleave(group, dim=0)   # [h_q, s_k, d]
        vs = v[k0:k0 + s_k].transpose(0, 1).repeat_interleave(group, dim=0)
        rows = torch.arange(s_q).unsqueeze(1)
        cols = torch.arange(s_k).unsqueeze(0)
        visible = (cols <= rows + (s_k - s_q)) if causal else torch.ones(s_q, s_k, dtype=torch.bool)
        o, l = _attend64(qs, ks, vs, visible.unsqueeze(0), scale, p_dtype)
        outs.append(o.transpose(0, 1))
        lses.append(l.transpose(0, 1))
        q0 += s_q
        k0 += s_k
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def mha_bwd64(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lens_q: Sequence[int], lens_k: Sequence[int], scale: float,
              causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen MHA backward in float64, written out: P = softmax(q.k * scale) (exact),
    dV = P^T dO, dP = dO V^T, delta = rowsum(dO * out), dS = P * (dP - delta),
    dQ = scale * dS K, dK = scale * dS^T Q; GQA sums dK/dV over each kv head's group.

    ``out`` is the forward output the backward is given (the kernels' contract, and
    upstream's): delta uses it as rounded to bf16/fp16, which is why this is not plain
    autograd of the float64 forward (that would use the unrounded out and differ by
    more than SPEC's tolerance in rows with cancellation). With an exact ``out`` the
    two agree to float64 rounding; tests/test_mha_autograd_cpu.py checks that."""
    dout, q, k, v, out = (_f64(t).cpu() for t in (dout, q, k, v, out))
    h_q, h_k = q.shape[1], k.shape[1]
    group = h_q // h_k
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q0 = k0 = 0
    for s_q, s_k in zip(lens_q, lens_k):
        qs = q[q0:q0 + s_q].transpose(0, 1)                                   # [h_q, s_q, d]
        ks = k[k0:k0 + s_k].transpose(0, 1).repeat_interleave(group, dim=0)   # [h_q, s_k, d]
        vs = v[k0:k0 + s_k].transpose(0, 1).repeat_interleave(group, dim=0)
        dos = dout[q0:q0 + s_q].transpose(0, 1)                               # [h_q, s_q, d_v]
        os_ = out[q0:q0 + s_q].transpose(0, 1)
        rows = torch.arange(s_q).unsqueeze(1)
        cols = torch.arange(s_k).unsqueeze(0)
        visible = (cols <= rows + (s_k - s_q)) if causal else torch.ones(s_q, s_k, dtype=torch.bool)
        logits = torch.einsum("hmd,hnd->hmn", qs, ks) * scale
        any_row = visible.any(dim=-1, keepdim=True)
        safe = torch.where(visible, logits, torch.full_like(logits, float("-inf")))
        safe = torch.where(any_row, safe, torch.zeros_like(safe))
        p = torch.softmax(safe, dim=-1) * any_row
        delta = (dos * os_).sum(dim=-1, keepdim=True)
        ds = p * (torch.einsum("hmd,hnd->hmn", dos, vs) - delta)
        dq[q0:q0 + s_q] = (torch.einsum("hmn,hnd->hmd", ds, ks) * scale).transpose(0, 1)
        dk_h = torch.einsum("hmn,hmd->hnd", ds, qs) * scale                 # [h_q, s_k, d]
        dv_h = torch.einsum("hmn,hmd->hnd", p, dos)
        dk[k0:k0 + s_k] = dk_h.reshape(h_k, group, s_k, k.shape[2]).sum(1).transpose(0, 1)
        dv[k0:k0 + s_k] = dv_h.reshape(h_k, group, s_k, v.shape[2]).sum(1).transpose(0, 1)
        q0 += s_q
        k0 += s_k
    return dq, dk, dv


# --------------------------------------------------------------------------- cases

def _compare_rows(op: str, backend: Optional[str], device: torch.device,
                  pairs: Sequence[Tuple[str, torch.Tensor, torch.Tensor]], tol_op: str) -> List[Row]:
    from .testing import TOLERANCES, compare

    rows = []
    for what, actual, ref in pairs:
        tol = TOLERANCES[tol_op][what]
        report = compare(actual, ref, abs_tol=tol[0], rel_tol=tol[1],
                         cos_tol=tol[2] if len(tol) > 2 else None, name=f"{op} {what}")
        rows.append({
            "op": f"{op} {what}", "backend": backend or "?", "device": str(device),
            "max_abs_err": f"{report.max_abs_err:.3e}", "cos_diff": f"{report.cos_diff:.3e}",
            "result": "PASS" if report.passed else "FAIL",
            "detail": "" if report.passed else report.message,
        })
    return rows


def _case_mha(device: torch.device, gen: torch.Generator) -> List[Row]:
    from . import dispatch, flash_attn_varlen_func

    lens_q, lens_k = [37, 0, 5, 64], [37, 0, 9, 80]
    h_q, h_k, d_qk, d_v = 8, 2, 128, 128
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total_q, total_k = sum(lens_q), sum(lens_k)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)

    q, k, v = rand(total_q, h_q, d_qk), rand(total_k, h_k, d_qk), rand(total_k, h_k, d_v)
    dout = rand(total_q, h_q, d_v)
    for t in (q, k, v):
        t.requires_grad_(True)
    scale = d_qk ** -0.5
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    fwd_backend = dispatch.last_backend("dense_prefill_fwd")
    out.backward(dout)
    bwd_backend = dispatch.last_backend("dense_prefill_bwd")

    # Each backend is held to its own contract at SPEC's tolerances. The reference is exact
    # fp32 math. The native forward rounds P to the input dtype before P.V (SPEC.md
    # numerics), so its float64 oracle does too. The native backward feeds P and dS to the
    # tensor cores as high + low parts, which tracks exact math: its oracle is exact.
    fwd_p = q.dtype if fwd_backend == "native" else None
    out64, lse64 = _mha64(_f64(q).cpu(), _f64(k).cpu(), _f64(v).cpu(), lens_q, lens_k, scale,
                          causal=True, p_dtype=fwd_p)
    dq64, dk64, dv64 = mha_bwd64(dout, q, k, v, out, lens_q, lens_k, scale, causal=True)
    rows = _compare_rows("mha_prefill_fwd", fwd_backend, device,
                         [("out", out, out64), ("lse", lse, lse64)], "mha_prefill")
    rows += _compare_rows("mha_prefill_bwd", bwd_backend, device,
                          [("dq", q.grad, dq64), ("dk", k.grad, dk64), ("dv", v.grad, dv64)],
                          "mha_prefill")
    return rows


def _case_dense_decode(device: torch.device, gen: torch.Generator) -> List[Row]:
    from . import dispatch, flash_mla_with_kvcache, get_mla_metadata

    b, s_q, h_q, h_k, d, d_v, page = 2, 2, 16, 1, 576, 512, 64
    seqlens = [100, 0]
    max_blocks, num_blocks = 3, 7
    cache = torch.full((num_blocks, page, h_k, d), float("nan"), dtype=torch.bfloat16)
    # Pages in a scrambled order; unused block_table entries point far out of range.
    block_table = torch.full((b, max_blocks), 2**30, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    for i, n in enumerate(seqlens):
        for j in range((n + page - 1) // page):
            blk = order.pop()
            block_table[i, j] = blk
            used = min(page, n - j * page)
            cache[blk, :used] = torch.randn(used, h_k, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(b, s_q, h_q, d, generator=gen).to(torch.bfloat16)
    scale = d ** -0.5

    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(
        q.to(device), cache.to(device), block_table.to(device),
        torch.tensor(seqlens, dtype=torch.int32, device=device), d_v, meta, causal=True)
    backend = dispatch.last_backend("dense_decode")

    ref_out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    ref_lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        tokens = torch.stack([_f64(cache[block_table[i, t // page], t % page]) for t in range(n)])
        kh = tokens.transpose(0, 1).repeat_interleave(h_q // h_k, dim=0)   # [h_q, n, d]
        visible = torch.arange(n).unsqueeze(0) <= torch.arange(s_q).unsqueeze(1) + (n - s_q)
        o, l = _attend64(_f64(q[i]).transpose(0, 1), kh, kh[..., :d_v], visible.unsqueeze(0), scale)
        ref_out[i] = o.transpose(0, 1)
        ref_lse[i] = l
    return _compare_rows("dense_decode", backend, device,
                         [("out", out, ref_out), ("lse", lse, ref_lse)], "dense_decode")


def _pack_v32(nope_e4m3: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """One V3.2 token row per input row: [512 e4m3 | 4 fp32 scales | 64 bf16] = 656 B."""
    return torch.cat([nope_e4m3.view(torch.uint8), scales.contiguous().view(torch.uint8),
                      rope.contiguous().view(torch.uint8)], dim=-1)


def _case_sparse_decode(device: torch.device, gen: torch.Generator) -> List[Row]:
    from . import dispatch, flash_mla_with_kvcache, get_mla_metadata

    b, s_q, h_q, d, d_v, page, num_blocks, topk = 2, 1, 16, 576, 512, 64, 4, 40
    slots = num_blocks * page
    # Every byte 0xFF: e4m3 NaN, fp32 NaN, bf16 NaN. Only referenced tokens get data.
    cache = torch.full((slots, 656), 0xFF, dtype=torch.uint8)
    used = torch.randperm(slots, generator=gen)[:2 * topk]
    nope = (torch.randn(len(used), 512, generator=gen) * 3).to(torch.float8_e4m3fn)
    scales = 2.0 ** torch.randint(-4, 1, (len(used), 4), generator=gen).to(torch.float32)
    rope = torch.randn(len(used), 64, generator=gen).to(torch.bfloat16)
    cache[used] = _pack_v32(nope, scales, rope)
    dequant = torch.full((slots, d), float("nan"), dtype=torch.float64)
    dequant[used] = torch.cat([
        (nope.to(torch.float64).view(len(used), 4, 128) * scales.to(torch.float64).unsqueeze(-1))
        .reshape(len(used), 512), rope.to(torch.float64)], dim=-1)

    indices = used.view(b, s_q, topk).to(torch.int32).clone()
    indices[0, 0, 3] = -1
    indices[1, 0, ::5] = -1
    topk_length = torch.tensor([topk, topk - 7], dtype=torch.int32)
    # Entries past topk_length must not be read: point them at NaN-filled tokens.
    unused_slot = int(next(s for s in range(slots) if s not in set(used.tolist())))
    indices[1, 0, topk - 7:] = unused_slot
    q = torch.randn(b, s_q, h_q, d, generator=gen).to(torch.bfloat16)
    scale = d ** -0.5

    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(
        q.to(device), cache.view(num_blocks, page, 1, 656).to(device), None, None, d_v, meta,
        is_fp8_kvcache=True, indices=indices.to(device), topk_length=topk_length.to(device))
    backend = dispatch.last_backend("sparse_decode")

    ref_out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    ref_lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        for j in range(s_q):
            idx = [int(x) for x in indices[i, j, :int(topk_length[i])] if int(x) != -1]
            if not idx:
                continue
            kv = dequant[idx].unsqueeze(0).expand(h_q, -1, -1)
            visible = torch.ones(1, 1, len(idx), dtype=torch.bool)
            o, l = _attend64(_f64(q[i, j]).unsqueeze(1), kv, kv[..., :d_v], visible, scale)
            ref_out[i, j] = o.squeeze(1)
            ref_lse[i, :, j] = l.squeeze(1)
    return _compare_rows("sparse_decode", backend, device,
                         [("out", out, ref_out), ("lse", lse, ref_lse)], "sparse_decode")


CASES: Sequence[Tuple[str, Callable[[torch.device, torch.Generator], List[Row]]]] = (
    ("mha_prefill", _case_mha),
    ("dense_decode", _case_dense_decode),
    ("sparse_decode", _case_sparse_decode),
)


# --------------------------------------------------------------------------- report

def native_build_line(device: torch.device) -> str:
    """One line: the native library's build info, or why none is loaded."""
    from . import _native

    try:
        info = _native.build_info()
    except Exception as exc:  # a broken library must not hide the rest of the smoke test
        return f"native library: failed to read build info: {type(exc).__name__}: {exc}"
    if info is None:
        try:
            reason = _native.unavailable_reason("dense_prefill_fwd", device, None)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        return f"native library: none ({reason})"
    if not isinstance(info, dict):
        return f"native library: {info}"
    summary = {key: info[key] for key in ("version", "cuda_version", "targets") if key in info}
    summary["kernels"] = len(info.get("kernels", []))
    return "native library: " + json.dumps(summary, sort_keys=True)


def _print_table(rows: List[Row]) -> None:
    headers = ("op", "backend", "device", "max_abs_err", "cos_diff", "result")
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(r[h].ljust(w) for h, w in zip(headers, widths)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_mla.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    import flash_mla

    print(f"flash_mla {flash_mla.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(native_build_line(device))
    rows: List[Row] = []
    notes: List[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, case in CASES:
            gen = torch.Generator().manual_seed(args.seed)
            try:
                rows += case(device, gen)
            except Exception as exc:  # report and keep going: one broken op must not hide the rest
                rows.append({"op": name, "backend": "-", "device": str(device), "max_abs_err": "-",
                             "cos_diff": "-", "result": "FAIL",
                             "detail": f"{type(exc).__name__}: {exc}"})
    for w in caught:
        text = str(w.message)
        if text not in notes:
            notes.append(text)
    _print_table(rows)
    for r in rows:
        if r["detail"]:
            print(f"FAIL {r['op']}: {r['detail']}")
    for text in notes:
        print(f"note: {text}")
    failed = sum(r["result"] != "PASS" for r in rows)
    print(f"smoke: {len(rows) - failed}/{len(rows)} passed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
