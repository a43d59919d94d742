"""The pictures a client may ask for, as PNG bytes at the image's own size, drawn like the files
of ``rstpm predict --save-dir`` (:mod:`rstpm.inference.overlay`):

* ``map``: the anomaly map coloured with inferno, on the normalised scale (0.5 = the pixel
  threshold; without thresholds, the map's own range);
* ``overlay``: the image blended with that map and the region at or above the pixel threshold
  outlined in cyan.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rstpm.data.images import pil_to_tensor
from rstpm.inference.detector import Prediction
from rstpm.inference.overlay import colorize, encode_png, render_overlay


def _colour_scale(prediction: Prediction) -> tuple[np.ndarray, float, float, float | None]:
    """The values to colour, their range and the contour level (None: no thresholds)."""
    if prediction.normalised_map is not None:
        return prediction.normalised_map, 0.0, 1.0, 0.5
    values = prediction.anomaly_map
    return values, float(values.min()), float(values.max()) + 1e-12, None


def map_png(prediction: Prediction) -> bytes:
    """The coloured anomaly map as PNG bytes."""
    values, vmin, vmax, _ = _colour_scale(prediction)
    return encode_png(colorize(values, vmin, vmax))


def overlay_png(image: Image.Image, prediction: Prediction) -> bytes:
    """The image with its coloured map and the thresholded region's contour, as PNG bytes."""
    rgb = (pil_to_tensor(image).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    values, vmin, vmax, threshold = _colour_scale(prediction)
    return encode_png(render_overlay(rgb, values, vmin, vmax, threshold))
