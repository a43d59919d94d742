"""Peak memory of one prediction per pixel of the image, for whole-image and tiled runs (not a
test): what `rstpm serve`'s pixel budget charges an image of each run (rstpm.serve.admission).

For each run and each side S, a fresh Python process loads the run (``Detector.load``, torch
backend, glibc set as the command line sets it: rstpm.hardware.keep_freed_memory), predicts
one small image to warm up, resets the kernel's peak resident memory (``/proc/self/clear_refs``),
then makes an S x S RGB image (uint8, what the server decodes) and predicts it. It prints the
peak resident memory above the level before the image, in bytes per image pixel, beside what
the server charges (``bytes_per_pixel``) for the run, and between two sides the marginal cost
of a pixel (what the charge must cover) and the fixed part (the network's batch of inputs or
tiles, bounded by the batch size and not charged per pixel).

    python benchmarks/prediction_memory.py --runs runs/default/bottle-s0 runs/tile/bottle-t256-s0
        [--sides 1500 3000 6000] [--seed 0]

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from rstpm.hardware import keep_freed_memory
keep_freed_memory()
from rstpm import Detector
from rstpm.serve.admission import bytes_per_pixel

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

run, side, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
detector = Detector.load(run, backend="torch")
rng = np.random.default_rng(seed)
detector.predict(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
prediction = detector.predict(image)
peak = status("VmHWM")
print(json.dumps({
    "peak_bytes_per_pixel": (peak - before) / side**2,
    "charged_bytes_per_pixel": bytes_per_pixel(detector.config),
    "tiling": str(detector.config.tiling),
}))
"""


def measure(run: Path, side: int, seed: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(run), str(side), str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[1500, 3000, 6000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    worst = 0.0  # marginal / charged between the two largest sides, over the runs
    for run in args.runs:
        peaks: list[tuple[int, float]] = []  # (pixels, peak bytes)
        for side in sorted(args.sides):
            result = measure(run, side, args.seed)
            peak, charged = result["peak_bytes_per_pixel"], result["charged_bytes_per_pixel"]
            print(
                f"{run} ({result['tiling']}) {side}x{side}: peak {peak:.1f} bytes a pixel, "
                f"charged {charged:.1f}"
            )
            pixels = side * side
            if peaks:
                before, before_bytes = peaks[-1]
                marginal = (peak * pixels - before_bytes) / (pixels - before)
                fixed = peak * pixels - marginal * pixels
                last = marginal / charged
                print(
                    f"  marginal cost from the previous side {marginal:.1f} bytes a pixel "
                    f"(/ charged {marginal / charged:.2f}), fixed part {fixed / 2**20:.0f} MiB"
                )
            peaks.append((pixels, peak * pixels))
        if len(peaks) > 1:
            worst = max(worst, last)
    print(f"largest marginal / charged between the two largest sides: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
