"""The project's one HTTP server (aiohttp): Telegram webhook, Slack events, health, readiness, metrics.

Channels add their routes before `start()`. It binds APPRENTICE_HTTP_HOST (127.0.0.1 by
default) so nothing is exposed unless an operator says so.

A slow or half-open client cannot take it down (docs/security.md, "Unbounded consumption"): a
connection must deliver its request line and headers within `read_timeout_s` of connecting (and
between requests, within `keepalive_timeout_s`), and its body within `read_timeout_s` (else 408),
before any handler runs; at most `max_connections` connections are kept, the oldest without a
request in progress being closed to make room (so a flood of half-open sockets cannot exhaust the
process's file descriptors); and `/readyz` answers from a cached check, so hammering it costs at
most one round of dependency probes per `ready_ttl_s`. Repeated log lines are throttled by
`bot/logsafe.ThrottleFilter`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[], Awaitable[bool]]
READY_TIMEOUT_S = 5.0  # one dependency probe
READY_TTL_S = 2.0  # /readyz reuses a check this young
READ_TIMEOUT_S = 10.0  # request line and headers after connecting; the body after the headers
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection (longer than a proxy's, usually 60 s)
MAX_BODY = 1024 * 1024  # 413 beyond this


def default_max_connections() -> int:
    """Half the process's file-descriptor limit, at most 1024: the other half stays for the database,
    the vector store, outgoing HTTP and the listening socket itself."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 512
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft // 2))


class HttpServer:
    """A small aiohttp app with an explicit start/stop lifecycle."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        max_connections: int | None = None,
        ready_ttl_s: float = READY_TTL_S,
    ) -> None:
        self.host, self.port = host, port
        self.read_timeout_s = read_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_connections = max_connections or default_max_connections()
        self.ready_ttl_s = ready_ttl_s

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._guarded(request, handler)

        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[guard])
        self._runner: web.AppRunner | None = None
        self._site: _Site | None = None
        # connections that have not yet sent a request (closed at read_timeout_s), and those whose
        # request is being handled (never closed to make room)
        self._waiting: set[RequestHandler] = set()
        self._busy: set[RequestHandler] = set()
        self.closed_slow = 0  # connections closed for not sending a request in time
        self.closed_for_room = 0  # idle connections closed because max_connections was reached
        # /readyz runs every check (database, vector store, model); the App fills these in.
        self.ready_checks: dict[str, Check] = {}
        self._ready: tuple[float, tuple[bool, dict[str, str]]] | None = None  # (when, result)
        self._probing: asyncio.Future[tuple[bool, dict[str, str]]] | None = None
        # /metrics: the body and its content type (bot/metrics.py, prometheus_client)
        self.metrics_page: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)
        self.add_route("GET", "/metrics", self._metrics)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.app.router.add_route(method, path, handler)

    # --- slow clients ----------------------------------------------------------------------
    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request: its body read within read_timeout_s (else 408) before the handler runs."""
        conn = request.protocol
        self._waiting.discard(conn)
        self._busy.add(conn)
        try:
            if request.body_exists:
                try:
                    async with asyncio.timeout(self.read_timeout_s):
                        await request.read()  # kept: the handler's read()/json()/post() reuse it
                except TimeoutError:
                    log.warning("HTTP request body not in within %ss: 408, closed", self.read_timeout_s)
                    response = web.Response(status=408, text="request body too slow")
                    response.force_close()
                    return response
            return await handler(request)
        finally:
            self._busy.discard(conn)

    def _connection(self) -> RequestHandler:
        """The protocol for a new connection; makes room first when max_connections are open."""
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        live = [conn for conn in server.connections if conn.transport is not None]  # oldest first
        excess = len(live) - self.max_connections + 1
        if excess > 0:
            idle = [conn for conn in live if conn not in self._busy][:excess]
            for conn in idle:
                self._waiting.discard(conn)
                conn.force_close()
            self.closed_for_room += len(idle)
            # the same line again and again under attack: the log's throttle (bot/logsafe.py) folds it
            log.warning(
                "HTTP server at its limit of %d connections: the oldest idle ones are closed to make room",
                self.max_connections,
            )
        conn = server()
        self._waiting.add(conn)
        asyncio.get_running_loop().call_later(self.read_timeout_s, self._first_request_due, conn)
        return conn

    def _first_request_due(self, conn: RequestHandler) -> None:
        """read_timeout_s after connecting: no request yet (a half-open or idle socket) -> closed."""
        if conn in self._waiting:
            self._waiting.discard(conn)
            conn.force_close()
            self.closed_slow += 1

    # --- endpoints --------------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        """200 when every dependency answers, else 503 naming the ones that did not (load balancers)."""
        ready, checks = await self.readiness()
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """The latest check if younger than ready_ttl_s, else one new round of probes shared by every
        caller that asks meanwhile (a flood of /readyz costs one round per ready_ttl_s)."""
        loop = asyncio.get_running_loop()
        if self._ready is not None and loop.time() - self._ready[0] < self.ready_ttl_s:
            return self._ready[1]
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe())
        # shielded: a caller that goes away (handler cancellation) does not cancel the others' probe
        return await asyncio.shield(self._probing)

    async def _probe(self) -> tuple[bool, dict[str, str]]:
        async def run(check: Check) -> bool:
            try:
                return bool(await asyncio.wait_for(check(), READY_TIMEOUT_S))
            except Exception as exc:
                log.warning("readiness check failed: %s", type(exc).__name__)
                return False

        names = list(self.ready_checks)
        results = await asyncio.gather(*(run(self.ready_checks[n]) for n in names))
        checks = {n: "ok" if ok else "failing" for n, ok in zip(names, results, strict=True)}
        result = (all(results), checks)
        self._ready = (asyncio.get_running_loop().time(), result)
        return result

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_page is None:
            return web.Response(status=404, text="metrics are not enabled")
        body, content_type = await self.metrics_page()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            # no handler_cancellation: a handler runs only once its whole request is in (the guard
            # reads the body first), and what it started must finish even if the client hangs up
            # (the Telegram webhook keeps the update, a Slack form stores the correction and sends it)
            handler_cancellation=False,
            keepalive_timeout=self.keepalive_timeout_s,
            lingering_time=min(10.0, self.read_timeout_s),
        )
        await self._runner.setup()
        # asyncio accepts up to `backlog` sockets at once before any of them is counted here, and a
        # closed connection's descriptor is freed a loop turn later: keep that burst well inside the
        # descriptors left over (a quarter of the connection limit)
        backlog = max(8, min(128, self.max_connections // 4))
        self._site = _Site(self._runner, self.host, self.port, self._connection, backlog)
        await self._site.start()
        # port 0 picks a free port; report the real one
        if self._site.listener is not None and self._site.listener.sockets:
            self.port = self._site.listener.sockets[0].getsockname()[1]
        log.info("HTTP server on %s:%s", self.host, self.port)

    async def stop(self) -> None:
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        self._waiting.clear()
        self._busy.clear()


class _Site(web.BaseSite):
    """aiohttp's TCPSite, with our own protocol factory (the connection limit, the first-request timer)."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, factory: Callable[[], RequestHandler], backlog: int
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._factory = host, port, factory
        self.listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        factory: Any = self._factory
        self.listener = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._server = self.listener
