"""Evaluation and reports: ``rstpm test`` (TIFF maps, metrics.json, report.html), ``rstpm
threshold`` (recalibration), ``rstpm bench`` and the paper's numbers."""
