"""Touching memory again after it sat freed for a while: a cost a pool refresh > 1 can pay here.

Not a test. Allocates and writes ``--gib`` GiB (new pages from the kernel, as the frozen networks'
activations of a pseudo-anomaly pool are), frees it, waits, and does it again: after a short
wait (``--short`` seconds) and after a long one (``--long``), alternately, ``--repeats`` times.
Prints the median seconds of each and their ratio (long / short).

On the development VM (2-core AMD EPYC, a firecracker guest) memory freed and left idle for
100 s is slower to touch again than after 5 s. The guest kernel runs a DAMON scheme that pages
out memory not accessed for 60 s (``/sys/kernel/mm/damon/admin``), a likely cause, not proven.
A pool refresh > 1 can pay it here: a pool made every 5th U-Net epoch (about 2.5 min apart)
may find its memory gone cold, a pool made every epoch (about 1 min apart) does not. Seen in
benchmarks/pool_refresh.py's runs: 48-58 s per pool at refresh 5 and 10 in one process, 22 s at
refresh 1, and 20-24 s at refresh 5 in a later process that had trained at refresh 1 first.
On a machine without such reclaim the ratio should be about 1. Measured here: x1.39 on the
quiet machine, x2.60 while a fit ran beside it; not enough on its own to explain those pools.

    python benchmarks/page_reuse.py --gib 2 --short 5 --long 100 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def touch_seconds(gib: float) -> float:
    """Seconds to allocate and write ``gib`` GiB of new memory (freed again afterwards)."""
    started = time.perf_counter()
    block = np.ones(int(gib * 2**30) // 8)
    seconds = time.perf_counter() - started
    del block
    return seconds


def measure(gib: float, short: float, long: float, repeats: int) -> dict[str, float]:
    """Median touch seconds after the short and the long wait, and their ratio."""
    touch_seconds(gib)  # the first touch of a fresh process is not compared
    after = {"short": [], "long": []}
    for _ in range(repeats):
        for name, wait in (("short", short), ("long", long)):
            time.sleep(wait)
            after[name].append(touch_seconds(gib))
    result = {name: statistics.median(values) for name, values in after.items()}
    result["ratio"] = result["long"] / result["short"]
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--short", type=float, default=5.0, help="seconds")
    parser.add_argument("--long", type=float, default=100.0, help="seconds")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure(args.gib, args.short, args.long, args.repeats)
    print(
        f"{args.gib:g} GiB touched after {args.short:g} s freed: {result['short']:.2f} s; "
        f"after {args.long:g} s freed: {result['long']:.2f} s; ratio x{result['ratio']:.2f} "
        f"(median of {args.repeats})"
    )
    return result


if __name__ == "__main__":
    main()
