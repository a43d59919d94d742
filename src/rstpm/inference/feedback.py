"""The operator's feedback on images: their scores and the run's verdicts, ready for the log.

``rstpm feedback`` and the service's ``POST /v1/runs/{name}/feedback`` record an operator's
verdict on an image with what the run made of it: the image score of every calibrated variant
(so that ``rstpm threshold --from-feedback`` can recalibrate without the image) and the verdict
each gave. The log itself is rstpm.runs.feedback_log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from rstpm.data.images import DataError, check_file
from rstpm.inference.backends import Backend, open_backend
from rstpm.inference.detector import score_maps
from rstpm.inference.maps import View
from rstpm.metrics.thresholds import Thresholds
from rstpm.runs.feedback_log import image_digest, make_entry
from rstpm.runs.thresholds_file import load_thresholds


class FeedbackScorer:
    """Every calibrated variant of a run, opened once: scores and verdicts of images."""

    def __init__(self, run_dir: Path, backend: str = "torch") -> None:
        self.run_dir = Path(run_dir)
        self.thresholds: dict[str, Thresholds] = load_thresholds(self.run_dir)
        if not self.thresholds:
            raise DataError(
                f"{self.run_dir} has no thresholds: feedback corrects verdicts; calibrate it "
                f"first with `rstpm threshold --run {self.run_dir}`"
            )
        self._opened: Backend = open_backend(self.run_dir, list(self.thresholds), backend)
        self._view = View.of_run(self.run_dir, self._opened.config)

    def scores(self, image: str | Path | Image.Image) -> dict[str, float]:
        """The image score of every variant, as predict takes it (the run's tiling and region
        of interest included)."""
        opened = self._opened
        maps, _ = score_maps(opened.batch_maps, self._view, image, opened.variants, str(image))
        return {v: float(m.max()) for v, m in maps.items()}

    def verdicts(self, scores: dict[str, float]) -> dict[str, str | None]:
        """What each variant said at its calibrated image threshold."""
        out: dict[str, str | None] = {}
        for variant, score in scores.items():
            threshold = self.thresholds.get(variant)
            if threshold is None:
                out[variant] = None
            else:
                out[variant] = "anomalous" if score >= threshold.image.value else "normal"
        return out

    def entry(
        self, verdict: str, name: str, data: bytes, image: Any, source: str
    ) -> dict[str, Any]:
        """One log entry for an image whose bytes are ``data``, decoded as ``image``."""
        scores = self.scores(image)
        return make_entry(verdict, name, image_digest(data), scores, self.verdicts(scores), source)


def entries_for_files(
    scorer: FeedbackScorer, paths: Sequence[Path], verdict: str
) -> list[dict[str, Any]]:
    """Log entries for image files (``rstpm feedback``).

    Raises:
        DataError: a file that is missing or not a readable image (nothing is logged).
    """
    entries = []
    for path in paths:
        check_file(Path(path))
        entries.append(scorer.entry(verdict, str(path), Path(path).read_bytes(), Path(path), "cli"))
    return entries


def corrected(entry: dict[str, Any], variant: str) -> bool | None:
    """Whether the operator's verdict differs from what ``variant`` said (None: it said none)."""
    said = entry.get("predicted", {}).get(variant)
    if said is None:
        return None
    return (said == "anomalous") != (entry["verdict"] == "defect")
