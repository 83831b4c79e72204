"""Operand precision of the dense terms' score matmuls (powerset NLA scores, XAC similarities).

``fp32``: plain fp32 matmuls (the training loop runs the loss forward with TF32 off whatever
``train.tf32`` says; the backward follows ``train.tf32``). ``bf16``: the operands are
rounded to bf16 and multiplied in bf16 (fp32 accumulation inside the kernel, result rounded to bf16),
and the result goes back to fp32 at once, so every activation (softplus, log-cosh, softmax,
log-sum-exp) and every reduction still runs in fp32. The backward of such a matmul is bf16 too.
Why it is a choice and not the default: the scores are divided by tau ~ 1e-3 before the powerset
activation, so a rounding of the scores is magnified. tests/test_matmul_precision.py bounds the
powerset loss's error against an fp64 reference at 1e-3 of the margin and XAC's at 1e-3 of the loss
value (XAC's absolute error is larger than 1e-3 of the margin), at small shapes on a CPU; fp32 stays
the default until a full-size run on the target GPU has shown the bounds hold there too. On a GPU bf16 operands run on the tensor cores at many
times fp32's rate; on a CPU they merely work (and are what the tests exercise).
"""

from __future__ import annotations

import torch

CHOICES = ("fp32", "bf16")


def operand_dtype(precision: str, key: str) -> torch.dtype | None:
    """The dtype the score matmuls' operands are rounded to (None: no rounding); errors name ``key``."""
    if precision not in CHOICES:
        raise ValueError(f"{key}={precision!r} is not one of {CHOICES}")
    return torch.bfloat16 if precision == "bf16" else None


def mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b, with operands in ``dtype`` when given, returned in a's dtype."""
    if dtype is None:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def bmm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """torch.bmm(a, b), with operands in ``dtype`` when given, returned in a's dtype."""
    if dtype is None:
        return torch.bmm(a, b)
    return torch.bmm(a.to(dtype), b.to(dtype)).to(a.dtype)


def einsum(equation: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """torch.einsum of two operands, in ``dtype`` when given, returned in a's dtype."""
    if dtype is None:
        return torch.einsum(equation, a, b)
    return torch.einsum(equation, a.to(dtype), b.to(dtype)).to(a.dtype)
