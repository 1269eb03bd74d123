"""DPO and the reward model learn real HH-RLHF preferences: a tiny model reaches > 90% training accuracy
on a handful of real pairs.

To keep this fast on a CPU the pairs are shortened and their tokens relabelled into a compact vocabulary
(the few hundred GPT-2 ids they use, numbered 0..K-1): the same sequences, but a (K, C) output layer
instead of (50257, C). The tasks never assume GPT-2's vocabulary size."""

from __future__ import annotations

import copy

import pytest
import torch
from rlhf_data import compact, one_thread, short_hh_pairs  # noqa: F401 (one_thread: autouse)

from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.dpo import DPOTask
from gpt2.rlhf.heads import RewardModel
from gpt2.rlhf.reward import RewardTask
from gpt2.tokenizer import EOT

TINY = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)



def train(model: torch.nn.Module, task, steps: int, lr: float) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for _ in range(steps):
        loss, metrics = task.loss(model, task.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"loss": loss.item(), **metrics})
    return history


def test_dpo_learns_real_preferences(shared_data, tokenizer_ok):
    pairs, config = compact(short_hh_pairs(shared_data))
    policy = GPT(config)
    task = DPOTask(copy.deepcopy(policy), 0.1, pairs, pairs, batch_size=8)
    before = task.evaluate(policy)
    assert before["val_loss"] == pytest.approx(0.6931472, abs=1e-6) and before["kl"] < 1e-6
    history = train(policy, task, steps=25, lr=2e-3)
    after = task.evaluate(policy)
    assert after["pref_acc"] > 0.9 and after["val_loss"] < 0.5, after
    assert after["reward_margin"] > 0 and after["kl"] > 0
    assert history[-1]["loss"] < history[0]["loss"]


def test_reward_model_learns_real_preferences(shared_data, tokenizer_ok):
    pairs, config = compact(short_hh_pairs(shared_data))
    model = RewardModel(GPT(config))
    task = RewardTask(pairs, pairs, batch_size=8)
    train(model, task, steps=25, lr=2e-3)
    after = task.evaluate(model)
    assert after["pref_acc"] > 0.9 and after["val_loss"] < 0.5, after


def test_reward_model_reads_the_last_real_token_and_round_trips(tmp_path):
    """Causal attention means tokens after the last real one cannot change its score. The two rows are equal
    mathematically, not bitwise: a GEMM may tile or vectorise the rows of a batch differently (on AVX2 the
    two scores differ by 2.4e-7), so they are compared to float32 rounding (rtol 1e-5), not exactly."""
    model = RewardModel(GPT(TINY)).eval()
    ids = torch.tensor([[5, 6, 7, EOT, 0, 0], [5, 6, 7, EOT, 9, 9]])
    targets = torch.tensor([[-100, 7, EOT, -100, -100, -100]] * 2)  # the answer "7 <|endoftext|>"
    with torch.no_grad():
        scores = model(ids, targets)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, targets), scores)
        h = model.backbone.hidden_states(ids)[:, 3]  # the last real token's
        torch.testing.assert_close(model.head(h).squeeze(-1), scores)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)  # the backbone is a plain HF GPT-2
    assert hf.config.n_layer == TINY.n_layer


def test_likelihood_reward_model_scores_the_summed_answer_logprobs_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(GPT(TINY), score="likelihood").eval()
    assert model.head is None
    ids = torch.tensor([[5, 6, 7, EOT, 0, 0], [5, 8, 9, 9, EOT, 0]])
    targets = torch.tensor([[-100, 7, EOT, -100, -100, -100], [-100, 9, 9, EOT, -100, -100]])
    with torch.no_grad():
        scores = model(ids, targets)
        logp = torch.log_softmax(model.backbone(ids), dim=-1)
    by_hand = [logp[0, 1, 7] + logp[0, 2, EOT], logp[1, 1, 9] + logp[1, 2, 9] + logp[1, 3, EOT]]
    torch.testing.assert_close(scores, torch.stack(by_hand), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "reward_head.safetensors").exists()
    loaded = RewardModel.from_pretrained(tmp_path).eval()
    assert loaded.score == "likelihood"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, targets), scores)


def test_likelihood_reward_model_learns_real_preferences(shared_data, tokenizer_ok):
    pairs, config = compact(short_hh_pairs(shared_data))
    model = RewardModel(GPT(config), score="likelihood")
    task = RewardTask(pairs, pairs, batch_size=8)
    train(model, task, steps=25, lr=2e-3)
    after = task.evaluate(model)
    assert after["pref_acc"] > 0.9 and after["val_loss"] < 0.5, after


def test_dpo_nll_coef_adds_the_chosen_answers_per_token_nll(shared_data, tokenizer_ok):
    pairs, config = compact(short_hh_pairs(shared_data))
    torch.manual_seed(0)
    policy = GPT(config)
    batch = DPOTask(copy.deepcopy(policy), 0.1, pairs, pairs, batch_size=4).next_batch()
    plain = DPOTask(copy.deepcopy(policy), 0.1, pairs, pairs, batch_size=4)
    rpo = DPOTask(copy.deepcopy(policy), 0.1, pairs, pairs, batch_size=4, nll_coef=0.5)
    base, _ = plain.loss(policy, batch)
    loss, metrics = rpo.loss(policy, batch)
    input_ids, targets = batch[0], batch[1]
    B = input_ids.size(0) // 2
    logp = torch.log_softmax(policy(input_ids[:B]).float(), dim=-1)
    mask = targets[:B] != -100
    picked = logp.gather(-1, targets[:B].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * mask).sum() / mask.sum()  # by hand: the mean over the chosen answers' tokens
    assert metrics["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert loss.item() == pytest.approx(base.item() + 0.5 * nll.item(), rel=1e-5)


def test_a_bad_reward_model_json_is_refused_naming_the_file(tmp_path):
    RewardModel(GPT(TINY), score="likelihood").save_pretrained(tmp_path)
    (tmp_path / "reward_model.json").write_text('{"score": "median"}\n')
    with pytest.raises(UserError, match="reward_model.json"):
        RewardModel.from_pretrained(tmp_path)
