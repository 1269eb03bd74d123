"""Aligning a fine-tuned GPT-2 with human preferences: DPO, a reward model, PPO, and GRPO on verifiable rewards.

- `losses`: the math, as pure functions on tensors (sequence log-probs over answer tokens, the DPO and
  Bradley-Terry losses, the per-token KL penalty, GAE, PPO's clipped losses). No model, no data, no loop.
- `heads`: `RewardModel` (GPT + scalar head on the last real token) and PPO's `ActorCritic` (policy +
  value head on the same backbone), with their file layout.
- `pairs`: the training-loop task over preference pairs and the setup shared by DPO and the reward model.
- `dpo`, `reward`, `ppo`: each algorithm's Task for the shared loop (their commands, `gpt2 dpo`, `gpt2 reward`
  and `gpt2 ppo`, are in `gpt2.commands`).
- `grpo`: GRPO's Task on a task with a verifiable reward (`gpt2 grpo`); `rollout`: what PPO and GRPO share
  (sampling answers through `gpt2.inference.generate`, answer log-probs, their config base).
Preference pairs come from `gpt2.data.preferences` (`gpt2 prepare hh`).

Why a package of its own rather than `gpt2/train/{dpo,reward,ppo}.py`: the three
stages share math, heads and a pair task that are not training-loop code, and `gpt2.train` belongs to the
shared loop; here each algorithm reads in one file with its math one import away.
"""
