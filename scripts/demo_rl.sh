#!/usr/bin/env bash
# Post-training that measurably works, end to end on a CPU: a task whose answers a program checks (addition,
# generated from a seed) -> a new tiny model fine-tuned on it -> its held-out accuracy a0 -> GRPO on the
# task's reward, DPO on pairs of the model's own right and wrong answers, a reward model on those pairs and
# PPO against it -> a table of held-out accuracies (95% intervals), the reward model's held-out pair accuracy,
# and a few answers before and after.
#
# Every stage runs a fixed number of steps (no wall-clock cap), so the figures do not depend on how fast or busy
# the machine is. Each accuracy is measured on the same held-out questions, which no stage trains on.
set -euo pipefail
OUT="${GPT2_RL_DEMO_DIR:-runs/demo-rl}"
TASK=arithmetic
HELD_OUT="${GPT2_RL_HELD_OUT:-500}"   # held-out questions every model answers
SFT_STEPS="${GPT2_RL_SFT_STEPS:-1500}"
GRPO_STEPS="${GPT2_RL_GRPO_STEPS:-100}"
PAIR_QUESTIONS="${GPT2_RL_PAIR_QUESTIONS:-1500}"
DPO_STEPS="${GPT2_RL_DPO_STEPS:-100}"
REWARD_STEPS="${GPT2_RL_REWARD_STEPS:-150}"
PPO_STEPS="${GPT2_RL_PPO_STEPS:-60}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a 4-layer, 128-wide model: a second thread mostly waits

start=$SECONDS
rm -rf "$OUT"
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

echo "== 3/7 GRPO on the task's reward ($GRPO_STEPS steps)"
# GRPO: `gpt2 grpo` (gpt2.rlhf.grpo) samples a group of answers per question, scores them with the task and
# raises the likelihood of the better-than-average ones. Skipped where this build has no such command.
if gpt2 grpo --help >/dev/null 2>&1; then
  gpt2 grpo --model "$OUT/sft" --task $TASK --out "$OUT/grpo" --max-steps "$GRPO_STEPS" --device cpu --no-progress
  evaluate grpo "$OUT/grpo"
else
  echo "demo: no \`gpt2 grpo\` in this build: GRPO skipped"
fi

echo "== 4/7 preference pairs from the fine-tuned model's own answers"
gpt2 prepare task-pairs --model "$OUT/sft" --task $TASK --out "$OUT/pairs" --limit "$PAIR_QUESTIONS" --samples 4 \
  --device cpu

echo "== 5/7 DPO on those pairs ($DPO_STEPS steps)"
gpt2 dpo --model "$OUT/sft" --data "$OUT/pairs" --out "$OUT/dpo" --max-steps "$DPO_STEPS" --batch-size 16 \
  --lr 1e-4 --device cpu --save-every 0 --no-progress
evaluate dpo "$OUT/dpo"

echo "== 6/7 a reward model on the same pairs ($REWARD_STEPS steps)"
gpt2 reward --model "$OUT/sft" --data "$OUT/pairs" --out "$OUT/reward" --max-steps "$REWARD_STEPS" --batch-size 16 \
  --lr 1e-3 --eval-every 50 --device cpu --save-every 0 --no-progress

echo "== 7/7 PPO against the reward model ($PPO_STEPS iterations)"
gpt2 ppo --model "$OUT/sft" --reward-model "$OUT/reward" --prompts "$OUT/pairs/prompts.txt" --out "$OUT/ppo" \
  --max-steps "$PPO_STEPS" --batch-size 32 --minibatch-size 16 --max-new-tokens 10 --lr 1e-4 --eval-every 20 \
  --device cpu --save-every 0 --no-progress
evaluate ppo "$OUT/ppo"

# The table, from the runs' own files.
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])

def last_eval(run: str, key: str):
    rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "eval" and key in r]
    return rows[-1] if rows else None

print(f"\n{'model':<34} {'held-out accuracy':>18}  95% interval   vs fine-tuned")
base = json.loads((out / "eval_sft.json").read_text())
names = {"sft": "fine-tuned (a0)", "grpo": "GRPO (task reward)", "dpo": "DPO (self-sampled pairs)",
         "ppo": "PPO (vs the reward model)"}
for name, label in names.items():
    path = out / f"eval_{name}.json"
    if not path.is_file():
        print(f"{label:<34} {'(skipped)':>18}")
        continue
    r = json.loads(path.read_text())
    delta = "" if name == "sft" else f"{r['accuracy'] - base['accuracy']:+.3f}"
    print(f"{label:<34} {r['correct']:>6}/{r['n']:<4} = {r['accuracy']:.3f}  {r['ci_low']:.3f}-{r['ci_high']:.3f}"
          f"   {delta}")
reward = last_eval("reward", "pref_acc")
ppo = last_eval("ppo", "kl")
pairs = json.loads((out / "pairs" / "meta.json").read_text())
print(f"reward model: held-out pair accuracy {reward['pref_acc']:.3f} on {pairs['val']} pairs "
      f"({pairs['train']} train pairs from {pairs['questions']} questions x {pairs['samples']} samples)")
print(f"PPO: KL to the fine-tuned model {ppo['kl']:.3f}, reward-model score {ppo['score']:.3f} (last evaluation)")
answers = {n: json.loads((out / f"eval_{n}.json").read_text())["answers"]
           for n in names if (out / f"eval_{n}.json").is_file()}
changed = [i for i, a in enumerate(answers["sft"]) if any(answers[n][i]["score"] != a["score"] for n in answers)]
print("\nanswers before and after (held-out questions the models disagree on):")
for i in changed[:5]:
    q = answers["sft"][i]
    row = "  ".join(f"{n}: {answers[n][i]['answer'].strip()!r}{'' if answers[n][i]['score'] else ' (wrong)'}"
                    for n in answers)
    print(f"  {q['prompt']} = {q['target']}   {row}")
EOF
echo "demo-rl: done in $((SECONDS - start)) s"
