"""Backend choice: FLASH_MLA_BACKEND, CPU -> reference, `native` raises with the
reason, one warning per (op, device, reason), and the native call path of
flash_mla.cuda (workspace growth) with a stand-in native library."""
from __future__ import annotations

import warnings

import pytest
import torch

import flash_mla
import flash_mla.cuda
from flash_mla import _native, dispatch, reference

CUDA0 = torch.device("cuda:0")
CUDA1 = torch.device("cuda:1")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset_state()
    yield
    dispatch.reset_state()


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, dispatch.FlashMLAFallbackWarning)]


@pytest.mark.parametrize("value,expected", [("", "auto"), ("auto", "auto"), ("Native", "native"),
                                            (" reference ", "reference")])
def test_backend_setting_values(monkeypatch, value, expected):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    assert dispatch.backend_setting() == expected


def test_invalid_backend_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=r"FLASH_MLA_BACKEND must be one of auto, native, reference, got 'cudnn'"):
        dispatch.choose("dense_prefill_fwd", CUDA0)


def test_env_var_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(_native, "unavailable_reason", lambda op, device, features=None: None)
    assert dispatch.choose("dense_prefill_fwd", CUDA0) == "native"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose("dense_prefill_fwd", CUDA0) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "native")
    assert dispatch.choose("dense_prefill_fwd", CUDA0) == "native"


@pytest.mark.parametrize("setting", ["auto", "native", "reference"])
def test_cpu_always_reference_without_warning(monkeypatch, setting):
    monkeypatch.setenv(dispatch.ENV_VAR, setting)
    monkeypatch.setattr(_native, "unavailable_reason",
                        lambda *a, **k: pytest.fail("the loader must not be asked about CPU tensors"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dispatch.choose("dense_prefill_fwd", torch.device("cpu")) == "reference"
    assert not _fallback_warnings(record)
    assert dispatch.last_backend("dense_prefill_fwd") == "reference"
    assert dispatch.last_choice("dense_prefill_fwd") == ("reference", "cpu")


def test_native_setting_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "native")
    monkeypatch.setattr(_native, "unavailable_reason",
                        lambda op, device, features=None: "no kernel for sm_86 in this build (targets: 90a, 120f)")
    with pytest.raises(RuntimeError, match=r"FLASH_MLA_BACKEND=native but dense_prefill_bwd cannot run "
                                           r"natively on cuda:0: no kernel for sm_86 in this build"):
        dispatch.choose("dense_prefill_bwd", CUDA0, {"dtype": "bf16", "head_dims": [128, 128]})


def test_auto_warns_once_per_op_device_and_reason(monkeypatch):
    seen = []

    def fake_reason(op, device, features=None):
        seen.append((op, str(device), features))
        if features and features.get("head_dims") == [96, 96]:
            return "feature head_dims=[96, 96] not implemented natively"
        return "no native library built"

    monkeypatch.setattr(_native, "unavailable_reason", fake_reason)
    features = {"dtype": "bf16", "head_dims": [64, 64]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.choose("dense_prefill_fwd", CUDA0, features) == "reference"
        first = _fallback_warnings(record)
        assert len(first) == 1
        assert "dense_prefill_fwd on cuda:0" in str(first[0].message)
        assert "no native library built" in str(first[0].message)
        # another device: its own warning (state is per device, not process-wide)
        dispatch.choose("dense_prefill_fwd", CUDA1, features)
        # another op on the first device: its own warning
        dispatch.choose("dense_prefill_bwd", CUDA0, features)
        # another reason on the first device (other features): warned again, once
        odd = {"dtype": "bf16", "head_dims": [96, 96]}
        dispatch.choose("dense_prefill_fwd", CUDA0, odd)
        dispatch.choose("dense_prefill_fwd", CUDA0, odd)
    messages = [str(w.message) for w in _fallback_warnings(record)]
    assert len(messages) == 4, messages
    assert "cuda:1" in messages[1] and "dense_prefill_bwd" in messages[2]
    assert "head_dims=[96, 96]" in messages[3]
    assert seen[0] == ("dense_prefill_fwd", "cuda:0", features)  # features reach the loader


def test_loader_answer_is_cached_per_op_device_features(monkeypatch):
    calls = []

    def fake_reason(op, device, features=None):
        calls.append(op)
        return None

    monkeypatch.setattr(_native, "unavailable_reason", fake_reason)
    for _ in range(5):
        assert dispatch.choose("dense_prefill_fwd", CUDA0, {"dtype": "bf16", "head_dims": [64, 64]}) == "native"
    assert calls == ["dense_prefill_fwd"]
    dispatch.choose("dense_prefill_fwd", CUDA0, {"dtype": "fp16", "head_dims": [64, 64]})
    dispatch.choose("dense_prefill_fwd", CUDA1, {"dtype": "bf16", "head_dims": [64, 64]})
    assert len(calls) == 3
    dispatch.reset_state()
    dispatch.choose("dense_prefill_fwd", CUDA0, {"dtype": "bf16", "head_dims": [64, 64]})
    assert len(calls) == 4
    # a replaced loader is asked afresh (its answers may differ)
    monkeypatch.setattr(_native, "unavailable_reason", lambda *a, **k: "gone")
    with pytest.warns(dispatch.FlashMLAFallbackWarning, match="gone"):
        assert dispatch.choose("dense_prefill_fwd", CUDA0, {"dtype": "bf16", "head_dims": [64, 64]}) == "reference"


def test_reference_setting_is_silent(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    monkeypatch.setattr(_native, "unavailable_reason", lambda *a, **k: "no native library built")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dispatch.choose("sparse_decode", CUDA0) == "reference"
    assert not _fallback_warnings(record)


def test_op_without_python_binding_falls_back_with_its_reason(monkeypatch):
    # Every op has a kernel in this version: unbind one to stand for an op without one.
    monkeypatch.setattr(dispatch, "_NATIVE_BOUND_OPS",
                        frozenset(dispatch._NATIVE_BOUND_OPS - {"sparse_decode"}))
    monkeypatch.setattr(_native, "unavailable_reason", lambda *a, **k: None)
    with pytest.warns(dispatch.FlashMLAFallbackWarning, match="no native sparse_decode entry point"):
        assert dispatch.choose("sparse_decode", CUDA0) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "native")
    with pytest.raises(RuntimeError, match="no native sparse_decode entry point"):
        dispatch.choose("sparse_decode", CUDA0)


def test_unknown_op_rejected():
    with pytest.raises(ValueError, match="op must be one of .* got 'dense'"):
        dispatch.choose("dense", CUDA0)


def test_last_backend_none_before_any_call():
    assert dispatch.last_backend("sparse_prefill") is None


# --------------------------------------------------------------------------- native call path

class FakeNative:
    """Stands in for the native library: records calls, computes with the reference."""

    def __init__(self, fwd_bytes, bwd_bytes):
        self.bytes = {"dense_prefill_fwd_workspace_bytes": fwd_bytes,
                      "dense_prefill_bwd_workspace_bytes": bwd_bytes}
        self.calls = []

    def function(self, name):
        if name in self.bytes:
            def size(*dims):
                self.calls.append((name, dims))
                return self.bytes[name]
            return size
        if name == "dense_prefill_fwd":
            def fwd(ws, q, k, v, cu_q, cu_k, out, lse, mask, scale, max_q, max_k, is_varlen):
                self.calls.append((name, ws, mask, scale, max_q, max_k, is_varlen))
                o, l = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, scale, mask == 1)
                out.copy_(o)
                lse.copy_(l)
            return fwd
        if name in ("dense_prefill_bwd", "dense_prefill_bwd_deterministic"):
            def bwd(ws, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, mask, scale, max_q, max_k, is_varlen):
                self.calls.append((name, ws, mask, scale, max_q, max_k, is_varlen))
                for dst, src in zip((dq, dk, dv), reference.mha_prefill_bwd(
                        dout, q, k, v, out, lse, cu_q, cu_k, scale, mask == 1)):
                    dst.copy_(src)
            return bwd
        raise AssertionError(f"unexpected native function {name}")


def _mha_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(9, 4, 64, generator=g).to(torch.bfloat16)
    k = torch.randn(11, 2, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(11, 2, 64, generator=g).to(torch.bfloat16)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.fixture
def fake_native(monkeypatch):
    fake = FakeNative(fwd_bytes=1000, bwd_bytes=5000)
    monkeypatch.setattr(_native, "function", fake.function)
    # CPU tensors never reach the native path by design; force it for this test.
    monkeypatch.setattr(dispatch, "choose", lambda op, device, features=None: dispatch.NATIVE)
    return fake


def test_low_level_grows_a_small_workspace(fake_native):
    q, k, v, cu_q, cu_k = _mha_inputs()
    out = torch.empty(9, 4, 64, dtype=torch.bfloat16)
    lse = torch.empty(4, 9).t()
    small = torch.empty(10, dtype=torch.uint8)
    flash_mla.cuda.dense_prefill_fwd(small, q, k, v, cu_q, cu_k, out, lse, 1, 0.125, 5, 6, True)
    size_call = fake_native.calls[0]
    assert size_call == ("dense_prefill_fwd_workspace_bytes", (2, 9, 11, 4, 2, 64, 64))
    name, ws, mask, scale, max_q, max_k, is_varlen = fake_native.calls[1]
    assert name == "dense_prefill_fwd" and ws is not small and ws.numel() == 1000
    assert (mask, scale, max_q, max_k, is_varlen) == (1, 0.125, 5, 6, True)
    ref_out, ref_lse = reference.mha_prefill_fwd(q, k, v, cu_q, cu_k, 0.125, True)
    assert torch.equal(out, ref_out.to(torch.bfloat16)) and torch.equal(lse, ref_lse)


def test_low_level_keeps_a_large_workspace(fake_native):
    q, k, v, cu_q, cu_k = _mha_inputs()
    out = torch.empty(9, 4, 64, dtype=torch.bfloat16)
    lse = torch.empty(4, 9).t()
    big = torch.empty(1 << 16, dtype=torch.uint8)
    flash_mla.cuda.dense_prefill_fwd(big, q, k, v, cu_q, cu_k, out, lse, 0, 0.125, 5, 6, False)
    assert fake_native.calls[1][1] is big
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    flash_mla.cuda.dense_prefill_bwd(big, torch.ones_like(out), q, k, v, out, lse, cu_q, cu_k, dq, dk,
                                     dv, 0, 0.125, 5, 6, False)
    assert fake_native.calls[2] == ("dense_prefill_bwd_workspace_bytes", (2, 9, 11, 4, 2, 64, 64))
    assert fake_native.calls[3][1] is big and fake_native.calls[3][2] == 0
    # the workspace size of a problem size is asked once per process (cached)
    flash_mla.cuda.dense_prefill_fwd(big, q, k, v, cu_q, cu_k, out, lse, 0, 0.125, 5, 6, False)
    assert [c[0] for c in fake_native.calls[4:]] == ["dense_prefill_fwd"]


def test_public_mha_uses_native_path_forward_and_backward(fake_native):
    q, k, v, cu_q, cu_k = _mha_inputs()
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = flash_mla.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True)
    out.sum().backward()
    names = [c[0] for c in fake_native.calls]
    assert names == ["dense_prefill_fwd_workspace_bytes", "dense_prefill_fwd",
                     "dense_prefill_bwd_workspace_bytes", "dense_prefill_bwd"]
    assert fake_native.calls[1][1].numel() == 1000 and fake_native.calls[3][1].numel() == 5000
    assert lse.stride(0) == 1 and q.grad is not None


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_picks_the_turn_taking_backward(fake_native, deterministic):
    q, k, v, cu_q, cu_k = _mha_inputs()
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = flash_mla.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True,
                                              deterministic=deterministic)
    out.sum().backward()
    want = "dense_prefill_bwd_deterministic" if deterministic else "dense_prefill_bwd"
    assert [c[0] for c in fake_native.calls][-1] == want


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_gpu_low_level_small_workspace_matches_large():
    """flash_mla.cuda with an undersized workspace (grown internally) gives the same
    bits as with a generous one; the backend is native where the library serves it."""
    dev = torch.device("cuda", torch.cuda.current_device())
    q, k, v, cu_q, cu_k = (t.to(dev) for t in _mha_inputs())
    features = {"dtype": "bf16", "head_dims": [64, 64]}
    expect = "native" if _native.unavailable_reason("dense_prefill_fwd", dev, features) is None else "reference"
    results = []
    for ws_bytes in (1, 256 << 20):
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        out = torch.empty(9, 4, 64, dtype=torch.bfloat16, device=dev)
        lse = torch.empty(4, 9, device=dev).t()
        flash_mla.cuda.dense_prefill_fwd(ws, q, k, v, cu_q, cu_k, out, lse, 1, 0.125, 5, 6, True)
        assert dispatch.last_backend("dense_prefill_fwd") == expect
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        flash_mla.cuda.dense_prefill_bwd(ws, torch.ones_like(out), q, k, v, out, lse, cu_q, cu_k,
                                         dq, dk, dv, 1, 0.125, 5, 6, True)
        results.append((out, lse, dk, dv))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_an_unbound_op_says_this_version_has_no_kernel_not_rebuild(monkeypatch):
    # The loader would say "not in this native build; rebuild with FLASH_MLA_KERNELS=all",
    # which no rebuild of this version can satisfy for an op that has no kernel yet.
    # Every op has a kernel in this version: unbind one to stand for an op without one.
    monkeypatch.setattr(dispatch, "_NATIVE_BOUND_OPS",
                        frozenset(dispatch._NATIVE_BOUND_OPS - {"sparse_decode"}))
    unbound = sorted(set(dispatch.OPS) - set(dispatch._NATIVE_BOUND_OPS) - {"combine"})
    assert unbound == ["sparse_decode"]
    monkeypatch.setattr(_native, "unavailable_reason",
                        lambda *a, **k: "op is not in this native build; rebuild")
    for op in unbound:
        reason = dispatch.native_unavailable_reason(op, CUDA0)
        assert reason == f"this version of flash_mla has no native {op} entry point to call"


@pytest.mark.parametrize("family,shape", [("dense_decode", (1, 1, 256, 576)),
                                          ("sparse_prefill", (4, 256, 576))])
def test_head_counts_past_the_kernels_fall_back_with_the_reason(monkeypatch, family, shape):
    # The kernels serve h_q 1..128 (their capability tables say so); a call with more
    # heads runs on the reference with the reason, instead of failing in the native entry.
    import importlib

    module = importlib.import_module(f"flash_mla.{family}")
    op = module.OP
    q = torch.zeros(shape, dtype=torch.bfloat16)
    features = module._features(q)
    assert features["h_q"] == 256
    table = {"dtype": ["bf16", "fp16"], "d_qk": [512, 576], "h_q": list(range(1, 129))}
    info = {"version": "0", "cuda_version": "13.0", "targets": ["90a"], "ptx": None,
            "kernels": [], "ops": {op: {k: table[k] for k in features}}}
    _native._reset_for_tests()
    monkeypatch.setattr(_native, "_state", {"module": object(), "info": info, "path": "x.so"})
    monkeypatch.setattr(_native, "_device_capability", lambda device: (0, (9, 0), "cuda:0"))
    reason = dispatch.native_unavailable_reason(op, CUDA0, features)
    assert reason is not None and "h_q=256" in reason
    features["h_q"] = 128
    assert dispatch.native_unavailable_reason(op, CUDA0, features) is None
