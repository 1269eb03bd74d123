"""`gpt2 ppo`: InstructGPT-style PPO against a reward model, with a per-token KL penalty to the reference.

One iteration:
  1. Rollout (no grad): sample an answer for each prompt with `gpt2.inference.generate` (KV cache); an
     answer that stopped on `<|endoftext|>` keeps it as its last action. Prompt + answer rows use the
     fine-tuning layout, so every per-token tensor is (B, T) with `mask` on the answer tokens.
     Record the policy's log-probs and values, the reference's log-probs, and the reward model's score.
  2. Rewards: -kl_coef * (logp - ref_logp) at every answer token, plus the score at the last one
     (`kl_penalized_rewards`). Advantages by GAE(gamma, lam), whitened over the batch; returns = A + V.
  3. Update: `ppo_epochs` passes over the rollout batch in shuffled minibatches, minimising the clipped
     policy loss + vf_coef * the clipped value loss, with gradient clipping.
Design decisions:
- The value function is a scalar head on the policy's own backbone (`ActorCritic`): one forward pass
  gives logits and values, and there is one model to shard, checkpoint and export. The policy alone is
  exported as a Hugging Face checkpoint; the value head is saved beside it.
- The reward is any function `(input_ids, targets) -> scores (B,)`; the command uses a `RewardModel`
  trained by `gpt2 reward`, the tests a known rule, so the algorithm is checked on its own.
- PPO alternates generation and optimisation, which the step-driven shared loop does not do, so it has
  this small outer loop built from the loop's pieces (optimizer, LR schedule, checkpoints, metrics,
  progress bar, plots) rather than a second copy of them.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from gpt2.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_DIR,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from gpt2.cli import Command, register
from gpt2.config import arg, to_dict
from gpt2.data.alpaca import LengthGroupedBatcher, collate
from gpt2.data.preferences import load_pairs, split_file
from gpt2.distributed import all_gather_object, all_reduce_mean, destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.inference import generate, pad_right
from gpt2.io import write_json_atomic
from gpt2.model import GPT
from gpt2.rlhf.heads import ActorCritic, RewardModel
from gpt2.rlhf.losses import (
    gae,
    kl_penalized_rewards,
    last_token_index,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from gpt2.template import format_prompt
from gpt2.tokenizer import EOT, encode
from gpt2.train.loop import (
    CONFIG_FILE,
    METRICS_FILE,
    MetricsLogger,
    NonFiniteLossError,
    StopSignals,
    TrainConfig,
    apply_lr,
    autocast_context,
    autocast_dtype,
    build_optimizer,
    plot,
    seed_everything,
)

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, targets) -> scores (B,)


@dataclass
class PPOHyper:
    """The algorithm's knobs (the command's config carries the same names)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatch_size: int = 8
    grad_clip: float = 1.0


def complete(prompt: list[int], answer: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """`generate` drops the final `<|endoftext|>`; put it back when that is why the answer stopped (it is
    an action the policy took and must be credited), i.e. when neither the token budget nor the context
    window ended it."""
    if len(answer) < max_new_tokens and len(prompt) + len(answer) < block_size:
        return answer + [EOT]
    return answer


@torch.no_grad()
def rollout(actor: ActorCritic, reference: GPT, reward_fn: RewardFn, prompts: list[list[int]], hp: PPOHyper,
            generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sample answers and compute everything the update needs. Returns (batch of (B, T) tensors, metrics)."""
    device = next(actor.parameters()).device
    ids, masks = pad_right(prompts)
    answers = generate(actor.policy, ids, masks, hp.temperature, hp.max_new_tokens, generator=generator)
    block = actor.policy.config.block_size
    input_ids, targets = collate([(p, complete(p, a, hp.max_new_tokens, block)) for p, a in zip(prompts, answers)])
    input_ids, targets = input_ids.to(device), targets.to(device)
    mask = targets != -100  # (B, T) answer tokens = actions

    was_training = actor.training
    actor.eval()
    logits, values = actor(input_ids)
    actor.train(was_training)
    logp = token_logprobs(logits, targets)
    ref_logp = token_logprobs(reference(input_ids), targets)
    values = values * mask
    score = reward_fn(input_ids, targets).float()  # (B,)
    rewards, kl = kl_penalized_rewards(score, logp, ref_logp, mask, hp.kl_coef)
    advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
    batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "logp": logp, "values": values,
             "advantages": whiten(advantages, mask), "returns": returns}
    metrics = {
        "score": score.mean().item(),
        "kl": kl.sum(1).mean().item(),  # per sequence, summed over its tokens
        "reward": rewards.sum(1).mean().item(),
        "answer_len": mask.sum(1).float().mean().item(),
        "ended": sum(bool(row[row != -100][-1] == EOT) for row in targets) / len(prompts),  # stopped by EOT
    }
    return batch, metrics


def ppo_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], hp: PPOHyper,
               generator: torch.Generator | None = None,
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """`ppo_epochs` passes of clipped-loss minibatch steps over one rollout batch. `model` is the
    ActorCritic (or its DDP wrapper). Returns metrics averaged over the minibatch steps."""
    B = batch["input_ids"].size(0)
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    model.train()
    for _ in range(hp.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, hp.minibatch_size):
            mb = {k: v[order[start:start + hp.minibatch_size].to(v.device)] for k, v in batch.items()}
            with autocast():
                logits, values = model(mb["input_ids"])
            logp = token_logprobs(logits, mb["targets"])
            policy_loss, pm = ppo_policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], hp.clip)
            value_loss, vm = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], hp.value_clip)
            loss = policy_loss + hp.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            optimizer.step()
            step_metrics = {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                            "grad_norm": grad_norm.item(), **pm, **vm}
            for k, v in step_metrics.items():
                totals[k] += v
            steps += 1
    return {k: v / steps for k, v in totals.items()}


# ----------------------------------------------------------------------------- `gpt2 ppo`


@dataclass
class PPOConfig(TrainConfig):
    """The shared loop's flags (a "step" is one PPO iteration: a rollout batch and its update) plus PPO's."""

    out: str = arg("runs/ppo", "run directory: checkpoint.pt, model/ (HF policy + value_head.safetensors), "
                               "metrics.jsonl, loss.png")
    model: str = arg("runs/finetune", "starting policy (the SFT model): a run folder, an HF folder or a hub name")
    reward_model: str = arg("runs/reward", "reward model folder written by `gpt2 reward` (its run folder works)")
    data: str = arg("data/hh", "prompts from this `gpt2 prepare hh` folder (train.jsonl; val.jsonl for eval)")
    prompts: str | None = arg(None, "instead of --data: a text file with one question per line, rendered with "
                                    "the fine-tuning template (the first --eval-prompts are also the eval set)")
    max_steps: int = arg(100, "PPO iterations (one rollout batch and its update each; the LR schedule ends here)")
    batch_size: int = arg(16, "prompts rolled out per iteration per process")
    minibatch_size: int = arg(8, "rollouts per optimizer step within an iteration")
    ppo_epochs: int = arg(4, "passes over each rollout batch")
    max_new_tokens: int = arg(64, "longest sampled answer in tokens")
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    kl_coef: float = arg(0.05, "per-token KL penalty to the reference (InstructGPT's beta)")
    gamma: float = arg(1.0, "discount of GAE")
    lam: float = arg(0.95, "lambda of GAE")
    clip: float = arg(0.2, "policy ratio clip range")
    value_clip: float = arg(0.2, "value clip range around the rollout-time value")
    vf_coef: float = arg(0.1, "weight of the value loss")
    eval_prompts: int = arg(32, "held-out prompts scored at each evaluation")
    lr: float = arg(1e-5, "peak learning rate (reached after warmup)")
    warmup_steps: int = arg(5, "iterations of linear LR warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay, on 2-D weights only")
    eval_every: int = arg(10, "score held-out prompts every N iterations (and at the end); 0 = never")
    save_every: int = arg(50, "checkpoint every N iterations; 0 = only at the end")
    compile: bool | None = arg(False, "not used by PPO (rollout shapes change every iteration)")


def load_prompts(cfg: PPOConfig, max_prompt_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, evaluation prompts) as token ids, each at most `max_prompt_len` tokens."""
    if cfg.prompts is not None:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path}: no such file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [encode(format_prompt(line)) for line in lines]
        evals = train[: cfg.eval_prompts]
    else:
        def unique_prompts(split: str) -> list[list[int]]:
            file = split_file(cfg.data, split)
            pairs = load_pairs(file) if split == "train" or file.is_file() else []
            return [list(p) for p in dict.fromkeys(tuple(pair["prompt"]) for pair in pairs)]

        train, evals = unique_prompts("train"), unique_prompts("val")[: cfg.eval_prompts]
    train = [p for p in train if 0 < len(p) <= max_prompt_len]
    evals = [p for p in evals if 0 < len(p) <= max_prompt_len]
    if not train:
        raise UserError(f"no prompt of at most {max_prompt_len} tokens in {cfg.prompts or cfg.data} (the context "
                        f"must also hold --max-new-tokens {cfg.max_new_tokens})")
    return train, evals


def _check(cfg: PPOConfig) -> None:
    if min(cfg.batch_size, cfg.minibatch_size, cfg.ppo_epochs, cfg.max_new_tokens) < 1:
        raise UserError("--batch-size, --minibatch-size, --ppo-epochs and --max-new-tokens must be >= 1")
    if cfg.max_steps < 1 or cfg.eval_every < 0 or cfg.save_every < 0:
        raise UserError("--max-steps must be >= 1 and --eval-every/--save-every >= 0")


def run(cfg: PPOConfig) -> ActorCritic:
    """The outer PPO loop, built from the shared loop's optimizer, LR schedule, autocast, checkpoint files,
    metrics logger and plot."""
    _check(cfg)
    dist = init_distributed(cfg.device)
    try:
        return _run(cfg, dist)
    finally:
        destroy_distributed()


def _run(cfg: PPOConfig, dist) -> ActorCritic:
    device, run_dir = dist.device, Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT_FILE
    if ckpt_path.exists() and not cfg.resume:
        raise UserError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    seed_everything(cfg.seed + dist.rank)
    policy = load_model(cfg.model)
    reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    scorer = RewardModel.from_pretrained(cfg.reward_model).eval().requires_grad_(False).to(device)
    context = min(policy.config.block_size, scorer.config.block_size)
    train_prompts, eval_prompts = load_prompts(cfg, context - cfg.max_new_tokens - 1)
    sampler = LengthGroupedBatcher([len(p) for p in train_prompts], cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                                   world_size=dist.world_size)
    actor = ActorCritic(policy).to(device)
    optimizer = build_optimizer(actor, cfg, device)
    hp = PPOHyper(**{f.name: getattr(cfg, f.name) for f in fields(PPOHyper)})
    gen = torch.Generator(device=device).manual_seed(cfg.seed + dist.rank)  # rollout sampling
    shuffle = torch.Generator().manual_seed(cfg.seed + dist.rank)  # minibatch order

    def reward_fn(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return scorer(input_ids, last_token_index(targets))

    start = 0
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("world_size", 1) != dist.world_size:
            raise UserError(f"{ckpt_path} was written by {state['world_size']} processes; resume with as many")
        actor.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mine = state["ranks"][dist.rank]
        sampler.load_state_dict(mine["sampler"])
        restore_rng_state(mine["rng"], device)
        gen.set_state(mine["gen"])
        shuffle.set_state(mine["shuffle"])
        start = state["step"]
    model: nn.Module = actor
    if dist.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(actor, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(cfg.dtype, device)
    autocast = lambda: autocast_context(device, amp)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG_FILE, to_dict(cfg))
        print(f"{len(train_prompts)} prompts ({len(eval_prompts)} for evaluation); {cfg.max_steps} iterations of "
              f"{cfg.batch_size * dist.world_size} rollouts", flush=True)
    metrics = MetricsLogger(run_dir / METRICS_FILE, enabled=dist.is_main, keep_until_step=start if start else None)

    def evaluate(step: int) -> None:
        if not eval_prompts:
            return
        with autocast():
            _, m = rollout(actor, reference, reward_fn, eval_prompts[dist.rank::dist.world_size] or eval_prompts[:1],
                           hp, generator=torch.Generator(device=device).manual_seed(cfg.seed))
        values = all_reduce_mean(torch.tensor([m["score"], m["kl"]], device=device)).tolist()
        if dist.is_main:
            metrics.log({"kind": "eval", "step": step, "score": values[0], "kl": values[1]})
            bar.write(f"step {step}: held-out score {values[0]:.4f}, kl {values[1]:.4f}")
            if step:  # the graph needs training lines
                plot(run_dir)

    def save(step: int) -> None:
        ranks = all_gather_object({"sampler": sampler.state_dict(), "rng": capture_rng_state(device),
                                   "gen": gen.get_state(), "shuffle": shuffle.get_state()})
        if dist.is_main:
            save_checkpoint({"model": actor.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "world_size": dist.world_size, "ranks": ranks, "train_config": to_dict(cfg),
                             "model_config": asdict(policy.config)}, ckpt_path)
            actor.save_pretrained(run_dir / MODEL_DIR)
            plot(run_dir)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (dist.is_main and cfg.progress), unit="it",
               dynamic_ncols=True, desc=run_dir.name)
    if start == 0 and cfg.eval_every:
        evaluate(0)
    t_start = time.perf_counter()
    end = cfg.stop_at_step or cfg.max_steps
    with StopSignals() as signals:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = apply_lr(optimizer, step, cfg)
            prompts = [train_prompts[i] for i in sampler.next_batch()]
            with autocast():
                batch, roll = rollout(actor, reference, reward_fn, prompts, hp, generator=gen)
            upd = ppo_update(model, optimizer, batch, hp, generator=shuffle, autocast=autocast)
            keys = sorted(roll) + sorted(upd)
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes
            flags = [float(out_of_time), float(signals.signum)]
            values = all_reduce_mean(torch.tensor([*({**roll, **upd}[k] for k in keys), *flags],
                                                  device=device, dtype=torch.float64)).tolist()
            record = dict(zip(keys, values))
            timed_out, signalled = values[-2] > 0, values[-1] > 0  # every rank stops at the same iteration
            stop = timed_out or signalled
            if not math.isfinite(record["loss"]):
                raise NonFiniteLossError(f"PPO stopped at iteration {step + 1}: loss {record['loss']}; lower --lr")
            done, now = step + 1, time.perf_counter()
            tokens = batch["input_ids"].numel() * dist.world_size
            metrics.log({"kind": "train", "step": done, "lr": lr, "tokens_per_s": tokens / (now - t0), "mfu": None,
                         "time": now - t_start, **record})
            bar.update(1)
            bar.set_postfix_str(f"score {record['score']:.3f} kl {record['kl']:.3f}", refresh=False)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                evaluate(done)
            if done == end or stop or (cfg.save_every and done % cfg.save_every == 0):
                save(done)
            if stop:
                if dist.is_main:
                    why = "--max-minutes reached" if timed_out else "signalled"
                    bar.write(f"{why}: saved iteration {done}; continue with --resume")
                if signalled:
                    bar.close()
                    signals.exit()
                break
    bar.close()
    return actor


register(Command("ppo", "InstructGPT-style PPO of a fine-tuned policy against a reward model", PPOConfig, run))
