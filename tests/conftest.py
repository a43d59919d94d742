"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rstpm.data.synthetic import make_synthetic_category

# `--precision auto` (the default) resolves from the CPU's flags: on a CPU with native bf16 it
# would take the bf16 path and the suite's results would depend on the machine. The suite runs
# as on a CPU without bf16 (fp32, channels-last) unless a test forces flags
# (tests/test_precision.py); subprocesses inherit the setting.
os.environ.setdefault("RSTPM_CPU_FLAGS", "none")
# `--backend auto` (the command line's default) runs OpenVINO where installed, exporting the
# run's graph on first use; the suite pins it to torch so that every test of another subject
# compares against the exact path without exporting each run. tests/test_openvino.py tests auto.
os.environ.setdefault("RSTPM_BACKEND", "torch")

# Ray starts its workers at nice 15 by default: beside a fit (or any CPU-heavy process) the Ray
# tests' workers got a sliver of the 2 cores and crawled. Test clusters inherit this.
os.environ.setdefault("RAY_worker_niceness", "0")

FULL_TIER_MODULES = ("test_cluster_ddp", "test_cluster_fanout", "test_cluster_predict")
"""Modules that start Ray (a local cluster costs seconds and ~0.4 GB each): the full tier only."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two tiers: ``pytest -m "not slow"`` (the quick tier) leaves out the tests marked slow
    (real data, CLI subprocesses, the browser, long fits) and every test of the Ray modules."""
    for item in items:
        if item.module is not None and item.module.__name__.split(".")[-1] in FULL_TIER_MODULES:
            item.add_marker(pytest.mark.slow)


SYNTHETIC_KWARGS = {
    "n_train": 20,
    "n_test_good": 4,
    "n_test_per_type": 4,
    "size": 64,
    "seed": 0,
}
"""Arguments of the shared synthetic category (defect types: the defaults, scratch and stain)."""


@pytest.fixture(scope="session")
def synthetic_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout category (20 train, 4 good + 2x4 defective test, 64 px).

    Shared by the whole session: treat it as read-only.
    """
    root = tmp_path_factory.mktemp("synthetic") / "category"
    return make_synthetic_category(root, **SYNTHETIC_KWARGS)
