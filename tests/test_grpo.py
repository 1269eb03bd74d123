"""`gpt2 grpo`: its advantage and loss against a hand computation, and the command on a test-only task that a
tiny model learns in seconds: the mean reward rises, two gloo ranks take the same steps as one process, a
resumed run equals an uninterrupted one, and bad flags get their one line.

The test task asks "Name colour i." and scores exactly "blue"; the starting model is fine-tuned (here, in a few
dozen steps) to answer one of four colours at random, so about a quarter of the sampled answers score 1 at the
start and GRPO has signal from the first step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from rlhf_data import one_thread  # noqa: F401 (autouse fixture)
from test_train_loop import _free_port

from gpt2.cli import main
from gpt2.data.batching import collate
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf import tasks
from gpt2.rlhf.losses import answer_logprobs, group_advantages, grpo_loss, k3_kl
from gpt2.rlhf.tasks import Question, VerifiableTask

COLOURS = ["red", "green", "blue", "gold"]
STEP_KEYS = ("loss", "grad_norm", "lr", "reward", "accuracy", "zero_adv_groups", "answer_len", "ended",
             "policy_loss", "clip_frac", "approx_kl")


class ColourTask(VerifiableTask):
    """Test-only: "Name colour i." (every i the same number of tokens), and only "blue" scores."""

    name = "colour"
    max_new_tokens = 3  # the colour, <|endoftext|>, and one more: `gpt2 grpo`'s default

    def questions(self, split: str) -> list[Question]:
        numbers = range(4) if split == "train" else range(4, 8)
        return [Question(f"Name colour {i}.", "blue", "blue") for i in numbers]

    def score(self, question: Question, completion: str) -> float:
        return float(completion.strip() == question.target)


def register_task() -> None:
    tasks.TASKS["colour"] = lambda source=None: ColourTask()


@pytest.fixture(autouse=True)
def colour_task():
    register_task()
    yield
    tasks.TASKS.pop("colour", None)


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, tokenizer_ok) -> Path:
    """A tiny model with GPT-2's vocabulary that answers each training question with one of the four colours,
    about equally often, then <|endoftext|> (a short fine-tuning on the answer tokens)."""
    from gpt2.template import format_prompt
    from gpt2.tokenizer import EOT, encode

    threads = torch.get_num_threads()  # module-scoped: set up before the autouse one_thread fixture
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16))
    rows = [(encode(format_prompt(q.prompt)), encode(c) + [EOT]) for q in ColourTask().questions("train")
            for c in COLOURS]
    ids, targets = collate(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(40):
        loss = -answer_logprobs(model, ids, targets).sum() / (targets != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("grpo") / "sft"
    model.save_pretrained(folder)
    return folder


def grpo_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--model", str(model), "--task", "colour", "--out", str(out), "--samples-per-prompt", "4",
            "--prompts-per-step", "4", "--micro-batch", "4", "--lr", "1e-2",
            "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--eval-questions", "4", *extra]


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


# ----------------------------------------------------------------------------- the math by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    assert group_advantages(rewards, 4).tolist() == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    # group 1's std (Bessel): sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2's is 0, so its advantages stay 0
    scaled = group_advantages(rewards, 4, scale=True)
    want = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0]
    assert scaled.tolist() == pytest.approx(want, abs=1e-6)


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.25), math.log(0.5)])
    ref = torch.tensor([math.log(0.5), math.log(0.5)])
    # ref / p = 2: 2 - ln 2 - 1; equal: 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([1 - math.log(2), 0.0], abs=1e-6)


def test_grpo_loss_by_hand():
    """Two answers of 2 and 1 tokens, advantages +1 and -0.5, clip 0.2. Ratios pi / pi_old: row 0 has 1.5
    (clipped to 1.2: its advantage is positive) and 0.5 (not clipped: the pessimistic term is the unclipped
    one); row 1 has 1.5 with a negative advantage (the unclipped term is the larger loss)."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old = torch.log(torch.tensor([[0.4, 0.4, 1.0], [0.2, 1.0, 1.0]])) * mask
    logp = (old + torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 1.0, 1.0]]))) * mask
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -0.5])
    loss, m = grpo_loss(logp, old, adv, mask, clip=0.2)
    # per token: max(-A r, -A clip(r)): -1.2, -0.5, 0.75; mean over the 3 answer tokens
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.75) / 3, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1 / 3) and "kl" not in m
    loss.backward()
    # the clipped token gets no gradient; the others -A * r / 3
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -0.5 / 3, 0], [0.75 / 3, 0, 0]]))

    # One update per rollout: pi_old is pi detached, the ratio is 1 and the loss is -mean(A) over the tokens
    logp.grad = None
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1 + 1 - 0.5) / 3, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [0.5 / 3, 0, 0]]))

    # The KL term: kl_coef * the mean k3 over answer tokens; ref / pi = 2 at one token, equal elsewhere
    ref = logp.detach() + torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])) * mask
    with_kl, m = grpo_loss(logp, logp.detach(), adv, mask, clip=0.2, kl_coef=0.5, ref_logp=ref)
    assert m["kl"].item() == pytest.approx((1 - math.log(2)) / 3, abs=1e-6)
    assert with_kl.item() == pytest.approx(-1.5 / 3 + 0.5 * (1 - math.log(2)) / 3, abs=1e-6)


def test_answer_logprobs_equal_the_full_heads():
    """The LM head run on the answer positions only gives the log-softmax of the full forward there."""
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    ids, targets = collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])])
    full = torch.log_softmax(model(ids).float(), -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(answer_logprobs(model, ids, targets), full * (targets != -100))


# ----------------------------------------------------------------------------- the command


def test_grpo_raises_the_mean_reward(start_model, tmp_path):
    """12 steps at a constant LR on one-token answers (the colour alone): about a quarter of the answers score
    at first, nearly all at the end (with --seed 1337, the default, and 0 to 3: 0.23-0.35 over the first 3
    steps, 0.94-1.0 over the last 3).
    Longer answers learn too, less steadily: one Adam step of this size moves every row of the 50257-token
    head, which can tip a 16-wide model into another answer altogether."""
    out = tmp_path / "run"
    main(grpo_args(start_model, out, "--max-steps", "12", "--eval-every", "12", "--max-new-tokens", "1",
                   "--min-lr", "1e-2"))
    train = records(out, "train")
    assert len(train) == 12 and set(STEP_KEYS) <= train[0].keys() and "kl" not in train[0]
    start = sum(r["reward"] for r in train[:3]) / 3
    end = sum(r["reward"] for r in train[-3:]) / 3
    assert start < 0.5 and end > 0.75, (start, end)
    assert all(r["reward"] == r["accuracy"] for r in train)  # a 0/1 scorer
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 12] and evals[-1]["accuracy"] == 1.0, evals
    assert GPT.from_pretrained(out / "model").config.n_embd == 16  # the policy, exported by the loop


def test_grpo_resumes_exactly(start_model, tmp_path):
    """4 steps at once == 2 steps, then --resume for 2 more: the same metrics, step by step."""
    extra = ("--max-steps", "4", "--updates-per-rollout", "2", "--kl-coef", "0.1", "--eval-every", "0")
    main(grpo_args(start_model, tmp_path / "whole", *extra))
    main(grpo_args(start_model, tmp_path / "split", *extra, "--stop-at-step", "2"))
    main(grpo_args(start_model, tmp_path / "split", *extra, "--resume"))
    whole, split = records(tmp_path / "whole", "train"), records(tmp_path / "split", "train")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    keys = (*STEP_KEYS, "kl")
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in whole]
    assert whole[-1]["kl"] > 0 and any(r["clip_frac"] > 0 for r in whole)  # the KL and the clip took part
    assert max(r["answer_len"] for r in whole) <= ColourTask.max_new_tokens  # the task's budget by default


def _ddp_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    register_task()
    main(argv)  # ends the process (a torchrun worker's end, see gpt2.distributed.end_process)


@pytest.mark.slow
def test_two_ranks_take_the_same_steps_as_one_process(start_model, tmp_path):
    """Two gloo ranks, each sampling and scoring half of the step's questions, equal one process with all of
    them: the groups are seeded per question, and the loss is weighted by the global token count."""
    extra = ("--max-steps", "2", "--updates-per-rollout", "2", "--kl-coef", "0.1", "--eval-every", "2")
    main(grpo_args(start_model, tmp_path / "one", *extra))
    argv = grpo_args(start_model, tmp_path / "two", *extra, "--parallel", "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    one, two = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert len(two) == 2 and all(r["policy_loss"] != 0 and r["grad_norm"] > 0 for r in one)  # a real update
    for key in ("loss", "policy_loss", "kl", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), key
    for key in ("reward", "accuracy", "zero_adv_groups", "answer_len"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    assert records(tmp_path / "two", "eval") == records(tmp_path / "one", "eval")


@pytest.mark.parametrize("flags, words", [
    (["--task", "nonesuch"], "unknown task 'nonesuch'"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
    (["--kl-coef", "-1"], "--kl-coef must be >= 0"),
    (["--temperature", "0"], "--temperature 0"),
    (["--parallel", "fsdp"], "--parallel fsdp"),
    (["--task", "arithmetic", "--source", "x.jsonl"], "--source"),  # a generated task reads no file
])
def test_bad_input_gets_one_line(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as e:  # each is refused before the model is read
        main(grpo_args(tmp_path / "no-model", tmp_path / "bad", *flags))
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
