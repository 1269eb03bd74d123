#!/usr/bin/env bash
# Post-training that measurably works, end to end on a CPU: a task whose answers a program checks (two-digit
# sums, generated from a seed) -> a new tiny model fine-tuned on it -> its held-out accuracy a0 -> GRPO on the
# task's reward; DPO on pairs of the model's own right and wrong answers; a reward model on those pairs and PPO
# against it -> a table of held-out accuracies with 95% intervals and each lift's paired interval, the reward
# model's held-out pair accuracy, PPO's KL, and answers before and after (scripts/rl_table.py).
#
# Every stage runs a fixed number of steps (no wall-clock cap), so the figures do not depend on how fast or busy
# the machine is. Every accuracy is measured on the same held-out questions, which no stage trains on. GRPO runs
# beside the pairs -> DPO -> reward model -> PPO chain (each on one thread: a 4-layer, 128-wide model gains
# little from a second), so the two cores of a small machine both work.
set -euo pipefail
OUT="${GPT2_RL_DEMO_DIR:-runs/demo-rl}"
TASK=arithmetic
HELD_OUT="${GPT2_RL_HELD_OUT:-500}"   # held-out questions every model answers
SFT_STEPS="${GPT2_RL_SFT_STEPS:-600}"
GRPO_STEPS="${GPT2_RL_GRPO_STEPS:-200}"
PAIR_QUESTIONS="${GPT2_RL_PAIR_QUESTIONS:-3000}"
DPO_STEPS="${GPT2_RL_DPO_STEPS:-150}"
REWARD_STEPS="${GPT2_RL_REWARD_STEPS:-300}"
PPO_STEPS="${GPT2_RL_PPO_STEPS:-60}"
export OMP_NUM_THREADS=1

start=$SECONDS
rm -rf "$OUT"
mkdir -p "$OUT"
evaluate() {  # evaluate NAME MODEL: held-out accuracy of MODEL, kept in $OUT/eval_NAME.json
  gpt2 eval task --model "$2" --task $TASK --limit "$HELD_OUT" --device cpu --show 3 --json "$OUT/eval_$1.json"
}

echo "== 1/7 the $TASK task's train questions as fine-tuning data"
gpt2 prepare task --task $TASK --out "$OUT/data"

echo "== 2/7 fine-tune a new tiny model on them ($SFT_STEPS steps)"
gpt2 finetune --preset tiny --scratch tiny --data "$OUT/data" --out "$OUT/sft" --device cpu --max-steps "$SFT_STEPS" \
  --batch-size 32 --lr 3e-3 --warmup-steps 50 --eval-every 250 --save-every 0 --no-progress \
  --sample-prompts "What is 4 7 + 3 8?" "What is 0 9 + 1 6?" --sample-max-tokens 6
evaluate sft "$OUT/sft"

echo "== 3/7 GRPO on the task's reward ($GRPO_STEPS steps), in the background: $OUT/grpo.log"
# Samples at temperature 0.7: closer to the greedy answers that are scored, so a group's right and wrong answers
# differ where the greedy choice is decided.
( gpt2 grpo --model "$OUT/sft" --task $TASK --out "$OUT/grpo" --max-steps "$GRPO_STEPS" --prompts-per-step 16 \
    --samples-per-prompt 8 --temperature 0.7 --lr 5e-5 --warmup-steps 10 --eval-every 50 --eval-questions 300 \
    --device cpu --save-every 0 --no-progress && evaluate grpo "$OUT/grpo" ) > "$OUT/grpo.log" 2>&1 &
grpo=$!
stop_grpo() { if [ -n "${grpo:-}" ]; then pkill -P "$grpo" 2>/dev/null; kill "$grpo" 2>/dev/null; fi; true; }
trap stop_grpo EXIT  # a failed stage (set -e) or Ctrl-C ends the background GRPO too

echo "== 4/7 preference pairs from the fine-tuned model's own answers"
gpt2 prepare task-pairs --model "$OUT/sft" --task $TASK --out "$OUT/pairs" --limit "$PAIR_QUESTIONS" --samples 4 \
  --pairs-per-question 2 --val-fraction 0.15 --device cpu

echo "== 5/7 DPO on those pairs ($DPO_STEPS steps), with the chosen answers' NLL (RPO)"
gpt2 dpo --model "$OUT/sft" --data "$OUT/pairs" --out "$OUT/dpo" --max-steps "$DPO_STEPS" --batch-size 16 \
  --lr 1e-4 --nll-coef 1 --warmup-steps 10 --eval-every 50 --device cpu --save-every 0 --no-progress
evaluate dpo "$OUT/dpo"

echo "== 6/7 a reward model on the same pairs ($REWARD_STEPS steps), scoring an answer by its likelihood"
# --score likelihood: the fine-tuned model's own log-probs already rank most held-out pairs right; a scalar head
# on the last token starts from nothing and, on this many pairs, learns to judge sums slowly (docs/rlhf.md).
gpt2 reward --model "$OUT/sft" --data "$OUT/pairs" --out "$OUT/reward" --max-steps "$REWARD_STEPS" --batch-size 16 \
  --lr 1e-4 --score likelihood --eval-every 100 --device cpu --save-every 0 --no-progress

echo "== 7/7 PPO against the reward model ($PPO_STEPS iterations)"
gpt2 ppo --model "$OUT/sft" --reward-model "$OUT/reward" --prompts "$OUT/pairs/prompts.txt" --out "$OUT/ppo" \
  --max-steps "$PPO_STEPS" --batch-size 32 --minibatch-size 16 --max-new-tokens 6 --lr 1e-4 --kl-coef 0.05 \
  --eval-every 20 --device cpu --save-every 0 --no-progress
evaluate ppo "$OUT/ppo"

echo "== GRPO: waiting for it to finish if it has not (its steps so far: $(cat "$OUT/grpo/metrics.jsonl" 2>/dev/null | grep -c '"kind": "train"' || true) of $GRPO_STEPS; tail -f $OUT/grpo.log to follow)"
if ! wait "$grpo"; then
  cat "$OUT/grpo.log" >&2
  echo "demo-rl: GRPO failed (its log is above)" >&2
  exit 1
fi
grpo=""
grep -v "^memory plan" "$OUT/grpo.log"

python "$(dirname "$0")/rl_table.py" "$OUT"
echo "demo-rl: done in $((SECONDS - start)) s"
