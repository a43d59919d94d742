"""rstpm: Reconstructed Student-Teacher and Discriminative Networks for anomaly detection.

Reference implementation of Yamada, Kamiya, Hotta, arXiv 2210.07548. See README.md for the map
from each equation of the paper to the module that implements it.
"""

__version__ = "0.1.0"

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):  # lazy: `import rstpm` stays light, torch loads on first use
    if name in ("Detector", "Prediction"):
        from rstpm import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'rstpm' has no attribute {name!r}")
