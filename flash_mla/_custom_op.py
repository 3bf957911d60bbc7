"""The torch.library boilerplate every op family shares, written once.

``define(name, schema, body, fake)`` registers ``flash_mla::<name>`` as a custom op
whose implementation is ``body`` (the family's function on validated inputs) and
whose fake (meta) implementation is ``fake``, and returns a :class:`FamilyOp`.

Calling a FamilyOp runs the registered op only while torch.compile traces the
caller; eager calls run ``body`` (or the family's ``eager`` function) directly.
Why: going through torch.library costs about a hundred microseconds per eager call
(docs/dispatch.md has the measurement), far more than the body's own host time,
while dynamo cannot trace the bodies (they call the native library or read
sequence lengths on the host) and needs the registered op and its fake. Both
paths run the same body, so they give identical numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ._checks import is_compiling

NAMESPACE = "flash_mla"


class FamilyOp:
    """A registered op plus the direct path that eager calls take.

    ``op`` is the torch.library CustomOpDef (register autograd on it), ``body`` the
    implementation, ``eager`` what an eager call runs (``body`` unless given)."""

    def __init__(self, op: Any, body: Callable, eager: Optional[Callable] = None) -> None:
        self.op = op
        self.body = body
        self.eager = eager if eager is not None else body

    def __call__(self, *args: Any) -> Any:
        if is_compiling():
            return self.op(*args)
        return self.eager(*args)


def define(name: str, schema: str, body: Callable, fake: Callable,
           eager: Optional[Callable] = None) -> FamilyOp:
    """Register ``flash_mla::<name>`` (no mutated arguments) with its fake kernel.

    ``schema`` is the argument list and return type, e.g.
    ``"(Tensor q, int d_v) -> (Tensor, Tensor)"``; ``fake`` takes the same
    arguments and returns empty tensors with the real outputs' shapes, dtypes and
    strides; ``eager`` (default ``body``) is what an eager call runs instead of the
    registered op."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", body, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return FamilyOp(op, body, eager)
