"""`gpt2 generate`: sample continuations of prompts from a checkpoint, printed as they are produced."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gpt2.cli import Command, register
from gpt2.config import arg
from gpt2.errors import UserError


@dataclass
class GenerateConfig:
    prompts: list[str] = arg(factory=list, help="prompt texts; each gets its own continuation",
                             positional=True)
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory (ours or OpenAI's) "
                                  "or a hub name")
    temperature: float = arg(0.8, help="sampling temperature; 0 = greedy")
    max_steps: int = arg(64, help="maximum number of new tokens per prompt")
    top_k: int | None = arg(None, help="sample only among the k most likely tokens")
    top_p: float | None = arg(None, help="nucleus sampling: smallest token set with this probability mass")
    seed: int = arg(1337, help="random seed, for reproducible sampling")
    device: str = arg("auto", help="cpu, cuda, mps or auto")


def run(cfg: GenerateConfig) -> list[str]:
    from gpt2.checkpoint import load_model
    from gpt2.distributed import pick_device
    from gpt2.inference import generate, tokenize_batch_input
    from gpt2.serve.text import TextStream
    from gpt2.tokenizer import decode_bytes

    if not cfg.prompts:
        raise UserError("give at least one prompt, e.g. gpt2 generate --model DIR \"Hello, I'm a language model,\"")
    if cfg.max_steps < 0 or cfg.temperature < 0:
        raise UserError("--max-steps and --temperature must be >= 0")
    device = pick_device(cfg.device)
    model = load_model(cfg.model, device).eval()
    ids, mask = tokenize_batch_input(cfg.prompts)
    too_long = [i for i, n in enumerate(mask.sum(1).tolist()) if n > model.config.block_size]
    if too_long:
        raise UserError(f"prompt {too_long[0] + 1} is longer than the model's context window "
                        f"({model.config.block_size} tokens)")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    single = len(cfg.prompts) == 1
    stream = TextStream()
    if single:  # one prompt: stream its text to the terminal as it is produced (whole characters only)
        print(cfg.prompts[0], end="", flush=True)

    def on_tokens(produced: list[tuple[int, int]]) -> None:
        for _, token in produced:
            sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    outputs = generate(model, ids, mask, cfg.temperature, cfg.max_steps, top_k=cfg.top_k, top_p=cfg.top_p,
                       generator=gen, on_tokens=on_tokens if single else None)
    texts = [decode_bytes(o).decode("utf-8", errors="replace") for o in outputs]
    if single:
        print(stream.finish())
    else:
        for i, (prompt, text) in enumerate(zip(cfg.prompts, texts)):
            print(f"--- [{i + 1}] ---\n{prompt}{text}")
    return texts


register(Command("generate", "sample continuations of prompts from a model", GenerateConfig, run))
