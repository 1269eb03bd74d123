"""`gpt2 generate`: sample continuations of prompts from a checkpoint, printed as they are produced.

    gpt2 generate --model RUN_DIR "Hello, I'm a language model,"
    gpt2 generate --model gpt2 --temperature 0 --max-tokens 32 "The capital of France" "Once upon a time"

One prompt is streamed to the terminal (whole characters only); several are generated as one batch and
printed one after the other. The generation is `gpt2.inference.generate`, the library's API.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg, check_sampling, check_values
from gpt2.decode import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPE_METAVAR, TextStream, decoder_for, load_dtype
from gpt2.distributed import pick_device
from gpt2.errors import UserError, note
from gpt2.inference import generate, tokenize_batch_input
from gpt2.tokenizer import decode_bytes


@dataclass
class GenerateConfig:
    prompts: list[str] = arg(factory=list, help="prompt texts; each gets its own continuation",
                             positional=True)
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory (ours or OpenAI's) "
                                  "or a hub name")
    temperature: float = arg(0.8, help="sampling temperature; 0 = greedy")
    max_tokens: int = arg(64, help="maximum number of new tokens per prompt", minimum=0,
                          aliases=("--max-steps",))
    top_k: int | None = arg(None, help="sample only among the k most likely tokens")
    top_p: float | None = arg(None, help="nucleus sampling: smallest token set with this probability mass")
    seed: int = arg(1337, help="random seed, for reproducible sampling")
    device: str = arg("auto", help="cpu, cuda, mps or auto")
    weights_dtype: str = arg("float32", help=WEIGHTS_DTYPE_HELP, metavar=WEIGHTS_DTYPE_METAVAR)
    compile: bool = arg(False, help="switch to the model compiled for this CPU (AOTInductor) once it is ready: "
                                    "generation starts at once, eagerly; the pieces are loaded from the cache, or "
                                    "compiled in the background (stopped if generation ends first; `gpt2 cache "
                                    "build` compiles ahead)")

    def validate(self) -> None:
        if not self.prompts:
            raise UserError("give at least one prompt, e.g. gpt2 generate --model DIR \"Hello, I'm a language "
                            "model,\"")
        empty = [i + 1 for i, p in enumerate(self.prompts) if not p]
        if empty:
            raise UserError(f"prompt {empty[0]} is empty: GPT-2 continues text, give it at least one character")
        check_values(self)
        check_sampling(self.temperature, self.top_k, self.top_p)
        load_dtype(self.weights_dtype)


def run(cfg: GenerateConfig) -> list[str]:
    cfg.validate()
    device = pick_device(cfg.device)
    model = load_model(cfg.model, device, load_dtype(cfg.weights_dtype), reads_text="--model").eval()
    ids, mask = tokenize_batch_input(cfg.prompts)
    too_long = [i for i, n in enumerate(mask.sum(1).tolist()) if n > model.config.block_size]
    if too_long:
        raise UserError(f"prompt {too_long[0] + 1} is longer than the model's context window "
                        f"({model.config.block_size} tokens)")
    # before the prompt is printed: it may say that it compiles in the background
    # eager unless --compile: a one-off command ends before loading or building the pieces would pay
    decoder = decoder_for(model, bool(cfg.compile), label=cfg.model, say=note, weights_dtype=cfg.weights_dtype)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    single = len(cfg.prompts) == 1
    stream = TextStream()
    if single:  # one prompt: stream its text to the terminal as it is produced (whole characters only)
        print(cfg.prompts[0], end="", flush=True)

    def on_tokens(produced: list[tuple[int, int]]) -> None:
        for _, token in produced:
            sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    outputs = generate(model, ids, mask, cfg.temperature, cfg.max_tokens, top_k=cfg.top_k, top_p=cfg.top_p,
                       generator=gen, on_tokens=on_tokens if single else None, decoder=decoder)
    texts = [decode_bytes(o).decode("utf-8", errors="replace") for o in outputs]
    if single:
        print(stream.finish())
    else:
        for i, (prompt, text) in enumerate(zip(cfg.prompts, texts)):
            print(f"--- [{i + 1}] ---\n{prompt}{text}")
    _note_window_stops(mask.sum(1).tolist(), outputs, cfg.max_tokens, model.config.block_size)
    return texts


def _note_window_stops(prompt_lengths: list[int], outputs: list[list[int]], max_tokens: int, window: int) -> None:
    """Say on stderr when a prompt stopped short of --max-tokens because it filled the context window."""
    cut = [i for i, (n, out) in enumerate(zip(prompt_lengths, outputs)) if len(out) < max_tokens and n + len(out)
           >= window]
    if cut:
        which = "" if len(outputs) == 1 else f"prompt {cut[0] + 1}{' and others' if len(cut) > 1 else ''}: "
        print(f"note: {which}stopped after {len(outputs[cut[0]])} of --max-tokens {max_tokens} new tokens at the "
              f"model's context window ({window} tokens)", file=sys.stderr)


COMMAND = Command("generate", "sample continuations of prompts from a model", GenerateConfig, run)
