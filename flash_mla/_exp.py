"""exp, exp2, sigmoid and logsumexp for the fp32 reference, evaluated in float64 on CPU.

On a busy 2-core CPU, torch 2.13's fp32 ``torch.exp`` returned values off by up to 1e-4
(absolute, on results <= 1) in about one fresh process in ten, with either vectorised
kernel (AVX2, AVX512), while the float64 kernel stayed exact; the smoke test's lse check
caught it through ``torch.logsumexp``. On CPU these helpers therefore take the float64
kernel and round the result to fp32 once (a correctly rounded fp32 exp); on a GPU they are
the plain fp32 calls.
"""
from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).to(x.dtype) if _wide(x) else torch.exp(x)


def exp2(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(x.double()).to(x.dtype) if _wide(x) else torch.exp2(x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x.double()).to(x.dtype) if _wide(x) else torch.sigmoid(x)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(x))) over dim (torch.logsumexp, in float64 on CPU); a row of -inf gives -inf."""
    if not _wide(x):
        return torch.logsumexp(x, dim=dim)
    return torch.logsumexp(x.double(), dim=dim).to(x.dtype)
