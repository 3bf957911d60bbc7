"""The repeat-call path of dense decode (flash_mla._repeat_call) on the CPU, with the
native entries faked and the dispatch forced to native: the first call is validated and
records; a call with the same layouts and scalars skips validation and passes the stored
schedule; any difference takes the full path, which raises exactly what a fresh holder's
call raises."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import flash_mla
from flash_mla import _native, _repeat_call, dense_decode, sparse_decode
from flash_mla import dispatch as _dispatch

B, S_Q, H_Q, D_QK, D_V, PAGE = 2, 1, 16, 576, 512, 64
PARTS = 3


class _FakeNative:
    """Stands in for the library: a fixed part count, a zero schedule, a decode that
    writes zeros and records its arguments; with ``allocates``, the allocating entry
    (returns zero out and lse of the shapes it was asked for) instead of the one that
    takes buffers, and its repeat twin, which compares a recorded layout key first."""

    def __init__(self, allocates: bool) -> None:
        self.fwd_calls: List[Tuple[Any, ...]] = []
        self.allocates = allocates

    def function(self, name: str) -> Callable:
        if name == "env_allocator_available":
            return lambda tensor: self.allocates
        if name == "dense_decode_fwd_alloc":
            assert self.allocates, "the allocating entry was called without the allocator"

            def fwd_alloc(q, k_cache, block_table, cache_seqlens, metadata, splits, scale,
                          causal, invariant):
                self.fwd_calls.append((q, k_cache, block_table, cache_seqlens, metadata,
                                       splits, scale, causal, invariant))
                b, s_q, h_q, _ = q.shape
                return (torch.zeros(b, s_q, h_q, D_V, dtype=q.dtype),
                        torch.zeros(b, h_q, s_q))
            return fwd_alloc
        if name == "dense_decode_layout_key":
            return _repeat_call.layout_key
        if name == "dense_decode_fwd_repeat":
            fwd_alloc = self.function("dense_decode_fwd_alloc")

            def fwd_repeat(q, k_cache, block_table, cache_seqlens, *rest):
                # the library's comparison, emulated with the Python key it mirrors
                if _repeat_call.layout_key(q, k_cache, block_table, cache_seqlens) != rest[-1]:
                    return None
                return fwd_alloc(q, k_cache, block_table, cache_seqlens, *rest[:-1])
            return fwd_repeat
        if name == "dense_decode_num_parts":
            return lambda *args: PARTS
        if name == "dense_decode_schedule":
            def schedule(lengths, metadata, split_offsets, invariant):
                metadata.zero_()
                split_offsets.zero_()
            return schedule
        if name == "dense_decode_fwd":
            assert not self.allocates, "buffers were allocated in Python with the allocator"

            def fwd(*args):
                self.fwd_calls.append(args)
                args[8].zero_()
                args[9].zero_()
            return fwd
        raise AssertionError(f"unexpected native function {name}")


def _install(monkeypatch, fake) -> None:
    """Puts `fake` in the library's place and makes the dispatch pick native for CPU tensors
    (the reference only under FLASH_MLA_BACKEND=reference)."""
    monkeypatch.setattr(_native, "function", fake.function)
    monkeypatch.setattr(_native, "array_item", lambda: (lambda result, i: result[i]))
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)

    def choose(op: str, device: Any, features: Any = None) -> str:
        backend = (_dispatch.REFERENCE if _dispatch.backend_setting() == _dispatch.REFERENCE
                   else _dispatch.NATIVE)
        _dispatch.record_choice(op, (backend, str(device)))
        return backend

    monkeypatch.setattr(_dispatch, "choose", choose)


@pytest.fixture(params=[False, True], ids=["python-buffers", "library-allocates"])
def native(monkeypatch, request) -> _FakeNative:
    fake = _FakeNative(allocates=request.param)
    _install(monkeypatch, fake)
    return fake


def _count_validations(monkeypatch, family) -> List[int]:
    """Counts calls of the family's validate (the full path)."""
    count = [0]
    original = family.validate

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(family, "validate", counting)
    return count


@pytest.fixture
def validations(monkeypatch) -> List[int]:
    return _count_validations(monkeypatch, dense_decode)


def _inputs(dtype=torch.bfloat16) -> Dict[str, Any]:
    return dict(q=torch.zeros(B, S_Q, H_Q, D_QK, dtype=dtype),
                k_cache=torch.zeros(4, PAGE, 1, D_QK, dtype=dtype),
                block_table=torch.zeros(B, 2, dtype=torch.int32),
                cache_seqlens=torch.full((B,), 70, dtype=torch.int32))


def _call(meta, args: Dict[str, Any], **kwargs: Any):
    return flash_mla.flash_mla_with_kvcache(args["q"], args["k_cache"], args["block_table"],
                                            args["cache_seqlens"], D_V, meta, **kwargs)


def test_repeat_skips_validation_and_reuses_the_schedule(native, validations):
    args = _inputs()
    meta = flash_mla.get_mla_metadata()[0]
    first = _call(meta, args, causal=True)
    assert validations[0] == 1 and dense_decode.repeat_record(meta) is not None
    # new data, same layouts: the repeat path
    args2 = {k: v.clone() for k, v in args.items()}
    second = _call(meta, args2, causal=True)
    assert validations[0] == 1, "the repeat call ran the full validation"
    assert len(native.fwd_calls) == 2
    call = native.fwd_calls[1]
    assert call[0] is args2["q"] and call[3] is args2["cache_seqlens"]
    assert call[4] is meta.tile_scheduler_metadata and call[5] is meta.num_splits
    scalars = call[6:] if native.allocates else call[10:]
    assert scalars[0] == pytest.approx(D_QK ** -0.5) and scalars[1] is True
    if native.allocates:
        assert scalars[2] is False  # enable_batch_invariant sizes the partials
    else:  # buffers sized as the full path's
        for full, repeat in zip(native.fwd_calls[0][6:10], call[6:10]):
            assert (full.shape, full.dtype) == (repeat.shape, repeat.dtype)
    # fresh outputs with the documented shapes
    assert second[0] is not first[0] and second[1] is not first[1]
    assert second[0].shape == (B, S_Q, H_Q, D_V) and second[0].dtype == torch.bfloat16
    assert second[1].shape == (B, H_Q, S_Q) and second[1].dtype == torch.float32
    assert _dispatch.last_backend("dense_decode") == _dispatch.NATIVE


def _noncontiguous_q(args):
    wide = torch.zeros(B, S_Q, H_Q, 2 * D_QK, dtype=args["q"].dtype)
    return dict(args, q=wide[..., ::2])


def _wider_table(args):
    return dict(args, block_table=torch.zeros(B, 3, dtype=torch.int32))


def _fp16(args):
    return _inputs(torch.float16)


def _q_only_fp16(args):
    return dict(args, q=args["q"].half())


def _parameter_q(args):
    return dict(args, q=torch.nn.Parameter(args["q"], requires_grad=False))


# (what changes, how the inputs change, the call's keywords, whether the full path accepts it)
_CHANGES = [
    ("softmax_scale", None, dict(softmax_scale=0.5), True),
    ("softmax_scale as int", None, dict(softmax_scale=1), True),
    ("causal as int", None, dict(causal=1), True),
    ("wider block_table", _wider_table, {}, True),
    ("q as a Parameter", _parameter_q, {}, True),
    ("negative softmax_scale", None, dict(softmax_scale=-1.0), False),
    ("non-contiguous q", _noncontiguous_q, {}, False),
    ("q fp16, cache bf16", _q_only_fp16, {}, False),
    ("is_fp8_kvcache", None, dict(is_fp8_kvcache=True), False),
    ("attn_sink", None, dict(attn_sink=torch.zeros(H_Q)), False),
    ("kv_format", None, dict(kv_format="V32"), False),
    ("num_splits", None, dict(num_splits=torch.zeros(1)), False),
]


@pytest.mark.parametrize("what,change,kwargs,accepted", _CHANGES, ids=[c[0] for c in _CHANGES])
def test_any_difference_takes_the_full_path(native, validations, what, change, kwargs,
                                            accepted):
    args = _inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _call(meta, args, causal=True)
    changed = change(args) if change is not None else args
    call_kwargs = dict(dict(causal=True), **kwargs)
    if accepted:
        _call(meta, changed, **call_kwargs)
        assert validations[0] == 2, f"{what}: the repeat path took a call that differs"
        return
    # the same exception, with the same message, as a fresh holder's call
    with pytest.raises((TypeError, ValueError)) as fresh:
        _call(flash_mla.get_mla_metadata()[0], changed, **call_kwargs)
    with pytest.raises(type(fresh.value)) as repeated:
        _call(meta, changed, **call_kwargs)
    assert str(repeated.value) == str(fresh.value)


def test_a_config_change_still_raises(native):
    args = _inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _call(meta, args, causal=True)
    with pytest.raises(ValueError, match="causal"):
        _call(meta, args, causal=False)
    with pytest.raises(ValueError, match="enable_batch_invariant"):
        _call(meta, args, causal=True, enable_batch_invariant=True)


def test_backend_change_reaches_the_dispatch(native, validations, monkeypatch):
    args = _inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _call(meta, args)
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    _call(meta, args)
    assert validations[0] == 2
    assert _dispatch.last_backend("dense_decode") == _dispatch.REFERENCE
    assert len(native.fwd_calls) == 1


def test_no_record_on_the_reference_or_for_other_scale_types(native, monkeypatch):
    args = _inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _call(meta, args, softmax_scale=1)  # an int scale: valid, but not repeatable
    assert dense_decode.repeat_record(meta) is None
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    meta = flash_mla.get_mla_metadata()[0]
    _call(meta, args)
    assert dense_decode.repeat_record(meta) is None


def test_layout_key_refuses_non_tensors():
    t = torch.zeros(2, 3)
    assert _repeat_call.layout_key(t, t) == (t.shape, t.stride(), t.dtype, t.device) * 2
    assert _repeat_call.layout_key(t, None) == (t.shape, t.stride(), t.dtype, t.device, None)
    assert _repeat_call.layout_key(t, 3) is None
    assert _repeat_call.layout_key(torch.nn.Parameter(t)) is None


# --------------------------------------------------------------------------- sparse decode

class _FakeSparseNative:
    """The library for sparse decode: a fixed part count, a zero schedule, the allocating
    decode entry (records its arguments, returns zero out and lse [b, s_q, h_q])."""

    def __init__(self, allocates: bool) -> None:
        self.allocates = allocates
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []

    def function(self, name: str) -> Callable:
        if name == "env_allocator_available":
            return lambda tensor: self.allocates
        if name == "sparse_decode_num_parts":
            return lambda *args: PARTS
        if name == "dense_decode_schedule":
            return lambda lengths, metadata, offsets, invariant: (metadata.zero_(),
                                                                  offsets.zero_())

        def entry(*args):
            self.calls.append((name, args))
            q = args[0]
            b, s_q, h_q, _ = q.shape
            if name == "sparse_decode_fwd_alloc":
                return (torch.zeros(b, s_q, h_q, D_V, dtype=q.dtype), torch.zeros(b, s_q, h_q))
            assert name == "sparse_decode_fwd", name
        return entry


@pytest.fixture(params=[False, True], ids=["python-buffers", "library-allocates"])
def sparse_native(monkeypatch, request) -> _FakeSparseNative:
    fake = _FakeSparseNative(allocates=request.param)
    _install(monkeypatch, fake)
    return fake


@pytest.fixture
def sparse_validations(monkeypatch) -> List[int]:
    return _count_validations(monkeypatch, sparse_decode)


def _sparse_inputs() -> Dict[str, Any]:
    return dict(q=torch.zeros(B, S_Q, H_Q, D_QK, dtype=torch.bfloat16),
                k_cache=torch.zeros(3, 64, 1, 656, dtype=torch.uint8),
                indices=torch.zeros(B, S_Q, 40, dtype=torch.int32),
                topk_length=torch.full((B,), 30, dtype=torch.int32))


def _sparse_call(meta, args: Dict[str, Any], **kwargs: Any):
    return flash_mla.flash_mla_with_kvcache(args["q"], args["k_cache"], None, None, D_V, meta,
                                            indices=args["indices"],
                                            topk_length=args["topk_length"], **kwargs)


def test_sparse_repeat_skips_validation(sparse_native, sparse_validations):
    args = _sparse_inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _sparse_call(meta, args, kv_format="V32")
    recorded = sparse_decode.repeat_record(meta)
    assert (recorded is not None) == sparse_native.allocates
    out, lse = _sparse_call(meta, {k: v.clone() for k, v in args.items()}, kv_format="V32")
    assert sparse_validations[0] == (1 if sparse_native.allocates else 2)
    name, call = sparse_native.calls[-1]
    if sparse_native.allocates:
        assert name == "sparse_decode_fwd_alloc"
        assert call[8] is meta.tile_scheduler_metadata and call[9] is meta.num_splits
        assert call[11:] == ("V32", "", False)
    assert out.shape == (B, S_Q, H_Q, D_V)
    assert lse.shape == (B, H_Q, S_Q) and lse.transpose(1, 2).is_contiguous()
    assert _dispatch.last_backend("sparse_decode") == _dispatch.NATIVE


def _misaligned_cache(args):
    raw = torch.zeros(3 * 64 * 656 + 16, dtype=torch.uint8)
    return dict(args, k_cache=raw[1:1 + 3 * 64 * 656].view(3, 64, 1, 656))


_SPARSE_CHANGES = [
    ("kv_format detected", None, dict(kv_format=None), True),
    ("softmax_scale", None, dict(kv_format="V32", softmax_scale=0.25), True),
    ("is_fp8_kvcache as int", None, dict(kv_format="V32", is_fp8_kvcache=1), True),
    ("misaligned cache", _misaligned_cache, dict(kv_format="V32"), False),
    ("causal", None, dict(kv_format="V32", causal=True), False),
    ("kv_format V4", None, dict(kv_format="V4"), False),
    ("head_dim_v", None, dict(kv_format="V32", head_dim_v=256), False),
]


@pytest.mark.parametrize("what,change,kwargs,accepted", _SPARSE_CHANGES,
                         ids=[c[0] for c in _SPARSE_CHANGES])
def test_sparse_differences_take_the_full_path(sparse_native, sparse_validations, what, change,
                                               kwargs, accepted):
    args = _sparse_inputs()
    meta = flash_mla.get_mla_metadata()[0]
    _sparse_call(meta, args, kv_format="V32")
    changed = change(args) if change is not None else args
    call_kwargs = dict(kwargs)
    head_dim_v = call_kwargs.pop("head_dim_v", D_V)

    def call(holder):
        return flash_mla.flash_mla_with_kvcache(
            changed["q"], changed["k_cache"], None, None, head_dim_v, holder,
            indices=changed["indices"], topk_length=changed["topk_length"], **call_kwargs)

    if accepted:
        call(meta)
        assert sparse_validations[0] == 2, f"{what}: the repeat path took a call that differs"
        return
    with pytest.raises((TypeError, ValueError)) as fresh:
        call(flash_mla.get_mla_metadata()[0])
    with pytest.raises(type(fresh.value)) as repeated:
        call(meta)
    assert str(repeated.value) == str(fresh.value)
