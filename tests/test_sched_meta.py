"""FlashMLASchedMeta: filled by the first decode call, reusable with the same
configuration, and every changed config field raises an error naming it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import flash_mla
from flash_mla.sched_meta import FlashMLASchedMeta, bind_or_check_config

BASE = FlashMLASchedMeta.Config(b=2, s_q=1, h_q=16, page_block_size=64, h_k=1, causal=False,
                                is_fp8_kvcache=True, topk=64, extra_page_block_size=None, extra_topk=None)
CHANGED = {"b": 3, "s_q": 2, "h_q": 32, "page_block_size": 32, "h_k": 2, "causal": True,
           "is_fp8_kvcache": False, "topk": 128, "extra_page_block_size": 64, "extra_topk": 32}


def test_every_field_has_a_change_case():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(FlashMLASchedMeta.Config)}


def test_first_call_binds_then_same_config_is_accepted():
    meta = FlashMLASchedMeta()
    assert bind_or_check_config(meta, BASE) is True
    assert meta.have_initialized and meta.config == BASE
    assert bind_or_check_config(meta, dataclasses.replace(BASE)) is False


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changed_field_is_named(field):
    meta = FlashMLASchedMeta()
    bind_or_check_config(meta, BASE)
    changed = dataclasses.replace(BASE, **{field: CHANGED[field]})
    with pytest.raises(ValueError) as info:
        bind_or_check_config(meta, changed)
    message = str(info.value)
    assert message.startswith(f"tile_scheduler_metadata was initialised with {field}={getattr(BASE, field)!r}")
    assert f"this call has {field}={CHANGED[field]!r}" in message
    assert meta.config == BASE  # the recorded config is not overwritten


def test_initialised_without_config_is_rejected():
    meta = FlashMLASchedMeta(have_initialized=True)
    with pytest.raises(ValueError, match="have_initialized=True but no config"):
        bind_or_check_config(meta, BASE)


# --------------------------------------------------------------------------- through the API

def _dense(b=2, s_q=1, h_q=4, h_k=1, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    cache = torch.randn(2 * b, 64, h_k, 576, generator=g).to(torch.bfloat16)
    table = torch.arange(2 * b, dtype=torch.int32).view(b, 2)
    seqlens = torch.full((b,), 70, dtype=torch.int32)
    return dict(q=q, k_cache=cache, block_table=table, cache_seqlens=seqlens, head_dim_v=512,
                causal=causal)


def _sparse(b=2, page=64, topk=8, extra=None):
    q = torch.randn(b, 1, 4, 576).to(torch.bfloat16)
    from flash_mla import quant
    cache = quant.quantize_kv_v32(torch.randn(2, page, 1, 576))
    indices = torch.arange(b * topk, dtype=torch.int32).view(b, 1, topk) % (2 * page)
    args = dict(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                is_fp8_kvcache=True, indices=indices)
    if extra is not None:
        extra_page, extra_topk = extra
        args["extra_k_cache"] = quant.quantize_kv_v32(torch.randn(1, extra_page, 1, 576))
        args["extra_indices_in_kvcache"] = torch.zeros(b, 1, extra_topk, dtype=torch.int32)
    return args


def test_reuse_across_calls_with_new_values():
    meta, _ = flash_mla.get_mla_metadata()
    out1, _ = flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **_dense(seed=0))
    assert meta.have_initialized
    assert meta.config == FlashMLASchedMeta.Config(2, 1, 4, 64, 1, False, False, None, None, None)
    # reference path: configuration recorded, no schedule tensors
    assert meta.tile_scheduler_metadata is None and meta.num_splits is None
    out2, _ = flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **_dense(seed=1))
    assert not torch.equal(out1, out2)  # a different layer's data, same schedule holder


@pytest.mark.parametrize("first,second,field", [
    (_dense(), _dense(b=3), "b"),
    (_dense(), _dense(s_q=2), "s_q"),
    (_dense(), _dense(h_q=8), "h_q"),
    (_dense(h_q=4), _dense(h_q=4, h_k=2), "h_k"),
    (_dense(), _dense(causal=True), "causal"),
    (_dense(), _sparse(), "is_fp8_kvcache"),
    (_sparse(page=64), _sparse(page=32), "page_block_size"),
    (_sparse(topk=8), _sparse(topk=16), "topk"),
    (_sparse(extra=(64, 4)), _sparse(extra=(32, 4)), "extra_page_block_size"),
    (_sparse(extra=(64, 4)), _sparse(extra=(64, 8)), "extra_topk"),
    (_sparse(), _sparse(extra=(64, 4)), "extra_page_block_size"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_api_rejects_changed_config(first, second, field):
    meta, _ = flash_mla.get_mla_metadata()
    flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **first)
    with pytest.raises(ValueError, match=f"initialised with {field}="):
        flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **second)


def test_invalid_call_does_not_bind_the_holder():
    meta, _ = flash_mla.get_mla_metadata()
    bad = _dense()
    bad["head_dim_v"] = 256
    with pytest.raises(ValueError, match="head_dim_v must be 512"):
        flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **bad)
    assert not meta.have_initialized and meta.config is None
    flash_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **_dense(b=3))
    assert meta.config.b == 3
