"""Instruction fine-tuning's Task (Alpaca batches for the shared loop) and its before/after answers
(`gpt2 finetune`, in `gpt2.commands.finetune`, is its command).

Design decisions:
- Batches: `LengthGroupedBatcher` (similar lengths together, so little padding; each rank takes disjoint
  batches; its (epoch, position) is the task state that checkpoints hold), laid out by
  `gpt2.data.batching.collate`, and the loss is `model.loss(input_ids, targets)`: mean cross-entropy over the
  batch's answer tokens (question and padding positions are -100), and `loss_weight` tells the loop how
  many, so a step averages over every answer token of the global batch (`gpt2.train.loop`: a micro batch
  with 10 answer tokens counts 10/500 of one with 500, not as much). `answer_tokens` is logged per step.
  On CPU the same loss is computed by `gpt2.losses.gpt_loss_chunked` (equal values and gradients,
  without materialising the (B*T, 50257) logits), as pretraining does.
- Under torch.compile (the default on CUDA) the varying lengths cost one recompile, after which the sequence
  dimension is dynamic (and one more for a short last batch): 3 graphs in all, measured with dynamo's counters
  in tests/test_train_speed.py, with no graph break, so no padding to fixed buckets is needed.
- Validation loss is token-weighted over the whole held-out split: each rank evaluates every W-th batch and
  the sums are all-reduced.
- `answer_prompts` answers questions formatted with `gpt2.template.format_prompt` and says whether each
  answer ended with <|endoftext|>; `render_samples` puts two sets of answers side by side (samples.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2.data.batching import Example, LengthGroupedBatcher, collate, num_targets
from gpt2.distributed import all_reduce_sum
from gpt2.errors import UserError
from gpt2.evaluate import val_loss
from gpt2.inference import generate, tokenize_batch_input
from gpt2.losses import IGNORE_INDEX, gpt_loss_chunked
from gpt2.template import format_prompt
from gpt2.tokenizer import decode_bytes
from gpt2.train.task import Task

# ---------------------------------------------------------------- the task


class FinetuneTask(Task):
    """Alpaca batches for the shared loop (a `gpt2.train.task.Task`)."""

    def __init__(self, train_examples: list[Example], val_examples: list[Example], batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, group_batches: int = 16,
                 fused_loss: bool = False):
        self.train_examples, self.fused_loss = train_examples, fused_loss
        self.batcher = LengthGroupedBatcher([len(q) + len(a) for q, a in train_examples], batch_size, seed=seed,
                                            rank=rank, world_size=world_size, group_batches=group_batches)
        # validation: fixed batches of similar length; rank r evaluates batches r, r+W, ...
        order = sorted(range(len(val_examples)), key=lambda i: len(val_examples[i][0]) + len(val_examples[i][1]))
        batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
        self.val_batches = [collate([val_examples[i] for i in b]) for b in batches[rank::world_size]]
        self.has_val = bool(val_examples)

    @property
    def batches_per_epoch(self) -> int:
        return self.batcher.batches_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.train_examples[i] for i in self.batcher.next_batch()])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        input_ids, targets = batch
        loss = gpt_loss_chunked(model, input_ids, targets) if self.fused_loss else model.loss(input_ids, targets)
        return loss, {"answer_tokens": (targets != IGNORE_INDEX).sum()}

    def loss_weight(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """The loss is a mean over answer tokens: the loop weights each micro batch by their number."""
        return num_targets(batch[1])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.has_val:
            return {}

        device = next(model.parameters()).device
        count = sum(num_targets(y) for _, y in self.val_batches)
        total = val_loss(model, self.val_batches) * count if count else 0.0
        sums = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
        return {"val_loss": float(sums[0] / sums[1])}

    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])


# ---------------------------------------------------------------- before/after answers


def answer_prompts(model: nn.Module, prompts: list[str], max_tokens: int, temperature: float = 0.0,
                   seed: int = 0) -> list[dict]:
    """Answers of `model` to each question (formatted with the one template): [{"answer", "stopped"}], where
    "stopped" says the answer ended with <|endoftext|> rather than at the token limit."""
    if not prompts:
        return []
    ids, mask = tokenize_batch_input([format_prompt(p) for p in prompts])
    block = model.config.block_size
    lengths = mask.sum(1).tolist()
    for p, n in zip(prompts, lengths):
        if n >= block:
            raise UserError(f"--sample-prompts: {p[:40]!r}... is {n} tokens with the template, longer than the "
                            f"model's context window ({block})")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    outputs = generate(model, ids, mask, temperature, max_tokens, generator=gen)
    # generate() ends a row at <|endoftext|> (not returned), at max_tokens, or at the context window's end;
    # a row shorter than both limits therefore stopped at <|endoftext|>.
    return [{"answer": decode_bytes(out).decode("utf-8", errors="replace"),
             "stopped": len(out) < min(max_tokens, block - n)} for out, n in zip(outputs, lengths)]


def _cell(text: str) -> str:
    """Text as one Markdown table cell."""
    if not text.strip():
        return "*(whitespace only)*" if text else "*(empty)*"
    return text.strip().replace("|", "\\|").replace("\n", "<br>")


def render_samples(prompts: list[str], before: list[dict], after: list[dict] | None, header: str) -> str:
    """samples.md: one side-by-side table per prompt."""
    lines = ["# Before and after fine-tuning", "", header, ""]
    for i, prompt in enumerate(prompts):
        b = before[i]
        a = after[i] if after else {"answer": "*(fine-tuning not finished)*", "stopped": None}
        stop = {True: "yes", False: "no", None: "-"}
        lines += [f"## {i + 1}. {prompt}", "",
                  "| | before | after |", "|---|---|---|",
                  f"| answer | {_cell(b['answer'])} | {_cell(a['answer'])} |",
                  f"| ended with `<\\|endoftext\\|>` | {stop[b['stopped']]} | {stop[a['stopped']]} |", ""]
    return "\n".join(lines)
