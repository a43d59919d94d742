"""The one ASGI middleware: every HTTP request is counted and timed, and refused with 401 unless
it carries the API key (when there is one) or asks for an open path (``/healthz``).

Requests are labelled by route template (``/v1/runs/{name}/predict``), never by the raw path,
so clients cannot grow the metrics without bound; paths that match no route count as
``unmatched``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rstpm.serve.auth import OPEN_PATHS, key_matches
from rstpm.serve.metrics import ServeMetrics

UNAUTHORISED = "missing or wrong API key: send the header Authorization: Bearer <key>"


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route a request matches, or ``unmatched``."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


class GuardAndCount:
    """Counts and times every request (also the refused ones) and checks the API key."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServeMetrics,
        routes: Sequence[BaseRoute],
        api_key: str | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.api_key = api_key

    def _allowed(self, scope: Scope) -> bool:
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return True
        return key_matches(Headers(scope=scope).get("authorization"), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what a request that raises past every handler amounts to

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._allowed(scope):
                await self.app(scope, receive, send_and_note)
            else:
                refusal = JSONResponse(
                    {"error": UNAUTHORISED}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await refusal(scope, receive, send_and_note)
        finally:
            route = route_label(self.routes, scope)
            seconds = time.perf_counter() - start
            self.metrics.observe_request(route, scope.get("method", ""), status, seconds)
