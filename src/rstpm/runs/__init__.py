"""The run directory: atomic files, teacher weights, weights and manifest, thresholds.json and
the resumable training checkpoint."""
