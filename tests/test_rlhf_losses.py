"""The RLHF math: answer-only log-probs, DPO, Bradley-Terry, KL-shaped rewards, GAE, PPO's clipped losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2.data.preferences import collate_pairs
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.losses import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    token_kl,
    token_logprobs,
    whiten,
)

TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def _targets() -> torch.Tensor:
    # row 0: prompt positions 0-1, answer targets at 2-4, padding at 5; row 1: answer at 1-5
    return torch.tensor([[-100, -100, 7, 3, 1, -100], [-100, 4, 4, 9, 0, 2]])


def test_sequence_logprobs_is_the_sum_over_answer_tokens():
    logits = torch.randn(2, 6, 11)
    targets = _targets()
    logp = logits.log_softmax(-1)
    expected = torch.stack([sum(logp[b, t, targets[b, t]] for t in range(6) if targets[b, t] != -100)
                            for b in range(2)])
    torch.testing.assert_close(sequence_logprobs(logits, targets), expected)
    tok = token_logprobs(logits, targets)
    assert (tok[targets == -100] == 0).all()


def test_prompt_and_padding_logits_contribute_nothing():
    logits = torch.randn(2, 6, 11)
    targets = _targets()
    before = sequence_logprobs(logits, targets)
    changed = logits.clone()
    changed[targets == -100] = torch.randn(int((targets == -100).sum()), 11) * 50  # prompt + padding rows
    assert torch.equal(sequence_logprobs(changed, targets), before)
    changed[0, 3, 5] += 1.0  # an answer position does count
    assert not torch.equal(sequence_logprobs(changed, targets), before)


def test_padding_tokens_do_not_change_a_models_sequence_logprobs():
    model = GPT(TINY).eval()
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9, 50256], "rejected": [10, 50256]},
             {"prompt": [1, 2, 3, 4, 5, 6], "chosen": [11, 12, 13, 14, 50256], "rejected": [15, 50256]}]
    ids, targets = collate_pairs(pairs)
    with torch.no_grad():
        before = sequence_logprobs(model(ids), targets)
        lengths = torch.tensor([6, 11, 5, 8])  # chosen rows, then rejected rows
        padding = torch.arange(ids.size(1))[None] >= lengths[:, None]
        assert padding.any()
        ids2 = ids.masked_fill(padding, 777)  # any token in the padding
        after = sequence_logprobs(model(ids2), targets)
    torch.testing.assert_close(after, before)
    # and each row equals its own unpadded computation
    with torch.no_grad():
        solo = model(torch.tensor([[1, 2, 3, 4, 5, 6, 15, 50256]]))
        solo_t = torch.tensor([[-100] * 5 + [15, 50256, -100]])
        torch.testing.assert_close(sequence_logprobs(solo, solo_t)[0], before[3], atol=1e-5, rtol=1e-5)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    model = GPT(TINY)
    ref = GPT(TINY)
    ref.load_state_dict(model.state_dict())
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9, 50256], "rejected": [10, 50256]}]
    ids, targets = collate_pairs(pairs)
    logp = sequence_logprobs(model(ids), targets)
    with torch.no_grad():
        ref_logp = sequence_logprobs(ref(ids), targets)
    loss, metrics = dpo_loss(logp[:1], logp[1:], ref_logp[:1], ref_logp[1:], beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert metrics["reward_margin"] == 0 and metrics["pref_acc"] == 0
    loss.backward()  # the gradient exists and is not zero: the policy can move away
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rc, rr = torch.randn(3), torch.randn(3)
    beta = 0.5
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    # d/d pi_c of -log sigmoid(beta * m) = -beta * sigmoid(-beta * m) / B
    m = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * m.detach()) / 3)
    loss2, metrics = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1)
    assert loss2.item() < math.log(2) and metrics["pref_acc"] == 1.0
    assert abs(metrics["reward_margin"] - 0.2) < 1e-6


def test_bradley_terry_loss():
    loss, m = bradley_terry_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]))
    expected = (-F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(loss, expected)
    assert m["pref_acc"] == 0.5 and m["reward_margin"] == 0.0
    assert abs(bradley_terry_loss(torch.zeros(4), torch.zeros(4))[0].item() - math.log(2)) < 1e-7


def test_token_kl_zero_for_equal_logits_and_positive_otherwise():
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert token_kl(a, a, mask).abs() < 1e-6
    assert token_kl(a, b, mask) > 0
    mask[:, 2:] = False  # only masked positions count
    b2 = b.clone()
    b2[:, 2:] = 100 * torch.randn(2, 3, 7)
    torch.testing.assert_close(token_kl(a, b2, mask), token_kl(a, b, mask))


def test_kl_penalized_rewards_put_the_score_on_the_last_answer_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    logp = torch.tensor([[9.0, -1.0, -2.0, 9.0], [9.0, 9.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, 0.0, -1.0, -3.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 10.1, 0.0], [0.0, 0.0, 0.0, 19.8]]))


def test_gae_matches_a_hand_computed_example():
    # row 0: prompt at 0, answer at 1-2, padding at 3 (values there are junk and must be ignored)
    # row 1: all four positions are answer tokens
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: A2 = 1.0 - 0.4 = 0.6; A1 = (0.5 + 0.9 * 0.4 - 0.2) + 0.9 * 0.8 * 0.6 = 0.66 + 0.432
    # row 1: A3 = 1; A2 = 1 + 0.72; A1 = 1 + 0.72 * 1.72; A0 = 1 + 0.72 * 2.2384
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.092, 0.6, 0.0], [2.611648, 2.2384, 1.72, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.292, 1.0, 0.0], [2.611648, 2.2384, 1.72, 1.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.randn(3, 6)
    values = torch.randn(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_whiten():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    w = whiten(x, mask)
    assert w[0, 0] == 0
    torch.testing.assert_close(w[mask].mean(), torch.tensor(0.0))
    torch.testing.assert_close(w[mask].pow(2).mean(), torch.tensor(1.0), atol=1e-5, rtol=1e-5)


def test_ppo_policy_loss_clips_the_ratio():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    # at ratio 1 the loss is -mean(A) and the gradient is -A / n
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    assert loss.item() == 0.0 and m["clip_frac"] == 0.0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.5]]))
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: both clipped, so no gradient
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))
    assert m["clip_frac"] == 1.0 and (logp.grad == 0).all()
    # ratio 0.5 with A > 0: the pessimistic (unclipped) term is used and the gradient flows
    logp = torch.log(torch.tensor([[0.5, 1.5]])).requires_grad_()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-0.5 + 1.5) / 2))
    assert (logp.grad != 0).all()


def test_ppo_value_loss_clips_around_the_old_value():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 2.0, 0.0]], requires_grad=True)
    loss, _ = ppo_value_loss(values, old, ret, mask, clip=0.2)
    # pos 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; pos 1: max((2-1)^2, (0.2-1)^2) = 1.0; pos 2 masked
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 1.0) / 2))
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] > 0 and values.grad[0, 2] == 0
