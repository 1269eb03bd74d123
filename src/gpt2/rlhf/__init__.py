"""Aligning a fine-tuned GPT-2 with human preferences: DPO, a reward model, and PPO.

- `losses`: the math, as pure functions on tensors (sequence log-probs over answer tokens, the DPO and
  Bradley-Terry losses, GAE, PPO's clipped losses, the per-token KL penalty). No model, no data, no loop.
- `dpo`, `reward`, `ppo`: one stage each (`gpt2 dpo`, `gpt2 reward`, `gpt2 ppo`), a config plus a small
  task that plugs into the shared training loop.
Preference pairs come from `gpt2.data.preferences` (`gpt2 prepare hh`).
"""
