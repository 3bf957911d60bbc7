"""Dense MLA decode: ``flash_mla_with_kvcache`` without ``indices``.

The family in one module: its validation (one function, fixed order), its
dispatch (native kernel or the PyTorch reference, through flash_mla.dispatch), the
``flash_mla::dense_decode`` custom op that torch.compile traces, and ``decode``,
which flash_mla.with_kvcache calls for a call without indices.

Contract (the API's, not a kernel capability, so named here): q [b, s_q, h_q, 576]
bf16 or fp16; k_cache [num_blocks, 64, h_k, 576] of q's dtype, V being its first 512
dims; block_table int32 [b, max_blocks]; cache_seqlens int32 [b]; h_q % h_k == 0;
head_dim_v 512. Causal (s_q > 1) is bottom-right aligned. Returns out
[b, s_q, h_q, 512] in q's dtype and a contiguous fp32 lse [b, h_q, s_q].

Values of cache_seqlens and block_table are checked only where reading them costs
no device sync (CPU tensors): seqlens >= 0, enough table columns, pages inside the
cache. On a GPU they are the caller's responsibility, as upstream.

Native path: ``_run_native`` calls the library's tvm-ffi entries (csrc/api/dense_decode.cu):
the first call that receives a FlashMLASchedMeta runs the schedule kernel
(``dense_decode_schedule``, on the GPU, no host sync) and stores its tensors in the holder
(``tile_scheduler_metadata``: int32 [parts, 8], ``num_splits``: split offsets int32
[b + 1]); every call then launches the decode and the split-KV combine
(``dense_decode_fwd``) on the current stream, so a decode step is capturable in a CUDA
graph (a capture that includes the first call recomputes the schedule at each replay).
``enable_batch_invariant=True`` picks pieces that depend only on each request's own length
(docs/dense_decode.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import _checks as C
from . import _custom_op
from . import _native
from . import dispatch as _dispatch
from ._decode_buffers import decode_buffers, run_schedule, split_count
from ._repeat_call import RECORD_ATTR, Record, backend_env, layout_key, record_of
from .sched_meta import FlashMLASchedMeta, bind_or_check_config, stored_schedule

_Tensor = torch.Tensor

OP = "dense_decode"

# The API contract of dense decode.
D_QK = 576
HEAD_DIM_V = 512
PAGE_SIZE = 64
DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_FEATURE = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Arguments of flash_mla_with_kvcache that only sparse decode takes.
_SPARSE_ONLY = ("attn_sink", "extra_k_cache", "extra_indices_in_kvcache", "topk_length",
                "extra_topk_length")


class Problem(NamedTuple):
    """Sizes derived by validation (a NamedTuple, so torch.compile traces it)."""
    b: int
    s_q: int
    h_q: int
    h_k: int
    page_size: int
    softmax_scale: float


# --------------------------------------------------------------------------- validation

def validate(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any, head_dim_v: Any,
             softmax_scale: Any, causal: Any, is_fp8_kvcache: Any, **sparse_only: Any) -> Problem:
    """All checks of a dense decode call, in order: arguments this family does not
    take, Python types, dtypes, devices, layout, shapes, values. ``sparse_only``
    holds the sparse-decode arguments by name; each must be None."""
    for name in _SPARSE_ONLY:
        value = sparse_only.get(name)
        if value is not None:
            raise ValueError(
                f"{name} must be None for dense decode (indices is None), got {type(value).__name__}"
            )
    for name, value in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if value is None:
            raise ValueError(f"{name} must be a tensor for dense decode (indices is None), got None")
    found = C.tensors([("q", q), ("k_cache", k_cache), ("block_table", block_table),
                       ("cache_seqlens", cache_seqlens)])
    C.integer(head_dim_v, "head_dim_v")
    C.real(softmax_scale, "softmax_scale", optional=True)
    C.boolean(causal, "causal")
    C.boolean(is_fp8_kvcache, "is_fp8_kvcache")
    if is_fp8_kvcache:
        raise ValueError(
            "is_fp8_kvcache must be False for dense decode (indices is None): the FP8 cache "
            "is served by sparse decode only, got True"
        )

    C.dtype(q, "q", DTYPES)
    C.same_dtype(k_cache, "k_cache", q, "q")
    C.dtype(block_table, "block_table", (torch.int32,))
    C.dtype(cache_seqlens, "cache_seqlens", (torch.int32,))
    C.same_device(found)

    for name, t in found.items():
        C.last_dim_contiguous(t, name)

    C.ndim(q, "q", 4, f"[b, s_q, h_q, {D_QK}]")
    C.ndim(k_cache, "k_cache", 4, f"[num_blocks, {PAGE_SIZE}, h_k, {D_QK}]")
    C.ndim(block_table, "block_table", 2, "[b, max_blocks]")
    b, s_q, h_q, _ = q.shape
    C.dim_eq(q, "q", 3, D_QK, "head dim (last dim)")
    C.dim_eq(k_cache, "k_cache", 1, PAGE_SIZE, "page size")
    C.dim_eq(k_cache, "k_cache", 3, D_QK, "head dim (last dim) equal to q's")
    h_k = k_cache.shape[2]
    if h_k < 1 or h_q % h_k != 0:
        raise ValueError(
            f"k_cache heads (dim 2) must divide q's {int(h_q)} heads, got shape {C.shape(k_cache)}"
        )
    C.dim_eq(block_table, "block_table", 0, b, "batch size (dim 0) equal to q's")
    C.vector(cache_seqlens, "cache_seqlens", b, "b")

    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = D_QK ** -0.5
    C.positive_finite(softmax_scale, "softmax_scale")
    _check_cache_values(k_cache, block_table, cache_seqlens)
    return Problem(b=int(b), s_q=int(s_q), h_q=int(h_q), h_k=int(h_k), page_size=PAGE_SIZE,
                   softmax_scale=float(softmax_scale))


def _check_cache_values(k_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor) -> None:
    """Sequence lengths and the pages they reach, where readable without a sync."""
    if not (C.host_readable(cache_seqlens) and C.host_readable(block_table)):
        return
    num_blocks, columns = int(k_cache.shape[0]), int(block_table.shape[1])
    for i, s_k in enumerate(int(s) for s in cache_seqlens.tolist()):
        if s_k < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {s_k} at index {i}")
        pages = -(-s_k // PAGE_SIZE)
        if pages > columns:
            raise ValueError(
                f"block_table must have at least {pages} columns for cache_seqlens[{i}] = {s_k} "
                f"(pages of {PAGE_SIZE} tokens), got shape {C.shape(block_table)}"
            )
        if pages:
            row = block_table[i, :pages]
            lo, hi = int(row.min()), int(row.max())
            if lo < 0 or hi >= num_blocks:
                raise ValueError(
                    f"block_table[{i}, :{pages}] must hold pages in [0, {num_blocks}) (k_cache "
                    f"blocks), got values in [{lo}, {hi}]"
                )


# --------------------------------------------------------------------------- dispatch

def _features(q: torch.Tensor) -> dict:
    """What the dispatch asks the library about (keys of build_info()["ops"][OP])."""
    return {"dtype": _DTYPE_FEATURE[q.dtype], "h_q": int(q.shape[2])}


def _native_schedule(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     batch_invariant: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule on q's device, computed by a GPU kernel from cache_seqlens
    (no host sync): (metadata int32 [parts, 8], split offsets int32 [b + 1])."""
    b, s_q, h_q, _ = q.shape
    h_k = k_cache.shape[2]
    parts = int(_native.function("dense_decode_num_parts")(
        q.device.index, int(b), int(s_q), int(h_q), int(h_k), bool(batch_invariant)))
    return run_schedule(cache_seqlens, parts, batch_invariant)


def _run_native(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                causal: bool, tile_scheduler_metadata: Optional[torch.Tensor] = None,
                num_splits: Optional[torch.Tensor] = None,
                batch_invariant: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The native decode and combine (one tvm-ffi call on the current stream). The
    schedule comes from the caller's FlashMLASchedMeta, or is computed here when none is
    given (a traced call). Out, lse and the fp32 split partials are allocated per call:
    by the library through torch's allocator where the caller installs it
    (dense_decode_fwd_alloc, the cheaper way), else here by flash_mla._decode_buffers
    (rows in (h_q, s_q) order)."""
    if tile_scheduler_metadata is None or num_splits is None:
        tile_scheduler_metadata, num_splits = _native_schedule(q, k_cache, cache_seqlens,
                                                               batch_invariant)
    if _native.env_allocator_available(q):
        result = _native.function("dense_decode_fwd_alloc")(
            q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
            float(softmax_scale), bool(causal), bool(batch_invariant))
        item = _native.array_item()
        return item(result, 0), item(result, 1)
    buf = decode_buffers(q, head_dim_v, tile_scheduler_metadata.shape[0], batch_invariant,
                         heads_first=True)
    _native.function("dense_decode_fwd")(q, k_cache, block_table, cache_seqlens,
                                  tile_scheduler_metadata, num_splits, buf.o_accum, buf.lse_accum,
                                  buf.out, buf.lse, float(softmax_scale), bool(causal))
    return buf.out, buf.lse


def _run_reference(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                   causal: bool, tile_scheduler_metadata: Optional[torch.Tensor] = None,
                   num_splits: Optional[torch.Tensor] = None,
                   batch_invariant: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fp32 reference (needs no schedule; every request is computed on its own, so
    it is batch invariant as it stands)."""
    from . import reference  # imported on the fallback path only

    out, lse = reference.dense_decode(
        q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
        head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)
    return out.to(q.dtype), lse.contiguous()


def _body(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
          cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
          causal: bool, tile_scheduler_metadata: Optional[torch.Tensor],
          num_splits: Optional[torch.Tensor],
          batch_invariant: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense decode on validated inputs: (out [b, s_q, h_q, head_dim_v] in q's dtype,
    lse fp32 [b, h_q, s_q] contiguous)."""
    backend = _dispatch.choose(OP, q.device, _features(q))
    run = _run_native if backend == _dispatch.NATIVE else _run_reference
    return run(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
               tile_scheduler_metadata, num_splits, batch_invariant)


def _fake(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
          tile_scheduler_metadata, num_splits, batch_invariant):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty((b, s_q, h_q, head_dim_v)),
            torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device))


_op = _custom_op.define(
    OP,
    "(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
    "float softmax_scale, bool causal, Tensor? tile_scheduler_metadata, Tensor? num_splits, "
    "bool batch_invariant) -> (Tensor, Tensor)",
    _body, _fake)


def _stored_schedule(holder: FlashMLASchedMeta, q: torch.Tensor, k_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, batch_invariant: bool
                     ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The holder's schedule; on its first native call, computed and stored there. None
    while tracing (the op computes one per call) or on the reference backend."""
    can_store = (holder.tile_scheduler_metadata is None and not C.is_compiling()
                 and _dispatch.choose(OP, q.device, _features(q)) == _dispatch.NATIVE)
    return stored_schedule(holder, batch_invariant, can_store,
                           lambda: _native_schedule(q, k_cache, cache_seqlens, batch_invariant))


# --------------------------------------------------------------------------- repeat calls

class _Repeat(Record):
    """The record of a holder's first native call (flash_mla._repeat_call): a later call
    with the same tensor layouts and scalar arguments runs the native decode with the
    stored schedule, skipping validation, dispatch and the holder's checks."""

    __slots__ = ("causal", "fwd", "item", "native_key", "out_shape", "lse_shape", "o_accum_shape",
                 "lse_accum_shape", "dtype", "device")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor, softmax_scale: Optional[float], p: Problem,
                 causal: bool, invariant: bool, metadata: torch.Tensor,
                 num_splits: torch.Tensor) -> None:
        super().__init__(layout_key(q, k_cache, block_table, cache_seqlens), softmax_scale,
                         invariant, q.device, p.softmax_scale, metadata, num_splits)
        self.causal = causal
        # The library allocates out, lse and the partials where torch's allocator is
        # installed for the call (item unpacks its result); else they are allocated here.
        # With the allocator, the library also compares the tensors' layouts with the
        # recorded ones (dense_decode_fwd_repeat, csrc/api/layout_key.h): cheaper than
        # building the key in Python, which remains for the other case.
        self.item = _native.array_item() if _native.env_allocator_available(q) else None
        self.native_key = None
        if self.item is not None:
            self.native_key = _native.function("dense_decode_layout_key")(
                q, k_cache, block_table, cache_seqlens)
        self.fwd = _native.function("dense_decode_fwd" if self.item is None
                                    else "dense_decode_fwd_repeat")
        splits = split_count(p.b, int(metadata.shape[0]), invariant)
        self.out_shape = (p.b, p.s_q, p.h_q, HEAD_DIM_V)
        self.lse_shape = (p.b, p.h_q, p.s_q)
        self.o_accum_shape = (splits, p.h_q, p.s_q, HEAD_DIM_V)
        self.lse_accum_shape = (splits, p.h_q, p.s_q)
        self.dtype = q.dtype
        self.device = q.device

    @staticmethod
    def recordable(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any,
                   softmax_scale: Any) -> bool:
        """Whether a validated native call can be repeated this way: plain tensors (no
        subclass, no fake), a float or None scale (other real types take the full path),
        not tracing. Native calls have CUDA tensors, whose values validation never reads,
        so a repeat skips no value check."""
        return (layout_key(q, k_cache, block_table, cache_seqlens) is not None
                and (softmax_scale is None or type(softmax_scale) is float)
                and not C.is_compiling())

    def __call__(self, q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any,
                 head_dim_v: Any, softmax_scale: Any, causal: Any, is_fp8_kvcache: Any,
                 enable_batch_invariant: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The decode of a call that repeats the recorded one, or None (then the caller
        takes the full path). Positional, in flash_mla_with_kvcache's order: this is the
        per-layer hot path, where each keyword costs time."""
        if (causal is not self.causal or enable_batch_invariant is not self.invariant
                or is_fp8_kvcache is not False
                or type(head_dim_v) is not int or head_dim_v != HEAD_DIM_V
                or not self.same_scale(softmax_scale)
                or backend_env() != self.backend or C.is_compiling()):
            return None
        if self.item is not None:
            # Plain tensors only, as layout_key requires; the library compares the rest.
            if (type(q) is not _Tensor or type(k_cache) is not _Tensor
                    or type(block_table) is not _Tensor or type(cache_seqlens) is not _Tensor):
                return None
            result = self.fwd(q, k_cache, block_table, cache_seqlens, self.metadata,
                              self.num_splits, self.scale, self.causal, self.invariant,
                              self.native_key)
            if result is None:
                return None
            out, lse = self.item(result, 0), self.item(result, 1)
        else:
            if layout_key(q, k_cache, block_table, cache_seqlens) != self.key:
                return None
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
            lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
            o_accum = torch.empty(self.o_accum_shape, dtype=torch.float32, device=self.device)
            lse_accum = torch.empty(self.lse_accum_shape, dtype=torch.float32,
                                    device=self.device)
            self.fwd(q, k_cache, block_table, cache_seqlens, self.metadata, self.num_splits,
                     o_accum, lse_accum, out, lse, self.scale, self.causal)
        _dispatch.record_choice(OP, self.choice)
        return out, lse


def repeat_record(holder: Any) -> Optional[_Repeat]:
    """The holder's dense-decode record, or None (no native call yet, or another family's)."""
    return record_of(holder, _Repeat)


# --------------------------------------------------------------------------- entry

def decode(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any, head_dim_v: Any,
           tile_scheduler_metadata: FlashMLASchedMeta, softmax_scale: Any, causal: Any,
           is_fp8_kvcache: Any, enable_batch_invariant: Any = False,
           **sparse_only: Optional[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` without indices (see flash_mla.with_kvcache):
    validate, record or check the schedule holder's configuration, run. The first
    native call stores the split-KV schedule in the holder, and a record that lets
    later calls with the same layouts skip this Python (_Repeat)."""
    p = validate(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                 is_fp8_kvcache, **sparse_only)
    C.boolean(enable_batch_invariant, "enable_batch_invariant")
    config = FlashMLASchedMeta.Config(p.b, p.s_q, p.h_q, p.page_size, p.h_k, bool(causal),
                                      False, None, None, None)
    bind_or_check_config(tile_scheduler_metadata, config)
    invariant = bool(enable_batch_invariant)
    metadata, num_splits = _stored_schedule(tile_scheduler_metadata, q, k_cache, cache_seqlens,
                                            invariant)
    result = _op(q, k_cache, block_table, cache_seqlens, int(head_dim_v), p.softmax_scale,
                 bool(causal), metadata, num_splits, invariant)
    if (metadata is not None and _dispatch.last_backend(OP) == _dispatch.NATIVE
            and _Repeat.recordable(q, k_cache, block_table, cache_seqlens, softmax_scale)):
        setattr(tile_scheduler_metadata, RECORD_ATTR,
                _Repeat(q, k_cache, block_table, cache_seqlens, softmax_scale, p, bool(causal),
                        invariant, metadata, num_splits))
    return result
