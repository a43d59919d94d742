"""Cost of the discriminative U-Net at a quarter of the input size vs at the input size.

Not a test: prints seconds per training step (forward + backward + Adam, batch 16) and per
inference batch for both resolutions, measured in one process, and their ratios.

    python benchmarks/disc_resolution.py [--image-size 256] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from speed import median_time  # benchmarks/speed.py, next to this script

from rstpm.core.discriminative import DiscriminativeStage
from rstpm.core.focal_loss import focal_loss


def measure(side: int, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    stage = DiscriminativeStage((side, side))
    raw = torch.rand(batch, 3, side, side)
    stage.normalizer.fit(raw)
    target = (torch.rand(batch, side, side) > 0.9).float()
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=1e-4)

    def train_step() -> None:
        stage.train()
        loss = focal_loss(stage(raw), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        stage.eval()
        with torch.inference_mode():
            stage(raw)

    return median_time(train_step, repeats), median_time(infer, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, batch {args.batch_size}"
    )
    quarter = measure(args.image_size // 4, args.batch_size, args.repeats)
    full = measure(args.image_size, args.batch_size, args.repeats)
    for name, (train_s, infer_s) in (("quarter", quarter), ("full", full)):
        side = args.image_size // 4 if name == "quarter" else args.image_size
        print(f"{name:>8} ({side}x{side}): train step {train_s:.3f} s, inference {infer_s:.3f} s")
    train_ratio, infer_ratio = full[0] / quarter[0], full[1] / quarter[1]
    print(f"full / quarter: train {train_ratio:.1f}x, inference {infer_ratio:.1f}x")


if __name__ == "__main__":
    main()
