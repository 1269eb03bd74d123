"""A deadline for each HTTP request to arrive: a client that sends its headers (or its body) slowly, or opens a
connection and sends nothing, is cut off instead of holding a connection forever (slowloris). The deadline covers
the request's arrival only, never its answer, which may take as long as generation takes.

uvicorn times out only idle keep-alive connections (`timeout_keep_alive`), and that timer is cancelled by the
first byte a client sends, so a client that trickles a request byte by byte is never timed out; h11 has no such
limit either. `deadline_protocol(seconds)` is uvicorn's h11 protocol with one timer per request: armed when the
connection opens and whenever part of a request has arrived but not all of it (a keep-alive connection's next
request included), cancelled once the whole request (headers and body) is in. When it fires the client gets
`408 Request Timeout` (or, if an answer has begun, say an early 413, just the close) and the connection is closed.

"The whole request is in" is h11's `their_state` DONE on a keep-alive connection, but MUST_CLOSE on one that will
close after this answer (HTTP/1.0, or `Connection: close`, as curl scripts send and as nginx proxies by default):
both count, or such a request's deadline would run on into its answer.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gpt2.serve")

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
REQUEST_IN = (h11.DONE, h11.MUST_CLOSE)  # the client's states once its whole request has arrived
NOTHING_SENT = (h11.IDLE, h11.SEND_RESPONSE)  # our states before an answer's first byte


def request_in(conn: h11.Connection) -> bool:
    """Whether the client's current request has wholly arrived (whatever the connection's keep-alive)."""
    return conn.their_state in REQUEST_IN


def request_arriving(conn: h11.Connection) -> bool:
    """Whether part of a request has arrived and the rest has not: its body is coming, or bytes of its head wait
    in h11's buffer (a pipelined request, taken up once the answer before it is complete)."""
    return conn.their_state is h11.SEND_BODY or (conn.their_state is h11.IDLE and bool(conn.trailing_data[0]))


def deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class (for `uvicorn.Config(http=...)`) giving every request `seconds` to arrive."""

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a new connection owes a request: saying nothing at all is no way to hold it

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if request_in(self.conn) or self.transport.is_closing():
                self._disarm()  # the request is in: its answer may take as long as it takes
            else:
                self._arm()  # a request has begun (a keep-alive connection's next one): it has `seconds`

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer, and takes up a pipelined request
            if request_arriving(self.conn) and not self.transport.is_closing():
                self._arm()
            else:
                self._disarm()  # idle: uvicorn's keep-alive timer closes the connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or request_in(self.conn):
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("%s did not send a whole request within %g s: closed (408)", client, seconds)
            if self.conn.our_state in NOTHING_SENT:  # a 408 after an answer's first bytes would corrupt it
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return DeadlineH11Protocol
