"""The commands of `gpt2 <command>`: one thin module per command (or group) whose `COMMAND` (or `COMMANDS`) names
it, its help line, its typed config and the function that runs it. `gpt2.cli` lists these modules in one table;
nothing in the library imports them."""

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
