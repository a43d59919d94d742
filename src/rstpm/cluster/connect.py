"""Joining a Ray cluster for ``--ray [ADDRESS]``, with one-line errors.

ADDRESS as Ray's own ``ray.init(address=...)`` reads it:

* none (``--ray`` alone): ``RAY_ADDRESS``, else the cluster last started on this machine with
  ``ray start``, else a new local Ray instance on this machine's cores;
* ``auto``: a running cluster (``ray start`` on this machine), or an error;
* ``local``: a new local instance, even when a cluster runs;
* ``HOST:PORT`` (a head's GCS address) or ``ray://HOST:PORT`` (Ray Client).

When the driver is already connected (``ray.init`` called by the caller, as the tests do with
a multi-node ``ray.cluster_utils.Cluster``) that connection is used and left open.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'rstpm[ray]' (./scripts/setup installs it)"


class ClusterError(RuntimeError):
    """A cluster job cannot start or go on (Ray missing, no cluster at the address, ...)."""


WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray's niceness of its worker processes (its default 15); a local instance rstpm starts runs
them at 0 unless the variable is set, so that tasks keep their share of a busy machine."""


def import_ray() -> Any:
    """The ``ray`` module, or a ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to (or start) Ray for the duration of the block; yields the ``ray`` module.

    ``num_cpus`` only applies when a new local instance starts (None: all cores). A session
    this function opened is shut down at the end; an existing connection is kept.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {
        "address": address,
        "include_dashboard": False,
        "log_to_driver": os.environ.get("RSTPM_RAY_LOG_TO_DRIVER", "1") != "0",
        "configure_logging": False,
    }
    if address in (None, "local"):
        kwargs["num_cpus"] = num_cpus
        # Ray starts its workers at nice 15: beside other work they got a sliver of the CPU
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = address or "the default address"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(
            f"cannot connect to Ray at {where}: {first}; start a head with `ray start --head` "
            "or pass --ray local"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def free_cpus(ray: Any) -> float:
    """CPUs the cluster has free now (what task and actor sizes are chosen from)."""
    return float(ray.available_resources().get("CPU", 0.0))


def total_cpus(ray: Any) -> float:
    """CPUs of all alive nodes of the cluster."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def enter_driver_folder(cwd: str) -> None:
    """Run a task or actor in the driver's current folder (given as ``os.getcwd()`` there), so
    relative paths (data, runs, --anomaly-source, weights) mean what they mean on the driver:
    Ray starts workers elsewhere (Ray Train in its own trial folder). Needs shared storage
    mounted at the same path on every node; a one-line ClusterError where it is not."""
    if not Path(cwd).is_dir():
        raise ClusterError(
            f"{cwd} (the driver's current folder) is not on this node; put the data and runs "
            "on storage every node mounts at the same path"
        )
    os.chdir(cwd)
