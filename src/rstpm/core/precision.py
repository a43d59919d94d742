"""Numeric precision of the networks' convolutions: exact fp32, or bfloat16 autocast on the CPU.

``bf16`` runs convolutions and matrix products in bfloat16 (fast on CPUs with AVX-512 BF16 or
AMX); parameters, optimiser state, the distances of Eq. 2 and the losses stay in float32. It is
a switch because it changes the numbers: measure it against ``fp32`` (benchmarks/speed.py and
docs/performance.md) before trusting it on a new category.

``auto`` (the command line's default) is resolved by :func:`choose_precision` from the CPU's
flags: bf16 where the CPU computes bf16 natively, fp32 elsewhere (a CPU without those
instructions emulates bf16, many times slower than fp32), both in the channels-last layout
(oneDNN's faster convolutions: the fp32 student epoch 1.5x faster, docs/performance.md). The
exact path is an explicit ``fp32`` without ``channels_last``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch

PRECISIONS = ("fp32", "bf16")
"""What the networks run at."""
REQUESTS = ("auto", *PRECISIONS)
"""What a user may ask for: ``auto`` is resolved per machine."""
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (as /proc/cpuinfo names them) of native bf16 arithmetic: either one suffices."""


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """What a request resolved to on one machine (recorded in run.json)."""

    requested: str
    precision: str
    channels_last: bool
    native_bf16: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_precision(
    requested: str, cpu_flags: Collection[str], channels_last: bool = False
) -> PrecisionChoice:
    """Resolve ``auto`` / ``fp32`` / ``bf16`` against a CPU's flags.

    ``auto`` gives bf16 when one of :data:`NATIVE_BF16_FLAGS` is present, else fp32, both with
    channels-last; an explicit precision is kept as it is, with the layout asked for.
    """
    if requested not in REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(REQUESTS)}, got {requested!r}")
    native = any(flag in cpu_flags for flag in NATIVE_BF16_FLAGS)
    if requested == "auto":
        precision = "bf16" if native else "fp32"
        return PrecisionChoice(requested, precision, True, native)
    return PrecisionChoice(requested, requested, channels_last, native)
