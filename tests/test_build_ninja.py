"""build.ninja generation (flash_mla_build.ninja_file) and the build's process
output handling (flash_mla_build.build.stream_process)."""
from __future__ import annotations

import sys
from pathlib import Path

from flash_mla_build import archs as A
from flash_mla_build import flags as F
from flash_mla_build import ninja_file as N
from flash_mla_build.build import stream_process
from flash_mla_build.sources import Source


def _plan(tmp_path: Path, platform: str) -> N.NinjaPlan:
    root = tmp_path / "repo"
    t120, t90 = A.Target.parse("120f"), A.Target.parse("90a")
    srcs = [
        Source(root / "csrc/api/combine.cu", "csrc/api/combine.cu", "combine", True,
               (t90, t120), True),
        Source(root / "csrc/sm90/x.cu", "csrc/sm90/x.cu", "dense_decode", True, (t90,),
               False),
        Source(root / "csrc/api/build_info.cpp", "csrc/api/build_info.cpp", "core", False, (),
               False),
    ]
    opts = F.BuildOptions(include_dirs=[str(root / "csrc")], defines=["A=1"])
    return N.NinjaPlan(
        platform=platform, nvcc="/opt/cuda dir/bin/nvcc", cxx="g++",
        nvcc_args=F.nvcc_compile_args(platform, opts, ()),
        cxx_args=F.cxx_compile_args(platform, opts),
        link_args=F.nvcc_link_args(platform, "$out", ["/lib"], ["tvm_ffi"]),
        output=F.library_filename(platform), sources=srcs,
        gencode_for={s.rel: A.gencode_flags(s.targets, ptx=s.ptx) for s in srcs if s.is_cuda})


def test_linux_ninja_file(tmp_path):
    build = tmp_path / "repo" / "build" / "native"
    path = N.write_ninja(_plan(tmp_path, "linux"), build)
    text = path.read_text()
    # Short relative object paths and relative sources.
    assert "build obj/api/combine.cu.o: nvcc ../../csrc/api/combine.cu" in text
    assert "build obj/api/build_info.cpp.o: cxx ../../csrc/api/build_info.cpp" in text
    # Per-file targets: the portable file gets both + PTX, the sm90 file 90a only.
    assert ("  gencode = -gencode=arch=compute_90a,code=sm_90a "
            "-gencode=arch=compute_120f,code=sm_120f "
            "-gencode=arch=compute_120,code=compute_120") in text
    assert "build obj/sm90/x.cu.o: nvcc ../../csrc/sm90/x.cu\n  gencode = " \
           "-gencode=arch=compute_90a,code=sm_90a\n" in text
    # Depfiles in the rules (where $out exists), link through a response file.
    assert "command = $nvcc $nvcc_flags $gencode -MD -MF $out.d -c $in -o $out" in text
    assert "rspfile = $out.rsp" in text and "rspfile_content = $in_newline" in text
    assert "build libflash_mla_native.so: link obj/api/combine.cu.o obj/sm90/x.cu.o " \
           "obj/api/build_info.cpp.o" in text
    # A path with a space is shell-quoted.
    assert "nvcc = '/opt/cuda dir/bin/nvcc'" in text
    # Rewriting identical content leaves the file untouched (ninja's mtime check).
    mtime = path.stat().st_mtime_ns
    N.write_ninja(_plan(tmp_path, "linux"), build)
    assert path.stat().st_mtime_ns == mtime


def test_windows_ninja_file(tmp_path):
    text = N.render_ninja(_plan(tmp_path, "windows"), tmp_path / "repo" / "build" / "native")
    assert "build obj/api/combine.cu.obj: nvcc ../../csrc/api/combine.cu" in text
    assert "command = $cxx $cxx_flags /showIncludes /c $in /Fo$out\n  deps = msvc" in text
    assert 'nvcc = "/opt/cuda dir/bin/nvcc"' in text
    assert "build flash_mla_native.dll: link" in text
    assert "-Xcompiler=/Zc:__cplusplus" in text


def test_dollar_and_colon_escaping():
    assert N.quote_arg("a$b", "linux") == "'a$$b'"  # shell-quoted, ninja-escaped
    assert N.quote_arg("$out.rsp", "linux") == "$out.rsp"
    assert N._path_token("C:/x y/z.cu") == "C$:/x$ y/z.cu"
    assert N.object_path("csrc/portable/decode/combine/instantiations/bf16.cu", "linux") == \
        "obj/portable/decode/combine/instantiations/bf16.cu.o"


def test_compiler_output_decoded_with_replacement():
    lines = []
    code = ("import sys; sys.stdout.buffer.write(b'[1/2] NVCC caf\\xe9\\n'); "
            "sys.stdout.buffer.write(b'ptxas info : quiet\\n'); "
            "sys.stdout.buffer.write(b'x.cu(3): error: \\xff bad\\n'); sys.exit(3)")
    rc, text = stream_process([sys.executable, "-c", code], None, lines.append)
    assert rc == 3
    assert lines == ["[1/2] NVCC caf\ufffd", "x.cu(3): error: \ufffd bad"]
    assert "ptxas info : quiet" in text
