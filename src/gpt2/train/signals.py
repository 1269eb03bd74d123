"""SIGTERM and Ctrl-C during training: finish the step, save a checkpoint, exit as the signal asked."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """SIGTERM / Ctrl-C set a flag; the loop finishes the current step, saves and exits. A second signal
    stops at once."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def exit(self) -> None:
        """After the checkpoint is saved: leave as the signal asked (Ctrl-C -> KeyboardInterrupt, else exit
        status 128 + signal number, 143 for SIGTERM)."""
        signum = self.signum or signal.SIGTERM
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum))
