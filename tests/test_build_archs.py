"""FLASH_MLA_CUDA_ARCHS resolution against nvcc versions, and which sources build
for which targets (flash_mla_build.archs / .sources)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flash_mla_build import archs as A
from flash_mla_build import sources as S


def names(targets):
    return [t.name for t in targets]


@pytest.mark.parametrize("nvcc,expected", [
    ((13, 0), ["80", "86", "89", "90a", "100f", "120f"]),
    ((12, 9), ["80", "86", "89", "90a", "100f", "120f"]),
    ((12, 8), ["80", "86", "89", "90a"]),          # no 'f' targets before 12.9
    ((12, 4), ["80", "86", "89", "90a"]),
])
def test_all_is_every_default_target_the_nvcc_supports(nvcc, expected):
    assert names(A.select_targets("all", nvcc)) == expected
    assert names(A.select_targets(None, nvcc)) == expected


def test_explicit_list_sorted_and_deduplicated():
    got = A.select_targets("120f;80, 90a 80", (13, 0))
    assert names(got) == ["80", "90a", "120f"]


@pytest.mark.parametrize("request_,nvcc,needs", [
    ("120", (12, 6), "12.8"),
    ("120f", (12, 8), "12.9"),
    ("121", (12, 8), "12.9"),
    ("100f", (12, 8), "12.9"),
    ("120a", (12, 4), "12.8"),
])
def test_target_newer_than_nvcc_names_the_cuda_version(request_, nvcc, needs):
    with pytest.raises(A.ArchError, match=f"needs CUDA {needs} or newer, but the nvcc found is "
                                          f"CUDA {nvcc[0]}.{nvcc[1]}"):
        A.select_targets(request_, nvcc)


def test_removed_and_unknown_targets():
    with pytest.raises(A.ArchError, match="CUDA 13 removed every target below sm_75"):
        A.select_targets("70", (13, 0))
    assert names(A.select_targets("70", (12, 4))) == ["70"]
    with pytest.raises(A.ArchError, match="not a known CUDA target"):
        A.select_targets("95", (13, 0))
    with pytest.raises(A.ArchError, match="is not a CUDA target"):
        A.select_targets("hopper", (13, 0))


def test_native_maps_gpus_to_targets():
    caps = [(9, 0), (12, 0), (12, 1), (8, 6), (10, 3)]
    assert names(A.select_targets("native", (13, 0), caps)) == ["86", "90a", "100f", "120f"]
    # Before 12.9 there is no family target: plain sm_120 / sm_121.
    assert names(A.select_targets("native", (12, 8), [(12, 0)])) == ["120"]
    with pytest.raises(A.ArchError, match="found no GPU"):
        A.select_targets("native", (13, 0), [])


def test_gencode_uses_equals_form_and_plain_ptx_of_newest():
    flags = A.gencode_flags(A.select_targets("80;90a;120f", (13, 0)))
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_120f,code=sm_120f",
        "-gencode=arch=compute_120,code=compute_120",
    ]
    assert A.gencode_flags([A.Target.parse("90a")], ptx=False) == [
        "-gencode=arch=compute_90a,code=sm_90a"]


def _tree(tmp_path: Path) -> Path:
    for rel in ["csrc/common/kernel_registry.cpp", "csrc/api/build_info.cpp",
                "csrc/api/combine.cu", "csrc/portable/decode/combine/instantiations/bf16.cu",
                "csrc/api/dense_prefill_fwd.cu", "csrc/portable/prefill/fwd/inst/d128.cu",
                "csrc/sm90/decode/dense/inst/a.cu", "csrc/sm120/decode/x.cu",
                "csrc/api/checks.h", "csrc/misc/new_thing.cu", "csrc/api/old.disabled.cu"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("// test\n")
    return tmp_path


def test_sources_all_kernels(tmp_path):
    root = _tree(tmp_path)
    targets = A.select_targets("80;90a;120f", (13, 0))
    srcs = {s.rel: s for s in S.discover_sources(root, targets, S.select_kernel_families("all"))}
    assert "csrc/api/checks.h" not in srcs and "csrc/api/old.disabled.cu" not in srcs
    assert names(srcs["csrc/api/combine.cu"].targets) == ["80", "90a", "120f"]
    assert srcs["csrc/api/combine.cu"].ptx
    assert names(srcs["csrc/sm90/decode/dense/inst/a.cu"].targets) == ["90a"]
    assert not srcs["csrc/sm90/decode/dense/inst/a.cu"].ptx
    assert names(srcs["csrc/sm120/decode/x.cu"].targets) == ["120f"]
    assert srcs["csrc/portable/prefill/fwd/inst/d128.cu"].family == "dense_prefill"
    assert srcs["csrc/misc/new_thing.cu"].family == "other"
    assert not srcs["csrc/api/build_info.cpp"].is_cuda


def test_sources_kernel_switch_and_arch_filter(tmp_path):
    root = _tree(tmp_path)
    targets = A.select_targets("120f", (13, 0))
    rels = [s.rel for s in S.discover_sources(root, targets,
                                              S.select_kernel_families("combine"))]
    assert rels == ["csrc/api/build_info.cpp", "csrc/api/combine.cu",
                    "csrc/common/kernel_registry.cpp",
                    "csrc/portable/decode/combine/instantiations/bf16.cu"]
    with pytest.raises(S.KernelsError, match="unknown kernel families \\['decodes'\\]"):
        S.select_kernel_families("combine;decodes")


def test_real_tree_combine_build_selects_expected_files():
    root = Path(__file__).resolve().parent.parent
    srcs = S.discover_sources(root, A.select_targets("120f", (13, 0)),
                              S.select_kernel_families("combine"))
    rels = [s.rel for s in srcs]
    assert "csrc/api/combine.cu" in rels and "csrc/api/build_info.cpp" in rels
    assert all(S.rule_for(r).family in ("core", "combine") for r in rels)
