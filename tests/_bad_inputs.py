"""Harness of the bad-input tables (tests/test_bad_inputs_<family>.py).

A table row starts from a valid call of one entry, changes one argument, and names
the exception type and a regex the whole message must match: the argument as the
caller spelled it first, then what was expected, then what was given. Validation
runs before any computation, so the tables are fast; tensors live on the CPU (the
'meta' device stands in for a second device).

Each row must fail if the family's validation were removed: the harness checks
that the exception was raised inside the validating code (the family module's
``validate`` or, for the decode router's own two arguments, the router), not by
torch or the reference further down.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Tuple

import pytest
import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
I32, I64, U8 = torch.int32, torch.int64, torch.uint8

PACKAGE = Path(__file__).resolve().parents[1] / "flash_mla"


class Case(NamedTuple):
    id: str
    entry: str            # key of the test file's ENTRIES
    arg: str              # argument changed (as the entry's caller names it)
    value: Callable[[Dict[str, Any]], Any]
    exc: type
    pattern: str          # re.fullmatch against the message
    origin: str = "validate"  # function that must raise: the family's validate, or the router


def ints(values, dtype=I32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def const(value: Any) -> Callable[[Dict[str, Any]], Any]:
    return lambda a: value


def cast(name: str, dtype: torch.dtype) -> Callable[[Dict[str, Any]], Any]:
    return lambda a: a[name].to(dtype)


def on_meta(name: str) -> Callable[[Dict[str, Any]], Any]:
    return lambda a: a[name].to("meta")


def strided_last(name: str) -> Callable[[Dict[str, Any]], Any]:
    """The argument's values in a view whose last dim has stride 2."""
    def make(a: Dict[str, Any]) -> torch.Tensor:
        t = a[name]
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return make


def edit(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Dict[str, Any]], Any]:
    """A copy of the argument changed by fn (e.g. one value set)."""
    def make(a: Dict[str, Any]) -> torch.Tensor:
        return fn(a[name].clone())
    return make


def setitem(name: str, index: Any, value: Any) -> Callable[[Dict[str, Any]], Any]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t
    return edit(name, change)


def raising_function(info: pytest.ExceptionInfo) -> Tuple[str, Tuple[str, ...]]:
    """(innermost flash_mla function that the exception passed through, all of them as
    'module.function'), from the traceback."""
    names = []
    for entry in info.traceback:
        path = Path(str(entry.path)).resolve()
        if path.parent == PACKAGE:
            names.append(f"{path.stem}.{entry.frame.code.name}")
    return names[-1], tuple(names)


def check_case(case: Case, entries: Dict[str, Tuple[Callable[[], Dict[str, Any]], Callable[..., Any]]],
               family: str) -> None:
    build, call = entries[case.entry]
    args = build()
    args[case.arg] = case.value(args)
    with pytest.raises(Exception) as info:
        call(**args)
    assert type(info.value) is case.exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.fullmatch(case.pattern, message), f"{message!r} does not match {case.pattern!r}"
    _, path = raising_function(info)
    if case.origin == "validate":
        assert f"{family}.validate" in path, f"raised outside {family}.validate: {path}"
    else:
        assert path[-1] in case.origin.split("|"), f"raised in {path[-1]}, not {case.origin}"


def check_table(cases, entries) -> None:
    """The table's size and ids, and that every entry's unmodified call passes."""
    assert len(cases) >= 40, len(cases)
    assert len({c.id for c in cases}) == len(cases)
    assert {c.entry for c in cases} == set(entries)
