"""GPU tests of the native dense MHA prefill backward (dense_prefill_bwd).

The backward's contract: given the out the forward stored (rounded to the input dtype) and
its fp32 lse, dq, dk and dv compare with the float64 oracle fed that same out
(flash_mla.oracle.mha_bwd: delta = rowsum(dO * out)), under the two numerics rules
(flash_mla.testing):

- hostile inputs (q, k, v, dout ~ N(0, 1), GQA/MQA, odd splits, long rows): rule 2,
  max|grad - exact| <= 2 x max|plain - exact| with ``plain`` autograd through the plain
  bf16/fp16 PyTorch forward (oracle.plain_mha_bwd), plus the cos bound and the exact
  inf/NaN pattern;
- upstream-style inputs (q, k, v and dout ~ randn/10): rule 1, the element rule of the "MHA
  prefill" row. (With dout ~ N(0, 1), dv = P^T dO cancels to near 0 in places where a
  kernel that rounds P once to bf16, which meets the contract, misses abs 1e-3.)
Neither rule asks how the kernel rounds P and dS (high + low parts or once): any kernel
meeting the contract passes.

Kernel tests run once per main-kernel CTA the library has for the head dim, forced with
FLASH_MLA_DENSE_BWD_WARPS: 8 (sm_120's), 4 (where two 4-warp CTAs fit an SM, d <= 128) and
8x128 (where a block may use 164928 B at d = 128, d <= 128).
d = 192 has no 4-warp CTA (the variable's 4 runs the 8-warp CTA there), and the
deterministic dq always runs the 8-warp CTA, so neither runs twice.

The forward output and lse come from the float64 oracle (out rounded to the input dtype),
so these tests do not depend on the native forward; one end-to-end case uses it.

Hostile inputs: dq/dk/dv are poisoned with NaN before each call (an unwritten element
fails); q/out/dout and k/v carry NaN rows after the last sequence (reading past
cu_seqlens shows up as NaN); zero-length sequences; a sequence with queries but no keys and
one with keys but no queries (those keys need dk = dv = 0).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Tuple

import pytest
import torch

from flash_mla import oracle
from flash_mla.testing import check_op_close, check_plain_rule, make_noncontiguous
from tests.gpu_native import native_function

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = [(64, 64), (128, 128), (192, 128)]
HEADS = {"mha": (4, 4), "mqa": (8, 1), "gqa": (8, 2)}  # (h_q, h_k)
# Main-kernel CTAs per d_qk (FLASH_MLA_DENSE_BWD_WARPS values); no 4-warp CTA at d_qk = 192.
CTAS = {64: ("8", "4", "8x128"), 128: ("8", "4", "8x128"), 192: ("8",)}
DIMS_CTAS = [(dims, cta) for dims in HEAD_DIMS for cta in CTAS[dims[0]]]
DIMS_CTAS_IDS = [f"d{a}_{b}-warps{cta}" for (a, b), cta in DIMS_CTAS]
NAN_PAD_ROWS = 3
HOSTILE, UPSTREAM = "hostile", "upstream"


def _force_cta(monkeypatch, cta: str) -> None:
    """The library reads FLASH_MLA_DENSE_BWD_WARPS on every call."""
    monkeypatch.setenv("FLASH_MLA_DENSE_BWD_WARPS", cta)


@pytest.fixture(params=CTAS[128], ids=[f"warps{c}" for c in CTAS[128]])
def cta(request, monkeypatch):
    """Every main-kernel CTA, for tests at d_qk <= 128."""
    _force_cta(monkeypatch, request.param)
    return request.param


def _cu(lengths: Sequence[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device="cuda")


class Problem:
    """Inputs of one backward call plus the oracle forward's out (rounded) and lse."""

    def __init__(self, seq_q: Sequence[int], seq_k: Sequence[int], h_q: int, h_k: int, d_qk: int,
                 d_v: int, dtype: torch.dtype, causal: bool, seed: int = 0, style: str = HOSTILE):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.seq_q, self.seq_k = list(seq_q), list(seq_k)
        self.causal = causal
        self.style = style
        self.scale = d_qk ** -0.5
        tq, tk = sum(seq_q), sum(seq_k)
        pad = NAN_PAD_ROWS
        std = 1.0 if style == HOSTILE else 0.1

        def randn(*shape):
            return (torch.randn(*shape, device="cuda", generator=gen) * std).to(dtype)

        # NaN rows after the last sequence (part of the tensors, outside every sequence).
        self.q = randn(tq + pad, h_q, d_qk)
        self.k = randn(tk + pad, h_k, d_qk)
        self.v = randn(tk + pad, h_k, d_v)
        self.dout = randn(tq + pad, h_q, d_v)
        for t, n in ((self.q, tq), (self.k, tk), (self.v, tk), (self.dout, tq)):
            t[n:] = float("nan")
        self.cu_q, self.cu_k = _cu(seq_q), _cu(seq_k)
        out, lse = oracle.mha_fwd(self.q, self.k, self.v, self.cu_q, self.cu_k, self.scale, causal)
        self.out = out.to(dtype)
        self.out[tq:] = float("nan")
        # The [total_q, h_q] transpose view of a contiguous [h_q, total_q] buffer.
        self.lse = lse.float().T.contiguous().T

    def exact(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float64 gradients given this problem's out (the kernels' contract)."""
        return oracle.mha_bwd(self.dout, self.q, self.k, self.v, self.out, self.cu_q, self.cu_k,
                              self.scale, self.causal)

    def plain(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return oracle.plain_mha_bwd(self.dout, self.q, self.k, self.v, self.cu_q, self.cu_k,
                                    self.scale, self.causal)


def _run_bwd(pb: Problem, *, dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None,
             dv: Optional[torch.Tensor] = None, q=None, k=None, v=None, out=None, dout=None,
             lse=None, workspace: Optional[torch.Tensor] = None, deterministic: bool = False):
    bwd = native_function("dense_prefill_bwd_deterministic" if deterministic
                          else "dense_prefill_bwd")
    ws_bytes = native_function("dense_prefill_bwd_workspace_bytes")
    q = pb.q if q is None else q
    k = pb.k if k is None else k
    v = pb.v if v is None else v
    out = pb.out if out is None else out
    dout = pb.dout if dout is None else dout
    lse = pb.lse if lse is None else lse
    total_q, h_q, d_qk = q.shape
    total_k, h_k, d_v = v.shape
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for t in (dq, dk, dv):
        t.fill_(float("nan"))
    if workspace is None:
        n = ws_bytes(len(pb.seq_q), total_q, total_k, h_q, h_k, d_qk, d_v)
        workspace = torch.empty(n, dtype=torch.uint8, device="cuda")
    try:
        bwd(workspace, dout, q, k, v, out, lse, pb.cu_q, pb.cu_k, dq, dk, dv,
            1 if pb.causal else 0, pb.scale, max(pb.seq_q + [0]), max(pb.seq_k + [0]), True)
    except ValueError as err:
        # A forced 4-warp CTA on a GPU whose shared memory cannot hold two of them (sm_120,
        # sm_86/89: 100 KB per SM): the library refuses, naming the variable, and never
        # runs that CTA there, so there is nothing of it to test on this GPU.
        if re.search(r"FLASH_MLA_DENSE_BWD_WARPS=(4|8x128) needs a GPU", str(err)):
            pytest.skip(f"the 4-warp backward CTA does not exist on this GPU: {err}")
        raise
    return dq, dk, dv


def _check(pb: Problem, got, tag: str) -> None:
    """The rule the problem's inputs call for, on dq, dk and dv."""
    exact = pb.exact()
    plain = pb.plain() if pb.style == HOSTILE else (None, None, None)
    for what, a, e, p in zip(("dq", "dk", "dv"), got, exact, plain):
        if pb.style == UPSTREAM:
            check_op_close("mha_prefill", what, a, e, name=f"{tag} {what}")
        else:
            check_plain_rule(a, e, p, "mha_prefill", what, name=f"{tag} {what}")


def _case_id(dtype_name, dims, causal, heads):
    return f"{dtype_name}-d{dims[0]}_{dims[1]}-{'causal' if causal else 'full'}-{heads}"


VARLEN_CASES = [
    (dn, dims, cta, causal, heads)
    for dn in DTYPES
    for dims, cta in DIMS_CTAS
    for causal in (False, True)
    for heads in HEADS
]


@pytest.mark.parametrize("dtype_name,dims,cta,causal,heads", VARLEN_CASES,
                         ids=[f"{_case_id(dn, d, c, h)}-warps{w}" for dn, d, w, c, h in VARLEN_CASES])
def test_bwd_varlen(dtype_name, dims, cta, causal, heads, monkeypatch):
    """Varlen [17, 1, 0, 300, 4096] for queries and keys, every dtype / head dims / CTA /
    mask / head grouping, hostile inputs."""
    _force_cta(monkeypatch, cta)
    h_q, h_k = HEADS[heads]
    seqs = [17, 1, 0, 300, 4096]
    pb = Problem(seqs, seqs, h_q, h_k, dims[0], dims[1], DTYPES[dtype_name], causal)
    got = _run_bwd(pb)
    _check(pb, got, _case_id(dtype_name, dims, causal, heads))
    # Rows after the last sequence (NaN inputs) belong to no sequence: gradient 0.
    for t in got:
        assert torch.all(t[-NAN_PAD_ROWS:] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_bwd_upstream_inputs(dtype_name, dims, cta, causal, monkeypatch):
    """Upstream-style inputs, GQA, odd splits: the element rule."""
    _force_cta(monkeypatch, cta)
    pb = Problem([17, 1, 0, 300, 777], [40, 3, 9, 200, 1000], 8, 2, dims[0], dims[1],
                 DTYPES[dtype_name], causal, seed=12, style=UPSTREAM)
    _check(pb, _run_bwd(pb), f"upstream {dtype_name} d{dims} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
def test_bwd_seqlen_q_ne_k(dims, cta, causal, monkeypatch):
    """s_q != s_k both ways (causal: rows that see no key when s_q > s_k), queries
    without keys (s_k = 0) and keys without queries (s_q = 0: dk = dv = 0)."""
    _force_cta(monkeypatch, cta)
    seq_q = [5, 200, 64, 0, 7, 130]
    seq_k = [77, 13, 200, 9, 0, 129]
    pb = Problem(seq_q, seq_k, 8, 2, dims[0], dims[1], torch.bfloat16, causal, seed=1)
    got = _run_bwd(pb)
    _check(pb, got, f"q!=k d{dims} causal={causal}")
    # Keys of the sequence with no queries (rows 77 + 13 + 200 .. + 9) are exactly 0.
    k0 = 77 + 13 + 200
    assert torch.all(got[1][k0:k0 + 9] == 0) and torch.all(got[2][k0:k0 + 9] == 0)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_seqlen_one(dtype_name, causal, cta):
    pb = Problem([1, 1, 1], [1, 3, 1], 8, 1, 128, 128, DTYPES[dtype_name], causal, seed=2)
    _check(pb, _run_bwd(pb), f"seqlen1 {dtype_name} causal={causal}")


@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
def test_bwd_noncontiguous(dims, cta, monkeypatch):
    """Every tensor a strided view (last dim padded by 128, other dims by 1, NaN in
    the padding); lse a transposed view with a padded head stride."""
    _force_cta(monkeypatch, cta)
    pb = Problem([33, 0, 250], [40, 5, 250], 4, 2, dims[0], dims[1], torch.bfloat16, True, seed=3)
    nc = {name: make_noncontiguous(getattr(pb, name)) for name in ("q", "k", "v", "out", "dout")}
    total_q, h_q = pb.lse.shape
    lse_buf = torch.full((h_q, total_q + 8), float("nan"), device="cuda")
    lse = lse_buf[:, :total_q].T
    lse.copy_(pb.lse)
    dq, dk, dv = (make_noncontiguous(t) for t in (pb.q, pb.k, pb.v))
    assert not dq.is_contiguous() and lse.stride(0) == 1 and lse.stride(1) == total_q + 8
    got = _run_bwd(pb, dq=dq, dk=dk, dv=dv, lse=lse, **nc)
    _check(pb, got, f"noncontiguous d{dims}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_dk_dv_bit_deterministic(causal, cta):
    """dk and dv are written once per element from a fixed-order sum: repeated runs
    are bit-identical. dq goes through fp32 atomics (documented as not
    bit-deterministic) and is only checked against the oracle."""
    pb = Problem([300, 1000, 17], [300, 1000, 17], 8, 2, 128, 128, torch.bfloat16, causal, seed=4)
    first = _run_bwd(pb)
    _check(pb, first, f"determinism causal={causal}")
    for _ in range(3):
        again = _run_bwd(pb)
        assert torch.equal(again[1].view(torch.int16), first[1].view(torch.int16)), "dk changed"
        assert torch.equal(again[2].view(torch.int16), first[2].view(torch.int16)), "dv changed"


# deterministic=True (flash_attn_varlen_func's flag): the key blocks of a sequence add
# into each query block's dq in key-block order (turn counters in the workspace; the
# 8-warp CTA whatever FLASH_MLA_DENSE_BWD_WARPS says, so it runs once, unforced), so dq
# is bit-identical as well. Many key blocks per sequence (up to 16 add into each dq row),
# s_q != s_k both ways (bottom-right causal), a zero-length and a one-row sequence, GQA.
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=[f"d{a}_{b}" for a, b in HEAD_DIMS])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_deterministic_dq_bit_identical(dims, causal):
    pb = Problem([300, 1000, 0, 1, 700], [500, 1000, 7, 1, 450], 8, 2, dims[0], dims[1],
                 torch.bfloat16, causal, seed=10)
    first = _run_bwd(pb, deterministic=True)
    _check(pb, first, f"deterministic causal={causal}")
    for _ in range(3):
        again = _run_bwd(pb, deterministic=True)
        for what, a, b in zip(("dq", "dk", "dv"), again, first):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{what} changed"


def test_bwd_deterministic_through_the_public_api():
    """flash_attn_varlen_func(deterministic=True): two backward passes, equal bits."""
    import flash_mla

    pb = Problem([700, 0, 513], [650, 3, 513], 8, 2, 128, 128, torch.bfloat16, True, seed=11)
    grads = []
    for _ in range(2):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (pb.q, pb.k, pb.v))
        out, _ = flash_mla.flash_attn_varlen_func(q, k, v, pb.cu_q, pb.cu_k, 700, 650,
                                                  causal=True, deterministic=True)
        out.backward(pb.dout.nan_to_num(0.0))
        grads.append((q.grad, k.grad, v.grad))
    for what, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{what} changed"


def test_bwd_long_sequence_grid(cta):
    """One long sequence (many key blocks, 8 query heads per kv head)."""
    pb = Problem([9000], [9000], 8, 1, 64, 64, torch.bfloat16, True, seed=5)
    _check(pb, _run_bwd(pb), "long")


@pytest.mark.parametrize("seqlen,causal", [(70000, False), (131072, True)])
def test_bwd_long_sequence(seqlen, causal, cta):
    """The issue's 128k: up to 2048 key blocks, each looping over up to 2048 query
    blocks; one head keeps the oracles' memory bounded (they work through row chunks)."""
    pb = Problem([seqlen], [seqlen], 1, 1, 64, 64, torch.bfloat16, causal, seed=9)
    _check(pb, _run_bwd(pb), f"long {seqlen} causal={causal}")


# The kernels' causal launch order changes with the grid size: at most 8 CTAs per SM
# (kLongestFirstWaves in dense_bwd/config.h) run key block slowest, larger grids in
# grid order. Both mappings must cover every (key block, kv head, sequence) once.
@pytest.mark.parametrize("ctas_per_sm", [2, 12], ids=["longest_first", "grid_order"])
def test_bwd_causal_launch_orders(ctas_per_sm, cta):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seqs = [640, 1, 0, 577]  # 10 key blocks in the longest sequence
    h_k = max(1, -(-ctas_per_sm * sms // (10 * len(seqs))))  # ceil
    pb = Problem(seqs, seqs, 2 * h_k, h_k, 64, 64, torch.bfloat16, True, seed=8)
    assert (10 * h_k * len(seqs) <= 8 * sms) == (ctas_per_sm < 8)
    got = _run_bwd(pb)
    _check(pb, got, f"causal order {ctas_per_sm} CTAs/SM, h_k {h_k}")


def test_bwd_end_to_end_with_native_forward(cta):
    """out and lse from the native forward feed the native backward."""
    fwd = native_function("dense_prefill_fwd")
    pb = Problem([100, 0, 513], [120, 3, 513], 8, 2, 128, 128, torch.bfloat16, True, seed=6)
    total_q, h_q, _ = pb.q.shape
    out = torch.full_like(pb.out, float("nan"))
    lse = torch.full((h_q, total_q), float("nan"), device="cuda").T
    fwd(torch.empty(0, dtype=torch.uint8, device="cuda"), pb.q, pb.k, pb.v, pb.cu_q, pb.cu_k, out,
        lse, 1, pb.scale, 513, 513, True)
    pb.out, pb.lse = out, lse
    _check(pb, _run_bwd(pb), "end-to-end")


# ---------------------------------------------------------------------------
# errors from the entry (validation happens before any launch)
# ---------------------------------------------------------------------------
def _small() -> Problem:
    return Problem([10, 6], [10, 6], 4, 2, 64, 64, torch.bfloat16, False, seed=7)


def test_bwd_error_workspace_too_small():
    pb = _small()
    with pytest.raises(ValueError, match="workspace must hold at least"):
        _run_bwd(pb, workspace=torch.empty(16, dtype=torch.uint8, device="cuda"))


def test_bwd_error_dtype():
    pb = _small()
    with pytest.raises(TypeError, match="q must have dtype"):
        _run_bwd(pb, q=pb.q.float(), dq=torch.empty_like(pb.q))
    with pytest.raises(TypeError, match="dout must have dtype"):
        _run_bwd(pb, dout=pb.dout.half())
    with pytest.raises(TypeError, match="lse must have dtype float32"):
        _run_bwd(pb, lse=pb.lse.double())


def test_bwd_error_shapes():
    pb = _small()
    with pytest.raises(ValueError, match=r"\(d_qk, d_v\)"):
        q = torch.zeros(pb.q.shape[0], 4, 96, dtype=torch.bfloat16, device="cuda")
        k = torch.zeros(pb.k.shape[0], 2, 96, dtype=torch.bfloat16, device="cuda")
        _run_bwd(pb, q=q, k=k, dq=torch.empty_like(q), dk=torch.empty_like(k))
    with pytest.raises(ValueError, match="multiple of h_k"):
        k = torch.zeros(pb.k.shape[0], 3, 64, dtype=torch.bfloat16, device="cuda")
        _run_bwd(pb, k=k, v=k.clone(), dk=torch.empty_like(k), dv=torch.empty_like(k))
    with pytest.raises(ValueError, match="dk must have shape"):
        _run_bwd(pb, dk=pb.k[:-1].clone())
    with pytest.raises(ValueError, match="lse must be the"):
        _run_bwd(pb, lse=pb.lse.contiguous())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        _run_bwd(pb, dout=pb.dout.transpose(0, 2).contiguous().transpose(0, 2))


def test_workspace_bytes_formula():
    """delta [h_q, total_q padded to 64] + dq_accum [total_q, h_q, d_qk], fp32, + the
    deterministic dq's turn counters [ceil(total_q / 64) + batch, h_q], int32, each
    rounded up to 256 bytes."""
    ws_bytes = native_function("dense_prefill_bwd_workspace_bytes")
    for batch, total_q, h_q, d_qk in ((1, 0, 1, 64), (3, 1, 1, 64), (7, 4414, 8, 192),
                                      (1, 70000, 128, 128)):
        delta = math.ceil(h_q * (math.ceil(total_q / 64) * 64) * 4 / 256) * 256
        acc = math.ceil(total_q * h_q * d_qk * 4 / 256) * 256
        turns = math.ceil((math.ceil(total_q / 64) + batch) * h_q * 4 / 256) * 256
        assert ws_bytes(batch, total_q, 5, h_q, 1, d_qk, 128) == delta + acc + turns


def test_unknown_layout_variable_raises(monkeypatch):
    monkeypatch.setenv("FLASH_MLA_DENSE_BWD_WARPS", "16")
    pb = Problem([5], [5], 2, 2, 64, 64, torch.bfloat16, False, seed=7)
    with pytest.raises(ValueError, match=r"FLASH_MLA_DENSE_BWD_WARPS must be 8, 4 or 8x128.*'16'"):
        _run_bwd(pb)
