"""Training: ``fit`` / ``resume`` on one epoch loop (loop.py) that both stages use: the
students (students.py) and the discriminative network (discriminator.py); thresholds are
calibrated at the end (calibrate.py)."""
