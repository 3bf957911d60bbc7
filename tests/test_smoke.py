"""`python -m flash_mla.smoke` in-process, on the CPU: its expectation of where each op runs
(decided from the environment and the library's build info, never from the functions
under test), planted fallbacks that must fail with the reason, numerics that must fail,
and the plain statement that no GPU kernel ran."""
from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import _native, smoke

ROWS = ["dense_prefill_fwd out", "dense_prefill_fwd lse", "dense_prefill_bwd dq", "dense_prefill_bwd dk",
        "dense_prefill_bwd dv", "dense_decode out", "dense_decode lse", "sparse_prefill out",
        "sparse_prefill lse", "sparse_prefill max_logits", "sparse_decode out", "sparse_decode lse"]
MHA_OPS = ("dense_prefill_fwd", "dense_prefill_bwd")
NATIVE_OPS = MHA_OPS + ("dense_decode", "sparse_prefill", "sparse_decode")
INFO_SM90 = {"version": "0.1.0", "cuda_version": "13.0", "targets": ["80", "90a"], "ptx": None,
             "ops": {"dense_prefill_fwd": {}, "dense_prefill_bwd": {}, "combine": {},
                     "dense_decode": {}, "dense_decode_schedule": {}, "sparse_prefill": {},
                     "sparse_decode": {}},
             "kernels": []}


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU-only machine as the smoke test sees it, whatever this one has."""
    monkeypatch.delenv("FLASH_MLA_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _lines(text: str, prefix: str):
    return [line for line in text.splitlines() if line.startswith(prefix + " ")]


# --------------------------------------------------------------------------- plan()

def _plan(capability, info=INFO_SM90, load_error=None, setting="auto"):
    return smoke.plan(smoke.SMOKE_OPS, capability=capability, setting=setting, info=info,
                      load_error=load_error)


def test_plan_without_a_gpu_expects_the_reference_and_says_why():
    p = _plan(None)
    assert {e.backend for e in p.expected.values()} == {"reference"}
    assert p.library_failure is None and p.no_gpu_reason == "no CUDA device visible"


def test_plan_backend_reference_forces_the_reference_on_a_gpu():
    p = _plan((12, 0), info=None, load_error="no library", setting="reference")
    assert {e.backend for e in p.expected.values()} == {"reference"}
    assert p.library_failure is None  # a missing library is no failure when the reference is forced
    assert "FLASH_MLA_BACKEND=reference" in p.no_gpu_reason


def test_plan_on_a_served_gpu_expects_native_for_the_native_kernel_ops():
    p = _plan((9, 0))
    assert p.library_failure is None and p.no_gpu_reason is None
    for op in NATIVE_OPS:
        assert p.expected[op].backend == "native" and "90a" in p.expected[op].why


def test_plan_family_cubin_and_ptx_count_as_runnable():
    info = dict(INFO_SM90, targets=["120f"])
    assert _plan((12, 1), info=info).library_failure is None
    info = dict(INFO_SM90, targets=["80"], ptx="80")
    assert _plan((9, 0), info=info).library_failure is None


def test_plan_library_without_the_gpus_arch_fails_naming_targets():
    p = _plan((12, 0))  # planted: a library built for sm_80 / sm_90a on an sm_120 GPU
    assert "sm_120" in p.library_failure and "80, 90a" in p.library_failure
    for op in NATIVE_OPS:
        assert p.expected[op].backend == "native"


def test_plan_missing_library_on_a_gpu_fails_with_the_loaders_reason():
    p = _plan((9, 0), info=None, load_error="planted: libflash_mla_native.so: cannot open")
    assert "planted: libflash_mla_native.so: cannot open" in p.library_failure
    for op in NATIVE_OPS:
        assert p.expected[op].backend == "native"


def test_plan_op_left_out_of_a_developer_build_expects_the_reference():
    info = dict(INFO_SM90, ops={"dense_prefill_fwd": {}})
    p = _plan((9, 0), info=info)
    assert p.expected["dense_prefill_fwd"].backend == "native"
    bwd = p.expected["dense_prefill_bwd"]
    assert bwd.backend == "reference" and "not in this native build" in bwd.why


# --------------------------------------------------------------------------- main()

def test_smoke_main_passes_on_cpu_and_says_no_gpu_kernel_ran(capsys, no_gpu):
    assert smoke.main(["--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].startswith("native library: ")
    header = next(line for line in text.splitlines() if line.startswith("op "))
    for column in smoke.HEADERS:
        assert column in header
    for row in ROWS:
        lines = _lines(text, row)
        assert len(lines) == 1, f"row {row!r} missing from:\n{text}"
        assert "reference (no CUDA device visible)" in lines[0] and lines[0].endswith("PASS"), lines[0]
    assert all(" plain x2 " in _lines(text, r)[0] for r in ROWS[:5] if not r.endswith("lse"))
    assert "no GPU kernel was exercised (no CUDA device visible)" in text
    assert f"smoke: {len(ROWS)}/{len(ROWS)} passed" in text


def test_smoke_with_backend_reference_says_so(capsys, no_gpu, monkeypatch):
    monkeypatch.setenv("FLASH_MLA_BACKEND", "reference")
    assert smoke.main(["--device", "cpu"]) == 0
    assert "no GPU kernel was exercised (FLASH_MLA_BACKEND=reference forces the reference)" in \
        capsys.readouterr().out


def test_planted_library_without_the_gpus_arch_fails_with_the_reason(capsys, no_gpu, monkeypatch):
    # The smoke believes an sm_120 GPU is visible and the library was built for sm_80/90a:
    # every op with a native kernel must fail (it falls back), the library row too, and
    # the exit is 1.
    monkeypatch.setattr(smoke, "_capability", lambda device: (12, 0))
    monkeypatch.setattr(_native, "build_info", lambda: INFO_SM90)
    monkeypatch.setattr(_native, "load_error", lambda: None)
    assert smoke.main(["--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert "FAIL native library: the native library has no kernel for this GPU (sm_120" in text
    for row in ROWS:
        line = _lines(text, row)[0]
        assert line.endswith("FAIL") and " native " in line, line
        assert f"FAIL {row}: expected native" in text and "but reference ran; dispatcher: " in text
    assert f"smoke: 0/{len(ROWS) + 1} passed" in text
    assert ("GPU kernels expected: dense_prefill_fwd, dense_prefill_bwd, dense_decode, "
            "sparse_prefill, sparse_decode") in text


def test_planted_missing_library_fails_with_the_loaders_reason(capsys, no_gpu, monkeypatch):
    monkeypatch.setattr(smoke, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(_native, "build_info", lambda: None)
    monkeypatch.setattr(_native, "load_error", lambda: "planted: the library failed to load")
    assert smoke.main(["--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert "FAIL native library: the native library is not usable: planted: the library failed to load" in text
    assert "loader: planted: the library failed to load" in text
    assert "no GPU kernel was exercised" not in text


def test_smoke_reports_a_wrong_op(capsys, no_gpu, monkeypatch):
    real = flash_mla.flash_mla_with_kvcache

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 0.05, lse

    monkeypatch.setattr(flash_mla, "flash_mla_with_kvcache", off_by_a_bit)
    assert smoke.main(["--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert _lines(text, "dense_decode out")[0].endswith("FAIL")
    assert "FAIL dense_decode out: dense_decode out: FAIL" in text and "elements outside abs_tol" in text
    assert f"smoke: {len(ROWS) - 2}/{len(ROWS)} passed" in text  # dense and sparse out rows


def test_smoke_reports_a_wrong_gradient_under_the_plain_rule(capsys, no_gpu, monkeypatch):
    real = flash_mla.flash_attn_varlen_func

    class Skew(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.1  # 10% off: far beyond 2x plain bf16's error

    def skewed(q, *args, **kwargs):
        return real(Skew.apply(q), *args, **kwargs)

    monkeypatch.setattr(flash_mla, "flash_attn_varlen_func", skewed)
    assert smoke.main(["--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert _lines(text, "dense_prefill_bwd dq")[0].endswith("FAIL")
    assert "FAIL dense_prefill_bwd dq:" in text and "x plain's" in text
    assert _lines(text, "dense_prefill_bwd dk")[0].endswith("PASS")


def test_smoke_reports_an_exception_as_failure(capsys, no_gpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(flash_mla, "flash_attn_varlen_func", broken)
    assert smoke.main(["--device", "cpu"]) == 1
    assert "FAIL dense_prefill: RuntimeError: kernel exploded" in capsys.readouterr().out


@pytest.mark.gpu
def test_smoke_on_gpu_passes(capsys):
    """The real thing: on a GPU, the smoke test's own expectation and its exit status."""
    device = torch.device("cuda", torch.cuda.current_device())
    code = smoke.main(["--device", str(device)])
    text = capsys.readouterr().out
    assert code == 0, text
    if smoke.make_plan(device).no_gpu_reason is None:
        for row in ROWS[:5]:
            assert " native " in _lines(text, row)[0], text


def test_the_smoke_tests_list_of_native_ops_matches_the_dispatchers():
    # Kept apart on purpose (the smoke test's expectation must not come from the code it
    # checks), so a kernel family bound in the dispatcher must be added to both.
    from flash_mla import dispatch, smoke

    assert set(smoke.NATIVE_KERNEL_OPS) == set(dispatch._NATIVE_BOUND_OPS)
