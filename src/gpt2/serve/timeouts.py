"""A deadline for each HTTP request to arrive: a client that sends its headers (or its body) slowly, or opens a
connection and sends nothing, is cut off instead of holding a connection forever (slowloris).

uvicorn times out only idle keep-alive connections (`timeout_keep_alive`), and that timer is cancelled by the
first byte a client sends, so a client that trickles a request byte by byte is never timed out; h11 has no such
limit either. `deadline_protocol(seconds)` is uvicorn's h11 protocol with one timer per request: armed when the
connection opens and again when a keep-alive connection starts its next request, cancelled once the whole
request (headers and body) has arrived. When it fires the client gets `408 Request Timeout` and the connection
is closed. Answers are not limited: the timer stops before the app runs its route to the end.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gpt2.serve")

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class (for `uvicorn.Config(http=...)`) giving every request `seconds` to arrive."""

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.DONE or self.transport.is_closing():
                self._disarm()  # the request is in: its answer may take as long as it takes
            else:
                self._arm()  # a request has begun (a keep-alive connection's next one): it has `seconds`

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait
            self._disarm()

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
            if self.transport.is_closing() or self.conn.their_state is h11.DONE:
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("%s did not send a whole request within %g s: closed (408)", client, seconds)
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return DeadlineH11Protocol
