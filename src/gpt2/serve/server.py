"""Running the HTTP server beside the engine: `listen` (the address, checked before anything else happens),
`http_server` (uvicorn on those sockets) and `serve_http_beside` (`gpt2 serve`, in `gpt2.commands.serve`, loads
the model and calls them).

Design decisions:
- The listening sockets are bound here, before the model loads, and handed to uvicorn: a port in use or a
  host that is no address of this machine is one line naming --host/--port (a `UserError`) before anything
  says it is serving, rather than uvicorn's log lines after. They listen at once too, which is what holds the
  port; a client that connects while the model loads waits in the backlog and is answered once it is up.
- uvicorn runs in a thread of its own and the engine keeps the main thread, the one that loaded the model
  (see "One thread does the tensor work" in `gpt2.decode.engine`); Ctrl+C and SIGTERM are caught here.
- Shutting down ends every request with an answer (see `Engine.drain`): on the first Ctrl+C or SIGTERM the
  engine admits nothing more (queued requests get a 503) and the running ones have `grace` seconds to finish,
  after which they are ended (a 503, or a stream's error event and `[DONE]`); a second signal ends them at
  once. uvicorn stops accepting connections meanwhile and waits for the answers to be written, then the engine
  stops. uvicorn's own limit (`grace` + `FLUSH_S`) cuts only a client that stops reading, and `quiet_at_shutdown`
  makes that cut one log line instead of a CancelledError traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING

from gpt2.errors import UserError

if TYPE_CHECKING:
    import uvicorn

    from gpt2.decode import Engine

log = logging.getLogger("gpt2.serve")

BACKLOG = 2048  # uvicorn's default
FLUSH_S = 5.0  # after the grace: time for the ended requests' last bytes to reach their clients
BIND_HINTS = {errno.EADDRINUSE: "another server is using this port",
              errno.EADDRNOTAVAIL: "not an address of this machine",
              errno.EACCES: "ports below 1024 need privileges"}


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on every address `host` resolves to (as asyncio's `create_server` would bind them), or
    a `UserError` naming --host/--port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:  # gaierror; UnicodeError: a label too long for IDNA
        raise UserError(f"--host {host}: not an address or a name this machine can resolve "
                        f"({getattr(e, 'strerror', None) or e})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = _listen_on(family, kind, proto, address, host, port)
            if sock is not None:
                sockets.append(sock)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    if not sockets:
        raise UserError(f"--host {host}: this machine cannot listen on any of its addresses (IPv6 off?)")
    return sockets


def _listen_on(family: int, kind: int, proto: int, address: tuple, host: str, port: int) -> socket.socket | None:
    """A socket listening on `address`; None for an address family this machine lacks (skipped, as asyncio
    does: `localhost` may resolve to ::1 too where IPv6 is off)."""
    try:
        sock = socket.socket(family, kind, proto)
    except OSError:
        return None
    try:
        # as asyncio does: a restart may bind while the last run's connections linger in TIME_WAIT, and an IPv6
        # socket does not also take the IPv4 port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        hint = BIND_HINTS.get(e.errno)
        raise UserError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}"
                        + (f" ({hint})" if hint else "")) from None
    return sock


def http_server(app, engine: Engine, request_timeout: float, grace: float) -> uvicorn.Server:
    """uvicorn serving `app` with the request deadline of `gpt2.serve.timeouts`, for `serve_http_beside`."""
    # the web stack only when serving (see `gpt2.commands.serve`): uvicorn, and h11 with uvicorn (timeouts)
    import uvicorn

    from gpt2.serve.timeouts import deadline_protocol

    return uvicorn.Server(uvicorn.Config(quiet_at_shutdown(app, engine), log_level="info",
                                         timeout_graceful_shutdown=grace + FLUSH_S,
                                         http=deadline_protocol(request_timeout)))


def quiet_at_shutdown(app, engine: Engine):
    """`app` whose requests, cancelled by uvicorn once its shutdown limit has passed (a client that stopped
    reading its answer), end with one log line: uvicorn would log the CancelledError with a traceback."""
    async def wrapped(scope, receive, send) -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not engine.draining:
                raise
            log.info("%s %s: cut at shutdown (the client was not reading its answer)", scope.get("method", ""),
                     scope.get("path", ""))

    return wrapped


def serve_http_beside(engine: Engine, server: uvicorn.Server, sockets: list[socket.socket], grace: float) -> bool:
    """Run the HTTP server on `sockets` in a thread of its own and the engine in this one (the thread that loaded
    the model and compiled the step: see "One thread does the tensor work" in `gpt2.decode.engine`) until the HTTP
    server ends. Ctrl+C or SIGTERM shut it down, giving running requests `grace` seconds (a second signal: none;
    see the module docstring); the engine then stops. Returns whether the HTTP server had started."""
    def http() -> None:
        try:
            server.run(sockets=sockets)  # outside the main thread it installs no signal handlers: ours do its part
        finally:
            engine.stop()

    def on_signal(signum, frame) -> None:
        engine.drain(0.0 if server.should_exit else grace)  # runs in this thread, the engine's: `drain` allows it
        server.should_exit = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(timeout=grace + 2 * FLUSH_S)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return server.started
