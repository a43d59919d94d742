"""The pictures a client may ask for, as PNG bytes at the image's own size, drawn like the files
of ``rstpm predict --save-dir`` (:mod:`rstpm.inference.predict`, the same functions):

* ``map``: the anomaly map coloured with inferno, on the normalised scale (0.5 = the pixel
  threshold; without thresholds, the map's own range);
* ``overlay``: the image blended with that map and the region at or above the pixel threshold
  outlined in cyan.
"""

from __future__ import annotations

from PIL import Image

from rstpm.data.images import pil_to_tensor
from rstpm.inference.detector import Prediction
from rstpm.inference.overlay import colorize, encode_png
from rstpm.inference.predict import colour_scale, overlay_image


def map_png(prediction: Prediction) -> bytes:
    """The coloured anomaly map as PNG bytes."""
    values, vmin, vmax, _ = colour_scale(prediction)
    return encode_png(colorize(values, vmin, vmax))


def overlay_png(image: Image.Image, prediction: Prediction) -> bytes:
    """The image with its coloured map and the thresholded region's contour, as PNG bytes."""
    return encode_png(overlay_image(pil_to_tensor(image), prediction))
