"""Batched autoregressive generation with a KV cache.

Design decisions:
- The seed's API is kept exactly: `tokenize_batch_input(prompts) -> (input_ids, attention_masks)` gives
  right-padded LongTensors (pad id 0, mask 1/0), and `generate(model, input_ids, attention_masks,
  temperature, max_steps)` returns each prompt's new tokens, cut before `<|endoftext|>`.
- Right padding is handled by *left-aligning* internally: each row is shifted so that its last real token
  sits in the last column. Then every row's next token goes into the same cache slot, one forward pass per
  step serves the whole batch, and padding slots are masked out of attention. Positions come from the
  mask (`cumsum(mask) - 1`), so a prompt's output does not depend on what else is in its batch.
- Rows that have finished (emitted `<|endoftext|>`) are dropped from the batch and its cache, so a batch
  gets cheaper as its prompts end.
- On a CPU, decoding runs inside `gpt2.kernels.frozen`: MKL pre-packed weights for the projections, and for
  greedy decoding an exact argmax that screens the vocabulary with an int8 copy of the head before
  recomputing the few possible winners in fp32 (the tokens are those of the fp32 logits).
- GPT-2 has learned absolute positions: nothing can be generated past `block_size`. A prompt longer than
  the context window is an error; generation stops early when a row reaches the window's end.
- This module works on token ids only; `tokenize_batch_input` is the one place that calls the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gpt2.data.batching import PAD_ID, pad_right  # noqa: F401 (re-exported: the seed's API pads here)
from gpt2.kernels import frozen
from gpt2.model import GPT, KVCache
from gpt2.tokenizer import EOT, encode


def tokenize_batch_input(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts into right-padded (input_ids, attention_masks), both LongTensor [B, T]."""
    encoded = [encode(p) for p in prompts]
    return pad_right(encoded)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else softmax(logits / T) with
    optional top-k and nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_align(input_ids: torch.Tensor, attention_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each row's real tokens to end in the last column. Returns (ids, valid) with valid bool."""
    B, T = input_ids.shape
    lengths = attention_masks.sum(dim=1)  # (B,)
    cols = torch.arange(T, device=input_ids.device)[None]  # (1, T)
    # For output column c of row b, take source column c - (T - len_b) (a real token, or padding before).
    src = cols - (T - lengths)[:, None]  # (B, T)
    valid = src >= 0
    ids = torch.gather(input_ids, 1, src.clamp(min=0)).masked_fill(~valid, PAD_ID)
    return ids, valid


@torch.inference_mode()
def generate_stream(model: GPT, input_ids: torch.Tensor, attention_masks: torch.Tensor, temperature: float,
                    max_steps: int, *, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, eos_id: int | None = EOT,
                    ) -> Iterator[list[tuple[int, int]]]:
    """Yield, for each decoding step, the (prompt index, token) pairs produced at that step (rows that
    emit `eos_id` yield nothing for it and stop). See `generate` for the arguments."""
    _check_inputs(model, input_ids, attention_masks, max_steps)
    device = next(model.parameters()).device
    input_ids, attention_masks = input_ids.to(device), attention_masks.to(device)
    lengths = attention_masks.sum(dim=1)  # (B,)
    B, T = input_ids.shape
    steps = min(max_steps, model.config.block_size - int(lengths.min()))
    if steps <= 0 or B == 0:
        return
    ids, valid = left_align(input_ids, attention_masks)
    position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T): each row's own positions
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T + steps, device=device, dtype=dtype)

    was_training = model.training
    model.eval()
    try:
        with frozen(model, work=B * steps) as head:  # weights do not change while decoding: packed on CPU
            hidden = model.hidden_states(ids, position_ids, cache.attn_mask(valid), cache)  # (B, T, C)
            last = hidden[:, -1]  # (B, C): last column = each row's last real token
            alive = torch.arange(B, device=device)  # original prompt index of each remaining row
            next_pos = lengths.clone()  # (B,) position of each row's next token
            for _ in range(steps):
                if temperature <= 0 and head is not None:
                    tokens = head.argmax(last)  # (b,) the fp32 argmax, on CPU without all fp32 logits
                else:
                    tokens = sample_next(model.logits(last, head), temperature, top_k, top_p, generator)  # (b,)
                is_eos = tokens == eos_id if eos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
                yield [(i, t) for i, t, e in zip(alive.tolist(), tokens.tolist(), is_eos.tolist()) if not e]
                # a row also stops when its token took the context window's last position
                keep = ~(is_eos | (next_pos >= model.config.block_size - 1))
                if not bool(keep.any()):
                    return
                if not bool(keep.all()):
                    rows = keep.nonzero().squeeze(1)
                    alive, tokens, next_pos = alive[rows], tokens[rows], next_pos[rows]
                    cache.select_rows(rows)
                last = model.hidden_states(tokens[:, None], next_pos[:, None], None, cache)[:, -1]  # (b, C)
                next_pos = next_pos + 1
    finally:
        model.train(was_training)


def generate(model: GPT, input_ids: torch.Tensor, attention_masks: torch.Tensor, temperature: float,
             max_steps: int, *, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = EOT,
             on_tokens: Callable[[list[tuple[int, int]]], None] | None = None) -> list[list[int]]:
    """Sample up to `max_steps` new tokens for each right-padded prompt.

    input_ids, attention_masks: LongTensor [B, T], real tokens first, then padding (mask 0).
    temperature: 0 = greedy argmax; otherwise softmax(logits / temperature), optionally top-k / top-p.
    Each prompt stops at its first `<|endoftext|>` (not included in the output) or at the context window's
    end; the loop ends when every prompt has stopped or after `max_steps` tokens.
    Returns each prompt's generated tokens, prompt excluded. `on_tokens` is called after every step
    with that step's (prompt index, token) pairs, for streaming.
    """
    results: list[list[int]] = [[] for _ in range(input_ids.size(0))]
    for produced in generate_stream(model, input_ids, attention_masks, temperature, max_steps, top_k=top_k,
                                    top_p=top_p, generator=generator, eos_id=eos_id):
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
