"""The seed's generation API, on the decoding core (`gpt2.decode`).

Design decisions:
- The seed's API is kept exactly: `tokenize_batch_input(prompts) -> (input_ids, attention_masks)` gives
  right-padded LongTensors (pad id 0, mask 1/0), and `generate(model, input_ids, attention_masks,
  temperature, max_steps)` returns each prompt's new tokens, cut before `<|endoftext|>`.
- Everything about decoding (cache, left-aligned prefill, steps, sampling, the stop rules) is `gpt2.decode`'s:
  a batch runs on the decoding engine (`Engine.run_batch`), the one the server runs, so a prompt's greedy
  tokens are the same here, in a batch, and in the server. Rows that finish are dropped from the batch, which
  gets cheaper as its prompts end.
- GPT-2 has learned absolute positions: nothing can be generated past `block_size`. A prompt longer than
  the context window is an error; generation stops early when a row reaches the window's end.
- This module works on token ids only; `tokenize_batch_input` is the one place that calls the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gpt2.decode import PAD_ID, Decoder, SamplingParams, left_align, pad_right, sample_next
from gpt2.decode.engine import Engine
from gpt2.model import GPT
from gpt2.tokenizer import EOT, encode

__all__ = ["PAD_ID", "generate", "generate_stream", "left_align", "pad_right", "sample_next",
           "tokenize_batch_input"]


def tokenize_batch_input(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts into right-padded (input_ids, attention_masks), both LongTensor [B, T]."""
    return pad_right([encode(p) for p in prompts])


@torch.inference_mode()
def generate_stream(model: GPT, input_ids: torch.Tensor, attention_masks: torch.Tensor, temperature: float,
                    max_steps: int, *, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, eos_id: int | None = EOT,
                    decoder: Decoder | None = None, weights_dtype: str | None = None,
                    ) -> Iterator[list[tuple[int, int]]]:
    """Yield, for each decoding step, the (prompt index, token) pairs produced at that step (rows that
    emit `eos_id` yield nothing for it and stop). See `generate` for the arguments."""
    _check_inputs(model, input_ids, attention_masks, max_steps)
    lengths = attention_masks.sum(dim=1).tolist()
    prompts = [row[:n] for row, n in zip(input_ids.tolist(), lengths)]
    # per call unless given one: the weights may have changed since the last call
    if decoder is not None and decoder.model is not model:
        raise ValueError("decoder= was made for another model: make it with Decoder(model)")
    if decoder is not None and weights_dtype is not None and weights_dtype != decoder.weights_dtype:
        raise ValueError(f"weights_dtype={weights_dtype!r} but decoder= holds {decoder.weights_dtype} weights")
    if decoder is None and weights_dtype is not None:
        decoder = Decoder(model, weights_dtype=weights_dtype)
    params = SamplingParams(max_tokens=max_steps, temperature=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    try:
        engine = Engine(model, max_batch_size=max(len(prompts), 1), eos_id=eos_id, decoder=decoder)
        for events in engine.run_batch(prompts, params, generator):
            yield [(i, e.token) for i, e in events if e.token is not None]
    finally:
        model.train(was_training)


def generate(model: GPT, input_ids: torch.Tensor, attention_masks: torch.Tensor, temperature: float,
             max_steps: int, *, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = EOT,
             on_tokens: Callable[[list[tuple[int, int]]], None] | None = None,
             decoder: Decoder | None = None, weights_dtype: str | None = None) -> list[list[int]]:
    """Sample up to `max_steps` new tokens for each right-padded prompt.

    input_ids, attention_masks: LongTensor [B, T], real tokens first, then padding (mask 0).
    temperature: 0 = greedy argmax; otherwise softmax(logits / temperature), optionally top-k / top-p.
    Each prompt stops at its first `<|endoftext|>` (not included in the output) or at the context window's
    end; the loop ends when every prompt has stopped or after `max_steps` tokens.
    Returns each prompt's generated tokens, prompt excluded. `on_tokens` is called after every step
    with that step's (prompt index, token) pairs, for streaming. `decoder`: a `gpt2.decode.Decoder` of this
    model to run on (say a compiled one, kept across calls while the weights stay fixed); default: a new one,
    holding the weights in `weights_dtype` ("int8": 8-bit weights on a CPU, see `gpt2.decode.int8`; None: the
    model's dtype; a float dtype's name: a cast copy), made per call like the default decoder.
    """
    results: list[list[int]] = [[] for _ in range(input_ids.size(0))]
    for produced in generate_stream(model, input_ids, attention_masks, temperature, max_steps, top_k=top_k,
                                    top_p=top_p, generator=generator, eos_id=eos_id, decoder=decoder,
                                    weights_dtype=weights_dtype):
        for i, tok in produced:
            results[i].append(tok)
        if on_tokens is not None:
            on_tokens(produced)
    return results


def _check_inputs(model: GPT, input_ids: torch.Tensor, attention_masks: torch.Tensor, max_steps: int) -> None:
    if input_ids.shape != attention_masks.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_masks "
                         f"{tuple(attention_masks.shape)} must be the same [B, T] shape")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    lengths = attention_masks.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"prompt {int((lengths == 0).nonzero()[0])} is empty: GPT-2 needs at least one token")
    if int(lengths.max()) > model.config.block_size:
        raise ValueError(f"prompt of {int(lengths.max())} tokens is longer than the context window "
                         f"({model.config.block_size} tokens)")
    # right padding: once a row's mask drops to 0 it must stay 0
    if bool((attention_masks[:, 1:] > attention_masks[:, :-1]).any()):
        raise ValueError("attention_masks must be right-padded (1s then 0s in every row)")
