"""Tasks with a verifiable reward: questions whose answers a program checks, for fine-tuning, evaluation and RL.

A task gives questions (`Question`: the instruction text, the reference answer a model is fine-tuned on, and
the exact value the scorer compares) for a "train" and a "test" split, and a scorer that gives 1.0 to a
completion that reaches the target and 0.0 to anything else. GRPO trains on that score, `gpt2 eval task` reports
its mean on held-out questions (`evaluate_task`), `gpt2 prepare task` turns the train split into fine-tuning data
and `gpt2 prepare task-pairs` into preference pairs from a model's own samples.

Design decisions:
- Callers render `Question.prompt` with the one template (`gpt2.template.format_prompt`), as every other
  instruction is rendered, so a task's model is an ordinary fine-tuned model that `gpt2 chat` can talk to.
- Scores are exact match of an extracted final answer, never a partial credit: the reward of RL and the
  accuracy of evaluation are then the same number. A scorer never raises: malformed, empty or runaway text
  scores 0.0.
- `arithmetic` (built in, generated from a seed, no download): "What is 4 7 + 0 8?" -> "0 5 5". Two choices
  make it learnable by a small model in minutes. The digits are written apart because GPT-2's tokenizer cuts
  numbers irregularly ("1234" is "12" "34", "579" is one token): spaced, every digit is one token (" 7"). And
  every number has a fixed width (operands `digits` digits, the sum one more, zero-padded), so each digit sits
  at the same place in every question: a model learns which places to add instead of first searching the
  template's long preamble for the numbers (written without padding, the sums were barely learnt in the same
  time). Two-digit operands: a new `tiny` model fine-tuned for a few minutes on a CPU gets a fair share of the
  held-out sums right and many wrong (mostly the carries), which leaves room for RL to measurably help.
  Scoring: the completion's first line, with all whitespace removed, must be the sum's digits, leading zeros
  allowed ("0 5 5", "055" and " 55 " pass; "5 6", "55 is the answer" and "-55" do not).
  Splits: the test split is drawn first from `random.Random(seed)` (`n_test` pairs, distinct even with the
  operands swapped), then the train split (`n_train` distinct ordered pairs, neither order of any test pair),
  so the splits are disjoint and the same for a seed on every machine.
- `gsm8k`: grade-school math word problems (the hub's `openai/gsm8k`, config "main", splits "train" and
  "test"; or `source`, a local file or folder with the same fields `question` and `answer`, the answer's last
  line "#### <number>"). The reference answer is the whole solution (calculator annotations included, as
  published); the target is the number after "####". Scoring: the number after the completion's first
  "####", or else the completion's last number, compared with the target after normalising both (commas,
  "$" and a leading "+" removed; trailing zeros of a fraction dropped: "1,000.00" is "1000").
  A local source that is a folder is read as the hub lays it out: files whose names start with the split
  ("train-00000-of-00001.parquet", "test.jsonl"); a single file is the split asked for. A record with a field
  missing or not text, or an answer without "####", is a one-line error naming the file and line (or record).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.data.sources import iter_records, jsonl_records, local_files
from gpt2.errors import UserError
from gpt2.inference import generate, pad_right
from gpt2.template import format_prompt
from gpt2.tokenizer import decode_bytes, encode

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Question:
    prompt: str  # the instruction given to the model (rendered with gpt2.template.format_prompt)
    answer: str  # the reference answer a model is fine-tuned on
    target: str  # the exact value the scorer compares


class VerifiableTask:
    """A task whose answers a program checks (module docstring). Subclasses set `name` and implement both."""

    name: str = ""
    max_new_tokens: int = 64  # a long enough answer: generating further cannot turn a wrong one right

    def questions(self, split: str) -> list[Question]:
        """The questions of `split` ("train" or "test"): the same list on every call and machine; the two
        splits share no question."""
        raise NotImplementedError

    def score(self, question: Question, completion: str) -> float:
        """1.0 if `completion` answers `question` exactly, else 0.0; never raises."""
        raise NotImplementedError


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------- arithmetic


def spaced(n: int, width: int) -> str:
    """(407, 4) -> "0 4 0 7": zero-padded to `width` digits, one GPT-2 token per digit."""
    return " ".join(str(n).zfill(width))


class ArithmeticTask(VerifiableTask):
    """Addition of two numbers drawn uniformly from [0, 10**digits), written with `digits` digits each, generated
    from `seed` (module docstring)."""

    name = "arithmetic"

    def __init__(self, digits: int = 2, n_train: int = 7_000, n_test: int = 1_000, seed: int = 0) -> None:
        if digits < 1 or n_train < 0 or n_test < 0:
            raise ValueError("digits must be >= 1 and the split sizes >= 0")
        if n_train + 2 * n_test > 0.9 * (10**digits) ** 2:  # room to draw them without drawing for ever
            raise ValueError(f"{n_train} + {n_test} questions asked for, too many for {digits}-digit sums")
        self.digits, self.n_train, self.n_test, self.seed = digits, n_train, n_test, seed
        self.max_new_tokens = digits + 4  # one token per digit of the sum, <|endoftext|>, some slack
        self._splits: dict[str, list[Question]] | None = None

    def questions(self, split: str) -> list[Question]:
        check_split(split)
        if self._splits is None:
            test, train = self._pairs()
            self._splits = {"test": [self.make(a, b) for a, b in test], "train": [self.make(a, b) for a, b in train]}
        return list(self._splits[split])

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(test, train) operand pairs, drawn in one seeded stream: the test split first, one order of each
        pair; then train pairs in either order, none of them a test pair in either order."""
        rng = random.Random(self.seed)
        top = 10**self.digits
        test_keys: set[tuple[int, int]] = set()
        test: list[tuple[int, int]] = []
        while len(test) < self.n_test:
            a, b = rng.randrange(top), rng.randrange(top)
            if (min(a, b), max(a, b)) not in test_keys:
                test_keys.add((min(a, b), max(a, b)))
                test.append((a, b))
        seen: set[tuple[int, int]] = set()
        train: list[tuple[int, int]] = []
        while len(train) < self.n_train:
            a, b = rng.randrange(top), rng.randrange(top)
            if (a, b) not in seen and (min(a, b), max(a, b)) not in test_keys:
                seen.add((a, b))
                train.append((a, b))
        return test, train

    def make(self, a: int, b: int) -> Question:
        d = self.digits
        return Question(prompt=f"What is {spaced(a, d)} + {spaced(b, d)}?", answer=spaced(a + b, d + 1),
                        target=str(a + b))

    def score(self, question: Question, completion: str) -> float:
        first = completion.strip().split("\n", 1)[0] if isinstance(completion, str) else ""
        digits = "".join(first.split())
        return float(digits.isdecimal() and digits.isascii() and (digits.lstrip("0") or "0") == question.target)


# ---------------------------------------------------------------- GSM8K

GSM8K_HUB_ID, GSM8K_CONFIG = "openai/gsm8k", "main"
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """A number as GSM8K's scorer compares it: commas, "$" and a leading "+" removed, trailing zeros of a
    fraction dropped ("1,000.00" -> "1000", "4.50" -> "4.5", "-$5" -> "-5"); text that is no number
    comes back stripped."""
    t = text.strip().replace(",", "").replace("$", "").lstrip("+")
    if "." in t:
        whole, frac = t.split(".", 1)
        frac = frac.rstrip("0")
        t = f"{whole}.{frac}" if frac else whole
    return "0" if t == "-0" else t


def final_number(text: str) -> str | None:
    """The number after the first "####", or else the last number in `text`; None when there is none."""
    if "####" in text:
        found = _NUMBER.search(text.split("####", 1)[1])
    else:
        found = next(reversed(list(_NUMBER.finditer(text))), None)
    return normalize_number(found.group()) if found else None


class GSM8KTask(VerifiableTask):
    """GSM8K word problems from the hub or a local copy (module docstring)."""

    name = "gsm8k"
    max_new_tokens = 256  # room for a worked solution like the reference ones

    def __init__(self, source: str | None = None) -> None:
        if source is not None and not Path(source).exists():
            raise UserError(f"--source {source}: no such file or folder")
        self.source = source
        self._cache: dict[str, list[Question]] = {}

    def questions(self, split: str) -> list[Question]:
        check_split(split)
        if split not in self._cache:
            self._cache[split] = [self.parse(rec, where) for where, rec in self._records(split)]
            if not self._cache[split]:
                raise UserError(f"{self.source or GSM8K_HUB_ID}: no GSM8K questions in the {split} split")
        return list(self._cache[split])

    def _records(self, split: str) -> Iterator[tuple[str, dict]]:
        if self.source is None:
            records = iter_records(None, GSM8K_HUB_ID, GSM8K_CONFIG, split)
            yield from ((f"{GSM8K_HUB_ID} {split} record {i + 1}", r) for i, r in enumerate(records))
            return
        path = Path(self.source)
        files = local_files(path)
        if path.is_dir():
            files = [f for f in files if f.name.lower().startswith(split)]
            if not files:
                raise UserError(f"--source {path}: no file whose name starts with {split!r} (the hub's layout: "
                                f"{split}-00000-of-00001.parquet, or {split}.jsonl)")
        for f in files:
            if f.name.lower().endswith((".jsonl", ".jsonl.gz")):  # line numbers for the error messages
                yield from ((f"{f}:{line}", r) for line, r in jsonl_records(f))
            else:
                yield from ((f"{f}: record {i + 1}", r) for i, r in enumerate(iter_records(str(f), GSM8K_HUB_ID)))

    @staticmethod
    def parse(record: dict, where: str) -> Question:
        """One GSM8K record -> Question; a one-line UserError naming `where` for a malformed one."""
        for field in ("question", "answer"):
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                what = "no field" if value is None else "an empty or non-text field"
                raise UserError(f"{where}: {what} {field!r}: a GSM8K record has text fields question and answer")
        target = final_number(record["answer"]) if "####" in record["answer"] else None
        if target is None:
            raise UserError(f"{where}: the answer does not end in a '#### <number>' line")
        return Question(prompt=record["question"].strip(), answer=record["answer"].strip(), target=target)

    def score(self, question: Question, completion: str) -> float:
        try:
            return float(final_number(completion) == question.target)
        except (TypeError, AttributeError):  # not text at all
            return 0.0


# ---------------------------------------------------------------- the table

TASKS: dict[str, Callable[..., VerifiableTask]] = {
    "arithmetic": lambda source=None: ArithmeticTask(),
    "gsm8k": lambda source=None: GSM8KTask(source),
}


def get_task(name: str, source: str | None = None) -> VerifiableTask:
    """The task called `name`; `source` is a local copy of a downloaded task's data (gsm8k), refused for a
    generated one."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    if source is not None and name == "arithmetic":
        raise UserError("--source: the arithmetic task is generated from a seed and reads no file")
    return TASKS[name](source)


# ---------------------------------------------------------------- answering and scoring


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96): unlike the normal approximation it stays
    in [0, 1] and is not zero-width at 0 or n correct."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def prompt_ids(model: torch.nn.Module, questions: list[Question], max_new_tokens: int) -> list[list[int]]:
    """Each question rendered with the template and tokenized; a question that leaves no room in the model's
    context for an answer is a UserError (scoring it 0 would hide that it was never asked)."""
    ids = [encode(format_prompt(q.prompt)) for q in questions]
    block = model.config.block_size
    too_long = [i for i, p in enumerate(ids) if len(p) >= block]
    if too_long:
        raise UserError(f"{len(too_long)} question(s) (the first: {questions[too_long[0]].prompt[:40]!r}...) are "
                        f"{len(ids[too_long[0]])}+ tokens with the template, no room in the model's context window "
                        f"({block}) for an answer")
    return ids


def complete_ids(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """The model's answer tokens for each prompt (token ids), `batch_size` prompts at a time through the one
    decoding engine (`gpt2.inference.generate`): greedy at temperature 0, else sampled with `generator`. An
    answer ends before <|endoftext|> (not included), at `max_new_tokens` or at the context window's end."""
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_right(prompts[start:start + batch_size])
        answers += generate(model, ids.to(device), mask.to(device), temperature, max_new_tokens, generator=generator)
    return answers


def as_text(ids: list[int]) -> str:
    return decode_bytes(ids).decode("utf-8", errors="replace")


def evaluate_task(model: torch.nn.Module, questions: list[Question], task: VerifiableTask, max_new_tokens: int = 32,
                  batch_size: int = 64) -> dict:
    """Greedy answers of `model` to `questions`, scored by `task`: {"accuracy", "n", "correct", "ci_low",
    "ci_high" (95% Wilson interval), "completions", "scores"}."""
    answers = complete_ids(model, prompt_ids(model, questions, max_new_tokens), max_new_tokens, batch_size)
    completions = [as_text(a) for a in answers]
    scores = [task.score(q, c) for q, c in zip(questions, completions)]
    correct, n = int(sum(scores)), len(questions)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "ci_low": low, "ci_high": high,
            "completions": completions, "scores": scores}
