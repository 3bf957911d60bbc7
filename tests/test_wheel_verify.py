"""flash_mla_build.wheel_verify on recorded cuobjdump output (an excerpt of
`cuobjdump --dump-resource-usage` on a FLASH_MLA_CUDA_ARCHS=all
FLASH_MLA_KERNELS=combine build, CUDA 13.0), plus synthetic failing kernels."""
from __future__ import annotations

import json
import os
import zipfile

import pytest

from flash_mla_build import wheel_verify as W

K4 = "_ZN9flash_mla7combine14combine_kernelI13__nv_bfloat16Li4EEEvNS_13CombineParamsE"
K1 = "_ZN9flash_mla7combine14combine_kernelI13__nv_bfloat16Li1EEEvNS_13CombineParamsE"

RECORDED = f"""
Fatbin elf code:
================
arch = sm_75
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0

Fatbin ptx code:
================
arch = sm_120
code version = [9,0]
host = linux
compile_size = 64bit
compressed
ptxasOptions = -v --warn-on-spills --warn-on-local-memory-usage  

Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function {K4}:
  REG:56 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {K1}:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_120f
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function {K4}:
  REG:55 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1000 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {K1}:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1000 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

INFO = {"targets": ["80", "120f"], "kernels": [
    {"op": "combine", "variant": "bf16 d_v<=512", "dynamic_smem_bytes": 0, "threads": 128},
    {"op": "dense_prefill_fwd", "variant": "bf16 d128", "dynamic_smem_bytes": 98304,
     "threads": 288}]}


def test_parse_recorded_output():
    usages = W.parse_resource_usage(RECORDED)
    assert [(u.arch, u.name, u.registers) for u in usages] == [
        ("sm_80", K4, 56), ("sm_80", K1, 40), ("sm_120f", K4, 55), ("sm_120f", K1, 40)]
    assert all(u.stack == 0 and u.local == 0 and u.static_smem == 0 for u in usages)


def test_recorded_build_passes_and_lists_targets():
    report = W.verify(W.parse_resource_usage(RECORDED), INFO, required=["120f", "sm_80"])
    assert report.ok, report.problems
    assert report.kernels == {K1: ["sm_120f", "sm_80"], K4: ["sm_120f", "sm_80"]}
    entry = [e for e in report.sm120 if e["kernel"] == K4][0]
    # Joined with build_info by op name ("combine" is in the symbol).
    assert (entry["registers"], entry["dynamic_smem"], entry["dynamic_from"]) == \
        (55, 0, "op combine")


def test_missing_required_target_fails():
    report = W.verify(W.parse_resource_usage(RECORDED), INFO, required=["100f"])
    assert not report.ok
    assert f"{K4} has no sm_100f cubin (built for sm_120f, sm_80)" in report.problems


def _synthetic(name, stack=0, local=0, shared=0):
    return (f"Fatbin elf code:\n================\narch = sm_120f\n\nResource usage:\n"
            f" Function {name}:\n  REG:255 STACK:{stack} SHARED:{shared} LOCAL:{local} "
            "CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0\n")


def test_spills_and_shared_memory_over_sm120_limit_fail():
    name = "_ZN9flash_mla17dense_prefill_fwd6kernelEv"
    report = W.verify(W.parse_resource_usage(_synthetic(name, stack=16, local=8, shared=4096)),
                      INFO)
    assert not report.ok
    assert report.problems == [
        f"{name} on sm_120f needs 102400 B of shared memory (4096 static + 98304 dynamic, op "
        "dense_prefill_fwd); sm_120 allows 101376 B",
        f"{name} on sm_120f uses local memory (stack 16 B, local 8 B): register spills are "
        "not allowed in release kernels",
    ]


def test_unknown_op_uses_library_maximum():
    report = W.verify(W.parse_resource_usage(_synthetic("_Z6mysteryv", shared=3073)), INFO)
    assert report.problems == ["_Z6mysteryv on sm_120f needs 101377 B of shared memory (3073 "
                               "static + 98304 dynamic, library maximum); sm_120 allows "
                               "101376 B"]


def test_empty_fatbinary_fails():
    assert W.verify([], INFO).problems == ["no kernels found in the library's fatbinary"]


def test_cli_on_a_wheel_with_fake_cuobjdump(tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "flash_mla-0.1.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("flash_mla/__init__.py", "")
        zf.writestr("flash_mla/lib/libflash_mla_native.so", b"\x7fELF fake")
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, RECORDED.encode(), b""

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(W.subprocess, "run", fake_run)
    monkeypatch.setattr(W, "read_build_info", lambda lib: INFO)
    out_json = tmp_path / "r.json"
    assert W.main([str(wheel), "--cuobjdump", "cuobjdump", "--require", "120f",
                   "--json", str(out_json)]) == 0
    assert seen["cmd"][:2] == ["cuobjdump", "--dump-resource-usage"]
    assert seen["cmd"][2].endswith("libflash_mla_native.so")
    assert json.loads(out_json.read_text())[str(wheel)]["ok"] is True
    assert "OK" in capsys.readouterr().out
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("flash_mla/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="holds no flash_mla_native library"):
        W.main([str(empty), "--cuobjdump", "cuobjdump"])


def test_claimed_target_without_cubins_fails_by_default():
    info = dict(INFO, targets=["80", "90a", "120f"])
    report = W.verify(W.parse_resource_usage(RECORDED), info)
    assert not report.ok
    assert f"{K1} has no sm_90a cubin (built for sm_120f, sm_80)" in report.problems


def test_arch_specific_kernel_is_not_required_elsewhere():
    text = RECORDED + _synthetic("_ZN9flash_mla4sm1206kernelEv").replace(
        "REG:255 STACK:0", "REG:128 STACK:0")
    report = W.verify(W.parse_resource_usage(text), INFO)
    assert report.ok, report.problems


def test_build_info_is_read_in_a_child_process(tmp_path, monkeypatch):
    # On Windows a DLL loaded into this process cannot be deleted until it exits, so the
    # wheel check's temporary folder could not be cleaned up (PermissionError at step 6).
    # A stand-in tvm_ffi, importable only by the child, proves where the library is loaded.
    fake = tmp_path / "fake" / "tvm_ffi"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import json, os\n"
        "class _M:\n"
        "    def __init__(self, path):\n"
        "        self.path = path\n"
        "    def build_info(self):\n"
        "        return json.dumps({'loaded_by': os.getpid(), 'path': self.path})\n"
        "def load_module(path):\n"
        "    return _M(path)\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    import tvm_ffi

    def refuse(*args, **kwargs):
        raise AssertionError("the library was loaded into the verifying process")

    monkeypatch.setattr(tvm_ffi, "load_module", refuse)
    lib = tmp_path / "libflash_mla_native.so"
    lib.write_bytes(b"\x7fELF")
    info = W.read_build_info(lib)
    assert info["path"] == str(lib)
    assert info["loaded_by"] != os.getpid()
    lib.unlink()  # nothing holds it


def test_build_info_failure_in_the_child_is_a_warning(tmp_path, monkeypatch, capsys):
    # A stand-in tvm_ffi that fails the way a broken library does (the real one takes a
    # second to import, for the same outcome).
    fake = tmp_path / "fake" / "tvm_ffi"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "def load_module(path):\n"
        "    raise RuntimeError('cannot load ' + path)\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    lib = tmp_path / "not_a_library.so"
    lib.write_bytes(b"garbage")
    assert W.read_build_info(lib) is None
    err = capsys.readouterr().err
    assert "could not read build_info" in err and "cannot load" in err


def test_kernels_that_never_run_on_sm120_do_not_bound_its_cubins():
    # The backward's 128-key CTA at d = 128 (164864 B) is launched only where a block may
    # use that much; build_info marks it, and an sm_120 cubin of the op keeps its own bound.
    name = "_ZN9flash_mla8portable9dense_bwd24dense_bwd_main_kernelEv"
    info = {"kernels": [
        {"op": "dense_bwd", "variant": "8-warp", "dynamic_smem_bytes": 98816, "threads": 256},
        {"op": "dense_bwd", "variant": "128-key d128", "dynamic_smem_bytes": 164864,
         "threads": 256, "runs_on_sm120": False}]}
    assert W._dynamic_smem_for(name, info) == (98816, "op dense_bwd")
    report = W.verify(W.parse_resource_usage(_synthetic(name)), info)
    assert report.ok, report.problems
    info["kernels"][1]["runs_on_sm120"] = True
    assert not W.verify(W.parse_resource_usage(_synthetic(name)), info).ok


BWD_INFO = {"kernels": [
    {"op": "dense_prefill_bwd", "variant": "main bf16 d_qk128 d_v128", "dynamic_smem_bytes": 82432,
     "threads": 256, "symbol": "21dense_bwd_main_kernelI 4BF16ELi128ELi128E"},
    {"op": "dense_prefill_bwd", "variant": "main 128-key bf16 d_qk64 d_v64",
     "dynamic_smem_bytes": 99328, "threads": 256,
     "symbol": "24dense_bwd_main128_kernelI 4BF16ELi64ELi64E"},
    {"op": "dense_prefill_bwd", "variant": "main 128-key bf16 d_qk128 d_v128",
     "dynamic_smem_bytes": 164864, "threads": 256, "runs_on_sm120": False,
     "symbol": "24dense_bwd_main128_kernelI 4BF16ELi128ELi128E"},
    {"op": "dense_prefill_bwd", "variant": "convert dq", "dynamic_smem_bytes": 0,
     "threads": 256, "symbol": "27dense_bwd_convert_dq_kernelI"}]}
BWD = "_ZN9flash_mla8portable9dense_bwd"


def test_kernels_join_their_own_record_by_symbol_pieces():
    # The dense_bwd symbols do not contain the op name "dense_prefill_bwd": without the
    # pieces every one of them was held to the library's largest record.
    main = BWD + "21dense_bwd_main_kernelINS0_4BF16ELi128ELi128ENS1_6NoMaskEEEvNS_5ParamsE"
    main128 = BWD + "24dense_bwd_main128_kernelINS0_4BF16ELi64ELi64ENS1_6NoMaskEEEvNS_5ParamsE"
    convert = BWD + "27dense_bwd_convert_dq_kernelINS0_4BF16ELi128EEEvNS_5ParamsE"
    assert W._dynamic_smem_for(main, BWD_INFO) == (82432, "record main bf16 d_qk128 d_v128")
    assert W._dynamic_smem_for(main128, BWD_INFO) == (
        99328, "record main 128-key bf16 d_qk64 d_v64")
    assert W._dynamic_smem_for(convert, BWD_INFO) == (0, "record convert dq")
    # The 8-warp kernel at d = 64 has no record here: the op-name join, then the library's
    # largest sm_120 record (the 164864 B one never bounds an sm_120 cubin).
    other = BWD + "21dense_bwd_main_kernelINS0_4BF16ELi64ELi64ENS1_6NoMaskEEEvNS_5ParamsE"
    assert W._dynamic_smem_for(other, BWD_INFO) == (99328, "library maximum")


def test_trap_cubin_of_a_large_smem_kernel_is_not_held_to_its_size():
    trap = BWD + "24dense_bwd_main128_kernelINS0_4BF16ELi128ELi128ENS1_6NoMaskEEEvNS_5ParamsE"
    dyn, how = W._dynamic_smem_for(trap, BWD_INFO)
    assert (dyn, how) == (0, "never launched on sm_120 (main 128-key bf16 d_qk128 d_v128)")
    report = W.verify(W.parse_resource_usage(_synthetic(trap)), BWD_INFO)
    assert report.ok, report.problems


def test_kernel_joins_the_most_specific_op():
    # The schedule kernel's symbol names both "dense_decode" and "dense_decode_schedule":
    # it must get the schedule's 0 B of dynamic shared memory, not the decode's 100352.
    info = {"kernels": [
        {"op": "dense_decode", "variant": "bf16", "dynamic_smem_bytes": 100352, "threads": 128},
        {"op": "dense_decode_schedule", "variant": "s", "dynamic_smem_bytes": 0, "threads": 256}]}
    sched = "_ZN9flash_mla8portable15decode_schedule28dense_decode_schedule_kernelEv"
    decode = "_ZN9flash_mla8portable12dense_decode19dense_decode_kernelEv"
    assert W._dynamic_smem_for(sched, info) == (0, "op dense_decode_schedule")
    assert W._dynamic_smem_for(decode, info) == (100352, "op dense_decode")
