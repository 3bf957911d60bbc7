"""The numerics contract as checks, and hostile-input builders, shared by the test suites,
the smoke test and the benchmarks. Exact values come from flash_mla.oracle (float64).

Two rules; a check uses the one its inputs call for.

Rule 1, upstream-style inputs (q, k, v ~ randn/10; decode q clamped to [-1, 1]): the
element rule, ``check_op_close(op, what, actual, exact)`` with TOLERANCES[op][what]. An
element passes when abs_err < abs_tol OR rel_err < rel_tol, rel_err = |a - r| / (|r| +
1e-6); the positions of +inf, -inf and NaN must match exactly; cos_diff = 1 - 2<a, r> /
(|a|^2 + |r|^2), in float64 over the elements finite in both, must be <= cos_tol. An
element equal to its reference always passes (so zero tolerances mean bit-identical).
Tolerances are stated in units of the output dtype (2.01/128 = about two bf16 ulps
relative).

Rule 2, hostile inputs (std-1 values, long rows, GQA, odd splits): the plain-math rule,
``check_plain_rule(actual, exact, plain, op, what)``: max|actual - exact| <= PLAIN_FACTOR
(2) x max|plain - exact|, where ``plain`` is the same op in plain PyTorch at the input
precision (flash_mla.oracle.plain_*), plus the cos bound of TOLERANCES and the exact
inf/NaN pattern. Element tolerances written for values ~0.1 do not scale to values ~1,
where no bf16 kernel meets them. fp32 outputs (lse, max_logits) keep the element rule:
for those, check_plain_rule applies check_op_close.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "TOLERANCES",
    "CloseReport",
    "compare",
    "check_close",
    "check_op_close",
    "PLAIN_FACTOR",
    "PlainReport",
    "compare_plain",
    "check_plain_rule",
    "make_noncontiguous",
    "invalid_prefill_indices",
    "PagedKVCache",
    "make_paged_kv_cache",
]

# op -> tensor -> (abs_tol, rel_tol[, cos_tol]): the element rule's table. Outputs carry a
# cosine bound; lse / max_logits (fp32) do not.
TOLERANCES: Dict[str, Dict[str, Tuple[float, ...]]] = {
    "dense_decode": {
        "out": (8e-4, 2.01 / 128, 5e-6),
        "lse": (1e-6, 8.01 / 65536),
    },
    "sparse_decode": {
        "out": (1e-3, 2.01 / 128, 5e-6),
        "lse": (1e-6, 8.01 / 65536),
    },
    "sparse_prefill": {
        "out": (8e-4, 3.01 / 128, 7e-6),
        "lse": (1e-6, 2.01 / 65536),
        "max_logits": (1e-6, 2.01 / 65536),
    },
    "mha_prefill": {
        "out": (1e-3, 8.01 / 128, 7e-6),
        "dq": (1e-3, 8.01 / 128, 7e-6),
        "dk": (1e-3, 8.01 / 128, 7e-6),
        "dv": (1e-3, 8.01 / 128, 7e-6),
        "lse": (1e-6, 2.01 / 65536),
    },
}

_REL_EPS = 1e-6


@dataclass
class CloseReport:
    """Outcome of compare(); ``message`` is what check_close raises with."""

    name: str
    passed: bool
    numel: int
    num_failed: int = 0             # finite elements outside both tolerances
    num_special_mismatch: int = 0   # positions whose inf/NaN pattern differs
    max_abs_err: float = 0.0        # over elements finite in both
    max_rel_err: float = 0.0
    cos_diff: float = 0.0
    worst_index: Optional[Tuple[int, ...]] = None
    worst_actual: float = 0.0
    worst_reference: float = 0.0
    problems: List[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        head = f"{self.name}: {'PASS' if self.passed else 'FAIL'}"
        stats = (
            f"max_abs_err={self.max_abs_err:.3e} max_rel_err={self.max_rel_err:.3e} "
            f"cos_diff={self.cos_diff:.3e} over {self.numel} elements"
        )
        return "; ".join([head] + self.problems + [stats])


def _unravel(flat: int, shape: Sequence[int]) -> Tuple[int, ...]:
    index = []
    for size in reversed(list(shape)):
        index.append(flat % size if size else 0)
        flat = flat // size if size else 0
    return tuple(reversed(index))


def _as_float64(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    return t.detach().to(device=device, dtype=torch.float64)


def _special_pattern_problems(a: torch.Tensor, r: torch.Tensor, other: str) -> Tuple[int, List[str]]:
    mismatch = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    problems = []
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = test(a) != test(r)
        mismatch |= differ
        count = int(differ.sum())
        if count:
            at = _unravel(int(differ.flatten().nonzero()[0]), a.shape)
            problems.append(
                f"{count} positions differ in {what} pattern, first at {at}: "
                f"actual={float(a[at]):.6g} {other}={float(r[at]):.6g}"
            )
    return int(mismatch.sum()), problems


def compare(
    actual: torch.Tensor,
    ref: torch.Tensor,
    *,
    abs_tol: float,
    rel_tol: float,
    cos_tol: Optional[float] = None,
    name: str = "tensor",
) -> CloseReport:
    """Compare without raising; see the module docstring for the rule.

    Works in float64 on actual's device (ref is moved there), so large GPU outputs
    are not copied to the host.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise TypeError(
            f"actual and ref must be torch.Tensors, got {type(actual).__name__} and {type(ref).__name__}"
        )
    if tuple(actual.shape) != tuple(ref.shape):
        return CloseReport(
            name=name, passed=False, numel=actual.numel(),
            problems=[f"shape mismatch: actual {tuple(actual.shape)} vs reference {tuple(ref.shape)}"],
        )
    a = _as_float64("actual", actual, actual.device)
    r = _as_float64("ref", ref, actual.device)
    report = CloseReport(name=name, passed=True, numel=a.numel())

    report.num_special_mismatch, report.problems = _special_pattern_problems(a, r, "reference")

    finite = torch.isfinite(a) & torch.isfinite(r)
    fa = torch.where(finite, a, torch.zeros_like(a))
    fr = torch.where(finite, r, torch.zeros_like(r))
    abs_err = (fa - fr).abs()
    rel_err = abs_err / (fr.abs() + _REL_EPS)
    # exact equality always passes, so zero tolerances mean "bit-identical"
    failed = finite & ~((abs_err < abs_tol) | (rel_err < rel_tol) | (abs_err == 0))
    report.num_failed = int(failed.sum())
    if a.numel():
        report.max_abs_err = float(abs_err.max())
        report.max_rel_err = float(rel_err.max())
        # the worst element: largest abs error among failing elements (else overall)
        ranked = torch.where(failed, abs_err, torch.full_like(abs_err, -1.0)) if report.num_failed else abs_err
        worst = _unravel(int(ranked.flatten().argmax()), a.shape)
        report.worst_index = worst
        report.worst_actual, report.worst_reference = float(a[worst]), float(r[worst])
    denom = float((fa * fa).sum() + (fr * fr).sum())
    report.cos_diff = 0.0 if denom == 0.0 else 1.0 - 2.0 * float((fa * fr).sum()) / denom

    if report.num_failed:
        w = report.worst_index
        report.problems.append(
            f"{report.num_failed} of {report.numel} elements outside abs_tol={abs_tol:.3g} and "
            f"rel_tol={rel_tol:.6g}; worst at index {w}: actual={report.worst_actual:.8g} "
            f"reference={report.worst_reference:.8g} abs_err={float(abs_err[w]):.3e} "
            f"rel_err={float(rel_err[w]):.3e}"
        )
    if cos_tol is not None and not report.cos_diff <= cos_tol:
        report.problems.append(f"cos_diff {report.cos_diff:.3e} exceeds cos_tol {cos_tol:.3g}")
    report.passed = not report.problems
    return report


def check_close(
    actual: torch.Tensor,
    ref: torch.Tensor,
    *,
    abs_tol: float,
    rel_tol: float,
    cos_tol: Optional[float] = None,
    name: str,
) -> CloseReport:
    """compare(), raising AssertionError with the report's message when it fails."""
    report = compare(actual, ref, abs_tol=abs_tol, rel_tol=rel_tol, cos_tol=cos_tol, name=name)
    if not report.passed:
        raise AssertionError(report.message)
    return report


def _tolerance(op: str, what: str) -> Tuple[float, ...]:
    if op not in TOLERANCES:
        raise ValueError(f"op must be one of {sorted(TOLERANCES)}, got {op!r}")
    if what not in TOLERANCES[op]:
        raise ValueError(f"what must be one of {sorted(TOLERANCES[op])} for op {op!r}, got {what!r}")
    return TOLERANCES[op][what]


def check_op_close(op: str, what: str, actual: torch.Tensor, ref: torch.Tensor, *, name: Optional[str] = None) -> CloseReport:
    """check_close with TOLERANCES[op][what], e.g. check_op_close("sparse_decode", "lse", lse, ref_lse)."""
    tol = _tolerance(op, what)
    cos_tol = tol[2] if len(tol) > 2 else None
    return check_close(actual, ref, abs_tol=tol[0], rel_tol=tol[1], cos_tol=cos_tol, name=name or f"{op}.{what}")


# ---------------------------------------------------------------------------
# rule 2: the plain-math rule
# ---------------------------------------------------------------------------
# A kernel's largest error may be at most this multiple of plain PyTorch's.
PLAIN_FACTOR = 2.0


@dataclass
class PlainReport:
    """Outcome of compare_plain(); ``message`` is what check_plain_rule raises with."""

    name: str
    passed: bool
    numel: int
    max_err: float = 0.0            # max |actual - exact| over elements finite in both
    plain_max_err: float = 0.0      # max |plain - exact| over elements finite in both
    cos_diff: float = 0.0           # actual against exact
    num_special_mismatch: int = 0   # positions whose inf/NaN pattern differs (actual vs exact)
    worst_index: Optional[Tuple[int, ...]] = None
    worst_actual: float = 0.0
    worst_exact: float = 0.0
    worst_plain: float = 0.0
    plain_worst_index: Optional[Tuple[int, ...]] = None
    problems: List[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """max_err / plain_max_err (inf when plain is exact and actual is not)."""
        if self.plain_max_err == 0.0:
            return 0.0 if self.max_err == 0.0 else float("inf")
        return self.max_err / self.plain_max_err

    @property
    def message(self) -> str:
        head = f"{self.name}: {'PASS' if self.passed else 'FAIL'}"
        stats = (
            f"max_err={self.max_err:.3e} plain_max_err={self.plain_max_err:.3e} "
            f"ratio={self.ratio:.3f} cos_diff={self.cos_diff:.3e} over {self.numel} elements"
        )
        return "; ".join([head] + self.problems + [stats])


def compare_plain(
    actual: torch.Tensor,
    exact: torch.Tensor,
    plain: torch.Tensor,
    *,
    cos_tol: float,
    factor: float = PLAIN_FACTOR,
    name: str = "tensor",
) -> PlainReport:
    """Rule 2 without raising: max|actual - exact| <= factor * max|plain - exact|, cos_diff
    (actual vs exact) <= cos_tol, and actual's inf/NaN pattern equal to exact's. ``plain``
    must be finite wherever ``exact`` is (else the plain computation is broken and the check
    fails saying so). Works in float64 on actual's device."""
    for label, t in (("actual", actual), ("exact", exact), ("plain", plain)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    shapes = {tuple(t.shape) for t in (actual, exact, plain)}
    if len(shapes) != 1:
        return PlainReport(
            name=name, passed=False, numel=actual.numel(),
            problems=[f"shape mismatch: actual {tuple(actual.shape)}, exact {tuple(exact.shape)}, "
                      f"plain {tuple(plain.shape)}"],
        )
    a = _as_float64("actual", actual, actual.device)
    e = _as_float64("exact", exact, actual.device)
    p = _as_float64("plain", plain, actual.device)
    report = PlainReport(name=name, passed=True, numel=a.numel())
    report.num_special_mismatch, report.problems = _special_pattern_problems(a, e, "exact")

    broken = torch.isfinite(e) & ~torch.isfinite(p)
    if bool(broken.any()):
        at = _unravel(int(broken.flatten().nonzero()[0]), a.shape)
        report.problems.append(
            f"plain is not finite at {int(broken.sum())} positions where exact is, first at {at}: "
            f"plain={float(p[at]):.6g} exact={float(e[at]):.6g} (the plain computation is broken)"
        )
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), zero)
    plain_finite = torch.isfinite(p) & torch.isfinite(e)
    plain_err = torch.where(plain_finite, (p - e).abs(), zero)
    if a.numel():
        worst = _unravel(int(err.flatten().argmax()), a.shape)
        report.max_err = float(err[worst])
        report.worst_index = worst
        report.worst_actual, report.worst_exact, report.worst_plain = (
            float(a[worst]), float(e[worst]), float(p[worst]))
        plain_worst = _unravel(int(plain_err.flatten().argmax()), a.shape)
        report.plain_worst_index = plain_worst
        report.plain_max_err = float(plain_err[plain_worst])
    fa = torch.where(finite, a, zero)
    fe = torch.where(finite, e, zero)
    denom = float((fa * fa).sum() + (fe * fe).sum())
    report.cos_diff = 0.0 if denom == 0.0 else 1.0 - 2.0 * float((fa * fe).sum()) / denom

    bound = factor * report.plain_max_err
    if not report.max_err <= bound:
        report.problems.append(
            f"max_err {report.max_err:.3e} exceeds {factor:g} x plain's {report.plain_max_err:.3e} "
            f"= {bound:.3e}; worst at index {report.worst_index}: actual={report.worst_actual:.8g} "
            f"exact={report.worst_exact:.8g} plain={report.worst_plain:.8g}; plain's worst at "
            f"{report.plain_worst_index}"
        )
    if not report.cos_diff <= cos_tol:
        report.problems.append(f"cos_diff {report.cos_diff:.3e} exceeds cos_tol {cos_tol:.3g}")
    report.passed = not report.problems
    return report


def check_plain_rule(
    actual: torch.Tensor,
    exact: torch.Tensor,
    plain: Optional[torch.Tensor],
    op: str,
    what: str,
    *,
    name: Optional[str] = None,
) -> Union[PlainReport, CloseReport]:
    """Rule 2 for TOLERANCES[op][what], raising AssertionError with the report when it fails.

    Outputs with a cos bound (out, dq, dk, dv) get compare_plain with that bound; fp32
    outputs (lse, max_logits) keep the element rule (check_op_close), and ``plain`` is not
    used for them (it may be None)."""
    tol = _tolerance(op, what)
    label = name or f"{op}.{what}"
    if len(tol) < 3:
        return check_op_close(op, what, actual, exact, name=label)
    if plain is None:
        raise TypeError(f"plain must be a torch.Tensor for {op}.{what} (rule 2), got None")
    report = compare_plain(actual, exact, plain, cos_tol=tol[2], name=label)
    if not report.passed:
        raise AssertionError(report.message)
    return report


# ---------------------------------------------------------------------------
# hostile inputs
# ---------------------------------------------------------------------------
def _poison_value(dtype: torch.dtype) -> Union[float, int, bool]:
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point:
        return float("nan")
    return torch.iinfo(dtype).max


def make_noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A copy of t as a non-contiguous view: the last dim is padded by 128 and every other
    dim by 1 in a larger buffer whose padding holds NaN (the dtype's max for integers,
    NaN bytes 0x7F for float8), then sliced back to t's shape.

    The last dim stays unit-stride (kernels require it); every other stride grows.
    A 0-d tensor is returned as a plain copy.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        return t.clone()
    padded = [s + 1 for s in t.shape[:-1]] + [t.shape[-1] + 128]
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        big = torch.full(padded, 0x7F, dtype=torch.uint8, device=t.device).view(t.dtype)
    else:
        big = torch.full(padded, _poison_value(t.dtype), dtype=t.dtype, device=t.device)
    view = big[tuple(slice(0, s) for s in t.shape)]
    view.copy_(t)
    return view


def invalid_prefill_indices(s_kv: int) -> List[int]:
    """The contract's invalid index candidates for sparse prefill with s_kv keys:
    [-2**31, -123456, -1, s_kv, 114514, 2147480000, 2**31 - 1], keeping only those that
    really are invalid for this s_kv (114514 is a valid index once s_kv > 114514)."""
    candidates = [-(2 ** 31), -123456, -1, s_kv, 114514, 2147480000, 2 ** 31 - 1]
    return [c for c in candidates if c < 0 or c >= s_kv]


# Values written into unused block_table entries: huge, both signs, never a valid page.
_HOSTILE_PAGES = (2 ** 31 - 1, -(2 ** 31), 2147480000, 1 << 30, -123456)


@dataclass
class PagedKVCache:
    """A paged KV cache built by make_paged_kv_cache."""

    k_cache: torch.Tensor        # [num_blocks, page_size, h_k, d]; NaN in every slot no sequence uses
    block_table: torch.Tensor    # int32 [b, max_blocks]; unused entries hold huge / negative garbage
    cache_seqlens: torch.Tensor  # int32 [b]
    sequences: List[torch.Tensor]  # per batch, the valid tokens [seqlen, h_k, d] (k_cache's dtype)

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]


def make_paged_kv_cache(
    cache_seqlens: Sequence[int],
    *,
    page_size: int = 64,
    h_k: int = 1,
    d: int = 576,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
    spare_blocks: int = 2,
    extra_table_columns: int = 1,
    std: float = 1.0,
) -> PagedKVCache:
    """Hostile paged cache: pages are assigned in a random order, the unused tail of each
    sequence's last page and ``spare_blocks`` unreferenced blocks are NaN, and block_table
    entries past each sequence's pages (plus ``extra_table_columns`` more columns) cycle
    through huge and negative values. Token values are N(0, std^2) drawn on the CPU from
    ``generator`` (so a seed gives the same cache on every device), then cast to dtype.
    """
    lengths = [int(s) for s in cache_seqlens]
    if any(s < 0 for s in lengths):
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths}")
    if page_size < 1 or h_k < 1 or d < 1 or spare_blocks < 0 or extra_table_columns < 0:
        raise ValueError(
            f"page_size, h_k, d must be >= 1 and spare_blocks, extra_table_columns >= 0, got page_size={page_size} "
            f"h_k={h_k} d={d} spare_blocks={spare_blocks} extra_table_columns={extra_table_columns}"
        )
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (NaN marks unused slots), got {dtype}")
    pages_per_seq = [-(-s // page_size) for s in lengths]
    used_blocks = sum(pages_per_seq)
    num_blocks = used_blocks + spare_blocks
    max_blocks = max(pages_per_seq, default=0) + extra_table_columns

    cache = torch.full((num_blocks, page_size, h_k, d), float("nan"), dtype=torch.float32)
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.tensor(
        [[_HOSTILE_PAGES[(i + j) % len(_HOSTILE_PAGES)] for j in range(max_blocks)] for i in range(len(lengths))],
        dtype=torch.int64,
    ).reshape(len(lengths), max_blocks)
    sequences = []
    next_block = 0
    for i, (s, n_pages) in enumerate(zip(lengths, pages_per_seq)):
        tokens = torch.randn(s, h_k, d, generator=generator) * std
        pages = order[next_block:next_block + n_pages]
        next_block += n_pages
        table[i, :n_pages] = pages
        for p in range(n_pages):
            chunk = tokens[p * page_size:(p + 1) * page_size]
            cache[pages[p], :chunk.shape[0]] = chunk
        sequences.append(tokens.to(dtype=dtype, device=device))
    return PagedKVCache(
        k_cache=cache.to(dtype=dtype, device=device),
        block_table=table.to(dtype=torch.int32, device=device),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
        sequences=sequences,
    )
