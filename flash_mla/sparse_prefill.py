"""Sparse MLA prefill: ``flash_mla_sparse_fwd``.

The family in one module: the public function, its validation (one function, fixed
order), its dispatch (native kernel or the PyTorch reference, through
flash_mla.dispatch) and the ``flash_mla::sparse_prefill`` custom op that
torch.compile traces.

Contract: q bf16 [s_q, h_q, d_qk] with d_qk 576 or 512; kv bf16 [s_kv, 1, d_qk];
indices int32 [s_q, 1, topk]; no batch dimension (callers fold batches into s_q and
s_kv). An index < 0 or >= s_kv is invalid and skipped by the op itself, so index
values need no check (and none is made: that would need a device sync).
topk_length int32 [s_q] (per query); attn_sink fp32 [h_q]; d_v 512; sm_scale has
no default, as upstream.

Native path: ``_run_native`` allocates the outputs and calls the library's tvm-ffi entry
``sparse_prefill_fwd`` (csrc/api/sparse_prefill.cu) on the current stream; the kernel
skips invalid indices itself and needs no host sync (docs/sparse_prefill.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import _checks as C
from . import _custom_op
from . import _native
from . import dispatch as _dispatch

__all__ = ["flash_mla_sparse_fwd"]

OP = "sparse_prefill"

D_QK = (576, 512)
D_V = 512
DTYPES = (torch.bfloat16,)


class Problem(NamedTuple):
    """Sizes derived by validation."""
    s_q: int
    h_q: int
    d_qk: int
    s_kv: int
    topk: int


# --------------------------------------------------------------------------- validation

def validate(q: Any, kv: Any, indices: Any, sm_scale: Any, d_v: Any, attn_sink: Any = None,
             topk_length: Any = None) -> Problem:
    """All checks of a ``flash_mla_sparse_fwd`` call, in order: Python types, dtypes,
    devices, layout, shapes, values (Python scalars only)."""
    found = C.tensors([("q", q), ("kv", kv), ("indices", indices), ("attn_sink", attn_sink),
                       ("topk_length", topk_length)], optional=("attn_sink", "topk_length"))
    C.real(sm_scale, "sm_scale")
    C.integer(d_v, "d_v")

    C.dtype(q, "q", DTYPES)
    C.same_dtype(kv, "kv", q, "q")
    C.dtype(indices, "indices", (torch.int32,))
    if attn_sink is not None:
        C.dtype(attn_sink, "attn_sink", (torch.float32,))
    if topk_length is not None:
        C.dtype(topk_length, "topk_length", (torch.int32,))
    C.same_device(found)

    for name, t in found.items():
        C.last_dim_contiguous(t, name)

    C.ndim(q, "q", 3, "[s_q, h_q, d_qk]")
    s_q, h_q, d_qk = q.shape
    if d_qk not in D_QK:
        raise ValueError(f"q must have head dim (last dim) 576 or 512, got shape {C.shape(q)}")
    C.ndim(kv, "kv", 3, "[s_kv, 1, d_qk]")
    C.dim_eq(kv, "kv", 1, 1, "kv heads (dim 1) equal to")
    C.dim_eq(kv, "kv", 2, d_qk, "head dim (last dim) equal to q's")
    C.ndim(indices, "indices", 3, "[s_q, 1, topk]")
    if C.shape(indices)[:2] != (int(s_q), 1):
        raise ValueError(
            f"indices must have shape [s_q, 1, topk] = [{int(s_q)}, 1, topk] matching q, "
            f"got shape {C.shape(indices)}"
        )
    if attn_sink is not None:
        C.vector(attn_sink, "attn_sink", h_q, "h_q")
    if topk_length is not None:
        C.vector(topk_length, "topk_length", s_q, "s_q")

    C.positive_finite(sm_scale, "sm_scale")
    if d_v != D_V:
        raise ValueError(f"d_v must be {D_V}, got {d_v}")
    return Problem(s_q=s_q, h_q=h_q, d_qk=d_qk, s_kv=kv.shape[0], topk=indices.shape[2])


# --------------------------------------------------------------------------- dispatch

def _features(q: torch.Tensor) -> dict:
    """What the dispatch asks the library about (keys of build_info()["ops"][OP])."""
    return {"dtype": "bf16", "d_qk": int(q.shape[-1]), "h_q": int(q.shape[1])}




def _chunk_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernel can read it with 16-byte copies (every stride but the
    last a multiple of 8 elements, 16-byte aligned start), else a contiguous copy (a
    layout validation accepts but the kernel cannot gather from)."""
    ok = t.data_ptr() % 16 == 0 and all(
        st >= 0 and st % 8 == 0 for st in t.stride()[:-1])
    # clone, not contiguous(): a contiguous tensor at an odd address must move too.
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _run_native(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                d_v: int, attn_sink: Optional[torch.Tensor],
                topk_length: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native kernel (one tvm-ffi call on the current stream): out bf16
    [s_q, h_q, d_v], max_logits and lse fp32 [s_q, h_q], allocated here."""
    s_q, h_q, _ = q.shape
    out = torch.empty((s_q, h_q, d_v), dtype=q.dtype, device=q.device)
    max_logits = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    lse = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    if s_q == 0 or h_q == 0:
        return out, max_logits, lse
    if topk_length is not None:
        topk_length = topk_length.contiguous()
    if attn_sink is not None:
        attn_sink = attn_sink.contiguous()
    _native.function("sparse_prefill_fwd")(_chunk_aligned(q), _chunk_aligned(kv), indices, topk_length,
                                    attn_sink, out, max_logits, lse, float(sm_scale), int(d_v))
    return out, max_logits, lse


def _run_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    from . import reference  # imported on the fallback path only

    out, max_logits, lse = reference.sparse_prefill(
        q=q, kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v, attn_sink=attn_sink,
        topk_length=topk_length)
    return out.to(q.dtype), max_logits.contiguous(), lse.contiguous()


def _body(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
          attn_sink: Optional[torch.Tensor],
          topk_length: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill on validated inputs: (out [s_q, h_q, d_v] in q's dtype,
    max_logits and lse fp32 [s_q, h_q] contiguous)."""
    backend = _dispatch.choose(OP, q.device, _features(q))
    run = _run_native if backend == _dispatch.NATIVE else _run_reference
    return run(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def _fake(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    s_q, h_q, _ = q.shape
    return (q.new_empty((s_q, h_q, d_v)),
            torch.empty((s_q, h_q), dtype=torch.float32, device=q.device),
            torch.empty((s_q, h_q), dtype=torch.float32, device=q.device))


_op = _custom_op.define(
    OP,
    "(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? attn_sink, "
    "Tensor? topk_length) -> (Tensor, Tensor, Tensor)",
    _body, _fake)


# --------------------------------------------------------------------------- entry

def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill: each query attends to its own ``topk`` tokens of kv.

    q bf16 [s_q, h_q, d_qk] (d_qk 576 or 512); kv bf16 [s_kv, 1, d_qk]; indices
    int32 [s_q, 1, topk], an index < 0 or >= s_kv is invalid (skipped); topk_length
    int32 [s_q]: only the first topk_length[i] indices of query i count; attn_sink
    fp32 [h_q] scales out by exp(lse) / (exp(lse) + exp(sink)) and leaves lse and
    max_logits unchanged. ``sm_scale`` has no default (as upstream).

    Returns (out bf16 [s_q, h_q, d_v], max_logits fp32 [s_q, h_q], lse fp32
    [s_q, h_q]), natural log; an empty row gives out 0, max_logits -inf, lse +inf.
    """
    validate(q, kv, indices, sm_scale, d_v, attn_sink=attn_sink, topk_length=topk_length)
    return _op(q, kv, indices, float(sm_scale), int(d_v), attn_sink, topk_length)
