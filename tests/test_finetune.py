"""`gpt2 finetune`: a tiny model learns a few Alpaca pairs (answers and stops), resume is exact, the
before/after report and the per-epoch validation are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2.commands.finetune import FinetuneConfig, run
from gpt2.commands.prepare_alpaca import PrepareAlpacaConfig, prepare
from gpt2.data.alpaca import encode_example, load_split
from gpt2.data.batching import collate
from gpt2.errors import UserError
from gpt2.hf_tokenizer import TOKENIZER_FILES
from gpt2.model import GPT, GPTConfig
from gpt2.train.finetune import FinetuneTask, answer_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("Name a primary color.", "Red."), ("What is two plus two?", "Four."), ("Say hello in French.", "Bonjour!")]


def make_data(tmp: Path, pairs, val_fraction=0.0) -> Path:
    src = tmp / "pairs.jsonl"
    src.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in pairs))
    prepare(PrepareAlpacaConfig(out=str(tmp / "data"), source=str(src), val_fraction=val_fraction, seed=0))
    return tmp / "data"


def make_init(tmp: Path, n_embd=32) -> Path:
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=n_embd)).save_pretrained(tmp / "init")
    return tmp / "init"


def test_tiny_model_learns_pairs_and_stops(tokenizer_ok, tmp_path):
    from gpt2.cli import main

    data, init = make_data(tmp_path, PAIRS), make_init(tmp_path)
    run_dir = tmp_path / "run"
    main(["finetune", "--init", str(init), "--data", str(data), "--out", str(run_dir), "--batch-size", "3",
          "--grad-accum", "1", "--epochs", "40", "--lr", "2e-2", "--warmup-steps", "5", "--device", "cpu",
          "--no-progress", "--save-every", "0", "--sample-max-tokens", "8",
          "--sample-prompts", *[q for q, _ in PAIRS]])
    model = GPT.from_pretrained(run_dir / "model")
    answers = answer_prompts(model, [q for q, _ in PAIRS], max_tokens=8)
    assert [a["answer"] for a in answers] == [a for _, a in PAIRS]
    assert all(a["stopped"] for a in answers)  # each ended with <|endoftext|>, well before the limit
    before = json.loads((run_dir / "samples_before.json").read_text())["answers"]
    assert not any(b["stopped"] for b in before)  # the random model never stops
    samples = (run_dir / "samples.md").read_text()
    for q, a in PAIRS:
        assert f"## {PAIRS.index((q, a)) + 1}. {q}" in samples and f"| {a} |" in samples
    assert samples.count("| no | yes |") == 3
    assert (run_dir / "loss.png").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert all((run_dir / "model" / name).is_file() for name in TOKENIZER_FILES)  # the export's, not the model's
    train_lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(train_lines) == 40 and train_lines[-1]["loss"] < 0.3
    # the logged answer tokens: each step is the one batch of all three answers (+ <|endoftext|> each)
    assert train_lines[0]["answer_tokens"] == sum(len(encode_example({"instruction": q, "output": a})[1])
                                                  for q, a in PAIRS)


QA = [(f"Question number {i}?", f"Answer {i} is {'long ' * (i % 4)}here.") for i in range(7)]


def resume_cfg(tmp: Path, data: Path, init: Path, out: str, **kw) -> FinetuneConfig:
    base = dict(init=str(init), data=str(data), out=str(tmp / out), batch_size=2, grad_accum=1, epochs=2,
                lr=1e-2, warmup_steps=2, device="cpu", progress=False, save_every=0, sample_prompts=["Hi?"],
                sample_max_tokens=3)
    return FinetuneConfig(**{**base, **kw})


def test_resume_equals_uninterrupted(tokenizer_ok, tmp_path):
    data, init = make_data(tmp_path, QA, val_fraction=0.3), make_init(tmp_path, n_embd=16)
    assert len(load_split(data, "train")) == 5 and len(load_split(data, "val")) == 2
    run(resume_cfg(tmp_path, data, init, "full"))  # 3 batches of <= 2 per epoch, 2 epochs: 6 steps
    run(resume_cfg(tmp_path, data, init, "split", stop_at_step=4))  # stops inside the second epoch
    with pytest.raises(UserError, match="--resume"):
        run(resume_cfg(tmp_path, data, init, "split"))
    run(resume_cfg(tmp_path, data, init, "split", resume=True))
    a = GPT.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = GPT.from_pretrained(tmp_path / "split" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    def lines(name):
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    full, split = lines("full"), lines("split")
    assert [x["loss"] for x in full if x["kind"] == "train"] == [x["loss"] for x in split if x["kind"] == "train"]
    # validation at the start and after each epoch (3 steps each)
    assert [x["step"] for x in full if x["kind"] == "eval"] == [0, 3, 6]
    assert full[-1]["val_loss"] < full[0]["val_loss"]
    # the resumed run's report still compares against the model it started from
    assert (tmp_path / "full" / "samples.md").read_text().replace("full", "split") == \
        (tmp_path / "split" / "samples.md").read_text()


def test_task_batches_and_validation_are_rank_aware():
    examples = [([1] * (3 + i), [5] * (1 + i % 3) + [50256]) for i in range(10)]
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=1, n_embd=8)).eval()
    tasks = [FinetuneTask(examples, examples[:5], 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert tasks[0].batches_per_epoch == tasks[1].batches_per_epoch == 2  # 5 batches: 4 used
    # validation batches: all five examples exactly once across the two ranks, shortest first
    val_rows = sum(x.size(0) for t in tasks for x, _ in t.val_batches)
    assert val_rows == 5
    # one rank's token-weighted val loss over everything equals the single-process value
    single = FinetuneTask(examples, examples[:5], 2, seed=1)
    with torch.no_grad():
        full = single.evaluate(model)["val_loss"]
        x, y = collate(examples[:5])
        torch.testing.assert_close(full, model.loss(x, y).item(), rtol=1e-5, atol=1e-6)
    # the CPU loss (chunked, fused) is model.loss: mean over answer tokens only
    batch = collate(examples[:4])
    fused = FinetuneTask(examples, [], 2, fused_loss=True).loss(model, batch)
    plain = FinetuneTask(examples, [], 2).loss(model, batch)
    torch.testing.assert_close(fused[0], plain[0])
    assert int(plain[1]["answer_tokens"]) == sum(len(a) for _, a in examples[:4])
    state = tasks[0].state_dict()
    x0 = tasks[0].next_batch()
    tasks[0].load_state_dict(state)
    assert torch.equal(tasks[0].next_batch()[0], x0[0])


def _ddp_worker(rank: int, world: int, port: int, cfg: FinetuneConfig) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run(cfg)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_accumulation(tokenizer_ok, tmp_path):
    """2 gloo ranks x 1 micro batch == 1 process x 2 micro batches: rank r takes batches r, r+2, ... which
    are exactly the single process's micro batches of each step."""
    import socket

    import torch.multiprocessing as mp

    data, init = make_data(tmp_path, QA[:6], val_fraction=0.3), make_init(tmp_path, n_embd=16)
    assert len(load_split(data, "train")) == 4
    single = resume_cfg(tmp_path, data, init, "single", batch_size=1, grad_accum=2, sample_prompts=[])
    run(single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = resume_cfg(tmp_path, data, init, "ddp", batch_size=1, grad_accum=1, sample_prompts=[])
    mp.spawn(_ddp_worker, args=(2, port, ddp), nprocs=2, join=True)

    def lines(name, kind, key):
        return [json.loads(x)[key] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == kind]

    assert len(lines("ddp", "train", "loss")) == 4  # 2 steps per epoch on either setup
    assert lines("ddp", "train", "loss") == pytest.approx(lines("single", "train", "loss"), abs=1e-5)
    assert lines("ddp", "eval", "val_loss") == pytest.approx(lines("single", "eval", "val_loss"), abs=1e-5)
    a = GPT.from_pretrained(tmp_path / "single" / "model").state_dict()
    b = GPT.from_pretrained(tmp_path / "ddp" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
