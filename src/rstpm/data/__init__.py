"""Data: folder layouts, image and mask reading under the input policy, datasets, DRAEM
pseudo-anomaly synthesis, synthetic MVTec-layout data and dataset checking."""
