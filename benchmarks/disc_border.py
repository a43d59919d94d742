"""Where the discriminative network (Omega^7) fires on normal images: its response by distance
from the map's border, and its inputs there. Not a test; the investigation behind issue 11.

For a run and its category, on four sets of images (up to ``--limit`` each): training images
(the U-Net learnt on pseudo-anomalies of these), held-out selection images, test good and test
defective images, it prints per ring of the U-Net's map (ring k = the pixels k pixels from the
nearest edge; rings ``--rings`` wide, the rest is "inner"):

* the U-Net's normalised inputs (mean per channel: Omega^1+6, Omega^2+5, Omega^3+4 after the
  run's InputNormalizer);
* Omega^7's mean, and the mean over images of its maximum within the ring (what sets an image
  score is the maximum);
* where each image's Omega^7 maximum lies (a histogram of its distance from the edge).

    python benchmarks/disc_border.py --run runs/transistor-paper \\
        --data ../shared/data/mvtec_ad/transistor [--limit 60] [--rings 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rstpm.core.discriminative import DiscriminativeUNet
from rstpm.data.dataset import load_all_images
from rstpm.data.layout import Sample, list_test_samples
from rstpm.runs.run_dir import load_run
from rstpm.training.discriminator import discriminator_inputs
from rstpm.training.fit import _training_split


def edge_distance(size: tuple[int, int]) -> np.ndarray:
    """(h, w) int: each pixel's distance in pixels from the nearest edge (0 on the edge)."""
    h, w = size
    rows, cols = np.mgrid[0:h, 0:w]
    return np.minimum(np.minimum(rows, cols), np.minimum(h - 1 - rows, w - 1 - cols))


@torch.no_grad()
def profile(model, config, samples: Sequence[Sample], rings: int) -> dict[str, list]:
    """Per ring: mean normalised input per channel, Omega^7 mean, mean of per-image ring max;
    and the histogram of the argmax's edge distance (last bin: >= rings)."""
    images = load_all_images(samples, config.image_size)
    raw = discriminator_inputs(model, images, config.batch_size)
    stage = model.discriminator
    scaled = stage.normalizer(raw)
    omega7 = torch.cat(
        [DiscriminativeUNet.probability(stage(raw[i : i + 16])) for i in range(0, len(raw), 16)]
    )
    distance = torch.from_numpy(edge_distance(stage.map_size))
    ring_of = distance.clamp(max=rings)
    result: dict[str, list] = {"inputs": [], "mean": [], "ring_max": []}
    for ring in range(rings + 1):
        inside = ring_of == ring
        result["inputs"].append(scaled[:, :, inside].mean(dim=(0, 2)).tolist())
        result["mean"].append(float(omega7[:, inside].mean()))
        result["ring_max"].append(float(omega7[:, inside].amax(dim=1).mean()))
    argmax = omega7.flatten(1).argmax(dim=1)
    result["argmax_histogram"] = np.bincount(
        ring_of.flatten()[argmax].numpy(), minlength=rings + 1
    ).tolist()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--rings", type=int, default=8)
    args = parser.parse_args(argv)
    model, config, _ = load_run(args.run)
    if model.discriminator is None:
        raise SystemExit(f"{args.run}: the run has no discriminative network")
    split = _training_split(config, args.data)
    test = list_test_samples(args.data)
    sets = {
        "train": split.train,
        "selection": split.selection,
        "test good": [s for s in test if s.label == 0],
        "test defective": [s for s in test if s.label == 1],
    }
    h, w = model.discriminator.map_size
    print(f"U-Net map {h}x{w}; ring k = k px from the edge, 'in' = >= {args.rings} px")
    for name, samples in sets.items():
        samples = samples[: args.limit]
        result = profile(model, config, samples, args.rings)
        labels = [str(k) for k in range(args.rings)] + ["in"]
        print(f"\n{name} ({len(samples)} images)")
        print("ring            " + " ".join(f"{label:>6}" for label in labels))
        print("omega7 mean     " + " ".join(f"{v:6.3f}" for v in result["mean"]))
        print("omega7 ring max " + " ".join(f"{v:6.3f}" for v in result["ring_max"]))
        print("argmax count    " + " ".join(f"{v:6d}" for v in result["argmax_histogram"]))
        for channel in range(3):
            values = [ring[channel] for ring in result["inputs"]]
            print(f"input ch{channel}       " + " ".join(f"{v:+6.2f}" for v in values))


if __name__ == "__main__":
    main()
