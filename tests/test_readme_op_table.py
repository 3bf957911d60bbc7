"""The README's op table resolves: every public entry is listed, and every Python module,
native entry (tvm-ffi export), kernel folder and reference function it names exists
(CPU; reads the sources, builds nothing)."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Ops: from the public entry to the kernel"
COLUMNS = 5


def _table_rows() -> List[List[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the op table has no rows"
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows[2:]]
    for row in cells:
        assert len(row) == COLUMNS, f"op table row must have {COLUMNS} cells, got {row}"
    return cells


def _names(cell: str) -> List[str]:
    return re.findall(r"`([^`]+)`", cell)


def _exports() -> Dict[str, str]:
    """tvm-ffi export name -> csrc/api file that exports it."""
    found = {}
    pattern = re.compile(r"TVM_FFI_DLL_EXPORT_TYPED_FUNC\(\s*(\w+)\s*,")
    for path in sorted((REPO / "csrc" / "api").glob("*.c*")):
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            found[name] = path.name
    return found


def _top_level_functions(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_public_entry_is_in_the_table():
    init = ast.parse((REPO / "flash_mla" / "__init__.py").read_text(encoding="utf-8"))
    public = next(ast.literal_eval(node.value) for node in init.body
                  if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    listed = {name for row in _table_rows() for name in _names(row[0])}
    for name in public:
        if name != "__version__":
            assert name in listed, f"public name {name} has no row in the README op table"
    for name in ("flash_mla.cuda.dense_prefill_fwd", "flash_mla.cuda.dense_prefill_bwd"):
        assert name in listed, f"{name} has no row in the README op table"


def test_every_named_module_entry_folder_and_reference_exists():
    exports = _exports()
    reference = _top_level_functions(REPO / "flash_mla" / "reference.py")
    for entry, modules, native, folder, ref in _table_rows():
        where = f"op table row {entry!r}"
        for module in _names(modules):
            assert (REPO / "flash_mla" / module).is_file(), f"{where}: flash_mla/{module} does not exist"
        files = [n for n in _names(native) if n.endswith((".cu", ".cpp"))]
        for name in (n for n in _names(native) if n not in files):
            assert name in exports, f"{where}: no csrc/api file exports {name}"
            if files:
                assert exports[name] in files, (
                    f"{where}: {name} is exported by csrc/api/{exports[name]}, not {files}")
        for name in files:
            assert (REPO / "csrc" / "api" / name).is_file(), f"{where}: csrc/api/{name} does not exist"
        for name in _names(folder):
            assert (REPO / "csrc" / "portable" / name).is_dir(), (
                f"{where}: csrc/portable/{name} does not exist")
        # A native entry without a kernel folder (or the reverse) is a half-filled row.
        assert (native.strip() == "-") == (folder.strip() == "-"), (
            f"{where}: native entry {native!r} and kernel folder {folder!r} must both be given or both be '-'")
        for name in _names(ref):
            assert name in reference, f"{where}: flash_mla/reference.py has no function {name}"
