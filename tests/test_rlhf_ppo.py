"""PPO on a tiny policy under a known reward: the reward goes up, the KL to the reference stays bounded."""

from __future__ import annotations

import copy
import json

import torch
from rlhf_data import one_thread  # noqa: F401 (autouse fixture)

from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.heads import ActorCritic
from gpt2.rlhf.losses import token_logprobs
from gpt2.rlhf.ppo import PPOHyper, PPOTask, rollout
from gpt2.rlhf.rollout import complete
from gpt2.tokenizer import EOT
from gpt2.train.loop import TrainConfig, train

# A 16-token vocabulary: a random policy emits the rewarded token 1/16 of the time, so PPO has signal.
SMALL = GPTConfig(block_size=32, vocab_size=16, n_layer=2, n_head=2, n_embd=32)
TOKEN = 3



def fraction_of_token(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The known reward: the fraction of answer tokens that are TOKEN."""
    answer = targets != -100
    return ((targets == TOKEN) & answer).sum(1).float() / answer.sum(1)


def test_complete_restores_the_eot_that_ended_an_answer():
    assert complete([1, 2], [5, 6], max_new_tokens=4, block_size=32) == [5, 6, EOT]  # stopped on EOT
    assert complete([1, 2], [5, 6, 7, 8], max_new_tokens=4, block_size=32) == [5, 6, 7, 8]  # out of budget
    assert complete([1, 2], [5, 6], max_new_tokens=8, block_size=4) == [5, 6]  # out of context


def test_answer_logprobs_values_equal_the_full_forward():
    torch.manual_seed(0)
    actor = ActorCritic(GPT(SMALL))
    ids = torch.randint(0, 16, (3, 10))
    targets = torch.full((3, 10), -100)
    targets[0, 4:9], targets[1, 2:5], targets[2, 6:9] = ids[0, 5:10], ids[1, 3:6], ids[2, 7:10]  # answers
    logp, values = actor.answer_logprobs_values(ids, targets)
    logits, full_values = actor(ids)
    torch.testing.assert_close(logp, token_logprobs(logits, targets))
    torch.testing.assert_close(values, full_values)


def test_rollout_tensors_share_the_answer_mask():
    torch.manual_seed(0)
    policy = GPT(SMALL)
    actor, reference = ActorCritic(policy), copy.deepcopy(policy)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    batch, metrics = rollout(actor, reference, fraction_of_token, prompts, PPOHyper(max_new_tokens=5))
    mask = batch["mask"]
    assert mask.sum(1).tolist() == [5, 5]  # no EOT in this vocabulary: every answer uses its budget
    assert mask[0, 2:7].all() and not mask[0, :2].any()  # actions at positions len(prompt) - 1 onwards
    for key in ("logp", "values", "advantages", "returns"):
        assert (batch[key][~mask] == 0).all(), key
    # policy == reference at rollout time: the KL penalty is exactly zero and the reward is the score
    assert metrics["kl"] == 0 and abs(metrics["reward"] - metrics["score"]) < 1e-6


def test_ppo_raises_a_known_reward_with_bounded_kl(tmp_path):
    """30 iterations of PPO's Task on the shared loop (constant LR) under the known reward."""
    policy = GPT(SMALL)
    reference = copy.deepcopy(policy).eval()
    actor = ActorCritic(policy)
    hp = PPOHyper(max_new_tokens=8, kl_coef=0.05, minibatch_size=16, ppo_epochs=4)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 16, (4,), generator=gen).tolist() for _ in range(32)]
    task = PPOTask(actor, reference, fraction_of_token, prompts, [], hp, batch_size=32)
    cfg = TrainConfig(out=str(tmp_path), max_steps=30, lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0,
                      betas=(0.9, 0.999), eval_every=0, save_every=0, device="cpu", compile=False, progress=False)
    train(actor, task, cfg)
    history = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    assert len(history) == 30 and {"policy_loss", "value_loss", "clip_frac", "answer_len"} <= history[0].keys()
    start = sum(m["score"] for m in history[:3]) / 3
    end = sum(m["score"] for m in history[-5:]) / 5
    kl_per_token = sum(m["kl"] for m in history[-5:]) / 5 / hp.max_new_tokens
    assert start < 0.15 and end > 0.3, (start, end)
    # The penalised optimum is ref * exp(reward / kl_coef) per token, about 0.6 nats/token here: the KL
    # is held near it instead of growing without bound as the policy collapses onto TOKEN.
    assert 0 < kl_per_token < 1.0, kl_per_token
