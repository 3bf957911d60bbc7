"""Which csrc/ sources build, in which kernel family and for which targets
(flash_mla_build.sources): explicit per-family lists, an unclaimed file is an error."""
from __future__ import annotations

from pathlib import Path

import pytest

from flash_mla_build import archs as A
from flash_mla_build import sources as S

REPO = Path(__file__).resolve().parent.parent

# Files of the layout every family follows (and two that must never build).
TREE = [
    "csrc/common/kernel_registry.cpp", "csrc/api/build_info.cpp", "csrc/api/checks.h",
    "csrc/api/combine.cu", "csrc/portable/decode/combine/instantiations/bf16.cu",
    "csrc/api/dense_decode.cu", "csrc/api/decode_schedule.cu",
    "csrc/portable/decode/dense/instantiations/bf16.cu",
    "csrc/portable/decode/schedule/schedule.cu",
    "csrc/api/sparse_decode.cu", "csrc/portable/decode/sparse/instantiations/v32.cu",
    "csrc/api/sparse_prefill.cu", "csrc/portable/prefill/sparse/instantiations/bf16.cu",
    "csrc/api/dense_prefill_fwd.cu", "csrc/api/dense_prefill_bwd.cu",
    "csrc/portable/prefill/dense_fwd/instantiations/fwd_d128.cu",
    "csrc/portable/prefill/dense_bwd/instantiations/bf16.cu",
    "csrc/api/old.disabled.cu",
]


def names(targets):
    return [t.name for t in targets]


def _tree(root: Path, files=TREE) -> Path:
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("// test\n")
    return root


def _all(root: Path, archs: str = "80;90a;120f", table=S.FAMILIES) -> dict:
    targets = A.select_targets(archs, (13, 0))
    families = S.select_kernel_families("all", table)
    return {s.rel: s for s in S.discover_sources(root, targets, families, table)}


def test_every_file_lands_in_its_family(tmp_path):
    srcs = _all(_tree(tmp_path))
    family = {rel: s.family for rel, s in srcs.items()}
    assert family == {
        "csrc/api/build_info.cpp": "core",
        "csrc/common/kernel_registry.cpp": "core",
        "csrc/api/combine.cu": "combine",
        "csrc/portable/decode/combine/instantiations/bf16.cu": "combine",
        "csrc/api/dense_decode.cu": "dense_decode",
        "csrc/api/decode_schedule.cu": "dense_decode",
        "csrc/portable/decode/dense/instantiations/bf16.cu": "dense_decode",
        "csrc/portable/decode/schedule/schedule.cu": "dense_decode",
        "csrc/api/sparse_decode.cu": "sparse_decode",
        "csrc/portable/decode/sparse/instantiations/v32.cu": "sparse_decode",
        "csrc/api/sparse_prefill.cu": "sparse_prefill",
        "csrc/portable/prefill/sparse/instantiations/bf16.cu": "sparse_prefill",
        "csrc/api/dense_prefill_fwd.cu": "dense_prefill",
        "csrc/api/dense_prefill_bwd.cu": "dense_prefill",
        "csrc/portable/prefill/dense_fwd/instantiations/fwd_d128.cu": "dense_prefill",
        "csrc/portable/prefill/dense_bwd/instantiations/bf16.cu": "dense_prefill",
    }
    # Headers and *.disabled.* files never build.
    assert "csrc/api/checks.h" not in srcs and "csrc/api/old.disabled.cu" not in srcs
    assert names(srcs["csrc/api/combine.cu"].targets) == ["80", "90a", "120f"]
    assert srcs["csrc/api/combine.cu"].ptx
    assert not srcs["csrc/api/build_info.cpp"].is_cuda


def test_sparse_prefill_folder_is_not_dense_prefill(tmp_path):
    root = _tree(tmp_path, ["csrc/common/kernel_registry.cpp",
                            "csrc/portable/prefill/sparse/kernel_extra.cu"])
    assert _all(root)["csrc/portable/prefill/sparse/kernel_extra.cu"].family == "sparse_prefill"
    targets = A.select_targets("120f", (13, 0))
    dense_only = S.discover_sources(root, targets, S.select_kernel_families("dense_prefill"))
    assert [s.rel for s in dense_only] == ["csrc/common/kernel_registry.cpp"]


@pytest.mark.parametrize("rel", [
    "csrc/misc/new_thing.cu",                       # a folder no family names
    "csrc/portable/prefill/dense_fwd_v2/x.cu",      # a name prefix is not a folder claim
    "csrc/portable/decode/other.cpp",               # the decode folder itself is not claimed
    "csrc/api/dense_prefill_fwd2.cu",               # nor a file named like an API file
])
def test_unclaimed_file_is_an_error_naming_it(tmp_path, rel):
    root = _tree(tmp_path, ["csrc/common/kernel_registry.cpp", rel])
    targets = A.select_targets("120f", (13, 0))
    # Fails whatever FLASH_MLA_KERNELS selects, not only 'all'.
    for request in ("all", "combine"):
        with pytest.raises(S.SourcesError, match="no kernel family claims " + rel):
            S.discover_sources(root, targets, S.select_kernel_families(request))


def test_file_claimed_twice_is_an_error(tmp_path):
    table = S.FAMILIES + (S.Family("x", ("csrc/api/combine.cu",)),)
    root = _tree(tmp_path, ["csrc/api/combine.cu"])
    with pytest.raises(S.SourcesError, match=r"csrc/api/combine.cu is claimed by several "
                                             r"kernel families \(combine, x\)"):
        _all(root, table=table)


def test_arch_specific_claims_build_for_their_targets_without_ptx(tmp_path):
    table = S.FAMILIES + (S.Family("fast", (), arch_paths=(
        ("csrc/sm90/", frozenset({"90a"})),
        ("csrc/sm120/", frozenset({"120a", "120f", "121a", "121f"})))),)
    root = _tree(tmp_path, ["csrc/api/combine.cu", "csrc/sm90/decode/a.cu",
                            "csrc/sm120/decode/b.cu"])
    srcs = _all(root, table=table)
    assert names(srcs["csrc/sm90/decode/a.cu"].targets) == ["90a"]
    assert not srcs["csrc/sm90/decode/a.cu"].ptx
    assert names(srcs["csrc/sm120/decode/b.cu"].targets) == ["120f"]
    # A build without 90a skips the sm90 file rather than compiling it for nothing.
    assert "csrc/sm90/decode/a.cu" not in _all(root, "80;120f", table=table)


def test_kernel_switch_selects_families_and_their_requirements():
    assert S.select_kernel_families("combine") == {"core", "combine"}
    assert S.select_kernel_families("combine;dense_prefill") == {"core", "combine",
                                                                  "dense_prefill"}
    # The decode families launch the combine, so it comes with them.
    assert S.select_kernel_families("dense_decode") == {"core", "dense_decode", "combine"}
    # Sparse decode also runs the dense decode's schedule kernel.
    assert S.select_kernel_families(" Sparse_Decode ") == {"core", "sparse_decode", "combine",
                                                          "dense_decode"}
    assert S.select_kernel_families("all") == {"core", *S.KERNEL_FAMILIES}
    assert S.select_kernel_families(None) == S.select_kernel_families("all")
    with pytest.raises(S.KernelsError, match=r"unknown kernel families \['decodes'\]"):
        S.select_kernel_families("combine;decodes")
    with pytest.raises(S.KernelsError, match="unknown kernel families"):
        S.select_kernel_families(" ; ")


def test_combine_build_of_a_tree(tmp_path):
    root = _tree(tmp_path)
    rels = [s.rel for s in S.discover_sources(root, A.select_targets("120f", (13, 0)),
                                              S.select_kernel_families("combine"))]
    assert rels == ["csrc/api/build_info.cpp", "csrc/api/combine.cu",
                    "csrc/common/kernel_registry.cpp",
                    "csrc/portable/decode/combine/instantiations/bf16.cu"]


def test_family_table_is_well_formed():
    seen = set()
    for family in S.FAMILIES:
        assert family.name not in seen
        seen.add(family.name)
        for claim in family.paths + tuple(p for p, _ in family.arch_paths):
            assert claim.startswith("csrc/")
            assert claim.endswith("/") or claim.endswith(S.SOURCE_SUFFIXES), claim
        assert all(r in S.KERNEL_FAMILIES for r in family.requires)


def test_real_tree_every_source_is_claimed():
    srcs = S.discover_sources(REPO, A.select_targets("120f", (13, 0)),
                              S.select_kernel_families("all"))
    on_disk = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*")
                     if p.suffix in S.SOURCE_SUFFIXES and ".disabled." not in p.name)
    assert sorted(s.rel for s in srcs) == on_disk
    combine = S.discover_sources(REPO, A.select_targets("120f", (13, 0)),
                                 S.select_kernel_families("combine"))
    rels = [s.rel for s in combine]
    assert "csrc/api/combine.cu" in rels and "csrc/api/build_info.cpp" in rels
    assert {s.family for s in combine} == {"core", "combine"}
