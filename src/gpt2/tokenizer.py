"""The GPT-2 BPE tokenizer (tiktoken's "gpt2" encoding).

`<|endoftext|>` (id 50256) separates documents in pretraining shards and ends every fine-tuning answer.
tiktoken downloads its two BPE files on first use; offline, point `TIKTOKEN_CACHE_DIR` at a folder that
holds them (this repo's CI uses `../shared/tiktoken_cache`).
"""

from __future__ import annotations

import functools
import os

import tiktoken

from gpt2.errors import UserError, as_json, json_kind

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's gpt2 encoding, or a clear error naming TIKTOKEN_CACHE_DIR when it cannot be fetched."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come from requests/urllib in many shapes
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise UserError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {e}). Offline? Set TIKTOKEN_CACHE_DIR to a "
            f"folder holding tiktoken's cached gpt2 files (currently TIKTOKEN_CACHE_DIR={cache})"
        ) from e


def encode(text: str) -> list[int]:
    """Text -> token ids. Special-token text such as "<|endoftext|>" is encoded as ordinary text."""
    return get_encoding().encode_ordinary(text)


def encode_batch(texts: list[str], num_threads: int = 8) -> list[list[int]]:
    return get_encoding().encode_ordinary_batch(texts, num_threads=num_threads)


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


def decode_bytes(ids: list[int]) -> bytes:
    """Raw bytes; for streaming, where one character may span several tokens."""
    return get_encoding().decode_bytes(ids)


def check_token_ids(value: object, where: str) -> list[int]:
    """`value` (a field of a prepared data file, `where` names the file, line and field) as a list of this
    tokenizer's ids; anything else (a string, a float, a bool, a negative id, an id past the vocabulary: a file
    edited by hand or made with another tokenizer) is a UserError naming `where`, not a crash in an embedding."""
    if not isinstance(value, list):
        raise UserError(f"{where} is {json_kind(value)}, not a list of token ids")
    # the common case at C speed; the loop below only finds what to name
    if all(type(t) is int for t in value) and (not value or (min(value) >= 0 and max(value) < VOCAB_SIZE)):
        return value
    i, bad = next((i, t) for i, t in enumerate(value) if type(t) is not int or not 0 <= t < VOCAB_SIZE)
    raise UserError(f"{where}[{i}] is {as_json(bad)}, not a token id of the GPT-2 tokenizer (an integer from 0 to "
                    f"{VOCAB_SIZE - 1})")
