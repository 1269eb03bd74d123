"""The decoder the decoding commands (`chat`, `serve`, `generate`) run on, and whether they compile by default;
their lines about it go to stderr (stdout stays the command's output)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gpt2.decode import Decoder
from gpt2.model import GPT


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# Below this many parameters compiling is not worth it by default (see `docs/compiled_decoding.md`): a small
# model decodes fast eagerly, so the pieces' one-time cost (minutes on 2 cores even for a 2-layer model) is
# repaid only after far more tokens than a chat or a short serving session produces.
COMPILE_MIN_PARAMS = 50_000_000


def wants_compile(model: GPT, compile: bool | None) -> bool:
    """Whether a command decodes compiled: `compile` when given (True: on a CPU only, said in one line), else
    (auto) on a CPU for models of at least `COMPILE_MIN_PARAMS` parameters."""
    on_cpu = model.lm_head.weight.device.type == "cpu"
    if compile is None:
        return on_cpu and model.num_params() >= COMPILE_MIN_PARAMS
    if compile and not on_cpu:
        _stderr(f"note: --compile is for CPUs; decoding on {model.lm_head.weight.device.type} runs eagerly")
    return compile and on_cpu


def decoder_for(model: GPT, compile: bool | None, build: bool = True, label: str = "",
                say: Callable[[str], None] = _stderr) -> Decoder:
    """The decoder a command runs on. It decodes eagerly from the first token; where compiling is wanted
    (`wants_compile`) the compiled pieces are made ready in the background (built when not cached, if `build`)
    and the decoder switches to them between two steps, taking the model's weights over (`release_weights`:
    the command uses the model only through the decoder). Nothing ever waits for the compiler."""
    decoder = Decoder(model, release_weights=True)
    if wants_compile(model, compile):
        decoder.compile_in_background(build=build, label=label, say=say)
    return decoder
