"""The shared training loop: DDP equivalence, exact resume, LR schedule, overfitting, metrics/PNG, NaN stop,
SIGTERM save. Models are tiny (small vocab) so the whole file runs in seconds on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.train.loop import NonFiniteLossError, TrainConfig, lr_at, run_length, train
from gpt2.train.task import Task

pytestmark = pytest.mark.usefixtures("one_thread")



MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=64)
T = 16


class ListTask(Task):
    """Micro batches from a fixed tensor of (num_micro, B, T+1) token windows. With several ranks, micro batch
    number p of rank r is global batch p * world + r, so N ranks x k micro-steps cover exactly the batches one
    process sees with N*k micro-steps."""

    def __init__(self, data: torch.Tensor, rank: int = 0, world: int = 1):
        self.data, self.rank, self.world, self.pos = data, rank, world, 0

    def next_batch(self):
        chunk = self.data[(self.pos * self.world + self.rank) % len(self.data)]
        self.pos += 1
        return chunk[:, :-1], chunk[:, 1:]

    def loss(self, model, batch):
        x, y = batch
        loss = model.loss(x, y)
        return loss, {"loss_x2": loss.detach() * 2}

    def evaluate(self, model):
        x, y = self.data[0][:, :-1], self.data[0][:, 1:]
        return {"val_loss": model.loss(x, y).item()}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make_data(num_micro=8, batch=2, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL.vocab_size, (num_micro, batch, T + 1), generator=g)


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(replace(MODEL, **overrides))


def cfg_for(out: Path, **kw) -> TrainConfig:
    """The loop's tests run in float32 unless they say otherwise: their claims (accumulation, DDP and FSDP equal
    one process, to 1e-5) are about the loop's arithmetic, and `--dtype auto` trains in bfloat16 on a CPU with
    native bf16 (tests/test_cpu_bf16.py), whose rounding would blur them on such a machine."""
    base = dict(out=str(out), max_steps=6, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, device="cpu",
                compile=False, progress=False, dtype="float32")
    return TrainConfig(**{**base, **kw})


def read_lines(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


def losses(run_dir: Path) -> list[float]:
    return [x["loss"] for x in read_lines(run_dir, "train")]


# --------------------------------------------------------------------------- LR schedule


def test_lr_schedule_warmup_peak_cosine_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # first step already moves
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # peak right after warmup
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine: (max + min) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert min(decay) >= 0.1
    assert lr_at(110, replace(cfg, min_lr=None)) == pytest.approx(0.1 * cfg.lr)  # default floor: lr / 10


# --------------------------------------------------------------------------- resume and stop_at_step


def test_run_length_rule():
    assert run_length(None, 2, 10) == 20 and run_length(None, 0.25, 10) == 3 and run_length(None, 0.01, 10) == 1
    assert run_length(7, 2, 10) == 7  # --max-steps wins whenever it is given
    with pytest.raises(UserError, match="--epochs must be > 0"):
        run_length(None, 0, 10)


def test_resume_is_exact(tmp_path):
    data = make_data()
    cfg = cfg_for(tmp_path / "full", eval_every=2)
    train(make_model(dropout=0.1), ListTask(data), cfg, grad_accum_steps=2)  # dropout: RNG state matters
    full = load_checkpoint(tmp_path / "full")

    part = replace(cfg, out=str(tmp_path / "part"), stop_at_step=3)
    res = train(make_model(dropout=0.1), ListTask(data), part, grad_accum_steps=2)
    assert res.step == 3 and load_checkpoint(tmp_path / "part")["step"] == 3
    with pytest.raises(Exception, match="already holds a checkpoint"):
        train(make_model(dropout=0.1), ListTask(data), replace(part, stop_at_step=None), grad_accum_steps=2)
    res = train(make_model(seed=99, dropout=0.1), ListTask(data), replace(part, stop_at_step=None, resume=True),
                grad_accum_steps=2)
    assert res.step == 6

    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert [x["step"] for x in read_lines(tmp_path / "part", "train")] == [1, 2, 3, 4, 5, 6]
    part_evals = read_lines(tmp_path / "part", "eval")
    assert [x["step"] for x in part_evals] == [0, 2, 3, 4, 6]  # + one where the first session stopped
    assert [x for x in part_evals if x["step"] != 3] == read_lines(tmp_path / "full", "eval")
    resumed = load_checkpoint(tmp_path / "part")
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert resumed["ranks"][0]["task"] == {"pos": 12}
    # the HF export and load_model see the same weights
    for m in (load_model(tmp_path / "part"), load_model(tmp_path / "part" / "checkpoint.pt")):
        assert torch.equal(m.transformer.h[1].mlp.c_fc.weight, full["model"]["transformer.h.1.mlp.c_fc.weight"])


# --------------------------------------------------------------------------- learning at all


def test_tiny_model_overfits_one_batch(tmp_path):
    data = make_data(num_micro=1, batch=4)
    cfg = cfg_for(tmp_path, max_steps=50, lr=2e-2, warmup_steps=5, min_lr=2e-3, weight_decay=0.0)
    res = train(make_model(), ListTask(data), cfg)
    first, last = losses(tmp_path)[0], res.loss
    assert first == pytest.approx(math.log(MODEL.vocab_size), abs=0.3)  # starts at chance
    assert last < 0.05, last


# --------------------------------------------------------------------------- observability


def test_metrics_jsonl_and_png(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=4, eval_every=2, save_every=2)
    train(make_model(), ListTask(make_data()), cfg, grad_accum_steps=2)
    train_lines, eval_lines = read_lines(tmp_path, "train"), read_lines(tmp_path, "eval")
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    for x in train_lines:
        assert set(x) == {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time", "loss_x2"}
        assert x["mfu"] is None  # CPU: no known peak
        assert x["loss_x2"] == pytest.approx(2 * x["loss"])  # task metrics are averaged like the loss
        assert x["tokens_per_s"] > 0 and x["grad_norm"] > 0
    assert [x["lr"] for x in train_lines] == [lr_at(s, cfg) for s in range(4)]
    assert [(x["step"], set(x)) for x in eval_lines] == [(s, {"kind", "step", "val_loss"}) for s in (0, 2, 4)]
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 4
    assert (tmp_path / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- failures


class NoEvalTask(ListTask):
    def evaluate(self, model):
        return {}


def test_run_without_eval_metrics_still_trains(tmp_path):
    """A stage with nothing to evaluate (no validation split) must not die drawing an empty graph."""
    res = train(make_model(), NoEvalTask(make_data()), cfg_for(tmp_path, eval_every=2), grad_accum_steps=1)
    assert res.step == 6 and len(read_lines(tmp_path, "train")) == 6


class NaNTask(ListTask):
    def __init__(self, data, nan_at_step: int):
        super().__init__(data)
        self.nan_at_step = nan_at_step

    def loss(self, model, batch):
        loss, m = super().loss(model, batch)
        return (loss * float("nan") if self.pos >= self.nan_at_step else loss), m


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan.*last good checkpoint \(step 2\)"):
        train(make_model(), NaNTask(make_data(), nan_at_step=3), cfg)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [x["step"] for x in read_lines(tmp_path, "train")] == [1, 2]


class SigtermTask(ListTask):
    def next_batch(self):
        if self.pos == 2:  # during step 3 (micro-batch 0 of it): as if a scheduler sent SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch()


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    with pytest.raises(SystemExit) as exc:
        train(make_model(), SigtermTask(make_data()), cfg_for(tmp_path))
    assert exc.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path)["step"] == 3  # the step in flight finished, then it saved
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, grad_accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpt2.distributed import destroy_distributed

    try:
        train(make_model(), ListTask(make_data(), rank, world), cfg_for(Path(out)), grad_accum_steps=grad_accum)
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------- token-weighted losses

# One global batch of 8 rows with very uneven numbers of valid targets, cut into 4 uneven micro batches.
KEEP = [2, 16, 5, 9, 1, 12, 3, 7]  # valid targets per row; the rest of each row is -100
PARTS = [(0, 1), (1, 5), (5, 6), (6, 8)]  # row ranges of the micro batches: 2, 37, 1 and 10 targets


def masked_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, MODEL.vocab_size, (len(KEEP), T), generator=g)
    y = torch.randint(0, MODEL.vocab_size, (len(KEEP), T), generator=g)
    for row, keep in enumerate(KEEP):
        y[row, keep:] = -100
    return x, y


class MaskedTask(ListTask):
    """Micro batch p of rank r is part p * world + r; the loss is a mean over valid targets."""

    def __init__(self, rank: int = 0, world: int = 1):
        x, y = masked_batch()
        super().__init__([(x[a:b], y[a:b]) for a, b in PARTS], rank, world)

    def next_batch(self):
        part = self.data[(self.pos * self.world + self.rank) % len(self.data)]
        self.pos += 1
        return part

    def loss_weight(self, batch):
        return int((batch[1] != -100).sum())


def train_capturing_grads(task, out: Path, grad_accum: int, monkeypatch=None) -> list[torch.Tensor]:
    """One step of the loop; the gradients the optimizer is about to apply."""
    import gpt2.train.loop as loop

    grads, real = [], loop.build_optimizer

    def build(model, cfg, device, **kw):
        opt = real(model, cfg, device, **kw)
        opt.register_step_pre_hook(lambda o, a, k: grads.extend(p.grad.clone() for p in model.parameters()))
        return opt

    if monkeypatch is not None:
        monkeypatch.setattr(loop, "build_optimizer", build)
    else:  # a spawned worker: nothing to restore
        loop.build_optimizer = build
    train(make_model(), task, cfg_for(out, max_steps=1, warmup_steps=1, grad_clip=0.0), grad_accum_steps=grad_accum)
    return grads


def reference_grads(weighted: bool = True) -> list[torch.Tensor]:
    """The gradient of the mean loss over every valid target of the global batch, in one pass (or, for
    contrast, of the mean of the micro batches' means)."""
    model, (x, y) = make_model(), masked_batch()
    if weighted:
        model.loss(x, y).backward()
    else:
        sum(model.loss(x[a:b], y[a:b]) for a, b in PARTS).div(len(PARTS)).backward()
    return [p.grad for p in model.parameters()]


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    # float32: the same terms summed in other groupings differ by a few ulps of the largest partial sums
    # (|grad| <~ 1, eps 1.2e-7), far below the gap to the unweighted gradient checked in the test.
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_uneven_micro_batches_give_the_gradient_of_the_global_token_mean(tmp_path, monkeypatch):
    want = reference_grads()
    assert_grads_close(train_capturing_grads(MaskedTask(), tmp_path / "one", 4, monkeypatch), want)
    # not trivially: the mean of the micro batches' means is a different gradient
    unweighted = reference_grads(weighted=False)
    assert max((u - w).abs().max().item() for u, w in zip(unweighted, want)) > 1e-2


def _weighted_ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpt2.distributed import destroy_distributed

    try:
        grads = train_capturing_grads(MaskedTask(rank, world), Path(out), 2)
        torch.save(grads, Path(out) / f"grads{rank}.pt")
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_uneven_ranks_give_the_gradient_of_the_global_token_mean(tmp_path):
    """2 gloo ranks x 2 micro batches holding 3 and 47 valid targets: DDP's average over ranks is undone."""
    mp.spawn(_weighted_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    want = reference_grads()
    for rank in range(2):
        assert_grads_close(torch.load(tmp_path / f"grads{rank}.pt"), want)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo ranks x 2 micro-steps == 1 process x 4 micro-steps: same per-step losses and final weights."""
    single = tmp_path / "single"
    train(make_model(), ListTask(make_data()), cfg_for(single), grad_accum_steps=4)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), 2), nprocs=2, join=True)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), abs=1e-5)
    assert [x["loss_x2"] for x in read_lines(tmp_path / "ddp", "train")] == pytest.approx(
        [2 * x for x in losses(single)], abs=1e-5)
    a, b = load_checkpoint(single), load_checkpoint(tmp_path / "ddp")
    assert b["world_size"] == 2 and [r["task"] for r in b["ranks"]] == [{"pos": 12}, {"pos": 12}]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-4)
    # and not trivially: training moved the weights
    assert not torch.allclose(a["model"]["transformer.h.0.attn.c_attn.weight"],
                              make_model().state_dict()["transformer.h.0.attn.c_attn.weight"])
