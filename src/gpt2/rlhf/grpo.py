"""GRPO (Group Relative Policy Optimization, DeepSeekMath: Shao et al. 2024) on a task with a verifiable reward
(`gpt2.rlhf.tasks`): the Task of the shared loop (`gpt2 grpo`, in `gpt2.commands.grpo`, is its command).

One step:
  1. Rollout (no grad): the step's questions, each rendered with the one template; G answers sampled for each
     (a group) through `gpt2.inference.generate`, the engine `gpt2 generate` runs; each answer scored by the
     task (1.0 right, 0.0 wrong).
  2. Advantages: each answer's reward minus its group's mean (`group_advantages`), the same at every one of
     its tokens.
  3. Update(s): `updates_per_rollout` optimizer updates on the whole rollout, each minimising the clipped
     surrogate over the answer tokens plus an optional KL penalty to the starting model (`grpo_loss`).

Design decisions, each beside nanochat's `scripts/chat_rl.py` and TRL's `GRPOTrainer`:
- Advantage = r - mean(group) by default, as nanochat does and Dr. GRPO (Liu et al. 2025) argues: dividing by
  the group's std weights the questions that are nearly always right or nearly always wrong most.
  `scale_rewards` divides by the std (+1e-4), DeepSeekMath's form and TRL's default (`scale_rewards="group"`).
  A group whose answers all scored the same has advantage 0 and gives no policy gradient; its share is
  logged (`zero_adv_groups`) rather than resampled (DAPO's dynamic sampling; neither reference does it).
- Loss: PPO's clipped surrogate, per token, with the ratio pi / pi_old against the rollout-time log-probs and
  `clip` 0.2 on both sides (TRL's epsilon; no DAPO clip-higher). `updates_per_rollout` is TRL's
  `num_iterations` (mu), 1 by default in both. With 1 the rollout's policy is the current one: pi_old is
  taken as pi detached (TRL does the same) and no extra forward pass is made, the ratio is exactly 1 and
  the clip never acts, so the gradient is REINFORCE's with the group mean as baseline: nanochat's update,
  which drops the ratio altogether ("we are on policy"). With more, pi_old is computed once at rollout
  time and the clip bounds how far the later updates move.
- Token-level normalisation over the global batch: the loss is the sum over every answer token of the step
  (all micro batches and ranks) divided by their number; `loss_weight` gives each micro batch's token count
  and the loop's global-count weighting does the rest. This is DAPO's normalisation and TRL's default
  `loss_type="dapo"`; the original per-answer mean (TRL's "grpo") gives a long answer's tokens less weight
  each, which favours short right answers and long wrong ones. nanochat divides each micro batch by its own
  token count and averages the passes: the same when micro batches hold equally many tokens.
- KL: `kl_coef` (beta) >= 0, default 0: TRL's default beta is 0.0, nanochat has no KL term, DeepSeekMath used
  0.04. When > 0 a frozen copy of the starting model is the reference (made only then), its log-probs are
  taken at rollout time, and beta * k3 (`k3_kl`, Schulman's estimator, as DeepSeekMath and TRL) is added to
  every answer token's loss, not to the reward as PPO (`gpt2.rlhf.ppo`) does. `kl` logs the mean k3 per
  answer token at the update (only when computed).
- Sampling: one `generate` call per group, its generator seeded from the run's seed and the prompt's place
  in the run's draw order (nanochat also samples each question's group in its own call, seeded by step and
  example; TRL batches every prompt's completions together). So a group's answers depend neither on the
  prompts beside it nor on how the step's prompts are spread over ranks: N ranks take the same step as one
  process, and resuming needs no generator state. `temperature` 1.0 and no top-k / top-p (TRL's defaults;
  nanochat uses top-k 50). An answer keeps the `<|endoftext|>` it stopped on as its last action; answers
  cut by `max_new_tokens` are trained on as they are (TRL's `mask_truncated_completions` is off by default).
- The step's questions: a seeded shuffle of the train split per epoch, the same on every rank; a step takes
  the next `prompts_per_step` (a count over all ranks, as nanochat's `examples_per_step`) and rank r the r-th
  share. The number drawn so far is the Task's whole state: `--resume` continues exactly.
- Micro batches: the rollout's rows are cut in order into `micro_batch` rows per forward pass (the loop's
  accumulation does not apply: a step is one rollout); log-probs run the LM head on the answer positions only
  (`gpt2.rlhf.losses.answer_logprobs`).
- Metrics of each step: mean reward; accuracy (the share of answers scored 1.0, the same number for the 0/1
  scorers of `gpt2.rlhf.tasks`); answer length and the share that ended with `<|endoftext|>`; the share of
  zero-advantage groups; the loss's clip fraction, approximate KL to pi_old and `kl`. Evaluation: greedy
  accuracy on the test split's first `eval_questions` (`evaluate_task`, split over ranks, counts summed),
  with its 95% Wilson interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gpt2.decode import Decoder
from gpt2.distributed import all_reduce_sum
from gpt2.model import GPT
from gpt2.precision import autocast_context
from gpt2.rlhf.losses import IGNORE, answer_logprobs, group_advantages, grpo_loss
from gpt2.rlhf.rollout import (
    RolloutHyper,
    answer_batch,
    answer_stats,
    answer_text,
    sample_answers,
)
from gpt2.rlhf.tasks import Question, VerifiableTask, evaluate_task, wilson_interval
from gpt2.train.task import Step, Task

MicroBatch = dict[str, Any]  # input_ids, targets, advantages (B,), tokens (int); old_logp, ref_logp as needed


@dataclass
class GRPOHyper(RolloutHyper):
    """The algorithm's knobs (the command's config carries the same names)."""
    samples_per_prompt: int = 8
    updates_per_rollout: int = 1
    scale_rewards: bool = False
    micro_batch: int = 16


class DrawOrder:
    """The run's order of questions: epoch e is a shuffle of the n question indices seeded by (seed, e), the same
    on every rank; `take(k)` returns the next k draw numbers (the position in that endless order)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.drawn = n, seed, 0
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> list[int]:
        draws = list(range(self.drawn, self.drawn + k))
        self.drawn += k
        return draws

    def question(self, draw: int) -> int:
        """The question index of draw number `draw`."""
        epoch = draw // self.n
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix(self.seed, SHUFFLE, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return int(self._perm[draw % self.n])


SHUFFLE, SAMPLE = 0, 1  # the two streams of seeds a run derives from its own


def mix(seed: int, *items: int) -> int:
    """A generator seed derived from a run's `seed` and `items` (a stream, then an epoch or a draw number): a
    multiplicative hash within 64 bits, the same on every machine and rank."""
    for item in items:
        seed = (seed * 0x9E3779B97F4A7C15 + item + 1) % 2**64
    return seed


class GRPOTask(Task):
    """GRPO as a Task of the shared loop (module docstring): a step is a rollout of groups and its updates."""

    def __init__(self, policy: GPT, reference: GPT | None, task: VerifiableTask, train: list[Question],
                 train_prompts: list[list[int]], evals: list[Question], hp: GRPOHyper, prompts_per_step: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 amp: torch.dtype | None = None):
        if prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step {prompts_per_step} is not a multiple of {world_size} ranks")
        if (reference is None) != (hp.kl_coef == 0):
            raise ValueError("a reference model is needed exactly when kl_coef > 0")
        self.policy, self.reference, self.task, self.hp = policy, reference, task, hp
        self.train, self.train_prompts, self.evals = train, train_prompts, evals
        self.per_rank = prompts_per_step // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.amp = device or torch.device("cpu"), amp
        self.order = DrawOrder(len(train), seed)

    # ---------------------------------------------------------------- rollout

    def my_draws(self) -> list[int]:
        """This rank's share of the step's draws (every rank advances the order by the whole step)."""
        draws = self.order.take(self.per_rank * self.world_size)
        return draws[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    @torch.no_grad()
    def sample_group(self, draw: int, decoder: Decoder | None = None,
                     ) -> tuple[list[int], list[list[int]], list[float]]:
        """(prompt, G answers, their rewards) for draw number `draw` (see "Sampling" in the module docstring)."""
        index = self.order.question(draw)
        prompt, G = self.train_prompts[index], self.hp.samples_per_prompt
        gen = torch.Generator(device=self.device).manual_seed(mix(self.seed, SAMPLE, draw))
        answers = sample_answers(self.policy, [prompt] * G, self.hp.temperature, self.hp.max_new_tokens, gen,
                                 decoder)
        rewards = [float(self.task.score(self.train[index], answer_text(a))) for a in answers]
        return prompt, answers, rewards

    @torch.no_grad()
    def rollout(self) -> tuple[list[MicroBatch], dict[str, float]]:
        """This rank's groups of the step, cut into micro batches, and the rollout's metrics."""
        prompts, answers, rewards = [], [], []
        decoder = Decoder(self.policy)  # one for the rollout's groups: the weights stay as they are until its end
        for draw in self.my_draws():
            prompt, group, scores = self.sample_group(draw, decoder)
            prompts += [prompt] * len(group)
            answers += group
            rewards += scores
        reward = torch.tensor(rewards)
        G = self.hp.samples_per_prompt
        advantages = group_advantages(reward, G, self.hp.scale_rewards)
        batches = [self.micro_batch(prompts[i:i + self.hp.micro_batch], answers[i:i + self.hp.micro_batch],
                                    advantages[i:i + self.hp.micro_batch])
                   for i in range(0, len(answers), self.hp.micro_batch)]
        groups = reward.view(-1, G)
        flat = (groups == groups[:, :1]).all(dim=1)  # every answer scored the same: advantage 0
        metrics = {"reward": reward.mean().item(), "accuracy": (reward >= 1).float().mean().item(),
                   "zero_adv_groups": flat.float().mean().item(), **answer_stats(answers)}
        return batches, metrics

    def micro_batch(self, prompts: list[list[int]], answers: list[list[int]], advantages: torch.Tensor,
                    ) -> MicroBatch:
        """Rows in the fine-tuning layout with their advantages; the rollout-time log-probs of the policy (when
        several updates share the rollout) and of the reference (when there is a KL term), on the device."""
        input_ids, targets = answer_batch(prompts, answers)
        mb: MicroBatch = {"input_ids": input_ids, "targets": targets, "advantages": advantages,
                          "tokens": int((targets != IGNORE).sum())}
        models = {"old_logp": self.policy if self.hp.updates_per_rollout > 1 else None,
                  "ref_logp": self.reference}
        if any(m is not None for m in models.values()):
            ids, tgt = input_ids.to(self.device), targets.to(self.device)
            with autocast_context(self.device, self.amp):
                for key, model in models.items():
                    if model is not None:
                        mb[key] = logprobs_eval(model, ids, tgt)
        return mb

    # ---------------------------------------------------------------- the loop's interface

    def step_batches(self, grad_accum_steps: int) -> Step:
        """One rollout, then `updates_per_rollout` updates on all of it (the loop's accumulation does not apply:
        a step is one rollout, cut into micro batches by `micro_batch`)."""
        batches, metrics = self.rollout()
        return [batches] * self.hp.updates_per_rollout, metrics

    def loss(self, model: nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """`grpo_loss` on the micro batch: a mean over its answer tokens (weighted by `loss_weight`)."""
        logp = answer_logprobs(model, mb["input_ids"], mb["targets"])
        old = mb.get("old_logp", logp.detach())  # one update per rollout: pi_old is pi (module docstring)
        return grpo_loss(logp, old, mb["advantages"], mb["targets"] != IGNORE, self.hp.clip, self.hp.kl_coef,
                         mb.get("ref_logp"))

    def loss_weight(self, mb: MicroBatch) -> int:
        return mb["tokens"]

    def num_tokens(self, mb: MicroBatch) -> int:
        return mb["input_ids"].numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy accuracy on the held-out questions, each rank answering its share, with its Wilson interval."""
        if not self.evals:
            return {}
        mine = self.evals[self.rank::self.world_size]
        result = evaluate_task(model, mine, self.task, self.hp.max_new_tokens, self.hp.micro_batch)
        counts = torch.tensor([float(result["correct"]), float(result["n"])], device=self.device)
        correct, n = (int(v) for v in all_reduce_sum(counts).tolist())
        low, high = wilson_interval(correct, n)
        return {"accuracy": correct / n, "ci_low": low, "ci_high": high}

    def state_dict(self) -> dict:
        return {"drawn": self.order.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.order.drawn = state["drawn"]


def logprobs_eval(model: GPT, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`answer_logprobs` of a model in eval mode (no dropout), its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return answer_logprobs(model, input_ids, targets)
    finally:
        model.train(was_training)
