"""flash_mla._decode_buffers on the CPU: the split count rule, the two row orders, and the
buffers each decode family's native call passes to its tvm-ffi entry (entry faked)."""
from __future__ import annotations

from typing import Any, List, Tuple

import pytest
import torch

from flash_mla import _native, dense_decode, sparse_decode
from flash_mla._decode_buffers import META_INTS, decode_buffers, run_schedule, split_count


def test_split_count_is_b_plus_parts_or_parts_when_batch_invariant():
    assert split_count(5, 3, batch_invariant=False) == 8
    assert split_count(5, 3, batch_invariant=True) == 3


@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("batch_invariant", [True, False])
def test_shapes_dtypes_and_row_order(heads_first, batch_invariant):
    q = torch.zeros(3, 2, 7, 576, dtype=torch.float16)
    buf = decode_buffers(q, 512, 4, batch_invariant, heads_first)
    rows = (7, 2) if heads_first else (2, 7)
    splits = 4 if batch_invariant else 7
    assert buf.out.shape == (3, 2, 7, 512) and buf.out.dtype == torch.float16
    assert buf.lse.shape == (3, *rows)
    assert buf.o_accum.shape == (splits, *rows, 512)
    assert buf.lse_accum.shape == (splits, *rows)
    for t in (buf.lse, buf.o_accum, buf.lse_accum):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert all(t.device == q.device for t in buf)


class _Recorder:
    """Stands in for flash_mla._native.function: records each call's arguments; answers
    env_allocator_available with ``allocates`` (unrecorded) and returns ``returns``."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.allocates = False
        self.returns: Any = None

    def function(self, name: str):
        if name == "env_allocator_available":
            return lambda tensor: self.allocates

        def call(*args):
            self.calls.append((name, args))
            return self.returns
        return call


@pytest.fixture
def rec(monkeypatch) -> _Recorder:
    recorder = _Recorder()
    monkeypatch.setattr(_native, "function", recorder.function)
    return recorder


# q [2, 3, 4, 576], a schedule of 5 parts and split offsets for b = 2
Q = torch.zeros(2, 3, 4, 576, dtype=torch.bfloat16)
META, SPLITS = torch.zeros(5, 8, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)


def test_dense_decode_passes_heads_first_buffers(rec):
    out, lse = dense_decode._run_native(Q, torch.zeros(1), torch.zeros(1), torch.zeros(1), 512,
                                        0.1, False, META, SPLITS, batch_invariant=False)
    (name, args), = rec.calls
    assert name == "dense_decode_fwd"
    o_accum, lse_accum, out_arg, lse_arg = args[6:10]
    assert o_accum.shape == (7, 4, 3, 512) and lse_accum.shape == (7, 4, 3)
    assert out_arg is out and lse_arg is lse and lse.shape == (2, 4, 3)


def test_dense_decode_lets_the_library_allocate_where_it_can(rec, monkeypatch):
    # With torch's allocator installed for the call, one entry allocates and returns
    # (out, lse); the Python side only unpacks them.
    rec.allocates = True
    rec.returns = ("out", "lse")
    monkeypatch.setattr(_native, "array_item", lambda: (lambda result, i: result[i]))
    k, table, lengths = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    out, lse = dense_decode._run_native(Q, k, table, lengths, 512, 0.1, True, META, SPLITS,
                                        batch_invariant=True)
    (name, args), = rec.calls
    assert name == "dense_decode_fwd_alloc"
    assert args[:6] == (Q, k, table, lengths, META, SPLITS) and args[6:] == (0.1, True, True)
    assert (out, lse) == ("out", "lse")


def test_sparse_decode_passes_queries_first_buffers(rec):
    cache = torch.zeros(1, 64, 1, 656, dtype=torch.uint8)
    out, lse = sparse_decode._run_native(Q, cache, None, None, None, None, None, None, 512, 0.1,
                                         "V32", None, True, META, SPLITS)
    (name, args), = rec.calls
    assert name == "sparse_decode_fwd"
    o_accum, lse_accum, out_arg, lse_arg = args[10:14]
    assert o_accum.shape == (5, 3, 4, 512) and lse_accum.shape == (5, 3, 4)
    assert out_arg is out and lse_arg.shape == (2, 3, 4)
    assert lse.shape == (2, 4, 3) and lse.data_ptr() == lse_arg.data_ptr()
    assert args[14:] == (0.1, "V32", "")


def test_run_schedule_sizes_the_schedule_from_the_lengths(rec):
    # Both families' schedules: [parts, 8] metadata and [b + 1] offsets, on the lengths'
    # device, filled by the library's schedule kernel from exactly those lengths.
    lengths = torch.tensor([5, 0, 130], dtype=torch.int32)
    metadata, offsets = run_schedule(lengths, 6, True)
    (name, args), = rec.calls
    assert name == "dense_decode_schedule"
    assert args[0] is lengths and args[1] is metadata and args[2] is offsets and args[3] is True
    assert metadata.shape == (6, META_INTS) and metadata.dtype == torch.int32
    assert offsets.shape == (4,) and offsets.dtype == torch.int32

