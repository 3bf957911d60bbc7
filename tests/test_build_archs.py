"""FLASH_MLA_CUDA_ARCHS resolution against nvcc versions (flash_mla_build.archs); which
sources build for which targets is tests/test_sources.py."""
from __future__ import annotations

import pytest

from flash_mla_build import archs as A


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

