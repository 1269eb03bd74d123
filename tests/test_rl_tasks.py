"""Tasks with a verifiable reward (`gpt2.rlhf.tasks`) and the commands that use them: `gpt2 eval task`,
`gpt2 prepare task`, `gpt2 prepare task-pairs`."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2.cli import main
from gpt2.data.alpaca import load_split
from gpt2.data.preferences import load_pairs
from gpt2.errors import UserError
from gpt2.losses import gpt_loss_chunked
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.tasks import (
    ArithmeticTask,
    GSM8KTask,
    Question,
    final_number,
    get_task,
    normalize_number,
    wilson_interval,
)
from gpt2.template import format_prompt
from gpt2.tokenizer import EOT, decode, encode

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A company paid $1,200 for each of 2 machines. What did it pay?",
     "answer": "It paid 2 * 1,200 = <<2*1200=2400>>2,400 dollars.\n#### 2,400"},
]


@pytest.fixture
def gsm8k_dir(tmp_path):
    """A local GSM8K copy in the hub's layout: one file per split."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n")
    (folder / "test.jsonl").write_text(json.dumps(GSM8K_ROWS[1]) + "\n")
    return folder


@pytest.fixture
def random_model(tmp_path, one_thread):
    """A small random model with the GPT-2 vocabulary (it reads the tokenizer's ids): wrong answers, quickly."""
    torch.manual_seed(0)
    path = tmp_path / "model"
    GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32)).save_pretrained(path)
    return path


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_scorer_exact_match_of_the_first_line():
    task = ArithmeticTask()
    q = task.make(7, 48)
    assert (q.prompt, q.answer, q.target) == ("What is 0 7 + 4 8?", "0 5 5", "55")
    wide = ArithmeticTask(digits=3).make(407, 586)
    assert (wide.prompt, wide.answer, wide.target) == ("What is 4 0 7 + 5 8 6?", "0 9 9 3", "993")
    for right in ["0 5 5", "055", "55", " 0 5 5 \nanything after the first line", "5 5\n", "0 0 5 5"]:
        assert task.score(q, right) == 1.0, right
    for wrong in ["0 5 6", "5", "0 5 5 0", "55 is the answer", "", "\n0 5 5x", "fifty-five", "-55", "5,5", "０５５"]:
        assert task.score(q, wrong) == 0.0, wrong
    assert task.score(task.make(0, 0), "0 0 0") == 1.0 and task.score(task.make(0, 0), "") == 0.0
    assert task.score(q, None) == 0.0  # not text: scored, never raised


def test_arithmetic_splits_are_deterministic_disjoint_and_correct():
    a, b = ArithmeticTask(n_train=6000, n_test=500), ArithmeticTask(n_train=6000, n_test=500)
    train, test = a.questions("train"), a.questions("test")
    assert (len(train), len(test)) == (6000, 500) and len(set(train)) == 6000
    assert train == b.questions("train") and test == b.questions("test")

    def operands(q: Question) -> frozenset:
        left, right = q.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        x, y = int(left.replace(" ", "")), int(right.replace(" ", ""))
        assert str(x + y) == q.target and q.answer.replace(" ", "") == q.target.zfill(3) and len(left) == 3
        return frozenset((x, y))

    assert not {operands(q) for q in train} & {operands(q) for q in test}  # also a + b against b + a
    assert len({operands(q) for q in test}) == 500
    assert ArithmeticTask(n_train=6000, n_test=500, seed=1).questions("test") != test
    with pytest.raises(ValueError, match="too many"):
        ArithmeticTask(digits=1, n_train=80, n_test=10)
    with pytest.raises(UserError, match="unknown split"):
        a.questions("val")


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_scorer_number_after_hashes_or_the_last_number():
    q = Question("q", "... #### 2,400", "2400")
    for right in ["#### 2400", "so it paid 2,400 dollars", "#### $2,400.00", "2 machines: 1200 x 2 = 2400.",
                  "#### 2400 (not 7)", "It is +2400"]:
        assert GSM8KTask().score(q, right) == 1.0, right
    for wrong in ["2400 dollars, not 7", "#### 24000", "#### ", "", "no number", "#### 2400.5", "-2400"]:
        assert GSM8KTask().score(q, wrong) == 0.0, wrong
    assert GSM8KTask().score(q, None) == 0.0
    assert normalize_number("1,000.50") == "1000.5" and normalize_number("-0") == "0"
    assert final_number("a 3 b 4.50 c") == "4.5" and final_number("nothing") is None


def test_gsm8k_local_folder_is_read_per_split(gsm8k_dir):
    task = get_task("gsm8k", str(gsm8k_dir))
    (train,), (test,) = task.questions("train"), task.questions("test")
    assert train.prompt == GSM8K_ROWS[0]["question"] and train.answer.endswith("#### 72") and train.target == "72"
    assert test.target == "2400"
    assert task.score(train, train.answer) == 1.0 and task.score(test, test.answer) == 1.0


@pytest.mark.parametrize("row, message", [
    ({"question": "How many?"}, r"gsm8k\.jsonl:2: no field 'answer'"),
    ({"answer": "#### 3"}, r"gsm8k\.jsonl:2: no field 'question'"),
    ({"question": "How many?", "answer": 3}, r"gsm8k\.jsonl:2: an empty or non-text field 'answer'"),
    ({"question": "How many?", "answer": "three"}, r"gsm8k\.jsonl:2: the answer does not end in a '#### <number>'"),
])
def test_gsm8k_malformed_record_is_one_line_naming_file_and_line(tmp_path, row, message):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        GSM8KTask(str(path)).questions("test")


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0


# ---------------------------------------------------------------- commands


def test_eval_task_through_the_command(random_model, tmp_path, tokenizer_ok, capsys):
    out = tmp_path / "result.json"
    summary = main_result(["eval", "task", "--model", str(random_model), "--task", "arithmetic", "--limit", "12",
                           "--batch-size", "5", "--show", "2", "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "arithmetic test: 0/12 correct, accuracy 0.000 (95% CI 0.000-0.24" in printed
    assert printed.count("WRONG  'What is ") == 2
    saved = json.loads(out.read_text())
    assert saved["n"] == 12 and saved["accuracy"] == 0.0 and len(saved["answers"]) == 12
    assert summary["n"] == 12
    assert saved["answers"][0]["target"] == ArithmeticTask().questions("test")[0].target


def main_result(argv: list[str]):
    """Run a command in-process and return what its function returned."""
    from gpt2.cli import build_parser
    from gpt2.config import build_config

    ns = build_parser().parse_args(argv)
    return ns._command.run(build_config(ns._command.config, ns, ns._command.presets))


def test_eval_task_counts_a_right_answer(tmp_path, tokenizer_ok, one_thread):
    """A model trained to say one sum's answer is scored right on that question and wrong on the others."""
    task = ArithmeticTask()
    q = task.questions("test")[0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    prompt, answer = encode(format_prompt(q.prompt)), encode(q.answer) + [EOT]
    seq = torch.tensor([prompt + answer])
    targets = torch.full_like(seq, -100)
    targets[0, len(prompt) - 1:-1] = torch.tensor(answer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        gpt_loss_chunked(model, seq, targets).backward()
        opt.step()
    model.save_pretrained(tmp_path / "m")
    result = main_result(["eval", "task", "--model", str(tmp_path / "m"), "--limit", "3", "--device", "cpu"])
    assert result["correct"] >= 1  # the trained question (others may share its answer's first digits, not all)
    assert result["n"] == 3


def test_prepare_task_writes_what_finetune_reads(tmp_path, tokenizer_ok):
    out = tmp_path / "arith"
    main(["prepare", "task", "--task", "arithmetic", "--out", str(out), "--limit", "50", "--val-fraction", "0.1"])
    train, val = load_split(out, "train"), load_split(out, "val")
    assert (len(train), len(val)) == (45, 5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "alpaca-examples-v1" and manifest["source"] == "task arithmetic"
    questions = {format_prompt(q.prompt): q.answer for q in ArithmeticTask().questions("train")[:50]}
    for q_ids, a_ids in train + val:
        assert a_ids[-1] == EOT and questions[decode(q_ids)] == decode(a_ids[:-1])


def test_prepare_task_pairs_pairs_right_with_wrong_answers(random_model, tmp_path, tokenizer_ok, monkeypatch):
    """A random model's samples, judged by a stand-in scorer (an even-length answer is "right") so that a few
    questions get both kinds: the pairs, their split and prompts.txt, as `gpt2 dpo`/`reward`/`ppo` read them."""
    monkeypatch.setattr(ArithmeticTask, "score", lambda self, q, c: float(len(c) % 2 == 0))
    out = tmp_path / "pairs"
    meta = main_result(["prepare", "task-pairs", "--model", str(random_model), "--out", str(out), "--limit", "16",
                        "--samples", "4", "--pairs-per-question", "2", "--max-new-tokens", "4", "--val-fraction",
                        "0.25", "--device", "cpu", "--seed", "3"])
    train, val = load_pairs(out / "train.jsonl"), load_pairs(out / "val.jsonl")
    assert meta["mixed"] > 0 and len(train) == meta["train"] and len(val) == meta["val"] and train
    questions = ArithmeticTask().questions("train")[:16]
    prompts = {tuple(encode(format_prompt(q.prompt))) for q in questions}
    for pair in train + val:
        assert tuple(pair["prompt"]) in prompts
        chosen, rejected = ([t for t in pair[side] if t != EOT] for side in ("chosen", "rejected"))
        assert len(decode(chosen)) % 2 == 0 and len(decode(rejected)) % 2 == 1
    assert {tuple(p["prompt"]) for p in train}.isdisjoint(tuple(p["prompt"]) for p in val)
    assert (out / "prompts.txt").read_text().splitlines() == [q.prompt for q in questions]
    # the same seed samples the same answers
    again = main_result(["prepare", "task-pairs", "--model", str(random_model), "--out", str(tmp_path / "again"),
                         "--limit", "16", "--samples", "4", "--pairs-per-question", "2", "--max-new-tokens", "4",
                         "--val-fraction", "0.25", "--device", "cpu", "--seed", "3"])
    assert again == meta and (tmp_path / "again" / "train.jsonl").read_text() == (out / "train.jsonl").read_text()


def test_finetune_from_scratch_on_task_data(tmp_path, tokenizer_ok, one_thread):
    """`gpt2 finetune --scratch tiny` trains a new model of the preset on `gpt2 prepare task`'s folder."""
    data = tmp_path / "arith"
    main(["prepare", "task", "--out", str(data), "--limit", "40"])
    common = ["--data", str(data), "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu",
              "--eval-every", "0", "--no-progress", "--save-every", "0", "--sample-prompts", "What is 1 + 2?",
              "--sample-max-tokens", "2"]
    main(["finetune", "--scratch", "tiny", "--out", str(tmp_path / "a"), *common])
    model = GPT.from_pretrained(tmp_path / "a" / "model")
    assert (model.config.n_layer, model.config.n_embd) == (4, 128)
    assert "A new `tiny` model fine-tuned on" in (tmp_path / "a" / "samples.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["finetune", "--scratch", "tiny", "--init", "gpt2"], "--init and --scratch both name the starting model"),
    (["eval", "task", "--task", "chess"], "invalid choice: 'chess'"),
    (["eval", "task", "--task", "gsm8k", "--source", "missing.jsonl"], "--source missing.jsonl: no such file"),
    (["prepare", "task", "--task", "arithmetic", "--source", "x.jsonl"], "reads no file"),
    (["prepare", "task-pairs", "--samples", "1"], "--samples must be >= 2"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # argparse's usage comes first


def test_unknown_task_name_through_the_library():
    with pytest.raises(UserError, match="unknown task 'chess': choose one of arithmetic, gsm8k"):
        get_task("chess")
