"""The commands of `gpt2 <command>`: one module per command (or group) that defines the command's typed config
(and its presets) and the function that runs it on the library's machinery, and whose `COMMAND` (or
`COMMANDS`) names it with its help line. `gpt2.cli` lists these modules in one table; nothing in the library
imports them, and no command module imports another (shared pieces, such as `gpt2.rlhf.pairs`'s config base,
are the library's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Command:
    name: str  # "generate" or "prepare fineweb"
    help: str
    config: type
    run: Callable[[Any], Any]
    presets: dict[str, Any] | None = None
    description: str | None = None
