"""The project's one HTTP server (aiohttp): Telegram webhook, Slack events, health, readiness, metrics.

Channels add their routes before `start()`. It binds APPRENTICE_HTTP_HOST (127.0.0.1 by
default) so nothing is exposed unless an operator says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[], Awaitable[bool]]
READY_TIMEOUT_S = 5.0


class HttpServer:
    """A small aiohttp app with an explicit start/stop lifecycle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.app = web.Application(client_max_size=1024 * 1024)
        self._runner: web.AppRunner | None = None
        # /readyz runs every check (database, vector store, model); the App fills these in.
        self.ready_checks: dict[str, Check] = {}
        # /metrics: the body and its content type (bot/metrics.py, prometheus_client)
        self.metrics_page: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)
        self.add_route("GET", "/metrics", self._metrics)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.app.router.add_route(method, path, handler)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        """200 when every dependency answers, else 503 naming the ones that did not (load balancers)."""

        async def run(check: Check) -> bool:
            try:
                return bool(await asyncio.wait_for(check(), READY_TIMEOUT_S))
            except Exception as exc:
                log.warning("readiness check failed: %s", type(exc).__name__)
                return False

        names = list(self.ready_checks)
        results = await asyncio.gather(*(run(self.ready_checks[n]) for n in names))
        checks = {n: "ok" if ok else "failing" for n, ok in zip(names, results, strict=True)}
        ready = all(results)
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_page is None:
            return web.Response(status=404, text="metrics are not enabled")
        body, content_type = await self.metrics_page()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # port 0 picks a free port; report the real one
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("HTTP server on %s:%s", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
