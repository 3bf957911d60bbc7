"""The ops' capability tables (csrc/common/capabilities.h and each kernel's config.h).

build_info()'s "ops" JSON is generated from constexpr tables; this compiles a small host
program against the same headers and the same capabilities_json() functions the API
files register, and checks the JSON the Python dispatch will read (its shape is part of
the loader's contract) and the lists the API's error messages print.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests._tools import run_host_program

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <cstdio>
#include "portable/decode/combine/config.h"
#include "portable/prefill/dense_bwd/config.h"
#include "portable/prefill/dense_fwd/config.h"
namespace caps = flash_mla::caps;
namespace fwd = flash_mla::portable::dense_fwd;
namespace bwd = flash_mla::portable::dense_bwd;
namespace combine = flash_mla::combine;
static_assert(caps::contains(fwd::kHeadDims, 192, 128) && !caps::contains(fwd::kHeadDims, 128, 192),
              "pairs are ordered (d_qk, d_v)");
static_assert(!caps::contains(fwd::kHeadDims, (int64_t{1} << 32) + 64, 64),
              "no narrowing before the comparison");
static_assert(combine::kDvs.contains(4) && combine::kDvs.contains(512) &&
              !combine::kDvs.contains(6) && !combine::kDvs.contains(516) &&
              !combine::kDvs.contains(0), "d_v range");
int main() {
  std::printf("%s\n", combine::capabilities_json().c_str());
  std::printf("%s\n", fwd::capabilities_json().c_str());
  std::printf("%s\n", bwd::capabilities_json().c_str());
  std::printf("%s\n", caps::listed(fwd::kHeadDims).c_str());
  std::printf("%s\n", caps::listed(fwd::kDtypes, " or ").c_str());
  std::printf("%s\n", caps::JsonObject().str().c_str());
  int visited = 0;
  caps::for_each_entry<3>([&](auto i) { visited += 1 << decltype(i)::value; });
  std::printf("%d\n", visited);
  return 0;
}
"""

MHA = {"dtype": ["bf16", "fp16"], "head_dims": [[64, 64], [128, 128], [192, 128]]}


@pytest.fixture(scope="module")
def program_output(tmp_path_factory) -> list:
    return run_host_program(PROGRAM, tmp_path_factory.mktemp("caps"), "caps").splitlines()


def test_ops_json_shape(program_output):
    combine, fwd, bwd = (json.loads(line) for line in program_output[:3])
    assert combine == {"dtype": ["bf16", "fp16"], "d_v": list(range(4, 513, 4))}
    assert fwd == MHA and bwd == MHA
    # Key order is part of the text build_info prints.
    assert program_output[1] == ('{"dtype": ["bf16", "fp16"], "head_dims": [[64, 64], '
                                 '[128, 128], [192, 128]]}')


def test_message_lists_and_helpers(program_output):
    assert program_output[3] == "(64, 64), (128, 128), (192, 128)"
    assert program_output[4] == "bfloat16 or float16"
    assert program_output[5] == "{}"
    assert program_output[6] == "7"  # every index visited once


def test_api_files_register_ops_from_tables():
    """Each API file registers its op by name with the table-built JSON function; no
    hand-written capability JSON or head-dim list is left in csrc/api/."""
    registered = {}
    for path in sorted((ROOT / "csrc" / "api").glob("*.cu")):
        text = path.read_text(encoding="utf-8")
        assert 'R"({' not in text, f"{path.name} holds a hand-written JSON string"
        assert "supported_mha_head_dims" not in text
        for op, fn in re.findall(r"FLASH_MLA_REGISTER_OP\(\s*(\w+)\s*,\s*([\w:]+)\s*\)", text):
            assert fn.endswith("capabilities_json"), (path.name, fn)
            registered[op] = path.name
    for op, api_file in {"combine": "combine.cu", "dense_prefill_fwd": "dense_prefill_fwd.cu",
                         "dense_prefill_bwd": "dense_prefill_bwd.cu"}.items():
        assert registered.get(op) == api_file


def test_kernel_records_name_a_registered_op():
    """Every FLASH_MLA_REGISTER_KERNEL (and its _SYMBOL and LARGE_SMEM forms) under csrc/
    names its op by the same name an API file registers with FLASH_MLA_REGISTER_OP (one
    name per op)."""
    ops, kernel_ops = set(), {}
    for path in sorted((ROOT / "csrc").rglob("*.cu")):
        text = path.read_text(encoding="utf-8")
        ops.update(re.findall(r"FLASH_MLA_REGISTER_OP\(\s*(\w+)\s*,", text))
        for op in re.findall(r"FLASH_MLA_REGISTER_(?:LARGE_SMEM_)?KERNEL(?:_SYMBOL)?\(\s*\w+\s*,"
                             r"\s*\"(\w+)\"", text):
            kernel_ops.setdefault(op, path.relative_to(ROOT).as_posix())
    assert kernel_ops, "no kernel records found"
    assert {"combine", "dense_prefill_fwd", "dense_prefill_bwd"} <= set(kernel_ops)
    unregistered = {op: where for op, where in kernel_ops.items() if op not in ops}
    assert not unregistered
