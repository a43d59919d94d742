"""The paper's published numbers (arXiv 2210.07548), as restated in method.md section 6.

Triples are (image AUROC, pixel AUROC, PRO). Only the full method has per-category numbers here;
the variants and the ablations are means over the 15 MVTec AD categories.
"""

from __future__ import annotations

Triple = tuple[float, float, float]

# Means over the 15 categories. "stpm" is STPM as published by Wang et al. (2021).
MEAN_BY_VARIANT: dict[str, Triple] = {
    "stpm": (0.955, 0.970, 0.921),
    "st": (0.962, 0.977, 0.935),
    "disc": (0.981, 0.980, 0.939),
    "full": (0.987, 0.985, 0.951),
}

# The full method (Eq. 7), per category.
FULL_BY_CATEGORY: dict[str, Triple] = {
    "bottle": (1.000, 0.993, 0.973),
    "pill": (0.981, 0.987, 0.974),
    "cable": (0.996, 0.983, 0.948),
    "transistor": (0.983, 0.907, 0.830),
    "screw": (0.968, 0.993, 0.955),
}

# Ablations of the full method, means over the 15 categories (Tables III and IV).
MEAN_BY_ABLATION: dict[str, Triple] = {
    "pair2": (0.987, 0.985, 0.951),  # the paper's configuration
    "t2-small": (0.982, 0.979, 0.937),  # Table III: T2 = ResNet18 instead of ResNet50
    "attention-none": (0.985, 0.983, 0.944),  # Table IV
    "attention-both": (0.985, 0.983, 0.946),  # Table IV
}
