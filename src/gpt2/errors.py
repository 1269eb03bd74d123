"""One exception type for bad input (a missing file, a corrupt shard, a flag that makes no sense).

Library code raises `UserError` with a one-line message naming the file or argument; the CLI prints it as
`gpt2: error: ...` and exits with status 2 instead of showing a traceback from deep inside.
"""

import sys


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never as a traceback."""


def note(line: str) -> None:
    """A one-line note for the user on stderr (stdout stays a command's output)."""
    print(line, file=sys.stderr, flush=True)
