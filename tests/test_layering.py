"""The package's layering, read statically from its imports: the library never imports the CLI or a command
module, a command module imports no other, the import graph has no cycle, importing the library's main modules
loads no command, and an import inside a function says why it is not at its module's top. Also: only training,
its stages and the commands import `gpt2.train`; the shard format calls nothing of the data pipeline; whole files
are written and hashed by `gpt2.io` only; no module is imported under an old path; only the decoding engine steps
the decoder; a run's command is passed to the trainer, not registered; every command module is in the CLI's table
and defines its commands' configs and runs itself."""

from __future__ import annotations

import ast
import dataclasses
import importlib
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


def test_a_command_module_imports_no_other():
    offenders = sorted(f"{m} imports {', '.join(sorted(d for d in deps if d.startswith('gpt2.commands.')))}"
                       for m, deps in graph(top_level_only=False).items()
                       if m.startswith("gpt2.commands.") and any(d.startswith("gpt2.commands.") for d in deps))
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


# Who may build on the training loop: training itself, the RLHF stages (Tasks on the loop) and the commands.
TRAINING_USERS = ("gpt2.train", "gpt2.rlhf", *COMMANDS)


def in_package(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_only_training_its_stages_and_the_commands_import_training():
    """What training and evaluation share (the chunked loss, autocast) lives below both: evaluation, the model,
    the data and decoding never import `gpt2.train`."""
    offenders = sorted(f"{m} imports {', '.join(sorted(d for d in deps if in_package(d, ('gpt2.train',))))}"
                       for m, deps in graph(top_level_only=False).items()
                       if not in_package(m, TRAINING_USERS) and any(in_package(d, ("gpt2.train",)) for d in deps))
    assert offenders == []


def test_the_shard_format_calls_nothing_of_the_data_pipeline():
    """`gpt2.data.shards` is the file format: the loader reads through it, never the other way (no import of
    the pipeline, and no batch drawn from a loader handed in)."""
    assert sorted(d for d in graph(top_level_only=False)["gpt2.data.shards"] if d.startswith("gpt2.data")) == []
    tree = ast.parse((PKG / "data" / "shards.py").read_text())
    assert not any(isinstance(n, ast.Attribute) and n.attr == "next_batch" for n in ast.walk(tree))


def test_whole_files_are_written_and_hashed_by_gpt2_io():
    """`gpt2.io` is the one home of whole-file writes (atomic) and file checksums: no other module writes a
    file by `json.dump`, `write_text` or `write_bytes`, or hashes one with `hashlib.file_digest`."""
    by_hand = {"dump", "write_text", "write_bytes", "file_digest"}
    offenders = sorted(f"src/gpt2/{path.relative_to(PKG).as_posix()}:{node.lineno}: .{node.func.attr}"
                       for path in PKG.rglob("*.py") if path != PKG / "io.py"
                       for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and node.func.attr in by_hand)
    assert offenders == []


def python_files() -> list[Path]:
    root = PKG.parents[1]
    return [p for folder in ("src", "tests", "bench", "scripts") for p in sorted((root / folder).rglob("*.py"))]


OLD_PATHS = ("gpt2.decoder", "gpt2.serve.engine", "gpt2.serve.text")  # now in gpt2.decode


def test_nothing_imports_a_module_under_an_old_path():
    """One path per module: `gpt2.decode` is the decoding core (its engine and text streams included), with no
    alias left behind."""
    for old in OLD_PATHS:
        assert not PKG.parent.joinpath(*old.split(".")).with_suffix(".py").exists(), old
    offenders = [f"{p.relative_to(PKG.parents[1])}: {m}" for p in python_files()
                 for m in imports(p, top_level_only=False)
                 if any(m == old or m.startswith(old + ".") for old in OLD_PATHS)]
    assert offenders == []


def decoder_calls(path: Path) -> list[str]:
    """Calls in `path` that run the decoder's decoding: any `.prefill(...)`, and `.step(...)` on a decoder."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if node.func.attr == "prefill" or (node.func.attr == "step" and receiver.endswith("decoder")):
                out.append(f"{path.relative_to(PKG.parents[1])}:{node.lineno}: {ast.unparse(node.func)}")
    return out


def test_only_the_engine_steps_the_decoder():
    """One decoding loop: generate, the chat, the server, fine-tuning's samples and PPO's rollouts all run on
    `gpt2.decode.engine`, the only module (besides the decoder itself) that prefills or steps a decoder."""
    allowed = {PKG / "decode" / "engine.py", PKG / "decode" / "decoder.py"}
    root = PKG.parents[1]
    files = [p for folder in ("src", "bench", "scripts") for p in sorted((root / folder).rglob("*.py"))]
    offenders = [c for p in files if p not in allowed for c in decoder_calls(p)]
    assert offenders == []
    assert decoder_calls(PKG / "decode" / "engine.py")  # the rule still sees the engine's own calls


def module_level_registries(path: Path) -> list[str]:
    """Names bound at `path`'s top level to an empty dict, list or set: state that callers fill in at run time."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and is_empty_container(node.value):
            found.extend(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and is_empty_container(node.value) and isinstance(node.target, ast.Name):
            found.append(node.target.id)
    return found


def is_empty_container(value: ast.AST | None) -> bool:
    if isinstance(value, ast.Dict):
        return not value.keys
    if isinstance(value, (ast.List, ast.Set)):
        return not value.elts
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in ("dict", "list", "set") and not value.args and not value.keywords)


def test_the_command_of_a_run_is_passed_not_registered():
    """The command that makes a run reaches the trainer as an argument (`train(..., command=...)`), from the
    command itself, so a run started without the CLI records it too: the library holds no registry of commands
    that the CLI would have to fill first."""
    registries = sorted(f"{module_name(p)}.{name}" for p in PKG.rglob("*.py") if not is_command(module_name(p))
                        for name in module_level_registries(p) if "command" in name.lower())
    assert registries == []
    unnamed = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "train"
                    and in_package(module_name(path), TRAINING_USERS) and not module_name(path).startswith("gpt2.train")
                    and "command" not in {k.arg for k in node.keywords}):
                unnamed.append(f"src/gpt2/{path.relative_to(PKG).as_posix()}:{node.lineno}")
    assert unnamed == [], "these stages train without saying which command runs them (command=...)"


def test_importing_the_library_loads_no_command_module():
    code = ("import sys, gpt2.model, gpt2.inference, gpt2.evaluate, gpt2.train.loop, gpt2.decode; "
            "print(sorted(m for m in sys.modules if m == 'gpt2.cli' or m.startswith('gpt2.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PKG.parent)}).stdout
    assert out.strip() == "[]"


# Modules a function may import where it needs them without a comment: optional, or slow to import where most
# users of the importing module never need them.
HEAVY = {
    "matplotlib": "about 0.4 s to import; only drawing a graph needs it",
    "datasets": "about a second to import; only streaming from the hub needs it",
    "pyarrow": "only reading .parquet files needs it",
    "huggingface_hub": "not a declared dependency; only a hub name needs it",
    "transformers": "a dev dependency, seconds to import",
    "onnx": "bench only",
    "onnxruntime": "bench only",
    "uvicorn": "the web stack: only `gpt2 serve` needs it",
    "fastapi": "the web stack: only `gpt2 serve` needs it",
    "torch._inductor": "a second to import; only compiling or loading compiled pieces needs it",
}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import inside a function or class body of `path`."""
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if nested and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif nested and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def has_reason(lines: list[str], import_lines: set[int], lineno: int) -> bool:
    """A `#` comment on the import's line, or on the line above its block of imports (blank lines between
    the block's imports allowed)."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 1
    while above >= 1 and (above in import_lines or not lines[above - 1].strip()):
        above -= 1
    return above >= 1 and lines[above - 1].strip().startswith("#")


def test_function_level_imports_say_why():
    unexplained = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        lines = path.read_text().splitlines()
        nodes = [n for n in ast.walk(ast.parse("\n".join(lines))) if isinstance(n, (ast.Import, ast.ImportFrom))]
        import_lines = {i for n in nodes for i in range(n.lineno, n.end_lineno + 1)}
        for lineno, module in function_level_imports(path):
            if any(module == h or module.startswith(h + ".") for h in HEAVY):
                continue
            if not has_reason(lines, import_lines, lineno):
                unexplained.append(f"src/gpt2/{rel}:{lineno}: {lines[lineno - 1].strip()}")
    assert unexplained == [], ("move these imports to the module's top, or say on the line (or the line above) "
                               "why they stay in the function")


def test_every_command_module_is_in_the_table_and_defines_its_configs_and_runs():
    """Configs live with their commands: each command's config class and run function are defined in its
    command module (a config may subclass a shared base of the library, such as `TrainConfig`)."""
    from gpt2.cli import COMMAND_MODULES

    assert sorted(COMMAND_MODULES) == sorted(p.stem for p in (PKG / "commands").glob("*.py") if p.stem != "__init__")
    misplaced = []
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gpt2.commands.{name}")
        commands = getattr(module, "COMMANDS", None) or [module.COMMAND]
        for cmd in commands:
            assert dataclasses.is_dataclass(cmd.config), f"gpt2 {cmd.name}: its config is not a dataclass"
            for what, obj in (("config", cmd.config), ("run", cmd.run)):
                if obj.__module__ != module.__name__:
                    misplaced.append(f"gpt2 {cmd.name}: {what} {obj.__qualname__} is defined in {obj.__module__}")
    assert misplaced == []
