"""The public API's names, parameter names/order/defaults and the FlashMLASchedMeta
dataclass match upstream FlashMLA (commit 9241ae3), so keyword callers of upstream
run unchanged; the 2026-09 generation's trailing keywords follow in its order."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flash_mla
import flash_mla.cuda

E = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD

# name -> [(parameter, default)], in order; E = no default.
EXPECTED = {
    "flash_mla_with_kvcache": [
        ("q", E), ("k_cache", E), ("block_table", E), ("cache_seqlens", E), ("head_dim_v", E),
        ("tile_scheduler_metadata", E), ("num_splits", None), ("softmax_scale", None),
        ("causal", False), ("is_fp8_kvcache", False), ("indices", None), ("attn_sink", None),
        ("extra_k_cache", None), ("extra_indices_in_kvcache", None), ("topk_length", None),
        ("extra_topk_length", None), ("enable_batch_invariant", False),
        # the 2026-09 generation's serving forks: the sparse caches' byte formats
        ("kv_format", None), ("extra_kv_format", None),
    ],
    "flash_mla_sparse_fwd": [
        ("q", E), ("kv", E), ("indices", E), ("sm_scale", E), ("d_v", 512), ("attn_sink", None),
        ("topk_length", None),
    ],
    "flash_attn_varlen_func": [
        ("q", E), ("k", E), ("v", E), ("cu_seqlens_qo", E), ("cu_seqlens_kv", E),
        ("max_seqlen_qo", E), ("max_seqlen_kv", E), ("dropout_p", 0.0), ("softmax_scale", None),
        ("causal", False), ("deterministic", False), ("is_varlen", True),
    ],
    "flash_attn_varlen_qkvpacked_func": [
        ("qkv", E), ("cu_seqlens", E), ("max_seqlen", E), ("head_dim_qk", E), ("dropout_p", 0.0),
        ("softmax_scale", None), ("causal", False), ("deterministic", False), ("is_varlen", True),
    ],
    "flash_attn_varlen_kvpacked_func": [
        ("q", E), ("kv", E), ("cu_seqlens_qo", E), ("cu_seqlens_kv", E), ("max_seqlen_qo", E),
        ("max_seqlen_kv", E), ("head_dim_qk", E), ("dropout_p", 0.0), ("softmax_scale", None),
        ("causal", False), ("deterministic", False), ("is_varlen", True),
    ],
}

EXPECTED_CUDA = {
    "dense_prefill_fwd": [
        "workspace", "q", "k", "v", "cu_seqlens_q", "cu_seqlens_kv", "out", "lse",
        "mask_mode_code", "softmax_scale", "max_seqlen_q", "max_seqlen_kv", "is_varlen",
    ],
    "dense_prefill_bwd": [
        "workspace", "dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_kv",
        "dq", "dk", "dv", "mask_mode_code", "softmax_scale", "max_seqlen_q", "max_seqlen_kv",
        "is_varlen",
    ],
}


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_function_signature(name):
    got = _params(getattr(flash_mla, name))
    want = [(n, d, POS) for n, d in EXPECTED[name]]
    assert got == want


def test_get_mla_metadata_takes_anything_and_returns_empty_meta():
    params = list(inspect.signature(flash_mla.get_mla_metadata).parameters.values())
    assert [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    meta, second = flash_mla.get_mla_metadata("cache_seqlens", 64, 1, num_heads_k=1)
    assert second is None
    assert meta == flash_mla.FlashMLASchedMeta(have_initialized=False, config=None,
                                               tile_scheduler_metadata=None, num_splits=None)


@pytest.mark.parametrize("name", sorted(EXPECTED_CUDA))
def test_low_level_cuda_signature(name):
    got = _params(getattr(flash_mla.cuda, name))
    assert got == [(n, E, POS) for n in EXPECTED_CUDA[name]]


def test_public_names():
    assert set(flash_mla.__all__) == set(EXPECTED) | {"get_mla_metadata", "FlashMLASchedMeta", "__version__"}
    for name in flash_mla.__all__:
        assert getattr(flash_mla, name) is not None
    assert flash_mla.__version__ == __import__("flash_mla._version", fromlist=["x"]).__version__
    with pytest.raises(AttributeError, match="no attribute 'not_a_function'"):
        flash_mla.not_a_function  # noqa: B018


def test_sched_meta_fields():
    fields = [(f.name, f.default) for f in dataclasses.fields(flash_mla.FlashMLASchedMeta)]
    assert fields == [("have_initialized", False), ("config", None),
                      ("tile_scheduler_metadata", None), ("num_splits", None)]
    config_fields = [f.name for f in dataclasses.fields(flash_mla.FlashMLASchedMeta.Config)]
    assert config_fields == ["b", "s_q", "h_q", "page_block_size", "h_k", "causal",
                             "is_fp8_kvcache", "topk", "extra_page_block_size", "extra_topk"]


def test_import_is_cheap_and_silent():
    # A fresh interpreter: importing the package must not import torch, load the
    # native library (or its loader) or warn.
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("error")
        import flash_mla
        assert "torch" not in sys.modules, "import flash_mla imported torch"
        assert "flash_mla._native" not in sys.modules, "import flash_mla imported the loader"
        assert "tvm_ffi" not in sys.modules, "import flash_mla imported tvm_ffi"
        flash_mla.FlashMLASchedMeta()
        print("ok", flash_mla.__version__)
    """)
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


# --------------------------------------------------------------------------- return contracts

def test_dense_decode_returns():
    import torch
    meta, _ = flash_mla.get_mla_metadata()
    q = torch.randn(2, 3, 4, 576).to(torch.float16)
    cache = torch.randn(2, 64, 2, 576).to(torch.float16)
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, torch.tensor([[0], [1]], dtype=torch.int32),
                                                torch.tensor([5, 64], dtype=torch.int32), 512, meta,
                                                causal=True)
    assert out.dtype == torch.float16 and out.shape == (2, 3, 4, 512)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 3) and lse.is_contiguous()


def test_sparse_decode_returns_lse_as_transposed_view():
    import torch
    from flash_mla import quant
    meta, _ = flash_mla.get_mla_metadata()
    q = torch.randn(2, 3, 4, 576).to(torch.bfloat16)
    cache = quant.quantize_kv_v32(torch.randn(1, 16, 1, 576))
    indices = torch.randint(-1, 16, (2, 3, 5), dtype=torch.int32)
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True,
                                                indices=indices)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 4, 512)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 3)
    assert lse.transpose(1, 2).is_contiguous() and lse.stride() == (12, 1, 4)


def test_sparse_prefill_returns():
    import torch
    q = torch.randn(6, 4, 512).to(torch.bfloat16)
    kv = torch.randn(9, 1, 512).to(torch.bfloat16)
    indices = torch.randint(-3, 12, (6, 1, 7), dtype=torch.int32)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, 0.05)
    assert out.dtype == torch.bfloat16 and out.shape == (6, 4, 512)
    for t in (max_logits, lse):
        assert t.dtype == torch.float32 and t.shape == (6, 4) and t.is_contiguous()
