"""`gpt2 prepare task` and `gpt2 prepare task-pairs`: training data from a task with a verifiable answer
(`gpt2.rlhf.tasks`).

    gpt2 prepare task --task arithmetic --out data/arith                       # for gpt2 finetune --data
    gpt2 prepare task-pairs --model runs/sft --task arithmetic --out data/arith-pairs --limit 2000

`prepare task` writes the task's train questions as fine-tuning examples (instruction = the question, output =
the reference answer) in the layout `gpt2 prepare alpaca` writes (`gpt2.data.alpaca.write_prepared`: train.jsonl,
val.jsonl, manifest.json), so `gpt2 finetune --data OUT` reads it unchanged; the val split is a seeded part of
the train questions, and the task's test questions stay unseen.

`prepare task-pairs` makes preference pairs from a model's own answers: for each train question it samples
`--samples` answers through the decoding engine, scores them with the task's exact scorer, and where at least
one is right and one wrong writes a pair (chosen: a right answer; rejected: a wrong one) in the layout
`gpt2 prepare hh` writes (`gpt2.data.preferences.write_pairs`), which `gpt2 dpo`, `gpt2 reward` and
`gpt2 ppo --data` read. A question gives up to `--pairs-per-question` pairs, each with another wrong answer.
Which questions' pairs are held out is decided by a hash of the question, so a question never has pairs on both
sides. OUT/prompts.txt holds the sampled questions, one a line (line breaks inside a question become spaces), for
`gpt2 ppo --prompts`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg, check_sampling, check_values
from gpt2.data.alpaca import encode_records, write_prepared
from gpt2.data.preferences import Pair, held_out, write_pairs
from gpt2.distributed import pick_device
from gpt2.errors import UserError
from gpt2.io import write_text_atomic
from gpt2.rlhf.tasks import TASKS, Question, VerifiableTask, as_text, complete_ids, get_task, prompt_ids
from gpt2.tokenizer import EOT

SOURCE_HELP = "gsm8k: a local file or folder with the hub's fields (question, answer) instead of openai/gsm8k"


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")


def _train_questions(task: VerifiableTask, limit: int | None) -> list[Question]:
    return task.questions("train")[:limit]


# ---------------------------------------------------------------- prepare task


@dataclass
class PrepareTaskConfig:
    task: str = arg("arithmetic", "task with a verifiable answer (gpt2.rlhf.tasks)", choices=sorted(TASKS))
    source: str | None = arg(None, SOURCE_HELP)
    out: str = arg("data/task", "output folder: train.jsonl, val.jsonl and manifest.json, what `gpt2 finetune "
                                "--data` reads")
    limit: int | None = arg(None, "use only the first N train questions", minimum=1)
    val_fraction: float = arg(0.02, "fraction of the train questions held out for the validation loss")
    seed: int = arg(1337, "seed of the train/val split")


def prepare_task(cfg: PrepareTaskConfig) -> dict:
    """The task's train questions as fine-tuning examples; returns the manifest."""
    check_values(cfg)
    _check_fraction(cfg.val_fraction)
    task = get_task(cfg.task, cfg.source)
    records = [{"instruction": q.prompt, "input": "", "output": q.answer}
               for q in _train_questions(task, cfg.limit)]
    examples, n_records, malformed, where = encode_records(records, f"{task.name} questions")
    if not examples:  # a task's questions are all well formed: this is an empty split
        raise UserError(f"task {task.name}: no train questions to prepare")
    manifest = write_prepared(Path(cfg.out), examples, source=f"task {task.name}" + (f" ({cfg.source})" if cfg.source
                              else ""), records=n_records, malformed=malformed, where=where,
                              val_fraction=cfg.val_fraction, seed=cfg.seed)
    print(f"prepare task: {task.name}: {manifest['train']} train + {manifest['val']} val examples -> {cfg.out} "
          f"(tokens {manifest['tokens']['total']}, longest {manifest['tokens']['max_len']})")
    return manifest


# ---------------------------------------------------------------- prepare task-pairs


@dataclass
class PrepareTaskPairsConfig:
    model: str = arg("runs/finetune", "the model whose sampled answers are paired: a run folder, an HF folder or "
                                      "a hub name")
    task: str = arg("arithmetic", "task with a verifiable answer (gpt2.rlhf.tasks)", choices=sorted(TASKS))
    source: str | None = arg(None, SOURCE_HELP)
    out: str = arg("data/task-pairs", "output folder: train.jsonl, val.jsonl, meta.json (what `gpt2 dpo`, `gpt2 "
                                      "reward` and `gpt2 ppo --data` read) and prompts.txt (for `gpt2 ppo --prompts`)")
    samples: int = arg(4, "answers sampled per question", minimum=2)
    limit: int | None = arg(None, "sample answers to only the first N train questions", minimum=1)
    pairs_per_question: int = arg(1, "most pairs from one question, each with another wrong answer", minimum=1)
    temperature: float = arg(1.0, "sampling temperature of the answers")
    max_new_tokens: int | None = arg(None, "longest sampled answer in tokens; default: the task's", minimum=1)
    batch_size: int = arg(64, "answers sampled together", minimum=1)
    val_fraction: float = arg(0.1, "fraction of the questions whose pairs are held out (by a hash of the question)")
    seed: int = arg(1337, "seed of the sampling")
    device: str = arg("auto", "cpu, cuda, mps or auto")


def question_pairs(task: VerifiableTask, question: Question, prompt: list[int], answers: list[list[int]],
                   max_new_tokens: int, most: int) -> tuple[list[Pair], list[float]]:
    """The pairs of one question from its sampled answers (token ids), and each answer's score: chosen a right
    answer, rejected a wrong one (each distinct wrong text used once, the distinct right ones in turn), at most
    `most` pairs. An answer that stopped before `max_new_tokens` keeps its <|endoftext|>; one cut at the limit
    is paired as cut (the scorer judged that text)."""
    scores = [task.score(question, as_text(a)) for a in answers]
    ended = [a + [EOT] * (len(a) < max_new_tokens) for a in answers]
    right = list({tuple(a): a for a, s in zip(ended, scores) if s}.values())  # distinct, in sampled order
    wrong = list({as_text(a): e for a, e, s in zip(answers, ended, scores) if not s}.values())
    if not right:
        return [], scores
    pairs = [{"prompt": prompt, "chosen": c, "rejected": r}
             for c, r in zip(itertools.cycle(right), wrong[:most])]
    return pairs, scores


def prepare_task_pairs(cfg: PrepareTaskPairsConfig) -> dict:
    """Sample, score and pair the model's answers to the train questions; returns meta.json's counts."""
    check_values(cfg)
    _check_fraction(cfg.val_fraction)
    check_sampling(cfg.temperature, None, None)
    task = get_task(cfg.task, cfg.source)
    questions = _train_questions(task, cfg.limit)
    model = load_model(cfg.model, pick_device(cfg.device), reads_text="--model").eval()
    max_new = cfg.max_new_tokens or task.max_new_tokens
    prompts = prompt_ids(model, questions, max_new)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(cfg.seed)
    k = cfg.samples
    answers = complete_ids(model, [p for p in prompts for _ in range(k)], max_new, cfg.batch_size, cfg.temperature,
                           generator)
    splits: dict[str, list[Pair]] = {"train": [], "val": []}
    counts: Counter = Counter()
    for i, (q, prompt) in enumerate(zip(questions, prompts)):
        pairs, scores = question_pairs(task, q, prompt, answers[i * k:(i + 1) * k], max_new, cfg.pairs_per_question)
        counts["right_samples"] += int(sum(scores))
        counts["all_right" if all(scores) else "all_wrong" if not any(scores) else "mixed"] += 1
        splits["val" if held_out(q.prompt, cfg.val_fraction) else "train"] += pairs
    if not splits["train"]:
        raise UserError(f"--model {cfg.model}: no train question got both a right and a wrong answer among "
                        f"{k} samples ({dict(counts)}): sample more (--samples, --limit) or at another --temperature")
    meta = {"source": f"task {task.name} sampled from {cfg.model}", "questions": len(questions), "samples": k,
            "temperature": cfg.temperature, "sample_accuracy": counts["right_samples"] / (len(questions) * k),
            **dict(counts)}
    out = Path(cfg.out)
    write_pairs(out, splits, meta)
    write_text_atomic(out / "prompts.txt", "".join(" ".join(q.prompt.split()) + "\n" for q in questions))
    print(f"prepare task-pairs: {len(questions)} questions x {k} samples, {meta['sample_accuracy']:.3f} of them "
          f"right; {counts['mixed']} questions mixed, {counts['all_right']} all right, {counts['all_wrong']} all "
          f"wrong -> {len(splits['train'])} train + {len(splits['val'])} val pairs in {out} (+ prompts.txt)")
    return {**meta, "train": len(splits["train"]), "val": len(splits["val"])}


COMMANDS = [
    Command("prepare task", "a verifiable task's train questions -> fine-tuning examples (gpt2 finetune --data)",
            PrepareTaskConfig, prepare_task),
    Command("prepare task-pairs", "preference pairs from a model's own right and wrong answers to a task's "
            "questions (gpt2 dpo / reward / ppo --data)", PrepareTaskPairsConfig, prepare_task_pairs),
]
