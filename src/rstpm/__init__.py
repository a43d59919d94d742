"""rstpm: Reconstructed Student-Teacher and Discriminative Networks for anomaly detection.

Reference implementation of Yamada, Kamiya, Hotta, arXiv 2210.07548. See docs/method.md for the
map from each equation of the paper to the module that implements it, and docs/architecture.md
for the layers:

    core -> config -> data -> metrics -> runs -> training -> inference -> evaluation -> serve -> cli

each a sub-package (config, hardware and cli are modules) that imports only from the layers
before it (tests/test_layers.py keeps it so).
"""

from rstpm._version import __version__

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):  # lazy: `import rstpm` stays light, torch loads on first use
    if name in ("Detector", "Prediction"):
        from rstpm.inference import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'rstpm' has no attribute {name!r}")
