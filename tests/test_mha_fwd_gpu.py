"""GPU tests of the native dense MHA prefill forward (dense_prefill_fwd), against the float64
oracle (flash_mla.oracle.mha_fwd) under the two numerics rules (flash_mla.testing):

- hostile inputs (q, k, v ~ N(0, 1), GQA/MQA, odd varlen splits, long rows, non-contiguous
  views, user scales): rule 2, max|out - exact| <= 2 x max|plain - exact| with ``plain``
  the forward in plain bf16/fp16 PyTorch (oracle.plain_mha_fwd), plus the cos bound and the
  exact inf/NaN pattern;
- upstream-style inputs (q, k, v ~ randn/10): rule 1, the element rule of the "MHA
  prefill" row (abs 1e-3 OR rel 8.01/128, cos_diff <= 7e-6);
- lse (fp32) always by the element rule (abs 1e-6 OR rel 2.01/65536); empty rows give out 0
  and lse +inf.

Every kernel test runs once per CTA layout the library has for its head dim, forced with
FLASH_MLA_DENSE_FWD_WARPS: 8 (sm_120's), 4 (A100's at d_qk <= 128) and 4x32 (4 warps of 32
rows, H100/H200/B200's, one K/V stage at d_qk = 192). There is no 4-warp CTA at d_qk = 192
(the variable's 4 runs the 8-warp CTA there), so that pair is not run twice. Outputs are
poisoned with NaN before each call, so an unwritten element fails; k/v carry NaN rows past
cu_seqlens_kv[-1], so reading past a sequence shows up as NaN.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from flash_mla import oracle
from flash_mla.testing import check_op_close, check_plain_rule, make_noncontiguous
from tests.gpu_native import native_function

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = [(64, 64), (128, 128), (192, 128)]
# CTA layouts per d_qk (FLASH_MLA_DENSE_FWD_WARPS values); no 4-warp CTA at d_qk = 192.
CTAS = {64: ("8", "4", "4x32"), 128: ("8", "4", "4x32"), 192: ("8", "4x32")}
DIMS_CTAS = [(dims, cta) for dims in HEAD_DIMS for cta in CTAS[dims[0]]]
DIMS_CTAS_IDS = [f"d{a}_{b}-warps{cta}" for (a, b), cta in DIMS_CTAS]
NAN_PAD_ROWS = 3  # NaN rows appended to k and v after the last sequence
HOSTILE, UPSTREAM = "hostile", "upstream"


def _force_cta(monkeypatch, cta: str) -> None:
    """The entry reads the variable on every call."""
    monkeypatch.setenv("FLASH_MLA_DENSE_FWD_WARPS", cta)


@pytest.fixture(params=CTAS[128], ids=[f"warps{c}" for c in CTAS[128]])
def cta(request, monkeypatch):
    """Every CTA layout, for tests at d_qk <= 128."""
    _force_cta(monkeypatch, request.param)
    return request.param


def _cu(lengths: Sequence[int], device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _inputs(seq_q: Sequence[int], seq_k: Sequence[int], h_q: int, h_k: int, d_qk: int, d_v: int,
            dtype: torch.dtype, seed: int = 0, style: str = HOSTILE):
    """q, k, v ~ N(0, 1) (hostile) or N(0, 1) / 10 (upstream-style); NaN rows after k and v."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    std = 1.0 if style == HOSTILE else 0.1
    total_q, total_k = sum(seq_q), sum(seq_k)

    def randn(*shape):
        return (torch.randn(*shape, device="cuda", generator=gen) * std).to(dtype)

    q = randn(total_q, h_q, d_qk)
    k = randn(total_k + NAN_PAD_ROWS, h_k, d_qk)
    v = randn(total_k + NAN_PAD_ROWS, h_k, d_v)
    k[total_k:] = float("nan")
    v[total_k:] = float("nan")
    return q, k, v, _cu(seq_q, "cuda"), _cu(seq_k, "cuda")


def _run(q, k, v, cu_q, cu_k, causal: bool, scale: float, max_q: int, max_k: int,
         out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, is_varlen=True):
    fwd = native_function("dense_prefill_fwd")
    total_q, h_q, _ = q.shape
    if out is None:
        out = torch.empty(total_q, h_q, v.shape[2], dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(h_q, total_q, dtype=torch.float32, device=q.device).T
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    workspace = torch.empty(0, dtype=torch.uint8, device=q.device)
    fwd(workspace, q, k, v, cu_q, cu_k, out, lse, 1 if causal else 0, scale, max_q, max_k, is_varlen)
    return out, lse


def _check(q, k, v, cu_q, cu_k, causal: bool, style: str, scale: Optional[float] = None,
           **kw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel and apply the rule ``style`` calls for; returns (out, lse, exact out,
    exact lse)."""
    d_qk = q.shape[2]
    scale = d_qk ** -0.5 if scale is None else scale
    lengths_q: List[int] = (cu_q[1:] - cu_q[:-1]).tolist()
    lengths_k: List[int] = (cu_k[1:] - cu_k[:-1]).tolist()
    out, lse = _run(q, k, v, cu_q, cu_k, causal, scale, max(lengths_q + [0]), max(lengths_k + [0]), **kw)
    torch.cuda.synchronize()
    exact_out, exact_lse = oracle.mha_fwd(q, k, v, cu_q, cu_k, scale, causal)
    check_op_close("mha_prefill", "lse", lse, exact_lse)
    if style == UPSTREAM:
        check_op_close("mha_prefill", "out", out, exact_out)
    else:
        plain = oracle.plain_mha_fwd(q, k, v, cu_q, cu_k, scale, causal)
        check_plain_rule(out, exact_out, plain, "mha_prefill", "out")
    return out, lse, exact_out, exact_lse


# (h_q, h_k, q lengths, k lengths): MHA with equal varlen splits; GQA and MQA with
# s_q != s_k per sequence, including s_k < s_q (causal rows that see nothing),
# s_k = 0 with s_q > 0, s_q = 0 with s_k > 0, and sequences longer than one tile.
SPLITS = {
    "mha_varlen": (4, 4, [17, 1, 0, 300, 4096], [17, 1, 0, 300, 4096]),
    "gqa4_unequal": (8, 2, [17, 1, 0, 300, 777, 130], [40, 3, 9, 200, 1000, 0]),
    "mqa8_unequal": (8, 1, [64, 129, 5, 1000], [64, 300, 0, 999]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_hostile(dtype, dims, cta, split, causal, monkeypatch):
    _force_cta(monkeypatch, cta)
    h_q, h_k, seq_q, seq_k = SPLITS[split]
    q, k, v, cu_q, cu_k = _inputs(seq_q, seq_k, h_q, h_k, dims[0], dims[1], DTYPES[dtype])
    out, _, _, exact_lse = _check(q, k, v, cu_q, cu_k, causal, HOSTILE)
    # Empty rows (exact lse +inf) must be exactly 0 in out.
    empty = torch.isinf(exact_lse)
    if empty.any():
        assert torch.all(out.float()[empty] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_upstream_inputs(dtype, dims, cta, causal, monkeypatch):
    _force_cta(monkeypatch, cta)
    h_q, h_k, seq_q, seq_k = SPLITS["gqa4_unequal"]
    q, k, v, cu_q, cu_k = _inputs(seq_q, seq_k, h_q, h_k, dims[0], dims[1], DTYPES[dtype], seed=8,
                                  style=UPSTREAM)
    _check(q, k, v, cu_q, cu_k, causal, UPSTREAM)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fixed_length_batch(causal, cta):
    b, s, h = 3, 256, 4
    q, k, v, cu_q, cu_k = _inputs([s] * b, [s] * b, h, h, 128, 128, torch.bfloat16, seed=1)
    _check(q, k, v, cu_q, cu_k, causal, HOSTILE, is_varlen=False)


@pytest.mark.parametrize("s_k", [1, 1000])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_query(s_k, causal, cta):
    # Upstream-style: with one key the exact out is v itself, so plain bf16 math is exact
    # there and the plain-math rule would demand exactness.
    q, k, v, cu_q, cu_k = _inputs([1], [s_k], 2, 2, 128, 128, torch.bfloat16, seed=2, style=UPSTREAM)
    _check(q, k, v, cu_q, cu_k, causal, UPSTREAM)


@pytest.mark.parametrize("seqlen,causal", [(32768, False), (70000, True), (131072, False)])
def test_long_sequence(seqlen, causal, cta):
    # One head keeps the oracles' memory bounded (they work through row chunks); 70000
    # rows exercise grid.x beyond 512 query blocks. 131072 keys per row is 2048 tiles: a
    # softmax rescale that is not exactly 1 when the max stays put drifts lse past the
    # element rule's 2.01/65536 there.
    q, k, v, cu_q, cu_k = _inputs([seqlen], [seqlen], 1, 1, 128, 128, torch.bfloat16, seed=3)
    _check(q, k, v, cu_q, cu_k, causal, HOSTILE)


@pytest.mark.parametrize("dims,cta", DIMS_CTAS, ids=DIMS_CTAS_IDS)
def test_noncontiguous_views(dims, cta, monkeypatch):
    # Row and head strides are not packed (make_noncontiguous pads every dim, with
    # NaN); out is a padded view too and lse's head stride exceeds total_q.
    _force_cta(monkeypatch, cta)
    seq = [100, 0, 333]
    q, k, v, cu_q, cu_k = _inputs(seq, [120, 7, 333], 8, 2, dims[0], dims[1], torch.float16, seed=4)
    qn, kn, vn = make_noncontiguous(q), make_noncontiguous(k), make_noncontiguous(v)
    assert not qn.is_contiguous() and qn.stride(1) != dims[0]
    total_q = q.shape[0]
    out = make_noncontiguous(torch.empty(total_q, 8, dims[1], dtype=q.dtype, device="cuda"))
    lse = torch.empty(8, total_q + 5, dtype=torch.float32, device="cuda")[:, :total_q].T
    _check(qn, kn, vn, cu_q, cu_k, True, HOSTILE, out=out, lse=lse)


@pytest.mark.parametrize("scale", [0.3, 2.0, -0.05, 0.0])
def test_user_softmax_scale(scale, cta):
    q, k, v, cu_q, cu_k = _inputs([200, 65], [260, 65], 4, 2, 64, 64, torch.bfloat16, seed=5)
    _check(q, k, v, cu_q, cu_k, True, HOSTILE, scale=scale)


@pytest.mark.parametrize("dims,cta", [c for c in DIMS_CTAS if c[0][0] >= 128],
                         ids=[i for c, i in zip(DIMS_CTAS, DIMS_CTAS_IDS) if c[0][0] >= 128])
def test_repeated_runs_are_bit_identical(dims, cta, monkeypatch):
    _force_cta(monkeypatch, cta)
    q, k, v, cu_q, cu_k = _inputs([17, 1000, 4096], [40, 900, 4096], 8, 2, dims[0], dims[1],
                                  torch.bfloat16, seed=6)
    first = [t.clone() for t in _run(q, k, v, cu_q, cu_k, True, 0.07, 4096, 4096)]
    for _ in range(3):
        again = _run(q, k, v, cu_q, cu_k, True, 0.07, 4096, 4096)
        assert torch.equal(again[0], first[0])
        assert torch.equal(again[1].nan_to_num(), first[1].nan_to_num())
        assert torch.equal(torch.isnan(again[1]), torch.isnan(first[1]))


def test_unknown_layout_variable_raises(monkeypatch):
    monkeypatch.setenv("FLASH_MLA_DENSE_FWD_WARPS", "16")
    with pytest.raises(ValueError, match=r"FLASH_MLA_DENSE_FWD_WARPS must be 8, 4 or 4x32.*'16'"):
        _call(_good_args())


def test_workspace_bytes_is_zero_and_checks_its_arguments():
    ws = native_function("dense_prefill_fwd_workspace_bytes")
    assert ws(5, 4414, 4414, 8, 2, 192, 128) == 0
    with pytest.raises(ValueError, match=r"\(d_qk, d_v\)"):
        ws(1, 10, 10, 4, 4, 96, 96)
    with pytest.raises(ValueError, match="h_q"):
        ws(1, 10, 10, 0, 1, 128, 128)


# --------------------------------------------------------------------------
# argument validation: TypeError / ValueError naming the argument
# --------------------------------------------------------------------------
def _good_args():
    q, k, v, cu_q, cu_k = _inputs([20, 30], [20, 30], 4, 2, 128, 128, torch.bfloat16, seed=7)
    k, v = k[:50], v[:50]
    out = torch.empty(50, 4, 128, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(4, 50, dtype=torch.float32, device="cuda").T
    ws = torch.empty(0, dtype=torch.uint8, device="cuda")
    return dict(workspace=ws, q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, out=out, lse=lse,
                mask=1, scale=0.1, max_q=30, max_k=30, varlen=True)


def _call(a):
    native_function("dense_prefill_fwd")(
        a["workspace"], a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["out"], a["lse"],
        a["mask"], a["scale"], a["max_q"], a["max_k"], a["varlen"])


def test_good_args_run():
    _call(_good_args())
    torch.cuda.synchronize()


BAD_CASES = {
    "q_fp32": (TypeError, "q must have dtype", lambda a: a.update(q=a["q"].float())),
    "k_dtype": (TypeError, "k must have dtype", lambda a: a.update(k=a["k"].half())),
    "out_dtype": (TypeError, "out must have dtype", lambda a: a.update(out=a["out"].half())),
    "lse_dtype": (TypeError, "lse must have dtype", lambda a: a.update(lse=a["lse"].double())),
    "cu_q_int64": (TypeError, "cu_seqlens_q must have dtype",
                   lambda a: a.update(cu_q=a["cu_q"].long())),
    "workspace_dtype": (TypeError, "workspace must have dtype",
                        lambda a: a.update(workspace=torch.empty(8, device="cuda"))),
    "q_cpu": (ValueError, "q must be a CUDA tensor", lambda a: a.update(q=a["q"].cpu())),
    "v_cpu": (ValueError, "v must be on the same device", lambda a: a.update(v=a["v"].cpu())),
    "head_dim": (ValueError, r"\(d_qk, d_v\)",
                 lambda a: a.update(q=a["q"][..., :96], k=a["k"][..., :96])),
    "k_head_dim": (ValueError, "k must have shape", lambda a: a.update(k=a["k"][..., :64])),
    "gqa_ratio": (ValueError, "q heads must be a positive multiple of k heads",
                  lambda a: a.update(k=a["k"].repeat(1, 2, 1)[:, :3].contiguous(),
                                     v=a["v"].repeat(1, 2, 1)[:, :3].contiguous())),
    "q_2d": (ValueError, "q must be 3-D", lambda a: a.update(q=a["q"].flatten(1))),
    "lse_contiguous": (ValueError, "lse must be the",
                       lambda a: a.update(lse=torch.empty(50, 4, device="cuda"))),
    "lse_shape": (ValueError, "lse must have shape",
                  lambda a: a.update(lse=torch.empty(4, 49, device="cuda").T)),
    "out_shape": (ValueError, "out must have shape", lambda a: a.update(out=a["out"][:49])),
    "q_last_dim_strided": (ValueError, "q must have a contiguous last dimension",
                           lambda a: a.update(q=torch.empty(50, 4, 256, dtype=torch.bfloat16,
                                                            device="cuda")[..., ::2])),
    "q_misaligned": (ValueError, "q must",
                     lambda a: a.update(q=torch.empty(50 * 4 * 128 + 1, dtype=torch.bfloat16,
                                                      device="cuda")[1:].view(50, 4, 128))),
    "cu_kv_batch": (ValueError, "cu_seqlens_kv must have shape",
                    lambda a: a.update(cu_k=a["cu_k"][:2])),
    "mask_code": (ValueError, "mask_mode_code", lambda a: a.update(mask=2)),
    "scale_nan": (ValueError, "softmax_scale", lambda a: a.update(scale=float("nan"))),
    "max_q_negative": (ValueError, "max_seqlen_q", lambda a: a.update(max_q=-1)),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_arguments_raise_naming_the_argument(case):
    err, pattern, mutate = BAD_CASES[case]
    args = _good_args()
    mutate(args)
    with pytest.raises(err, match=pattern):
        _call(args)
