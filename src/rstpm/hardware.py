"""What this machine's CPU can do, read once per process (for ``--precision auto``).

``RSTPM_CPU_FLAGS`` overrides the detection: a comma- or space-separated list of flags, or
``none`` for no flags (then ``auto`` means fp32). The test suite sets it so that its exact-path
assertions hold on every machine; an operator can set it to pin a fleet to one path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rstpm.core.precision import PrecisionChoice, choose_precision

CPU_FLAGS_ENV = "RSTPM_CPU_FLAGS"
MALLOC_ENV = "RSTPM_MALLOC"  # keep (the default) | system: see keep_freed_memory
MALLOC_CHOICES = ("keep", "system")
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def malloc_choice() -> str:
    """``RSTPM_MALLOC`` (``keep`` unless set), checked."""
    choice = os.environ.get(MALLOC_ENV, "keep").strip().lower() or "keep"
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"{MALLOC_ENV}={choice!r}: use one of {', '.join(MALLOC_CHOICES)}")
    return choice


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep the memory a process frees, so that the next step reuses it.

    By default glibc serves every allocation above 32 MiB (the largest mmap threshold it
    allows) with its own ``mmap`` and returns it on ``free``; a training step allocates and
    frees such activations every step, and the kernel then zero-fills each page again on its
    first touch (profile_fit.py on a Zen 3 at fp32: about 1.7 M page faults a student step, a
    quarter of its CPU time). ``mallopt(M_MMAP_MAX, 0)`` serves them from the heap instead and a
    trim threshold of 1 GiB keeps what was freed: the process holds its peak memory rather than
    giving it back between steps. Measured by benchmarks/allocator.py (docs/performance.md).

    Called once per process by the command line and by ``fit``; ``RSTPM_MALLOC=system`` leaves
    glibc as it is. Returns whether the setting was applied (False off glibc, e.g. on macOS or
    musl).
    """
    if malloc_choice() == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt of another libc: leave it
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
