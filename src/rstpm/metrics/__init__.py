"""Metrics (numpy only): the MVTec AD protocol (image / pixel AUROC, PRO), their curves, the
threshold maths of calibration and the verdict counts at a threshold."""
