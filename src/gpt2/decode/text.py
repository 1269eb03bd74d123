"""Tokens -> text deltas for streaming: whole characters only, cut at stop strings.

Design decisions:
- One character can span several byte-level BPE tokens (emoji, CJK), so tokens are decoded to bytes and fed
  through an incremental UTF-8 decoder, which holds a partial sequence back until it is complete.
- Stop strings (OpenAI's `stop`) are matched on text, not tokens: a stop string can start in the middle of a
  token. The tail of the text that could still be the beginning of a stop string is held back, so a stop
  string never reaches the client, even in part.
"""

from __future__ import annotations

import codecs

from gpt2.tokenizer import decode_bytes


class TextStream:
    """Feed tokens, get the text that may be shown so far; `stopped` once a stop string appeared."""

    def __init__(self, stop: list[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (up to the stop string, once found)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show."""
        if self.stopped:
            return ""
        self.text += self._utf8.decode(decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush what was held back (a dangling partial character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # search from where a stop string could first begin that was not yet complete
            begin = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
