"""One exception type for bad input (a missing file, a corrupt shard, a flag that makes no sense).

Library code raises `UserError` with a one-line message naming the file or argument; the CLI prints it as
`gpt2: error: ...` and exits with status 2 instead of showing a traceback from deep inside.
"""

import json
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never as a traceback."""


def note(line: str) -> None:
    """A one-line note for the user on stderr (stdout stays a command's output)."""
    print(line, file=sys.stderr, flush=True)


def as_json(value: object, limit: int = 40) -> str:
    """A value read from a JSON file, for an error message: written as the file writes it (`true`, `"12"`, not
    Python's `True`, `'12'`) and cut to `limit` characters, so the message stays one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def json_kind(value: object) -> str:
    """What a value read from a JSON file is, in JSON's words with an article ("an array", "a string", "null"), for
    an error message that says what a field should have been instead."""
    return _JSON_KINDS.get(type(value), type(value).__name__)
