"""Sparse MLA decode: ``flash_mla_with_kvcache`` with ``indices``, over a quantised cache.

The family in one module: its validation (one function, fixed order), its
dispatch (native kernel or the PyTorch reference, through flash_mla.dispatch), the
``flash_mla::sparse_decode`` custom op that torch.compile traces, and ``decode``,
which flash_mla.with_kvcache calls for a call with indices.

Contract: q bf16 [b, s_q, h_q, d_qk]. k_cache uint8/int8/float8_e4m3fn
[num_blocks, page_size, 1, bytes_per_token] in one of the five formats of
flash_mla.quant (V32 656 B d_qk 576; V32_NO_ROPE 528 B, V4 584 B, V41 528 B,
V41_FP4 288 B, d_qk 512), named by ``kv_format`` or, when it is None, detected from
the last dim (656 V32, 584 V4, 528 V41, 288 V41_FP4); the format's d_qk must be q's.
Any page size, tokens of a page back to back (stride(1) == bytes_per_token), the
cache 16-byte aligned (8 for V4) at its start and between blocks, because the
kernel copies 16-byte chunks (V4's 584-byte rows are only 8-aligned). A byte cache
with indices is FP8 whatever ``is_fp8_kvcache`` says (the newer API generation
defaults it to True; ours keeps False). indices int32 [b, s_q, topk], value
block * page_size + offset; a negative index or one past the cache is invalid and
never read, so index values need no check (and none is made: that would need a
device sync). topk_length int32 [b]: only the first topk_length[i] indices count.
attn_sink fp32 [h_q]. An optional extra pool (extra_k_cache in ``extra_kv_format``,
same rule, any format with q's d_qk; extra_indices_in_kvcache [b, s_q, extra_topk],
extra_topk_length [b]) joins the same softmax. causal False, head_dim_v 512.
Returns out [b, s_q, h_q, 512] bf16 and lse fp32 [b, h_q, s_q], the transposed
view of a contiguous [b, s_q, h_q] buffer (as upstream).

Native path: ``_run_native`` calls the library's ``sparse_decode_fwd`` (the kernel of
csrc/portable/decode/sparse, then the split-KV combine) with the schedule that the
dense decode's schedule kernel computes over each request's key-list length; the first
call stores it in the FlashMLASchedMeta (docs/sparse_decode.md). ``enable_batch_invariant``
makes a request's pieces depend on its own length only.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import _checks as C
from . import _custom_op
from . import _native
from . import dispatch as _dispatch
from ._decode_buffers import decode_buffers, run_schedule
from ._repeat_call import RECORD_ATTR, Record, backend_env, layout_key, record_of
from . import quant
from .sched_meta import FlashMLASchedMeta, bind_or_check_config, stored_schedule

OP = "sparse_decode"

HEAD_DIM_V = 512
CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
# A cache of one of these dtypes belongs to dense decode (indices None).
DENSE_CACHE_DTYPES = (torch.bfloat16, torch.float16)
Q_DTYPES = (torch.bfloat16,)
# Byte alignment of a cache's start and block stride: the kernel copies 16-byte chunks;
# V4's rows are 584 bytes, so its blocks are only 8-aligned.
CACHE_ALIGNMENT = 16
CACHE_ALIGNMENT_V4 = 8

_OPTIONAL = ("topk_length", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
             "extra_topk_length")


class Problem(NamedTuple):
    """Sizes derived by validation (a NamedTuple, so torch.compile traces it)."""
    b: int
    s_q: int
    h_q: int
    page_size: int
    topk: int
    extra_page_size: Optional[int]
    extra_topk: Optional[int]
    softmax_scale: float
    kv_format: str
    extra_kv_format: Optional[str]


# --------------------------------------------------------------------------- validation

def _format_name(value: Any, name: str) -> None:
    """kv_format / extra_kv_format: None or one of quant.FORMAT_NAMES."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__} {value!r}")
    if value not in quant.FORMAT_NAMES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, quant.FORMAT_NAMES))} or None, "
                         f"got {value!r}")


def _cache_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype in DENSE_CACHE_DTYPES:
        dense = C.dtype_name(t.dtype)
        raise ValueError(
            f"{name} must have dtype uint8 or int8 or float8_e4m3fn for sparse decode (indices given), "
            f"got {dense} (a {dense} cache is dense decode's: indices None)"
        )
    C.dtype(t, name, CACHE_DTYPES)


def _cache_format(t: torch.Tensor, name: str, kv_format: Optional[str], format_arg: str) -> quant.KvFormat:
    """The cache's format: the one named, whose size must match, or the one its last dim selects."""
    C.ndim(t, name, 4, "[num_blocks, page_size, 1, bytes_per_token]")
    bpt = int(t.shape[3])
    if kv_format is None:
        if bpt not in quant.DETECTED_FORMATS:
            raise ValueError(
                f"{name} must have {quant.DETECTION_RULE} bytes per token (last dim) when {format_arg} "
                f"is None, got shape {C.shape(t)}"
            )
        return quant.FORMATS[quant.detect_format(bpt)]
    fmt = quant.FORMATS[kv_format]
    if bpt != fmt.bytes_per_token:
        raise ValueError(
            f"{name} must have {fmt.bytes_per_token} bytes per token (last dim) for {format_arg}="
            f"{kv_format!r}, got shape {C.shape(t)}"
        )
    return fmt


def _head_dim_matches(q: torch.Tensor, fmt: quant.KvFormat, cache: str, kv_format: Optional[str],
                      format_arg: str) -> None:
    if q.shape[3] == fmt.d_qk:
        return
    how = (f"{format_arg}={kv_format!r}" if kv_format is not None else
           f"{format_arg}=None, which reads {cache}'s {fmt.bytes_per_token} bytes per token as {fmt.name}")
    raise ValueError(f"q must have head dim (last dim) {fmt.d_qk} for {how}, got shape {C.shape(q)}")


def _cache_layout(t: torch.Tensor, name: str, fmt: quant.KvFormat) -> None:
    """[num_blocks, page_size, 1, bytes_per_token], tokens of a page back to back, aligned."""
    bpt = fmt.bytes_per_token
    C.dim_eq(t, name, 2, 1, "kv heads (dim 2) equal to")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have page size (dim 1) >= 1, got shape {C.shape(t)}")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != bpt:
        raise ValueError(
            f"{name} must have stride(1) == {bpt} (tokens of a page back to back), "
            f"got strides {C.strides(t)} for shape {C.shape(t)}"
        )
    align = _alignment(fmt.name)
    if not C.is_compiling():  # no address while tracing: _body checks it when the op runs
        _cache_address(t, name, fmt.name)
    if t.shape[0] > 1 and t.stride(0) % align:  # one byte per element
        raise ValueError(
            f"{name} must have stride(0) a multiple of {align} bytes ({_alignment_reason(fmt.name)}), "
            f"got strides {C.strides(t)} for shape {C.shape(t)}"
        )


def _alignment(kv_format: str) -> int:
    return CACHE_ALIGNMENT_V4 if quant.FORMATS[kv_format].page_structured else CACHE_ALIGNMENT


def _alignment_reason(kv_format: str) -> str:
    return f"the kernel copies 16-byte chunks; {kv_format} format"


def _cache_address(t: torch.Tensor, name: str, kv_format: str) -> None:
    align = _alignment(kv_format)
    if t.data_ptr() % align:
        raise ValueError(
            f"{name} must start at a {align}-byte aligned address ({_alignment_reason(kv_format)}), "
            f"got data_ptr() % {align} == {t.data_ptr() % align}"
        )


def _batch_indices(t: torch.Tensor, name: str, b: int, s_q: int, topk: str) -> None:
    C.ndim(t, name, 3, f"[b, s_q, {topk}]")
    if C.shape(t)[:2] != (int(b), int(s_q)):
        raise ValueError(
            f"{name} must have shape [b, s_q, {topk}] = [{int(b)}, {int(s_q)}, {topk}] matching q, "
            f"got shape {C.shape(t)}"
        )


def validate(q: Any, k_cache: Any, indices: Any, topk_length: Any, head_dim_v: Any,
             softmax_scale: Any, causal: Any, is_fp8_kvcache: Any, attn_sink: Any = None,
             extra_k_cache: Any = None, extra_indices_in_kvcache: Any = None,
             extra_topk_length: Any = None, kv_format: Any = None, extra_kv_format: Any = None,
             enable_batch_invariant: Any = False) -> Problem:
    """All checks of a sparse decode call, in order: which arguments go together,
    Python types and names, dtypes, devices, layout, shapes (with the cache formats),
    alignment, values (Python scalars only). block_table and cache_seqlens are unused
    by sparse decode and not checked. is_fp8_kvcache may be either bool: a byte cache
    with indices is FP8."""
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        given, missing = (("extra_k_cache", "extra_indices_in_kvcache") if extra_k_cache is not None
                          else ("extra_indices_in_kvcache", "extra_k_cache"))
        raise ValueError(f"{missing} must be given together with {given}, got None")
    if extra_topk_length is not None and extra_k_cache is None:
        raise ValueError(
            "extra_topk_length must be None when extra_k_cache is None, "
            f"got {type(extra_topk_length).__name__}"
        )
    if extra_kv_format is not None and extra_k_cache is None:
        raise ValueError(f"extra_kv_format must be None when extra_k_cache is None, got {extra_kv_format!r}")
    found = C.tensors(
        [("q", q), ("k_cache", k_cache), ("indices", indices), ("topk_length", topk_length),
         ("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
         ("extra_indices_in_kvcache", extra_indices_in_kvcache),
         ("extra_topk_length", extra_topk_length)],
        optional=_OPTIONAL)
    C.integer(head_dim_v, "head_dim_v")
    C.real(softmax_scale, "softmax_scale", optional=True)
    C.boolean(is_fp8_kvcache, "is_fp8_kvcache")
    C.boolean(causal, "causal")
    C.boolean(enable_batch_invariant, "enable_batch_invariant")
    _format_name(kv_format, "kv_format")
    _format_name(extra_kv_format, "extra_kv_format")
    if causal:
        raise ValueError("causal must be False for sparse decode (indices given), got True")

    C.dtype(q, "q", Q_DTYPES)
    _cache_dtype(k_cache, "k_cache")
    C.dtype(indices, "indices", (torch.int32,))
    if extra_k_cache is not None:
        C.dtype(extra_k_cache, "extra_k_cache", CACHE_DTYPES)
        C.dtype(extra_indices_in_kvcache, "extra_indices_in_kvcache", (torch.int32,))
    for name, t in (("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
        if t is not None:
            C.dtype(t, name, (torch.int32,))
    if attn_sink is not None:
        C.dtype(attn_sink, "attn_sink", (torch.float32,))
    C.same_device(found)

    for name, t in found.items():
        C.last_dim_contiguous(t, name)

    C.ndim(q, "q", 4, "[b, s_q, h_q, d_qk]")
    b, s_q, h_q, _ = q.shape
    fmt = _cache_format(k_cache, "k_cache", kv_format, "kv_format")
    _head_dim_matches(q, fmt, "k_cache", kv_format, "kv_format")
    _cache_layout(k_cache, "k_cache", fmt)
    _batch_indices(indices, "indices", b, s_q, "topk")
    if topk_length is not None:
        C.vector(topk_length, "topk_length", b, "b")
    if attn_sink is not None:
        C.vector(attn_sink, "attn_sink", h_q, "h_q")
    extra_topk = extra_page_size = extra_name = None
    if extra_k_cache is not None:
        extra_fmt = _cache_format(extra_k_cache, "extra_k_cache", extra_kv_format, "extra_kv_format")
        _head_dim_matches(q, extra_fmt, "extra_k_cache", extra_kv_format, "extra_kv_format")
        _cache_layout(extra_k_cache, "extra_k_cache", extra_fmt)
        _batch_indices(extra_indices_in_kvcache, "extra_indices_in_kvcache", b, s_q, "extra_topk")
        extra_topk = int(extra_indices_in_kvcache.shape[2])
        extra_page_size = int(extra_k_cache.shape[1])
        extra_name = extra_fmt.name
    if extra_topk_length is not None:
        C.vector(extra_topk_length, "extra_topk_length", b, "b")

    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = int(q.shape[3]) ** -0.5
    C.positive_finite(softmax_scale, "softmax_scale")
    return Problem(b=int(b), s_q=int(s_q), h_q=int(h_q), page_size=int(k_cache.shape[1]),
                   topk=int(indices.shape[2]),
                   extra_page_size=extra_page_size, extra_topk=extra_topk,
                   softmax_scale=float(softmax_scale), kv_format=fmt.name,
                   extra_kv_format=extra_name)


# --------------------------------------------------------------------------- dispatch

def _features(q: torch.Tensor, kv_format: str, extra_kv_format: Optional[str]) -> dict:
    """What the dispatch asks the library about (keys of build_info()["ops"][OP])."""
    features = {"dtype": "bf16", "h_q": int(q.shape[2]), "kv_format": kv_format}
    if extra_kv_format is not None:
        features["extra_kv_format"] = extra_kv_format
    return features


# The tile that the main pool's key list is padded to (csrc/portable/decode/sparse/config.h,
# kBlockN).
_TILE = 16


def _key_lengths(b: int, device: torch.device, topk: int, topk_length: Optional[torch.Tensor],
                 extra_topk: Optional[int], extra_topk_length: Optional[torch.Tensor]
                 ) -> torch.Tensor:
    """Each request's key-list length, int32 [b] on the GPU (no host sync): the main pool's
    counted positions rounded up to a multiple of 16, plus the extra pool's. The kernel
    derives the same list from the same tensors (docs/sparse_decode.md)."""
    def counted(limit: int, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        if lengths is None:
            return torch.full((b,), limit, dtype=torch.int32, device=device)
        return lengths.clamp(0, limit)

    total = (counted(topk, topk_length) + (_TILE - 1)) // _TILE * _TILE
    if extra_topk is not None:
        total = total + counted(extra_topk, extra_topk_length)
    return total.to(torch.int32).contiguous()


def _native_schedule(q: torch.Tensor, indices: torch.Tensor, topk_length: Optional[torch.Tensor],
                     extra_indices: Optional[torch.Tensor],
                     extra_topk_length: Optional[torch.Tensor], batch_invariant: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule on q's device: the dense decode's schedule kernel over the
    key-list lengths: (metadata int32 [parts, 8], split offsets int32 [b + 1])."""
    b, s_q, h_q, d_qk = q.shape
    parts = int(_native.function("sparse_decode_num_parts")(
        q.device.index, int(b), int(s_q), int(h_q), int(d_qk), bool(batch_invariant)))
    lengths = _key_lengths(int(b), q.device, int(indices.shape[2]), topk_length,
                           None if extra_indices is None else int(extra_indices.shape[2]),
                           extra_topk_length)
    return run_schedule(lengths, parts, batch_invariant)


def _bytes(cache: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A byte cache as uint8 (a free view), whatever 8-bit dtype the caller used."""
    return cache if cache is None or cache.dtype == torch.uint8 else cache.view(torch.uint8)


def _run_native(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                extra_topk_length, head_dim_v, softmax_scale, kv_format, extra_kv_format,
                batch_invariant, tile_scheduler_metadata, num_splits):
    """The native decode and combine (one tvm-ffi call on the current stream). The schedule
    comes from the caller's FlashMLASchedMeta, or is computed here when none is given (a
    traced call). Out, lse and the fp32 split partials are allocated per call: by the
    library through torch's allocator where the caller installs it
    (sparse_decode_fwd_alloc), else here by flash_mla._decode_buffers (rows in (s_q, h_q)
    order)."""
    if tile_scheduler_metadata is None or num_splits is None:
        tile_scheduler_metadata, num_splits = _native_schedule(
            q, indices, topk_length, extra_indices, extra_topk_length, batch_invariant)
    if _native.env_allocator_available(q):
        result = _native.function("sparse_decode_fwd_alloc")(
            q, _bytes(k_cache), indices, topk_length, attn_sink, _bytes(extra_k_cache),
            extra_indices, extra_topk_length, tile_scheduler_metadata, num_splits,
            float(softmax_scale), str(kv_format),
            "" if extra_kv_format is None else str(extra_kv_format), bool(batch_invariant))
        item = _native.array_item()
        return item(result, 0), item(result, 1).transpose(1, 2)
    buf = decode_buffers(q, head_dim_v, tile_scheduler_metadata.shape[0], batch_invariant,
                         heads_first=False)
    _native.function("sparse_decode_fwd")(
        q, _bytes(k_cache), indices, topk_length, attn_sink, _bytes(extra_k_cache), extra_indices,
        extra_topk_length, tile_scheduler_metadata, num_splits, buf.o_accum, buf.lse_accum,
        buf.out, buf.lse, float(softmax_scale), str(kv_format),
        "" if extra_kv_format is None else str(extra_kv_format))
    return buf.out, buf.lse.transpose(1, 2)


def _run_reference(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                   extra_topk_length, head_dim_v, softmax_scale, kv_format, extra_kv_format,
                   batch_invariant, tile_scheduler_metadata, num_splits):
    """The PyTorch reference; it computes each request on its own, so it is batch-invariant
    either way, and it needs no schedule (the last three arguments are unused)."""
    from . import reference  # imported on the fallback path only

    out, lse = reference.sparse_decode(
        q=q, k_cache=k_cache, indices=indices, topk_length=topk_length,
        softmax_scale=softmax_scale, d_v=head_dim_v, attn_sink=attn_sink,
        extra_k_cache=extra_k_cache, extra_indices=extra_indices,
        extra_topk_length=extra_topk_length, kv_format=kv_format,
        extra_kv_format=extra_kv_format)
    return out.to(q.dtype), lse.contiguous().transpose(1, 2)


def _body(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
          topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
          extra_k_cache: Optional[torch.Tensor], extra_indices: Optional[torch.Tensor],
          extra_topk_length: Optional[torch.Tensor], head_dim_v: int, softmax_scale: float,
          kv_format: str, extra_kv_format: Optional[str], batch_invariant: bool,
          tile_scheduler_metadata: Optional[torch.Tensor],
          num_splits: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode on validated inputs: (out [b, s_q, h_q, head_dim_v] in q's dtype,
    lse fp32 [b, h_q, s_q] as the transposed view of a contiguous [b, s_q, h_q] buffer).
    Checks the caches' addresses, which validation cannot see while torch.compile traces."""
    _cache_address(k_cache, "k_cache", kv_format)
    if extra_k_cache is not None:
        _cache_address(extra_k_cache, "extra_k_cache", extra_kv_format)
    backend = _dispatch.choose(OP, q.device, _features(q, kv_format, extra_kv_format))
    run = _run_native if backend == _dispatch.NATIVE else _run_reference
    return run(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
               extra_topk_length, head_dim_v, softmax_scale, kv_format, extra_kv_format,
               batch_invariant, tile_scheduler_metadata, num_splits)


def _fake(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
          extra_topk_length, head_dim_v, softmax_scale, kv_format, extra_kv_format,
          batch_invariant, tile_scheduler_metadata, num_splits):
    b, s_q, h_q, _ = q.shape
    return (q.new_empty((b, s_q, h_q, head_dim_v)),
            torch.empty((b, s_q, h_q), dtype=torch.float32, device=q.device).transpose(1, 2))


_op = _custom_op.define(
    OP,
    "(Tensor q, Tensor k_cache, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
    "Tensor? extra_k_cache, Tensor? extra_indices, Tensor? extra_topk_length, int head_dim_v, "
    "float softmax_scale, str kv_format, str? extra_kv_format, bool batch_invariant, "
    "Tensor? tile_scheduler_metadata, Tensor? num_splits) -> (Tensor, Tensor)",
    _body, _fake)


# --------------------------------------------------------------------------- repeat calls

class _Repeat(Record):
    """The record of a holder's first native call (flash_mla._repeat_call): a later call
    with the same tensor layouts (None where the first had None), the same scalar
    arguments and caches still at aligned addresses runs the native decode with the stored
    schedule, skipping validation, dispatch and the holder's checks."""

    __slots__ = ("kv_format_arg", "extra_kv_format_arg", "kv_format", "extra_kv_format",
                 "align", "extra_align", "as_bytes", "extra_as_bytes", "fwd", "item")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
                 topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
                 extra_k_cache: Optional[torch.Tensor], extra_indices: Optional[torch.Tensor],
                 extra_topk_length: Optional[torch.Tensor], softmax_scale: Optional[float],
                 kv_format: Optional[str], extra_kv_format: Optional[str], p: Problem,
                 invariant: bool, metadata: torch.Tensor, num_splits: torch.Tensor) -> None:
        super().__init__(layout_key(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                                    extra_indices, extra_topk_length),
                         softmax_scale, invariant, q.device, p.softmax_scale, metadata,
                         num_splits)
        self.kv_format_arg = kv_format
        self.extra_kv_format_arg = extra_kv_format
        self.kv_format = p.kv_format
        self.extra_kv_format = "" if p.extra_kv_format is None else p.extra_kv_format
        self.align = _alignment(p.kv_format)
        self.extra_align = None if p.extra_kv_format is None else _alignment(p.extra_kv_format)
        self.as_bytes = k_cache.dtype != torch.uint8
        self.extra_as_bytes = extra_k_cache is not None and extra_k_cache.dtype != torch.uint8
        self.fwd = _native.function("sparse_decode_fwd_alloc")
        self.item = _native.array_item()

    @staticmethod
    def recordable(q: Any, k_cache: Any, indices: Any, topk_length: Any, attn_sink: Any,
                   extra_k_cache: Any, extra_indices: Any, extra_topk_length: Any,
                   softmax_scale: Any, kv_format: Any, extra_kv_format: Any) -> bool:
        """Whether a validated native call can be repeated this way: plain tensors (no
        subclass, no fake), a float or None scale, str or None formats, not tracing, and a
        library that allocates its outputs (its one entry is what a repeat calls)."""
        return (layout_key(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                           extra_indices, extra_topk_length) is not None
                and (softmax_scale is None or type(softmax_scale) is float)
                and (kv_format is None or type(kv_format) is str)
                and (extra_kv_format is None or type(extra_kv_format) is str)
                and not C.is_compiling() and _native.env_allocator_available(q))

    def __call__(self, q: Any, k_cache: Any, indices: Any, topk_length: Any, attn_sink: Any,
                 extra_k_cache: Any, extra_indices: Any, extra_topk_length: Any,
                 head_dim_v: Any, softmax_scale: Any, causal: Any, is_fp8_kvcache: Any,
                 kv_format: Any, extra_kv_format: Any, enable_batch_invariant: Any
                 ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The decode of a call that repeats the recorded one, or None (then the caller
        takes the full path). Positional, in flash_mla_with_kvcache's order of the sparse
        arguments: this is the per-layer hot path, where each keyword costs time."""
        if (causal is not False or enable_batch_invariant is not self.invariant
                or not (is_fp8_kvcache is True or is_fp8_kvcache is False)
                or type(head_dim_v) is not int or head_dim_v != HEAD_DIM_V
                or not self.same_scale(softmax_scale)
                or (kv_format is not self.kv_format_arg
                    and (type(kv_format) is not str or kv_format != self.kv_format_arg))
                or (extra_kv_format is not self.extra_kv_format_arg
                    and (type(extra_kv_format) is not str
                         or extra_kv_format != self.extra_kv_format_arg))
                or layout_key(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                              extra_indices, extra_topk_length) != self.key
                or k_cache.data_ptr() % self.align
                or (extra_k_cache is not None and extra_k_cache.data_ptr() % self.extra_align)
                or backend_env() != self.backend or C.is_compiling()):
            return None
        if self.as_bytes:
            k_cache = k_cache.view(torch.uint8)
        if self.extra_as_bytes:
            extra_k_cache = extra_k_cache.view(torch.uint8)
        result = self.fwd(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                          extra_indices, extra_topk_length, self.metadata, self.num_splits,
                          self.scale, self.kv_format, self.extra_kv_format, self.invariant)
        item = self.item
        _dispatch.record_choice(OP, self.choice)
        return item(result, 0), item(result, 1).transpose(1, 2)


def repeat_record(holder: Any) -> Optional[_Repeat]:
    """The holder's sparse-decode record, or None (no native call yet, or another family's)."""
    return record_of(holder, _Repeat)


# --------------------------------------------------------------------------- entry

def decode(q: Any, k_cache: Any, indices: Any, topk_length: Any, head_dim_v: Any,
           tile_scheduler_metadata: FlashMLASchedMeta, softmax_scale: Any, causal: Any,
           is_fp8_kvcache: Any, attn_sink: Any = None, extra_k_cache: Any = None,
           extra_indices_in_kvcache: Any = None, extra_topk_length: Any = None,
           kv_format: Any = None, extra_kv_format: Any = None,
           enable_batch_invariant: Any = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` with indices (see flash_mla.with_kvcache): validate,
    record or check the schedule holder's configuration, run. The holder records
    is_fp8_kvcache as True: a byte cache with indices is FP8 whatever the flag says. The
    first native call also stores a record that lets later calls with the same layouts
    skip this Python (_Repeat)."""
    p = validate(q, k_cache, indices, topk_length, head_dim_v, softmax_scale, causal,
                 is_fp8_kvcache, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
                 extra_indices_in_kvcache=extra_indices_in_kvcache,
                 extra_topk_length=extra_topk_length, kv_format=kv_format,
                 extra_kv_format=extra_kv_format, enable_batch_invariant=enable_batch_invariant)
    config = FlashMLASchedMeta.Config(p.b, p.s_q, p.h_q, p.page_size, 1, bool(causal),
                                      True, p.topk, p.extra_page_size, p.extra_topk)
    bind_or_check_config(tile_scheduler_metadata, config)
    invariant = bool(enable_batch_invariant)
    can_store = (tile_scheduler_metadata.tile_scheduler_metadata is None
                 and not C.is_compiling()
                 and _dispatch.choose(OP, q.device, _features(q, p.kv_format, p.extra_kv_format))
                 == _dispatch.NATIVE)
    metadata, num_splits = stored_schedule(
        tile_scheduler_metadata, invariant, can_store,
        lambda: _native_schedule(q, indices, topk_length, extra_indices_in_kvcache,
                                 extra_topk_length, invariant))
    result = _op(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                 extra_indices_in_kvcache, extra_topk_length, int(head_dim_v), p.softmax_scale,
                 p.kv_format, p.extra_kv_format, invariant, metadata, num_splits)
    if (metadata is not None and _dispatch.last_backend(OP) == _dispatch.NATIVE
            and _Repeat.recordable(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                                   extra_indices_in_kvcache, extra_topk_length, softmax_scale,
                                   kv_format, extra_kv_format)):
        setattr(tile_scheduler_metadata, RECORD_ATTR,
                _Repeat(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                        extra_indices_in_kvcache, extra_topk_length, softmax_scale, kv_format,
                        extra_kv_format, p, invariant, metadata, num_splits))
    return result
