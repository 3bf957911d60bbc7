"""Forward/backward smoke test: ``python -m flash_mla.smoke [--device cpu|cuda[:N]] [--seed N]``.

It checks two things per op: that the op ran where it should, and that its outputs meet
the numerics contract against the float64 oracle (flash_mla.oracle, rules in
flash_mla.testing).

Where each op should run is decided before any op runs, from the environment and the
native library's own build info, never from the functions under test:

- ``FLASH_MLA_BACKEND=reference``: the reference everywhere, and the smoke test says so;
- no CUDA device (or ``--device cpu``): the reference; the smoke test says plainly that
  no GPU kernel was exercised;
- on a CUDA device, an op this version has a native kernel for (NATIVE_KERNEL_OPS) is
  expected native. The library must then be loadable and hold a cubin or PTX that runs
  on the GPU (the build command builds for the user's GPU): if not, a "native library"
  row FAILs with the loader's reason, and every such op FAILs with the dispatcher's. An
  op the loaded library does not list in its "ops" (a developer build with
  FLASH_MLA_KERNELS) is expected on the reference, and the row says why;
- ops with no native kernel in this version run on the reference, reported as
  "reference (no native kernel in this version)", which is not a failure.

After each call, what actually ran is read from flash_mla.dispatch.last_backend; a
mismatch with the expectation is a FAIL that prints the dispatcher's reason.

Cases:
- dense MHA prefill, bf16, causal, GQA (h_q 8, h_k 2), varlen with a zero-length
  sequence and seqlen_q != seqlen_k, std-1 inputs (hostile): out and dq / dk / dv by the
  plain-math rule (rule 2: at most 2x plain bf16 PyTorch's error), lse by the element rule;
- dense decode, bf16, s_q 2 causal, paged cache with NaN in every unused slot and a
  zero-length sequence, upstream-style values (rule 1, element rule): out, lse;
- sparse prefill, bf16, d_qk 576, h_q 16, upstream-style values (rule 1): every invalid
  index candidate, an all-invalid row, topk_length (entries past it point at NaN rows),
  an attention sink: out, lse, max_logits;
- sparse FP8 decode (V3.2 cache, 656 B/token, NaN bytes in every slot not read),
  invalid (-1) indices and topk_length (rule 1): out, lse.

Prints the library's build line, the table (op, backend that ran, expected backend,
device, rule, max error, its limit, cos_diff, PASS/FAIL), then each failure's reason.
Exit status 0 only when every row passes.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Row = Dict[str, str]

NATIVE = "native"
REFERENCE = "reference"

# Ops for which this version of flash_mla has a native kernel and calls it; on a GPU the
# library was built for, each must run natively.
NATIVE_KERNEL_OPS: Tuple[str, ...] = ("dense_prefill_fwd", "dense_prefill_bwd", "dense_decode",
                                      "sparse_prefill", "sparse_decode")
# Ops the smoke test runs, in table order.
SMOKE_OPS: Tuple[str, ...] = ("dense_prefill_fwd", "dense_prefill_bwd", "dense_decode", "sparse_prefill",
                              "sparse_decode")
NO_NATIVE_KERNEL = "no native kernel in this version"
HEADERS = ("op", "backend", "expected", "device", "rule", "max_err", "limit", "cos_diff", "result")


# --------------------------------------------------------------------------- expectation

@dataclass(frozen=True)
class Expectation:
    """Where one op should run, and why."""

    backend: str
    why: str


@dataclass(frozen=True)
class Plan:
    """The expectation for every op, decided before any op runs."""

    expected: Dict[str, Expectation]
    library_failure: Optional[str]   # the library should serve this GPU and cannot: why
    no_gpu_reason: Optional[str]     # why no GPU kernel is expected to run, if none is


def plan(ops: Sequence[str], *, capability: Optional[Tuple[int, int]], setting: str,
         info: Optional[dict], load_error: Optional[str], no_gpu_reason: str = "no CUDA device visible") -> Plan:
    """Expected backend per op from the environment alone (see the module docstring).

    capability: the CUDA device's (major, minor), None when the smoke runs on no CUDA
    device (then ``no_gpu_reason`` says why); setting: FLASH_MLA_BACKEND (auto, native or
    reference); info / load_error: flash_mla._native.build_info() / load_error().
    """
    from . import _arch

    if setting == REFERENCE:
        why = "FLASH_MLA_BACKEND=reference forces the reference"
        return Plan({op: Expectation(REFERENCE, why) for op in ops}, None, why)
    if capability is None:
        return Plan({op: Expectation(REFERENCE, no_gpu_reason) for op in ops}, None, no_gpu_reason)
    sm = _arch.sm_name(*capability)
    library_failure = None
    if info is None:
        library_failure = f"the native library is not usable: {load_error or 'no reason given by the loader'}"
    else:
        targets = list(info.get("targets", []))
        runnable = _arch.runnable_target(targets, info.get("ptx"), *capability)
        if runnable is None:
            library_failure = (f"the native library has no kernel for this GPU ({sm}; built targets: "
                               f"{', '.join(targets) or 'none'}, PTX: {info.get('ptx') or 'none'}); "
                               f"rebuild for this GPU (FLASH_MLA_CUDA_ARCHS=native, or a list that "
                               f"includes {capability[0]}{capability[1]})")
    built_ops = set(info.get("ops", {})) if info is not None else None
    expected = {}
    for op in ops:
        if op not in NATIVE_KERNEL_OPS:
            expected[op] = Expectation(REFERENCE, NO_NATIVE_KERNEL)
        elif built_ops is not None and op not in built_ops:
            expected[op] = Expectation(REFERENCE, f"not in this native build (ops built: "
                                                  f"{', '.join(sorted(built_ops)) or 'none'})")
        elif library_failure is not None:
            expected[op] = Expectation(NATIVE, "this version has a native kernel for it")
        else:
            runnable = _arch.runnable_target(info.get("targets", []), info.get("ptx"), *capability)
            expected[op] = Expectation(NATIVE, f"the library lists it and runs {runnable} on {sm}")
    none_native = all(e.backend == REFERENCE for e in expected.values())
    return Plan(expected, library_failure, "no op of this build has a native kernel here" if none_native else None)


def _capability(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def make_plan(device: torch.device) -> Plan:
    """plan() for this process: FLASH_MLA_BACKEND, the device and the loaded library."""
    from . import _native, dispatch

    setting = dispatch.backend_setting()
    why = f"--device {device}" if torch.cuda.is_available() else "no CUDA device visible"
    try:
        info, error = _native.build_info(), _native.load_error()
    except Exception as exc:  # noqa: BLE001 - a loader crash is the reason itself
        info, error = None, f"{type(exc).__name__}: {exc}"
    return plan(SMOKE_OPS, capability=_capability(device), setting=setting, info=info,
                load_error=error, no_gpu_reason=why)


def backend_rows(op: str, device: torch.device, expected: Expectation, features: Optional[dict],
                 rows: List[Row]) -> None:
    """Fill the backend columns of ``rows`` (one op's) from what actually ran; a mismatch with
    the expectation FAILs each row with the dispatcher's reason."""
    from . import _native, dispatch

    ran = dispatch.last_backend(op) or "?"
    shown = ran if ran != REFERENCE or expected.backend != REFERENCE else f"{REFERENCE} ({expected.why})"
    problem = ""
    if ran != expected.backend:
        try:
            reason = dispatch.native_unavailable_reason(op, device, features)
        except Exception as exc:  # noqa: BLE001 - report it instead
            reason = f"{type(exc).__name__}: {exc}"
        load = _native.load_error()
        problem = (f"expected {expected.backend} ({expected.why}) but {ran} ran; dispatcher: "
                   f"{reason or 'no reason given'}" + (f"; loader: {load}" if load and load not in (reason or "") else ""))
    for row in rows:
        row["backend"], row["expected"] = shown, expected.backend
        if problem:
            row["result"] = "FAIL"
            row["detail"] = problem + ("; " + row["detail"] if row["detail"] else "")


# --------------------------------------------------------------------------- numerics

def _row(op: str, what: str, device: torch.device, rule: str, err: float, limit: str, cos: float,
         passed: bool, detail: str) -> Row:
    return {"op": f"{op} {what}", "backend": "?", "expected": "?", "device": str(device), "rule": rule,
            "max_err": f"{err:.3e}", "limit": limit, "cos_diff": f"{cos:.3e}",
            "result": "PASS" if passed else "FAIL", "detail": "" if passed else detail}


def element_row(op: str, tol_op: str, what: str, device: torch.device, actual: torch.Tensor,
                exact: torch.Tensor) -> Row:
    """Rule 1 (element rule) for TOLERANCES[tol_op][what]."""
    from .testing import TOLERANCES, compare

    tol = TOLERANCES[tol_op][what]
    report = compare(actual, exact, abs_tol=tol[0], rel_tol=tol[1],
                     cos_tol=tol[2] if len(tol) > 2 else None, name=f"{op} {what}")
    return _row(op, what, device, "element", report.max_abs_err, f"abs {tol[0]:g} | rel {tol[1]:.3g}",
                report.cos_diff, report.passed, report.message)


def plain_row(op: str, tol_op: str, what: str, device: torch.device, actual: torch.Tensor,
              exact: torch.Tensor, plain: torch.Tensor) -> Row:
    """Rule 2 (at most PLAIN_FACTOR x plain PyTorch's error) for TOLERANCES[tol_op][what]."""
    from .testing import PLAIN_FACTOR, TOLERANCES, compare_plain

    report = compare_plain(actual, exact, plain, cos_tol=TOLERANCES[tol_op][what][2], name=f"{op} {what}")
    return _row(op, what, device, f"plain x{PLAIN_FACTOR:g}", report.max_err,
                f"{PLAIN_FACTOR * report.plain_max_err:.3e}", report.cos_diff, report.passed, report.message)


# --------------------------------------------------------------------------- cases

def _cu(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _case_mha(device: torch.device, gen: torch.Generator, plan_: Plan) -> List[Row]:
    from . import flash_attn_varlen_func, oracle

    lens_q, lens_k = [37, 0, 5, 64], [37, 0, 9, 80]
    h_q, h_k, d_qk, d_v = 8, 2, 128, 128
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)

    def rand(*shape):  # std-1 values: hostile inputs, rule 2
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)

    q, k, v = rand(sum(lens_q), h_q, d_qk), rand(sum(lens_k), h_k, d_qk), rand(sum(lens_k), h_k, d_v)
    dout = rand(sum(lens_q), h_q, d_v)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    scale = d_qk ** -0.5
    features = {"dtype": "bf16", "head_dims": [d_qk, d_v]}

    out, lse = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    exact_out, exact_lse = oracle.mha_fwd(q, k, v, cu_q, cu_k, scale, causal=True)
    plain_out = oracle.plain_mha_fwd(q, k, v, cu_q, cu_k, scale, causal=True)
    fwd = [plain_row("dense_prefill_fwd", "mha_prefill", "out", device, out, exact_out, plain_out),
           element_row("dense_prefill_fwd", "mha_prefill", "lse", device, lse, exact_lse)]
    backend_rows("dense_prefill_fwd", device, plan_.expected["dense_prefill_fwd"], features, fwd)

    out.backward(dout)
    # The backward's contract: given the out the forward stored (rounded to bf16).
    exact_grads = oracle.mha_bwd(dout, q, k, v, out.detach(), cu_q, cu_k, scale, causal=True)
    plain_grads = oracle.plain_mha_bwd(dout, q, k, v, cu_q, cu_k, scale, causal=True)
    bwd = [plain_row("dense_prefill_bwd", "mha_prefill", what, device, leaf.grad, e, p)
           for what, leaf, e, p in zip(("dq", "dk", "dv"), leaves, exact_grads, plain_grads)]
    backend_rows("dense_prefill_bwd", device, plan_.expected["dense_prefill_bwd"], features, bwd)
    return fwd + bwd


def _case_dense_decode(device: torch.device, gen: torch.Generator, plan_: Plan) -> List[Row]:
    from . import flash_mla_with_kvcache, get_mla_metadata, oracle
    from .testing import make_paged_kv_cache

    b, s_q, h_q, h_k, d, d_v = 2, 2, 16, 1, 576, 512
    # Upstream-style values (std 0.1, q clamped to [-1, 1]) in a hostile cache: scrambled
    # pages, NaN in every unused slot, garbage in unused block_table entries.
    cache = make_paged_kv_cache([100, 0], page_size=64, h_k=h_k, d=d, generator=gen, std=0.1)
    q = torch.randn(b, s_q, h_q, d, generator=gen).clamp(-1, 1).to(torch.bfloat16)
    scale = d ** -0.5

    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q.to(device), cache.k_cache.to(device), cache.block_table.to(device),
                                      cache.cache_seqlens.to(device), d_v, meta, causal=True)
    exact_out, exact_lse = oracle.dense_decode(q, cache.k_cache, cache.block_table, cache.cache_seqlens,
                                               d_v, scale, causal=True)
    rows = [element_row("dense_decode", "dense_decode", "out", device, out, exact_out),
            element_row("dense_decode", "dense_decode", "lse", device, lse, exact_lse)]
    backend_rows("dense_decode", device, plan_.expected["dense_decode"], {"dtype": "bf16"}, rows)
    return rows


def _case_sparse_prefill(device: torch.device, gen: torch.Generator, plan_: Plan) -> List[Row]:
    from . import flash_mla_sparse_fwd, oracle

    s_q, h_q, d, d_v, s_kv, topk = 5, 16, 576, 512, 90, 37
    scale = d ** -0.5
    # Upstream-style values (std 0.1); kv rows no query may read hold NaN.
    kv = (torch.randn(s_kv, 1, d, generator=gen) / 10).to(torch.bfloat16)
    q = (torch.randn(s_q, h_q, d, generator=gen) / 10).to(torch.bfloat16)
    unread = 7
    kv[unread] = float("nan")
    readable = torch.tensor([i for i in range(s_kv) if i != unread])
    indices = readable[torch.randint(0, len(readable), (s_q, 1, topk), generator=gen)].to(torch.int32)
    invalid = [-2 ** 31, -123456, -1, s_kv, 114514, 2147480000, 2 ** 31 - 1]
    for j, bad in enumerate(invalid):
        indices[0, 0, 3 * j] = bad
        indices[4, 0, j] = bad
    indices[2, 0, :] = torch.tensor(invalid, dtype=torch.int32).repeat(topk // len(invalid) + 1)[:topk]
    topk_length = torch.tensor([topk, 20, topk, 1, 30], dtype=torch.int32)
    indices[1, 0, 20:] = unread   # past topk_length: never read
    indices[3, 0, 1:] = unread
    sink = torch.randn(h_q, generator=gen)

    out, max_logits, lse = flash_mla_sparse_fwd(
        q.to(device), kv.to(device), indices.to(device), scale, d_v, attn_sink=sink.to(device),
        topk_length=topk_length.to(device))
    exact_out, exact_max, exact_lse = oracle.sparse_prefill(q, kv, indices, scale, d_v, sink=sink,
                                                            topk_length=topk_length.tolist())
    rows = [element_row("sparse_prefill", "sparse_prefill", "out", device, out, exact_out),
            element_row("sparse_prefill", "sparse_prefill", "lse", device, lse, exact_lse),
            element_row("sparse_prefill", "sparse_prefill", "max_logits", device, max_logits, exact_max)]
    backend_rows("sparse_prefill", device, plan_.expected["sparse_prefill"], {"dtype": "bf16", "d_qk": d},
                 rows)
    return rows


def _pack_v32(nope_e4m3: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """One V3.2 token row per input row: [512 e4m3 | 4 fp32 scales | 64 bf16] = 656 B."""
    return torch.cat([nope_e4m3.view(torch.uint8), scales.contiguous().view(torch.uint8),
                      rope.contiguous().view(torch.uint8)], dim=-1)


def _case_sparse_decode(device: torch.device, gen: torch.Generator, plan_: Plan) -> List[Row]:
    from . import flash_mla_with_kvcache, get_mla_metadata, oracle

    b, s_q, h_q, d, d_v, page, num_blocks, topk = 2, 1, 16, 576, 512, 64, 4, 40
    slots = num_blocks * page
    # Every byte 0xFF: e4m3 NaN, fp32 NaN, bf16 NaN. Only referenced tokens get data.
    cache = torch.full((slots, 656), 0xFF, dtype=torch.uint8)
    used = torch.randperm(slots, generator=gen)[:2 * topk]
    nope = (torch.randn(len(used), 512, generator=gen) * 3).to(torch.float8_e4m3fn)
    scales = 2.0 ** torch.randint(-6, -2, (len(used), 4), generator=gen).to(torch.float32)
    rope = (torch.randn(len(used), 64, generator=gen) / 10).to(torch.bfloat16)
    cache[used] = _pack_v32(nope, scales, rope)
    cache = cache.view(num_blocks, page, 1, 656)

    indices = used.view(b, s_q, topk).to(torch.int32).clone()
    indices[0, 0, 3] = -1
    indices[1, 0, ::5] = -1
    topk_length = torch.tensor([topk, topk - 7], dtype=torch.int32)
    # Entries past topk_length must not be read: point them at NaN-filled tokens.
    unused_slot = int(next(s for s in range(slots) if s not in set(used.tolist())))
    indices[1, 0, topk - 7:] = unused_slot
    q = torch.randn(b, s_q, h_q, d, generator=gen).clamp(-1, 1).to(torch.bfloat16)
    scale = d ** -0.5

    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(
        q.to(device), cache.to(device), None, None, d_v, meta,
        is_fp8_kvcache=True, indices=indices.to(device), topk_length=topk_length.to(device))
    exact_out, exact_lse = oracle.sparse_decode(q, [(cache, indices, topk_length.tolist())], scale, d_v)
    rows = [element_row("sparse_decode", "sparse_decode", "out", device, out, exact_out),
            element_row("sparse_decode", "sparse_decode", "lse", device, lse, exact_lse.transpose(1, 2))]
    backend_rows("sparse_decode", device, plan_.expected["sparse_decode"],
                 {"dtype": "bf16", "h_q": h_q, "kv_format": "V32"}, rows)
    return rows


CASES: Sequence[Tuple[str, Callable[[torch.device, torch.Generator, Plan], List[Row]]]] = (
    ("dense_prefill", _case_mha),
    ("dense_decode", _case_dense_decode),
    ("sparse_prefill", _case_sparse_prefill),
    ("sparse_decode", _case_sparse_decode),
)


# --------------------------------------------------------------------------- report

def native_build_line(device: torch.device) -> str:
    """One line: the native library's build info, or why none is loaded."""
    from . import _native

    try:
        info = _native.build_info()
        error = _native.load_error()
    except Exception as exc:  # a broken library must not hide the rest of the smoke test
        return f"native library: failed to read build info: {type(exc).__name__}: {exc}"
    if info is None:
        return f"native library: none ({error or 'no reason given'})"
    if not isinstance(info, dict):
        return f"native library: {info}"
    summary = {key: info[key] for key in ("version", "cuda_version", "targets", "ptx") if key in info}
    summary["ops"] = sorted(info.get("ops", {}))
    summary["kernels"] = len(info.get("kernels", []))
    return "native library: " + json.dumps(summary, sort_keys=True)


def _print_table(rows: List[Row]) -> None:
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in HEADERS]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(r[h].ljust(w) for h, w in zip(HEADERS, widths)).rstrip())


def _failed_case_rows(name: str, device: torch.device, exc: BaseException) -> List[Row]:
    return [{"op": name, "backend": "-", "expected": "-", "device": str(device), "rule": "-",
             "max_err": "-", "limit": "-", "cos_diff": "-", "result": "FAIL",
             "detail": f"{type(exc).__name__}: {exc}"}]


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
    try:
        plan_ = make_plan(device)
    except Exception as exc:  # noqa: BLE001 - e.g. a bad FLASH_MLA_BACKEND value
        print(f"FAIL expectation: {type(exc).__name__}: {exc}")
        return 1
    if plan_.library_failure:
        rows.append({"op": "native library", "backend": "-", "expected": NATIVE, "device": str(device),
                     "rule": "-", "max_err": "-", "limit": "-", "cos_diff": "-", "result": "FAIL",
                     "detail": plan_.library_failure})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, case in CASES:
            gen = torch.Generator().manual_seed(args.seed)
            try:
                rows += case(device, gen, plan_)
            except Exception as exc:  # report and keep going: one broken op must not hide the rest
                rows += _failed_case_rows(name, device, exc)
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
    if plan_.no_gpu_reason is not None:
        print(f"no GPU kernel was exercised ({plan_.no_gpu_reason})")
    else:
        native_ops = [op for op, e in plan_.expected.items() if e.backend == NATIVE]
        print(f"GPU kernels expected: {', '.join(native_ops)}")
    failed = sum(r["result"] != "PASS" for r in rows)
    print(f"smoke: {len(rows) - failed}/{len(rows)} passed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
