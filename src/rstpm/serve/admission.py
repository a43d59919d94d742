"""Admission control of ``rstpm serve``: request slots and a budget of decoded pixels.

A request is admitted in steps, each refused before anything costly happens:

1. a **slot** of its run (:class:`Slots`, ``--queue-size`` + ``--max-batch-size`` per run),
   taken before the body is read: a full server answers 503 without reading or decoding;
2. the image's **size from its header** (nothing decoded yet);
3. its width x height against the **pixel budget** (:class:`PixelBudget`,
   ``--max-pixels-in-flight``), before decoding: 503 while the budget is used by other images,
   413 for an image larger than the whole budget.

The pixels are held by a :class:`Lease` until every holder has let go of the image: the request
(until its answer, or its timeout), the decode thread, the inference worker (until its batch is
done). A request that timed out while the worker still computes its image keeps its pixels
counted, so a stuck worker never lets decoded images pile up beyond the budget.
"""

from __future__ import annotations

import math
import os
import threading

from rstpm.config import Config
from rstpm.serve.batching import QueueFullError

BYTES_PER_PIXEL = 12
"""What one pixel in flight costs at most, roughly: the decoded RGB image (3 bytes, 6 while
the decoder copies it), its conversion to RGB when it is not (3), the anomaly map at the image's
own size (float32, 4)."""

TILED_OWN_BYTES_PER_PIXEL = 24
"""What a tiled run costs per pixel of the image at its own size: as a whole-image run, plus
the image as float32 (cut at its own resolution or scaled from it)."""

TILED_BYTES_PER_CUT_PIXEL = 32
"""What a tiled run costs on top per pixel of its tiles (the image scaled by ``--tile-scale``,
the overlaps counted twice): the tiles, their maps, the stitching's running sums and weights,
the stitched map. Measured by benchmarks/prediction_memory.py (docs/serve.md, "Memory")."""


def bytes_per_pixel(config: Config) -> float:
    """What one pixel of an image costs a run at most: :data:`BYTES_PER_PIXEL` for a run that
    scores whole images (resized to the network's size: the network's batch is a fixed cost,
    bounded by ``--max-batch-size``); for a tiled run :data:`TILED_OWN_BYTES_PER_PIXEL` plus
    :data:`TILED_BYTES_PER_CUT_PIXEL` x scale squared x the tiles' overlap factor (its batch of
    tiles is a fixed cost too)."""
    tiling = config.tiling
    if tiling is None:
        return float(BYTES_PER_PIXEL)
    overlap = (tiling.tile / (tiling.tile - tiling.overlap)) ** 2
    return TILED_OWN_BYTES_PER_PIXEL + TILED_BYTES_PER_CUT_PIXEL * tiling.scale**2 * overlap


def pixel_weight(config: Config) -> float:
    """How many decoded pixels of the budget (at :data:`BYTES_PER_PIXEL`) one pixel of an image
    counts for with this run: 1 for whole-image runs, more for tiled ones."""
    return bytes_per_pixel(config) / BYTES_PER_PIXEL


MEMORY_SHARE = 8
"""The default budget lets decoded images and their maps use 1/MEMORY_SHARE of the memory."""

FALLBACK_MEMORY_BYTES = 8 * 1024**3
"""The memory assumed where the machine's cannot be read."""


class OverBudgetError(RuntimeError):
    """The pixel budget is used by other images now: retry later (503 with Retry-After)."""


class ImageOverBudgetError(ValueError):
    """An image larger than the whole pixel budget: it can never be admitted (413)."""


def physical_memory_bytes() -> int:
    """The machine's physical memory (:data:`FALLBACK_MEMORY_BYTES` where unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_BYTES


def default_pixel_budget(memory_bytes: int | None = None) -> int:
    """``--max-pixels-in-flight`` by default: 1/8 of the memory at 12 bytes per pixel (16 GiB:
    178,956,970 pixels, two 9000x9000 images or ~35 images of 5 megapixels)."""
    memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
    return max(1, memory // MEMORY_SHARE // BYTES_PER_PIXEL)


class Lease:
    """Pixels reserved for one image, returned to the budget when the last holder releases."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self.pixels = pixels
        self._budget = budget
        self._holders = 1
        self._lock = threading.Lock()

    def share(self) -> Lease:
        """One more holder (a thread or the worker that will use the image)."""
        with self._lock:
            if self._holders == 0:
                raise RuntimeError("the lease was already released")
            self._holders += 1
        return self

    def release(self) -> None:
        """One holder lets go; the last one gives the pixels back."""
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._budget._give_back(self.pixels)


class PixelBudget:
    """A count of decoded pixels in flight, bounded by ``limit`` (thread-safe)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("--max-pixels-in-flight must be at least 1")
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Pixels reserved now."""
        return self._used

    def reserve(self, pixels: int, weight: float = 1.0) -> Lease:
        """A lease on ``pixels`` x ``weight`` (:func:`pixel_weight` of the image's run).

        Raises:
            ImageOverBudgetError: more pixels than the whole budget.
            OverBudgetError: not that many pixels free now.
        """
        charged = math.ceil(pixels * weight)
        if charged > self.limit:
            cost = "" if weight == 1.0 else f" (x{weight:.2f} for this tiled run: {charged:,})"
            raise ImageOverBudgetError(
                f"image of {pixels:,} pixels{cost} is larger than the server's budget of "
                f"{self.limit:,} decoded pixels in flight (--max-pixels-in-flight); downscale it"
            )
        with self._lock:
            if self._used + charged > self.limit:
                raise OverBudgetError(
                    "the server's budget of decoded pixels in flight is in use"
                    " (--max-pixels-in-flight)"
                )
            self._used += charged
        return Lease(self, charged)

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self._used -= pixels


class Slots:
    """Requests of one run between arrival and answer, at most ``limit`` (event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> None:
        """One slot.

        Raises:
            QueueFullError: every slot is taken.
        """
        if self.taken >= self.limit:
            raise QueueFullError("the inference queue is full")
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1
