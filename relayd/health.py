"""The health server: a small ASGI app (``/healthz``, ``/healthz/<feed>``, ``/metrics``) that
hypercorn serves inside the supervisor's nursery.

What "healthy" means is the feeds' business (each feed's ``health()``, see docs/OPERATIONS.md);
this module only shapes the answers. ``/healthz`` is 200 when every feed is healthy and 503
otherwise; the body is JSON either way, so an operator sees why. A reload that failed validation
shows in ``config_errors``, and every reload's outcome in ``reload`` (its generation, result and
errors), but does not make the instance unhealthy: the old configuration keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from functools import partial
from typing import Any, Protocol, cast

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from relayd import __version__, fastpath
from relayd.admission import PendingTable, Room, per_source_default
from relayd.config import Endpoint
from relayd.logs import log_failure
from relayd.metrics import CONTENT_TYPE, render
from relayd.netif import accept_forever, bind_tcp_listener
from relayd.runtime import Sample

log = logging.getLogger(__name__)


class _QuietStartup(logging.Filter):
    """Drops hypercorn's "Running on ..." line; the supervisor logs the address itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on ")


_hypercorn_log = logging.getLogger("relayd.http")
_hypercorn_log.addFilter(_QuietStartup())

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Connection limits of the health server. NLB health checks open a connection, ask once and
# close; anything that lingers is closed quickly so idle or slow clients cannot pile up.
KEEP_ALIVE_TIMEOUT = 2.0  # an idle connection (also one that never sends a byte) is closed
READ_TIMEOUT = 10  # a connection that sends nothing for this long is closed
MAX_HEADER_BYTES = 8192  # an incomplete request larger than this is refused
GRACEFUL_TIMEOUT = 1.0  # on stop or listen change, open requests get this long
BACKLOG = 1024
#: Health connections open at once: an eighth of the descriptor limit, 8 to 256, the rest kept
#: for the feeds. One source holds at most a quarter of them (relayd/admission.py): a flood
#: of idle clients sheds its own oldest connections, never a load balancer's probe.
HEALTH_CONNECTIONS_MIN = 8
HEALTH_CONNECTIONS_MAX = 256
#: Health connections accepted in a row before the accept loop lets other tasks run.


@attrs.define
class _Shed:
    """Health connections refused or closed to make room, over the process's life."""

    total: int = 0


HEALTH_SHED = _Shed()


@attrs.frozen
class FeedReport:
    """One feed as the health endpoint shows it."""

    name: str
    kind: str
    healthy: bool
    state: str
    detail: dict[str, Any] = attrs.field(factory=dict)
    connections: int = 0  # FeedHealth.connections, for the status line
    ready: bool = True  # FeedHealth.ready: only /healthz/<feed> answers by it

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "healthy": self.healthy, "state": self.state}
        if not self.ready:
            out["ready"] = False
        for key, value in self.detail.items():
            out.setdefault(key, value)
        return out


class HealthModel(Protocol):
    """What the health app asks the supervisor."""

    def feed_reports(self) -> Sequence[FeedReport]: ...

    def config_errors(self) -> Sequence[str]: ...

    def last_reload(self) -> Mapping[str, Any] | None:
        """The last reload's outcome (``ReloadOutcome.as_json``), None before the first."""

    def uptime_seconds(self) -> float: ...

    def stopping(self) -> bool: ...

    def samples(self) -> Iterable[Sample]: ...


def feed_key(report: FeedReport, reports: Sequence[FeedReport]) -> str:
    """A feed's key in ``feeds``: its name, or ``kind/name`` when a capture and an emit feed
    share the name (the one-process demo runs both halves of a feed)."""
    clash = sum(1 for r in reports if r.name == report.name) > 1
    return f"{report.kind}/{report.name}" if clash else report.name


def health_body(model: HealthModel, only: str | None = None) -> tuple[int, dict[str, Any]] | None:
    """The status code and JSON body of ``/healthz`` (``only``: one feed's path), or None for
    an unknown feed."""
    reports = list(model.feed_reports())
    chosen = reports
    if only is not None:
        chosen = [
            r for r in reports if only in (r.name, f"{r.kind}/{r.name}", feed_key(r, reports))
        ]
        if not chosen:
            return None
    healthy = all(r.healthy for r in chosen) and not model.stopping()
    # One feed's path is what its load balancer target group checks: a feed that is healthy
    # but not ready (standby) is 503 there, and healthy for the instance.
    ready = only is None or all(r.ready for r in chosen)
    status = "stopping" if model.stopping() else "ok" if healthy else "unhealthy"
    if healthy and not ready:
        status = "not ready"
    body = {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(model.uptime_seconds(), 3),
        "data_path": fastpath.active(),
        "config_errors": list(model.config_errors()),
        "feeds": {feed_key(r, reports): r.as_json() for r in chosen},
    }
    reload = model.last_reload()
    if reload is not None:  # from the first reload on
        body["reload"] = dict(reload)
    return (200 if healthy and ready else 503), body


def process_samples(start_wall: float) -> Iterator[Sample]:
    """Process facts for /metrics, read from /proc where Linux has them."""
    yield Sample(
        "build_info",
        "gauge",
        "relayd version, Python version and data path (c or python); always 1.",
        (
            ("version", __version__),
            ("python", sys.version.split()[0]),
            ("data_path", fastpath.active()),
        ),
        1,
    )
    yield Sample(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
        (),
        start_wall,
    )
    yield Sample(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        (),
        time.process_time(),
    )
    try:
        with open("/proc/self/statm", "rb") as f:
            rss_pages = int(f.read().split()[1])
        yield Sample(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (),
            rss_pages * os.sysconf("SC_PAGE_SIZE"),
        )
    except (OSError, ValueError, IndexError):
        pass
    try:
        fds = len(os.listdir("/proc/self/fd")) - 1  # not counting the listing's own fd
        yield Sample("process_open_fds", "gauge", "Number of open file descriptors.", (), fds)
    except OSError:
        pass
    yield Sample(
        "health_connections_shed_total",
        "counter",
        "Health connections refused or closed to stay under the connection caps.",
        (),
        HEALTH_SHED.total,
    )
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        yield Sample(
            "process_max_fds", "gauge", "Maximum number of open file descriptors.", (), soft
        )


class HealthApp:
    """ASGI 3 application; HTTP/1.1 via hypercorn. GET and HEAD only."""

    def __init__(self, model: HealthModel) -> None:
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served; hypercorn closes the connection
        status, headers, body = self.respond(scope["method"], scope["path"])
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *headers,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    def respond(self, method: str, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Route one request: (status, extra headers, body). Pure, so tests can call it."""
        if path == "/metrics":
            route = "metrics"
        elif path == "/healthz":
            route = "healthz"
        elif path.startswith("/healthz/") and len(path) > len("/healthz/"):
            route = "feed"
        else:
            return _text(404, "not found\n")
        if method not in ("GET", "HEAD"):
            status, headers, body = _text(405, "method not allowed\n")
            return status, [*headers, (b"allow", b"GET, HEAD")], body
        if route == "metrics":
            text = render(self.model.samples())
            return 200, [(b"content-type", CONTENT_TYPE.encode())], text.encode()
        only = path[len("/healthz/") :] if route == "feed" else None
        answer = health_body(self.model, only)
        if answer is None:
            return _json(404, {"error": f"no feed named {only!r}"})
        return _json(*answer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _json(status: int, obj: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()
    return status, [(b"content-type", b"application/json")], body


def _text(status: int, text: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, [(b"content-type", b"text/plain; charset=utf-8")], text.encode()


def hypercorn_config() -> HypercornConfig:
    """Hypercorn settings for the connections relayd accepts and hands to it."""
    config = HypercornConfig()
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.accesslog = None  # health checks every few seconds are not events
    config.errorlog = _hypercorn_log
    config.include_server_header = False
    return config


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the health server; OSError naming the address (closed socket)
    when it cannot bind.

    relayd binds it itself, so that a port in use is a clear error and nothing leaks, and
    accepts on it itself (``HealthConnections``); a reload binds the new address before it
    lets go of the old."""
    return bind_tcp_listener(host, port, backlog=BACKLOG)


def health_connection_limit(nofile: int | None = None) -> int:
    """How many health connections may be open at once under descriptor limit ``nofile``
    (default: this process's soft RLIMIT_NOFILE)."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return HEALTH_CONNECTIONS_MAX
    return max(HEALTH_CONNECTIONS_MIN, min(HEALTH_CONNECTIONS_MAX, nofile // 8))


class HealthConnections:
    """The health server's accept loop: hypercorn serves each connection it admits, at most
    ``limit`` at once (relayd/admission.py by source), so idle or slow clients are shed
    before they can take the descriptors the feeds need."""

    def __init__(self, limit: int) -> None:
        self.table: PendingTable[trio.CancelScope] = PendingTable(limit, per_source_default(limit))
        self._next_id = 0
        self._rlog_last = -float("inf")

    async def accept(
        self,
        listener: socket.socket,
        nursery: trio.Nursery,
        serve: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        """Accept until cancelled, ``serve`` each admitted connection in ``nursery``."""

        def admit(sock: socket.socket, host: str, _port: int) -> None:
            self._admit(sock, host, nursery, serve)

        def no_resources(exc: OSError) -> None:
            self._warn("cannot accept a health connection: %s; retrying", exc.strerror)

        await accept_forever(listener, admit, no_resources)

    def _admit(
        self,
        sock: socket.socket,
        source: str,
        nursery: trio.Nursery,
        serve: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        now = trio.current_time()
        if self.table.room_for(source, now) is Room.REFUSED:
            HEALTH_SHED.total += 1
            with contextlib.suppress(OSError):  # reset: no TIME_WAIT, no FIN to wait for
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            self._warn("health connections at the cap; refused one from %s", source)
            return
        self._next_id += 1
        key, scope = self._next_id, trio.CancelScope()
        evicted = self.table.add(key, source, scope, now)
        if evicted is not None:
            HEALTH_SHED.total += 1
            evicted.cancel()
        sock.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(self._serve_one, key, scope, stream, serve)

    async def _serve_one(
        self,
        key: int,
        scope: trio.CancelScope,
        stream: trio.SocketStream,
        serve: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        try:
            with scope:
                await serve(stream)
        finally:
            self.table.pop(key)
            stream.socket.close()  # hypercorn's own close may have been cancelled

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._rlog_last >= 10.0:
            self._rlog_last = now
            log.warning(message, *args)


async def serve_health(
    app: HealthApp,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    sock: socket.socket | None = None,
    connection_limit: int | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; started() with the bound address.
    ``sock``: a socket already bound to ``host:port`` (``bind_listener``), else bound here.

    The accept loop is relayd's (``HealthConnections``); each connection is hypercorn's
    (``TCPServer``: HTTP/1.1, its keep-alive and read timeouts). Open requests get
    ``GRACEFUL_TIMEOUT`` when it stops."""
    if sock is None:
        sock = bind_listener(host, port)
    config = hypercorn_config()
    connections = HealthConnections(
        connection_limit if connection_limit is not None else health_connection_limit()
    )
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    state: dict[str, Any] = {}

    async def serve(stream: trio.SocketStream) -> None:
        await TCPServer(wrapped, config, context, cast(Any, state), cast(Any, stream)).run()

    try:
        sock.setblocking(False)
        address = sock.getsockname()
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(connections.accept, sock, handlers, serve)
                task_status.started((address[0], address[1]))
                await shutdown_trigger()
                acceptor.cancel_scope.cancel()
            await context.terminated.set()  # idle keep-alive connections close now
            handlers.cancel_scope.deadline = trio.current_time() + GRACEFUL_TIMEOUT
    finally:
        sock.close()


# -- the server under supervision ----------------------------------------------------------

#: The health server must answer its first request within this (READY=1 waits for it).
PROBE_TIMEOUT = 5.0


class HealthServerError(RuntimeError):
    """The health server could not start, or does not answer."""


def describe(exc: BaseException) -> str:
    """One line for an exception; a group of one is unwrapped."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def format_address(address: tuple[str, int] | None) -> str:
    if address is None:
        return "-"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: The server's start and failures are the supervisor's to log.
_supervision_log = logging.getLogger("relayd.supervisor")


class HealthServer:
    """``serve_health`` in a task of its own: restarted after a failure once it has started,
    stopped through its shutdown trigger, probed with one real request."""

    def __init__(self, app: HealthApp) -> None:
        self.app = app
        self.address: tuple[str, int] | None = None
        self._stop: trio.Event | None = None
        self._done: trio.Event | None = None

    async def start(
        self, nursery: trio.Nursery, endpoint: Endpoint, sock: socket.socket | None = None
    ) -> None:
        """Serve on ``endpoint`` (raises HealthServerError when it cannot bind); ``sock``:
        already bound to it (``bind_listener``), used for the first serve."""
        stop, done = trio.Event(), trio.Event()
        self._stop, self._done = stop, done
        try:
            self.address = await nursery.start(partial(self._task, endpoint, sock, stop, done))
        except Exception as exc:
            raise HealthServerError(
                f"cannot start the health server on {endpoint}: {describe(exc)}"
            ) from exc

    async def stop(self) -> None:
        """Stop serving, and wait until it has (the caller bounds the wait)."""
        if self._stop is not None and self._done is not None:
            self._stop.set()
            await self._done.wait()

    async def _task(
        self,
        endpoint: Endpoint,
        sock: socket.socket | None,
        stop: trio.Event,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[tuple[str, int]],
    ) -> None:
        reported = False
        try:
            while not stop.is_set():
                try:
                    async with trio.open_nursery() as nursery:
                        address = await nursery.start(
                            partial(
                                serve_health,
                                self.app,
                                endpoint.host,
                                endpoint.port,
                                shutdown_trigger=stop.wait,
                                sock=sock,
                            )
                        )
                        sock = None  # hypercorn owns it now; a restart binds again
                        self.address = address
                        if not reported:
                            reported = True
                            task_status.started(address)
                        _supervision_log.info(
                            "health server listening on %s", format_address(address)
                        )
                except Exception as exc:
                    if not reported:
                        raise
                    log_failure(
                        _supervision_log,
                        logging.ERROR,
                        "health server failed (restarting in 1 s)",
                        exc=exc,
                    )
                    await trio.sleep(1.0)
        finally:
            done.set()

    async def probe(self) -> None:
        """One real request to the health server: READY=1 only once it answers."""
        assert self.address is not None
        host, port = self.address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(request)
                    head = b""
                    while b"\r\n" not in head:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        head += chunk
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise HealthServerError(f"the health server does not answer: {describe(exc)}") from exc
        if not head.startswith(b"HTTP/1.1 "):
            raise HealthServerError(f"the health server answered {head[:40]!r}")
