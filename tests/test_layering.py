"""The package's layering, read statically from its imports: the library never imports the CLI or a command
module, its import graph has no cycle, and importing the library's main modules loads no command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "gpt2"
COMMANDS = ("gpt2.cli", "gpt2.__main__", "gpt2.commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The gpt2 modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks import nothing at run time
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("gpt2"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from gpt2 import compiled`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gpt2"))
    return out


def graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in imports(p, top_level_only) if m in modules and m != name}
            for name, p in modules.items()}


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def test_the_library_never_imports_the_cli_or_a_command():
    offenders = sorted(f"{m} imports {', '.join(sorted(d for d in deps if is_command(d)))}"
                       for m, deps in graph(top_level_only=False).items()
                       if not is_command(m) and any(is_command(d) for d in deps))
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    g = graph(top_level_only=True)
    # a package imports its own submodules in its __init__: that edge is not a cycle of the layering
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycle.extend(path[path.index(d):] + [m, d] if d in path else [m, d])
                return True
            if state.get(d) is None and visit(d, path + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(g) if state.get(m) is None), " -> ".join(cycle)


def test_importing_the_library_loads_no_command_module():
    code = ("import sys, gpt2.model, gpt2.inference, gpt2.evaluate, gpt2.train.loop, gpt2.decode; "
            "print(sorted(m for m in sys.modules if m == 'gpt2.cli' or m.startswith('gpt2.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PKG.parent)}).stdout
    assert out.strip() == "[]"
