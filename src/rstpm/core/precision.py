"""Numeric precision of the networks' convolutions: exact fp32, or bfloat16 autocast on the CPU.

``bf16`` runs convolutions and matrix products in bfloat16 (fast on CPUs with AVX-512 BF16 or
AMX); parameters, optimiser state, the distances of Eq. 2 and the losses stay in float32. It is
a switch because it changes the numbers: measure it against ``fp32`` (benchmarks/speed.py and
the README) before trusting it on a new category.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
