"""Running the HTTP server beside the engine: `serve_http_beside` (`gpt2 serve`, in `gpt2.commands.serve`,
loads the model and calls it).

Design decisions:
- uvicorn runs in a thread of its own and the engine keeps the main thread, the one that loaded the model
  (see "One thread does the tensor work" in `gpt2.serve.engine`); Ctrl+C and SIGTERM are caught here and
  shut the HTTP server down gracefully, after which the engine stops.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

    from gpt2.serve.engine import Engine


def serve_http_beside(engine: Engine, server: uvicorn.Server) -> bool:
    """Run the HTTP server in a thread of its own and the engine in this one (the thread that loaded the model
    and compiled the step: see "One thread does the tensor work" in `gpt2.serve.engine`) until the HTTP server
    ends: Ctrl+C or SIGTERM shut it down gracefully (a second Ctrl+C at once), and the engine then stops.
    Returns whether the HTTP server had started."""
    def http() -> None:
        try:
            server.run()  # outside the main thread it installs no signal handlers: ours below do its part
        finally:
            engine.stop()

    def on_signal(signum, frame) -> None:
        server.force_exit = server.should_exit  # the second time
        server.should_exit = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return server.started
