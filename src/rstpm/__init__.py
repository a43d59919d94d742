"""rstpm: Reconstructed Student-Teacher and Discriminative Networks for anomaly detection.

Reference implementation of Yamada, Kamiya, Hotta, arXiv 2210.07548. See README.md for the map
from each equation of the paper to the module that implements it.
"""

__version__ = "0.1.0"
