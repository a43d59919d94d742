"""What this machine's CPU can do, read once per process (for ``--precision auto``).

``RSTPM_CPU_FLAGS`` overrides the detection: a comma- or space-separated list of flags, or
``none`` for no flags (then ``auto`` means fp32). The test suite sets it so that its exact-path
assertions hold on every machine; an operator can set it to pin a fleet to one path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rstpm.core.precision import PrecisionChoice, choose_precision

CPU_FLAGS_ENV = "RSTPM_CPU_FLAGS"
CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo's text (x86: ``flags``; ARM:
    ``Features``); empty when there is no such line."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def _detected_flags() -> frozenset[str]:
    try:
        return parse_cpuinfo_flags(CPUINFO.read_text(errors="replace"))
    except OSError:  # not Linux, or /proc hidden: no native bf16 assumed (the exact path)
        return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's flags: ``RSTPM_CPU_FLAGS`` when set, else /proc/cpuinfo (read once)."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        names = override.replace(",", " ").split()
        return frozenset(name for name in names if name != "none")
    return _detected_flags()


def resolve_precision(requested: str, channels_last: bool = False) -> PrecisionChoice:
    """``requested`` (auto / fp32 / bf16) resolved on this machine."""
    return choose_precision(requested, cpu_flags(), channels_last)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then restore the previous count (also
    when the block raises)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
