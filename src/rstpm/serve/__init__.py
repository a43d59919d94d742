"""``rstpm serve``: trained runs as an HTTP inspection service (FastAPI + uvicorn).

Needs the ``serve`` extra (``pip install -e '.[serve]'``). The pieces, lowest first:
``upload`` (what a client sends, checked and decoded), ``batching`` (micro-batches on a worker
thread behind a bounded queue), ``admission`` (request slots and the budget of decoded pixels,
before decoding), ``runs`` (loading and naming runs), ``drift`` (recent scores against the
calibration), ``auth``, ``metrics``, ``middleware``, ``render`` and ``page``, then ``app`` (the
routes) and ``server`` (uvicorn).
The endpoints, flags and errors are documented in ``docs/serve.md``.
"""

from rstpm.serve.app import ServeSettings, create_app
from rstpm.serve.runs import ServedRun, load_runs
from rstpm.serve.server import run_server, start_in_thread

__all__ = ["ServeSettings", "ServedRun", "create_app", "load_runs", "run_server", "start_in_thread"]
