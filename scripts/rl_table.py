"""The table `scripts/demo_rl.sh` ends with, read from the files its stages wrote in OUT:

    python scripts/rl_table.py OUT

Each model's held-out accuracy (`gpt2 eval task --json`, the same questions for every model) with its 95% Wilson
interval; its lift over the fine-tuned model with a 95% interval for the paired difference (the same questions
answered by both, so the interval is the paired one: the questions one got right and the other wrong decide it);
the goal of the stage and whether the measured lift reached it; the reward model's held-out pair accuracy, PPO's
KL to the fine-tuned model, and a few held-out questions whose answers changed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

STAGES = {  # eval file name: (row label, goal of the lift over the fine-tuned model)
    "sft": ("fine-tuned (a0)", None),
    "grpo": ("GRPO (task reward)", 0.20),
    "dpo": ("DPO (self-sampled pairs)", 0.10),
    "ppo": ("PPO (vs the reward model)", 0.10),
}
REWARD_GOAL = 0.90
Z = 1.959964  # two-sided 95%


def paired_interval(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """(mean difference, low, high) of after - before over the same questions, 95% normal interval of the
    paired differences."""
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    half = Z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def last_eval(out: Path, run: str, key: str) -> dict | None:
    path = out / run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("kind") == "eval" and key in r]
    return rows[-1] if rows else None


def main(out: Path) -> None:
    evals = {name: json.loads((out / f"eval_{name}.json").read_text())
             for name in STAGES if (out / f"eval_{name}.json").is_file()}
    base = evals["sft"]
    base_scores = [a["score"] for a in base["answers"]]
    print(f"\nheld-out accuracy on the same {base['n']} {base['task']} test questions (greedy):")
    print(f"{'model':<28} {'accuracy':>16}  {'95% interval':<13} {'lift':>7}  {'lift 95% interval':<17} goal")
    for name, (label, goal) in STAGES.items():
        if name not in evals:
            print(f"{label:<28} {'(not run)':>16}")
            continue
        r = evals[name]
        row = f"{label:<28} {r['correct']:>5}/{r['n']:<4} {r['accuracy']:.3f}  {r['ci_low']:.3f}-{r['ci_high']:.3f}"
        if goal is not None:
            lift, low, high = paired_interval(base_scores, [a["score"] for a in r["answers"]])
            verdict = "met" if lift >= goal else "missed"
            row += f"   {lift:+.3f}  {low:+.3f} to {high:+.3f}   >= +{goal:.2f}: {verdict}"
        print(row)
    reward = last_eval(out, "reward", "pref_acc")
    pairs_meta = out / "pairs" / "meta.json"
    if reward and pairs_meta.is_file():
        meta = json.loads(pairs_meta.read_text())
        verdict = "met" if reward["pref_acc"] >= REWARD_GOAL else "missed"
        print(f"reward model: held-out pair accuracy {reward['pref_acc']:.3f} on {meta['val']} pairs (goal >= "
              f"{REWARD_GOAL:.2f}: {verdict}); {meta['train']} train pairs from {meta['questions']} questions x "
              f"{meta['samples']} samples")
    ppo = last_eval(out, "ppo", "kl")
    if ppo:
        print(f"PPO: KL to the fine-tuned model {ppo['kl']:.3f} nats per answer, reward-model score "
              f"{ppo['score']:.3f} (last evaluation)")
    answers = {name: r["answers"] for name, r in evals.items()}
    changed = [i for i, a in enumerate(answers["sft"]) if any(answers[n][i]["score"] != a["score"] for n in answers)]
    print("\nanswers before and after (held-out questions whose score changed):")
    for i in changed[:6]:
        q = answers["sft"][i]
        row = "  ".join(f"{n}: {answers[n][i]['answer'].strip()!r}{'' if answers[n][i]['score'] else ' x'}"
                        for n in answers)
        print(f"  {q['prompt']} = {q['target']}   {row}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "eval_sft.json").is_file():
        sys.exit("usage: python scripts/rl_table.py OUT (the folder scripts/demo_rl.sh wrote, with eval_sft.json)")
    main(Path(sys.argv[1]))
