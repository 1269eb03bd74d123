"""Log-probabilities in OpenAI's two response shapes, from per-token entries (token, log-prob, top alternatives).

- Legacy completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; with `echo` the prompt's
  tokens come first and the very first token has no log-prob (`null`, and `null` alternatives), which is how
  lm-evaluation-harness scores a continuation (`max_tokens: 0, echo: true`).
- Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

Design decisions:
- A token is a byte string; one that is not valid UTF-8 alone (part of a character) is named as OpenAI does,
  `bytes:\\xe2\\x80`, and chat's `bytes` field always carries the exact bytes.
- `text_offset` is where the token's text starts in the returned text, counted in characters of the text
  decoded incrementally (so a character split over tokens belongs to the token that completes it), starting
  at the caller's offset: 0, or the echoed prompt's length for the generated part.
- This module only shapes; the decoding core computes the numbers (`gpt2.decode.TokenLogprob`, whose
  `logprob` is None here for echo's first prompt token: `unscored`). The wiring is `gpt2.serve.api`'s.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from gpt2.decode import TokenLogprob
from gpt2.tokenizer import decode_bytes

__all__ = ["TokenLogprob", "chat", "legacy", "merge_legacy", "text_offsets", "token_text", "unscored"]


def unscored(token: int) -> TokenLogprob:
    """Echo's first prompt token: nothing before it predicts it, so it has no log-prob (OpenAI's null)."""
    return TokenLogprob(token, None, [])


def token_text(token: int) -> str:
    raw = decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_offsets(tokens: Sequence[int], start: int = 0) -> list[int]:
    """Character offset of each token's text in the incrementally decoded text, from `start`."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(utf8.decode(decode_bytes([t])))
    return offsets


def legacy(entries: Sequence[TokenLogprob], start: int = 0, offsets: Sequence[int] | None = None) -> dict:
    """Completions' `logprobs` object for `entries` whose text begins at character `start`; `offsets` (each
    token's character offset from `start`) when the caller tracked them across chunks."""
    if offsets is None:
        offsets = text_offsets([e.token for e in entries])
    return {
        "tokens": [token_text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {token_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": [start + o for o in offsets],
    }


def merge_legacy(parts: Sequence[dict]) -> dict:
    """Concatenate legacy objects (echoed prompt, then completion; or stream chunks)."""
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}


def _chat_token(token: int, logprob: float) -> dict:
    return {"token": token_text(token), "logprob": logprob, "bytes": list(decode_bytes([token]))}


def chat(entries: Sequence[TokenLogprob]) -> dict:
    """Chat's `logprobs` object."""
    return {"content": [{**_chat_token(e.token, e.logprob), "top_logprobs": [_chat_token(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}
