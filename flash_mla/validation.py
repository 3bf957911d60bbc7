"""Argument checks, one function per op, in a fixed order.

Order inside every function (STYLE.md): Python types and devices (all tensors on
one device), then dtypes, then layout (last-dim contiguity and the strides SPEC.md
demands), then shapes, then values that can be checked without reading device
memory (Python scalars only: a host sync would break CUDA-graph capture and cost
latency, so tensor *values* such as cu_seqlens or indices are never inspected).

Errors: TypeError for a wrong Python type or dtype, ValueError for a wrong device,
layout, shape or value. Every message is a sentence naming the argument, what was
expected and what was given.

Each function returns a NamedTuple of the sizes it derived, so the caller
does not re-derive them.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

# Shared facts from SPEC.md.
DENSE_DECODE_D_QK = 576
HEAD_DIM_V = 512
DENSE_DECODE_PAGE_SIZE = 64
SPARSE_D_QK = (576, 512)
# Bytes per token of the FP8 caches: V3.2 (d_qk 576) and MODEL1 (d_qk 512).
FP8_BYTES_PER_TOKEN = {576: 656, 512: 584}
FP8_CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
MHA_HEAD_DIMS = ((64, 64), (128, 128), (192, 128))
MHA_DTYPES = (torch.bfloat16, torch.float16)
DECODE_DTYPES = (torch.bfloat16, torch.float16)



# Sizes derived by validation (NamedTuples: torch.compile traces them, unlike
# SimpleNamespace).
class DecodeSizes(NamedTuple):
    b: int
    s_q: int
    h_q: int
    h_k: int
    d_qk: int
    page_size: int
    topk: Optional[int] = None
    extra_page_size: Optional[int] = None
    extra_topk: Optional[int] = None


class SparsePrefillSizes(NamedTuple):
    s_q: int
    h_q: int
    d_qk: int
    s_kv: int
    topk: int


class MhaSizes(NamedTuple):
    batch: int
    total_q: int
    total_k: int
    h_q: int
    h_k: int
    d_qk: int
    d_v: int


# --------------------------------------------------------------------------- helpers

def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.stride())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(_dtype_name(d) for d in dtypes)


def _tensors(pairs: Sequence[Tuple[str, Any]], optional: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """TypeError unless each value is a tensor (optional names may be None);
    ValueError unless all tensors share the first one's device."""
    optional = set(optional)
    found: Dict[str, torch.Tensor] = {}
    for name, value in pairs:
        if value is None and name in optional:
            continue
        if not isinstance(value, torch.Tensor):
            what = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        found[name] = value
    if found:
        first_name, first = next(iter(found.items()))
        for name, t in found.items():
            if t.device != first.device:
                raise ValueError(
                    f"{name} must be on the same device as {first_name} ({first.device}), "
                    f"got {t.device}"
                )
    return found


def _dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_names(allowed)}, got {_dtype_name(t.dtype)}")


def _same_dtype(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the same dtype as {ref_name} ({_dtype_name(ref.dtype)}), "
            f"got {_dtype_name(t.dtype)}"
        )


def _last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    # Kernels load rows with vector loads; a size-1 last dim has no stride to speak of.
    if t.dim() >= 1 and t.shape[-1] != 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride(-1) == 1), "
            f"got strides {_strides(t)} for shape {_shape(t)}"
        )


def _ndim(t: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim}-D), got shape {_shape(t)}")


def _dim_eq(t: torch.Tensor, name: str, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} must have {what} {int(expected)}, got shape {_shape(t)}")


def _is_int(x: Any) -> bool:
    return (isinstance(x, numbers.Integral) and not isinstance(x, bool)) or isinstance(x, torch.SymInt)


def _int(x: Any, name: str, minimum: Optional[int] = None) -> None:
    if not _is_int(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    if minimum is not None and not isinstance(x, torch.SymInt) and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def _bool(x: Any, name: str) -> None:
    if isinstance(x, bool):
        return
    if isinstance(x, numbers.Integral) and x in (0, 1):
        return
    raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")


def _scale(x: Any, name: str, optional: bool) -> None:
    if x is None and optional:
        return
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat)):
        what = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r}")
    if not isinstance(x, torch.SymFloat) and not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite positive float, got {x!r}")


def _int32_vector(t: torch.Tensor, name: str, length: int, what: str) -> None:
    _ndim(t, name, 1, f"[{what}]")
    _dim_eq(t, name, 0, length, "length")


# --------------------------------------------------------------------------- decode

def validate_dense_decode(
    q: Any,
    k_cache: Any,
    block_table: Any,
    cache_seqlens: Any,
    head_dim_v: Any,
    softmax_scale: Any,
    causal: Any,
    is_fp8_kvcache: Any,
    attn_sink: Any = None,
    extra_k_cache: Any = None,
    extra_indices_in_kvcache: Any = None,
    topk_length: Any = None,
    extra_topk_length: Any = None,
) -> DecodeSizes:
    """Dense decode (``flash_mla_with_kvcache`` with ``indices=None``)."""
    # The sparse-only arguments make no sense without indices: say so first.
    for name, value in (
        ("attn_sink", attn_sink),
        ("extra_k_cache", extra_k_cache),
        ("extra_indices_in_kvcache", extra_indices_in_kvcache),
        ("topk_length", topk_length),
        ("extra_topk_length", extra_topk_length),
    ):
        if value is not None:
            raise ValueError(
                f"{name} must be None for dense decode (indices is None), got {type(value).__name__}"
            )
    if block_table is None or cache_seqlens is None:
        missing = "block_table" if block_table is None else "cache_seqlens"
        raise ValueError(f"{missing} must be a tensor for dense decode (indices is None), got None")
    _tensors([("q", q), ("k_cache", k_cache), ("block_table", block_table),
              ("cache_seqlens", cache_seqlens)])
    _bool(is_fp8_kvcache, "is_fp8_kvcache")
    if is_fp8_kvcache:
        raise ValueError(
            "is_fp8_kvcache must be False for dense decode (indices is None): the FP8 cache "
            "is served by sparse decode only, got True"
        )
    _dtype(q, "q", DECODE_DTYPES)
    _same_dtype(k_cache, "k_cache", q, "q")
    _dtype(block_table, "block_table", (torch.int32,))
    _dtype(cache_seqlens, "cache_seqlens", (torch.int32,))

    for name, t in (("q", q), ("k_cache", k_cache), ("block_table", block_table),
                    ("cache_seqlens", cache_seqlens)):
        _last_dim_contiguous(t, name)

    _ndim(q, "q", 4, "[b, s_q, h_q, 576]")
    _ndim(k_cache, "k_cache", 4, "[num_blocks, 64, h_k, 576]")
    _ndim(block_table, "block_table", 2, "[b, max_blocks]")
    b, s_q, h_q, d_qk = _shape(q)
    _dim_eq(q, "q", 3, DENSE_DECODE_D_QK, "head dim (last dim)")
    _dim_eq(k_cache, "k_cache", 1, DENSE_DECODE_PAGE_SIZE, "page size")
    _dim_eq(k_cache, "k_cache", 3, d_qk, "head dim (last dim) equal to q's")
    h_k = int(k_cache.shape[2])
    if h_k < 1 or h_q % h_k != 0:
        raise ValueError(
            f"k_cache heads (dim 2) must divide q's {h_q} heads, got shape {_shape(k_cache)}"
        )
    _dim_eq(block_table, "block_table", 0, b, "batch size (dim 0) equal to q's")
    _int32_vector(cache_seqlens, "cache_seqlens", b, "b")

    _int(head_dim_v, "head_dim_v")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    _scale(softmax_scale, "softmax_scale", optional=False)
    _bool(causal, "causal")
    return DecodeSizes(b=b, s_q=s_q, h_q=h_q, h_k=h_k, d_qk=d_qk, page_size=int(k_cache.shape[1]))


def _fp8_cache(t: torch.Tensor, name: str, d_qk: int) -> None:
    """Shape/stride rules of an FP8 KV cache [num_blocks, page_size, 1, bytes_per_token]."""
    bpt = FP8_BYTES_PER_TOKEN[d_qk]
    _ndim(t, name, 4, f"[num_blocks, page_size, 1, {bpt}]")
    _dim_eq(t, name, 3, bpt, f"{bpt} bytes per token (last dim) for d_qk {d_qk}")
    _dim_eq(t, name, 2, 1, "one kv head (dim 2)")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have page size >= 1, got shape {_shape(t)}")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != bpt:
        raise ValueError(
            f"{name} must have stride(1) == {bpt} (tokens of a page back to back), "
            f"got strides {_strides(t)}"
        )


def validate_sparse_decode(
    q: Any,
    k_cache: Any,
    indices: Any,
    topk_length: Any,
    head_dim_v: Any,
    softmax_scale: Any,
    causal: Any,
    is_fp8_kvcache: Any,
    attn_sink: Any = None,
    extra_k_cache: Any = None,
    extra_indices_in_kvcache: Any = None,
    extra_topk_length: Any = None,
) -> DecodeSizes:
    """Sparse FP8 decode (``flash_mla_with_kvcache`` with ``indices`` given).

    ``block_table`` and ``cache_seqlens`` are unused by sparse decode and not
    checked.
    """
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        given, missing = (("extra_k_cache", "extra_indices_in_kvcache") if extra_k_cache is not None
                          else ("extra_indices_in_kvcache", "extra_k_cache"))
        raise ValueError(f"{missing} must be given together with {given}, got None")
    if extra_topk_length is not None and extra_k_cache is None:
        raise ValueError("extra_topk_length must be None when extra_k_cache is None, got a tensor")
    _tensors(
        [("q", q), ("k_cache", k_cache), ("indices", indices), ("topk_length", topk_length),
         ("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
         ("extra_indices_in_kvcache", extra_indices_in_kvcache),
         ("extra_topk_length", extra_topk_length)],
        optional=("topk_length", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
                  "extra_topk_length"),
    )
    _bool(is_fp8_kvcache, "is_fp8_kvcache")
    _bool(causal, "causal")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True for sparse decode (indices given), got False")
    if causal:
        raise ValueError("causal must be False for sparse decode (indices given), got True")

    _dtype(q, "q", (torch.bfloat16,))
    _dtype(k_cache, "k_cache", FP8_CACHE_DTYPES)
    _dtype(indices, "indices", (torch.int32,))
    if topk_length is not None:
        _dtype(topk_length, "topk_length", (torch.int32,))
    if attn_sink is not None:
        _dtype(attn_sink, "attn_sink", (torch.float32,))
    if extra_k_cache is not None:
        _dtype(extra_k_cache, "extra_k_cache", FP8_CACHE_DTYPES)
        _dtype(extra_indices_in_kvcache, "extra_indices_in_kvcache", (torch.int32,))
    if extra_topk_length is not None:
        _dtype(extra_topk_length, "extra_topk_length", (torch.int32,))

    for name, t in (("q", q), ("k_cache", k_cache), ("indices", indices),
                    ("topk_length", topk_length), ("attn_sink", attn_sink),
                    ("extra_k_cache", extra_k_cache),
                    ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                    ("extra_topk_length", extra_topk_length)):
        if t is not None:
            _last_dim_contiguous(t, name)

    _ndim(q, "q", 4, "[b, s_q, h_q, d_qk]")
    b, s_q, h_q, d_qk = _shape(q)
    if d_qk not in SPARSE_D_QK:
        raise ValueError(
            f"q must have head dim (last dim) 576 (V3.2 cache) or 512 (MODEL1 cache), "
            f"got shape {_shape(q)}"
        )
    _fp8_cache(k_cache, "k_cache", d_qk)
    _ndim(indices, "indices", 3, "[b, s_q, topk]")
    if _shape(indices)[:2] != (b, s_q):
        raise ValueError(
            f"indices must have shape [b, s_q, topk] = [{b}, {s_q}, topk] matching q, "
            f"got shape {_shape(indices)}"
        )
    if topk_length is not None:
        _int32_vector(topk_length, "topk_length", b, "b")
    if attn_sink is not None:
        _int32_vector(attn_sink, "attn_sink", h_q, "h_q")
    extra_topk = None
    extra_page_size = None
    if extra_k_cache is not None:
        _fp8_cache(extra_k_cache, "extra_k_cache", d_qk)
        _ndim(extra_indices_in_kvcache, "extra_indices_in_kvcache", 3, "[b, s_q, extra_topk]")
        if _shape(extra_indices_in_kvcache)[:2] != (b, s_q):
            raise ValueError(
                f"extra_indices_in_kvcache must have shape [b, s_q, extra_topk] = "
                f"[{b}, {s_q}, extra_topk] matching q, got shape {_shape(extra_indices_in_kvcache)}"
            )
        extra_topk = int(extra_indices_in_kvcache.shape[2])
        extra_page_size = int(extra_k_cache.shape[1])
    if extra_topk_length is not None:
        _int32_vector(extra_topk_length, "extra_topk_length", b, "b")

    _int(head_dim_v, "head_dim_v")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    _scale(softmax_scale, "softmax_scale", optional=False)
    return DecodeSizes(b=b, s_q=s_q, h_q=h_q, h_k=1, d_qk=d_qk, page_size=int(k_cache.shape[1]),
                       topk=int(indices.shape[2]), extra_page_size=extra_page_size,
                       extra_topk=extra_topk)


# --------------------------------------------------------------------------- sparse prefill

def validate_sparse_prefill(
    q: Any,
    kv: Any,
    indices: Any,
    sm_scale: Any,
    d_v: Any,
    attn_sink: Any = None,
    topk_length: Any = None,
) -> SparsePrefillSizes:
    """``flash_mla_sparse_fwd``. Index values are not checked (out-of-range ones are
    treated as invalid by the op itself, which needs no host sync)."""
    _tensors([("q", q), ("kv", kv), ("indices", indices), ("attn_sink", attn_sink),
              ("topk_length", topk_length)], optional=("attn_sink", "topk_length"))
    _dtype(q, "q", (torch.bfloat16,))
    _same_dtype(kv, "kv", q, "q")
    _dtype(indices, "indices", (torch.int32,))
    if attn_sink is not None:
        _dtype(attn_sink, "attn_sink", (torch.float32,))
    if topk_length is not None:
        _dtype(topk_length, "topk_length", (torch.int32,))
    for name, t in (("q", q), ("kv", kv), ("indices", indices), ("attn_sink", attn_sink),
                    ("topk_length", topk_length)):
        if t is not None:
            _last_dim_contiguous(t, name)

    _ndim(q, "q", 3, "[s_q, h_q, d_qk]")
    s_q, h_q, d_qk = _shape(q)
    if d_qk not in SPARSE_D_QK:
        raise ValueError(f"q must have head dim (last dim) 576 or 512, got shape {_shape(q)}")
    _ndim(kv, "kv", 3, "[s_kv, 1, d_qk]")
    _dim_eq(kv, "kv", 1, 1, "one kv head (dim 1)")
    _dim_eq(kv, "kv", 2, d_qk, "head dim (last dim) equal to q's")
    _ndim(indices, "indices", 3, "[s_q, 1, topk]")
    if _shape(indices)[:2] != (s_q, 1):
        raise ValueError(
            f"indices must have shape [s_q, 1, topk] = [{s_q}, 1, topk] matching q, "
            f"got shape {_shape(indices)}"
        )
    if attn_sink is not None:
        _int32_vector(attn_sink, "attn_sink", h_q, "h_q")
    if topk_length is not None:
        _int32_vector(topk_length, "topk_length", s_q, "s_q")

    _scale(sm_scale, "sm_scale", optional=False)
    _int(d_v, "d_v")
    if d_v != HEAD_DIM_V:
        raise ValueError(f"d_v must be {HEAD_DIM_V}, got {d_v}")
    return SparsePrefillSizes(s_q=s_q, h_q=h_q, d_qk=d_qk, s_kv=int(kv.shape[0]),
                              topk=int(indices.shape[2]))


# --------------------------------------------------------------------------- MHA prefill

def _mha_common(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                cu_q_name: str, cu_k_name: str,
                extra: Sequence[Tuple[str, Any, Any]] = ()) -> None:
    """Device, dtype and layout checks shared by every MHA prefill entry.

    ``extra`` lists further tensors as (name, tensor, dtype) where dtype is a tuple
    of allowed dtypes or the string "q" (same dtype as q); they must share q's
    device and have a contiguous last dim (except the fp32 lse view, whose layout
    rule is checked with its shape)."""
    _tensors([("q", q), ("k", k), ("v", v), (cu_q_name, cu_seqlens_q),
              (cu_k_name, cu_seqlens_k), *[(name, t) for name, t, _ in extra]])
    _dtype(q, "q", MHA_DTYPES)
    _same_dtype(k, "k", q, "q")
    _same_dtype(v, "v", q, "q")
    _dtype(cu_seqlens_q, cu_q_name, (torch.int32,))
    _dtype(cu_seqlens_k, cu_k_name, (torch.int32,))
    for name, t, dtype in extra:
        if dtype == "q":
            _same_dtype(t, name, q, "q")
        else:
            _dtype(t, name, dtype)
    for name, t in (("q", q), ("k", k), ("v", v), (cu_q_name, cu_seqlens_q),
                    (cu_k_name, cu_seqlens_k)):
        _last_dim_contiguous(t, name)
    for name, t, _ in extra:
        if name == "workspace":
            if not t.is_contiguous():
                raise ValueError(f"workspace must be contiguous, got strides {_strides(t)}")
        elif name != "lse":
            _last_dim_contiguous(t, name)


def _mha_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, cu_q_name: str, cu_k_name: str) -> MhaSizes:
    _ndim(q, "q", 3, "[total_q, h_q, d_qk]")
    _ndim(k, "k", 3, "[total_k, h_k, d_qk]")
    _ndim(v, "v", 3, "[total_k, h_k, d_v]")
    # Sizes stay as torch gives them (SymInts under torch.compile(dynamic=True), so
    # no guard ties the graph to one total length); only messages convert to int.
    total_q, h_q, d_qk = q.shape
    total_k, h_k, _ = k.shape
    d_v = v.shape[2]
    _dim_eq(k, "k", 2, d_qk, "head dim (last dim) equal to q's")
    if v.shape[0] != total_k or v.shape[1] != h_k:
        raise ValueError(
            f"v must have the rows and heads of k, [{int(total_k)}, {int(h_k)}, d_v], "
            f"got shape {_shape(v)}"
        )
    if (d_qk, d_v) not in MHA_HEAD_DIMS:
        raise ValueError(
            f"q and v head dims (d_qk, d_v) must be one of {list(MHA_HEAD_DIMS)}, "
            f"got ({int(d_qk)}, {int(d_v)})"
        )
    if h_k < 1 or h_q % h_k != 0:
        raise ValueError(f"k heads (dim 1) must divide q's {int(h_q)} heads, got shape {_shape(k)}")
    _ndim(cu_seqlens_q, cu_q_name, 1, "[batch + 1]")
    _ndim(cu_seqlens_k, cu_k_name, 1, "[batch + 1]")
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(
            f"{cu_q_name} must have at least 2 entries (one sequence), got shape {_shape(cu_seqlens_q)}"
        )
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(
            f"{cu_k_name} must have the length of {cu_q_name} ({int(cu_seqlens_q.shape[0])}), "
            f"got shape {_shape(cu_seqlens_k)}"
        )
    return MhaSizes(batch=cu_seqlens_q.shape[0] - 1, total_q=total_q, total_k=total_k,
                    h_q=h_q, h_k=h_k, d_qk=d_qk, d_v=d_v)


def _mha_fast(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, dropout_p: Any,
              softmax_scale: Any, causal: Any, deterministic: Any, is_varlen: Any) -> Optional[MhaSizes]:
    """The common valid call of validate_mha_prefill in a few expressions (it runs once
    per layer per step, and the full checks cost ~10-25 us of Python). Returns the
    sizes only when every condition of the full checks holds, stricter where that is
    simpler (plain int/float/bool scalars, unit last-dim strides); None means "run the
    full checks", which then raise the precise error or accept."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor)
            and isinstance(cu_q, tensor) and isinstance(cu_k, tensor)):
        return None
    if type(max_q) is not int or type(max_k) is not int or max_q < 0 or max_k < 0:
        return None
    if type(dropout_p) not in (float, int) or dropout_p != 0:
        return None
    if softmax_scale is not None and not (type(softmax_scale) is float
                                          and 0.0 < softmax_scale < math.inf):
        return None
    if type(causal) is not bool or type(deterministic) is not bool or type(is_varlen) is not bool:
        return None
    device, dtype = q.device, q.dtype
    if k.device != device or v.device != device or cu_q.device != device or cu_k.device != device:
        return None
    if (dtype not in MHA_DTYPES or k.dtype != dtype or v.dtype != dtype
            or cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32):
        return None
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or cu_q.dim() != 1 or cu_k.dim() != 1:
        return None
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cu_q.stride(0) != 1 or cu_k.stride(0) != 1:
        return None
    total_q, h_q, d_qk = q.shape
    total_k, h_k, d_k = k.shape
    d_v = v.shape[2]
    if d_k != d_qk or v.shape[0] != total_k or v.shape[1] != h_k:
        return None
    if (d_qk, d_v) not in MHA_HEAD_DIMS or h_k < 1 or h_q % h_k != 0:
        return None
    entries = cu_q.shape[0]
    if entries < 2 or cu_k.shape[0] != entries:
        return None
    return MhaSizes(batch=entries - 1, total_q=total_q, total_k=total_k, h_q=h_q, h_k=h_k,
                    d_qk=d_qk, d_v=d_v)


def validate_mha_prefill(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_qo: Any,
    cu_seqlens_kv: Any,
    max_seqlen_qo: Any,
    max_seqlen_kv: Any,
    dropout_p: Any,
    softmax_scale: Any,
    causal: Any,
    deterministic: Any,
    is_varlen: Any,
) -> MhaSizes:
    """``flash_attn_varlen_func`` (and the packed forms after splitting)."""
    sizes = _mha_fast(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
                      dropout_p, softmax_scale, causal, deterministic, is_varlen)
    if sizes is not None:
        return sizes
    _mha_common(q, k, v, cu_seqlens_qo, cu_seqlens_kv, "cu_seqlens_qo", "cu_seqlens_kv")
    sizes = _mha_shapes(q, k, v, cu_seqlens_qo, cu_seqlens_kv, "cu_seqlens_qo", "cu_seqlens_kv")
    _int(max_seqlen_qo, "max_seqlen_qo", minimum=0)
    _int(max_seqlen_kv, "max_seqlen_kv", minimum=0)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0 (dropout is not implemented), got {dropout_p!r}")
    _scale(softmax_scale, "softmax_scale", optional=True)
    _bool(causal, "causal")
    _bool(deterministic, "deterministic")
    _bool(is_varlen, "is_varlen")
    return sizes


def validate_packed_split(packed: Any, name: str, head_dim_qk: Any, parts: int) -> None:
    """``qkv`` / ``kv`` of the packed forms: [total, h, parts * d_qk + d_v] style
    tensors whose LAST dim is split at multiples of ``head_dim_qk``."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    _int(head_dim_qk, "head_dim_qk", minimum=1)
    _ndim(packed, name, 3, f"[total, h, {parts} * head_dim_qk + d_v]")
    if packed.shape[2] <= parts * head_dim_qk:
        raise ValueError(
            f"{name} must have a last dim larger than {parts} * head_dim_qk = "
            f"{parts * head_dim_qk} (the rest is v), got shape {_shape(packed)}"
        )


def _lse_view(lse: torch.Tensor, name: str, total_q: int, h_q: int) -> None:
    _ndim(lse, name, 2, "[total_q, h_q]")
    if _shape(lse) != (total_q, h_q):
        raise ValueError(f"{name} must have shape ({total_q}, {h_q}), got shape {_shape(lse)}")
    if total_q > 1 and lse.stride(0) != 1:
        raise ValueError(
            f"{name} must be the [total_q, h_q] transpose of a contiguous [h_q, total_q] buffer "
            f"(stride(0) == 1), got strides {_strides(lse)}"
        )


def _exact_shape(t: torch.Tensor, name: str, shape: Tuple[int, ...]) -> None:
    if _shape(t) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {_shape(t)}")


def _low_level_scalars(mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
                       max_seqlen_kv: Any, is_varlen: Any) -> None:
    _int(mask_mode_code, "mask_mode_code")
    if mask_mode_code not in (0, 1):
        raise ValueError(f"mask_mode_code must be 0 (no mask) or 1 (causal), got {mask_mode_code}")
    _scale(softmax_scale, "softmax_scale", optional=False)
    _int(max_seqlen_q, "max_seqlen_q", minimum=0)
    _int(max_seqlen_kv, "max_seqlen_kv", minimum=0)
    _bool(is_varlen, "is_varlen")


def validate_dense_prefill_fwd(
    workspace: Any, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any,
    out: Any, lse: Any, mask_mode_code: Any, softmax_scale: Any, max_seqlen_q: Any,
    max_seqlen_kv: Any, is_varlen: Any,
) -> MhaSizes:
    """``flash_mla.cuda.dense_prefill_fwd`` (preallocated out / lse)."""
    _mha_common(q, k, v, cu_seqlens_q, cu_seqlens_kv, "cu_seqlens_q", "cu_seqlens_kv",
                extra=[("workspace", workspace, (torch.uint8,)), ("out", out, "q"),
                       ("lse", lse, (torch.float32,))])
    sizes = _mha_shapes(q, k, v, cu_seqlens_q, cu_seqlens_kv, "cu_seqlens_q", "cu_seqlens_kv")
    _exact_shape(out, "out", (sizes.total_q, sizes.h_q, sizes.d_v))
    _lse_view(lse, "lse", sizes.total_q, sizes.h_q)
    _low_level_scalars(mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)
    return sizes


def validate_dense_prefill_bwd(
    workspace: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    cu_seqlens_q: Any, cu_seqlens_kv: Any, dq: Any, dk: Any, dv: Any, mask_mode_code: Any,
    softmax_scale: Any, max_seqlen_q: Any, max_seqlen_kv: Any, is_varlen: Any,
) -> MhaSizes:
    """``flash_mla.cuda.dense_prefill_bwd`` (preallocated dq / dk / dv)."""
    _mha_common(q, k, v, cu_seqlens_q, cu_seqlens_kv, "cu_seqlens_q", "cu_seqlens_kv",
                extra=[("workspace", workspace, (torch.uint8,)), ("dout", dout, "q"),
                       ("out", out, "q"), ("lse", lse, (torch.float32,)), ("dq", dq, "q"),
                       ("dk", dk, "q"), ("dv", dv, "q")])
    sizes = _mha_shapes(q, k, v, cu_seqlens_q, cu_seqlens_kv, "cu_seqlens_q", "cu_seqlens_kv")
    _exact_shape(dout, "dout", (sizes.total_q, sizes.h_q, sizes.d_v))
    _exact_shape(out, "out", (sizes.total_q, sizes.h_q, sizes.d_v))
    _lse_view(lse, "lse", sizes.total_q, sizes.h_q)
    _exact_shape(dq, "dq", (sizes.total_q, sizes.h_q, sizes.d_qk))
    _exact_shape(dk, "dk", (sizes.total_k, sizes.h_k, sizes.d_qk))
    _exact_shape(dv, "dv", (sizes.total_k, sizes.h_k, sizes.d_v))
    _low_level_scalars(mask_mode_code, softmax_scale, max_seqlen_q, max_seqlen_kv, is_varlen)
    return sizes
