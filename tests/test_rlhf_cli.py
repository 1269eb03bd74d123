"""The commands end to end on the shared loop: `gpt2 prepare hh`, `gpt2 dpo`, `gpt2 reward`, `gpt2 ppo`.

Real HH pairs, shortened and relabelled into a compact vocabulary (see test_rlhf_train.py) so that a tiny
model runs a few steps in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_data import one_thread, pair_stage_inputs  # noqa: F401 (one_thread: autouse)

from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.model import GPT
from gpt2.rlhf.heads import VALUE_HEAD, RewardModel


@pytest.fixture
def setup(tmp_path, shared_data, tokenizer_ok):
    data, sft = pair_stage_inputs(tmp_path, shared_data, n=12, n_train=8)
    return tmp_path, data, sft


def _records(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


COMMON = ["--device", "cpu", "--no-progress", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0"]


def test_prepare_hh_command(tmp_path, shared_data, tokenizer_ok, capsys):
    out = tmp_path / "hh"
    main(["prepare", "hh", "--source", str(shared_data / "hh_rlhf_harmless_test.jsonl.gz"), "--out", str(out),
          "--max-len", "256", "--limit", "200", "--val-fraction", "0.1"])
    meta = json.loads((out / "meta.json").read_text())
    train = (out / "train.jsonl").read_text().splitlines()
    val = (out / "val.jsonl").read_text().splitlines()
    assert meta["read"] == 200 and meta["train"] == len(train) and meta["val"] == len(val) and val
    skipped = sum(v for k, v in meta.items() if k in ("too_long", "prompt_mismatch", "no_final_answer",
                                                      "identical_answers", "not_a_dialogue", "missing_field"))
    assert len(train) + len(val) + skipped == 200 and meta["truncated"] > 0
    assert all(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= 256
               for p in map(json.loads, train + val))
    assert "truncated" in capsys.readouterr().out


def test_prepare_hh_reports_a_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "hh", "--source", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "none.jsonl" in capsys.readouterr().err


def test_dpo_command(setup):
    tmp, data, sft = setup
    out = tmp / "dpo"
    main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(out), "--epochs", "3", *COMMON])
    train, evals = _records(out, "train"), _records(out, "eval")
    assert len(train) == 6  # 8 pairs / batch 4 = 2 steps per epoch, 3 epochs
    assert {"loss", "reward_margin", "pref_acc", "kl", "reward_chosen", "reward_rejected"} <= train[0].keys()
    assert [e["step"] for e in evals] == [0, 2, 4, 6]  # once an epoch
    assert evals[0]["val_loss"] == pytest.approx(0.6931472, abs=1e-5) and "pref_acc" in evals[-1]
    assert train[-1]["kl"] > 0
    assert (out / "loss.png").is_file() and (out / "checkpoint.pt").is_file()
    GPT.from_pretrained(out / "model")  # the policy is an HF checkpoint


def test_dpo_command_with_an_nll_term(setup):
    tmp, data, sft = setup
    out = tmp / "rpo"
    main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(out), "--max-steps", "2", "--nll-coef", "1",
          *COMMON])
    train = _records(out, "train")
    assert len(train) == 2 and all(r["nll"] > 0 for r in train)
    assert train[0]["loss"] > train[0]["nll"]  # the DPO term (ln 2 at the start) plus the NLL


def test_max_steps_wins_over_epochs_in_every_command(setup, capsys):
    """One rule (`run_length`): --max-steps when given, else --epochs x steps per epoch; the same help."""
    tmp, data, sft = setup
    for cmd in ("dpo", "reward"):
        out = tmp / f"{cmd}-steps"
        main([cmd, "--model", str(sft), "--data", str(data), "--out", str(out), "--epochs", "3", "--max-steps", "1",
              "--eval-every", "0", *COMMON])
        assert len(_records(out, "train")) == 1  # not 3 epochs x 2 steps
    helps = []
    for cmd in ("finetune", "dpo", "reward"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        helps.append(" ".join(capsys.readouterr().out.split()))
    for text in helps:
        assert "when given it wins over --epochs" in text and "sets --max-steps when that is not given" in text


def test_dpo_resume_matches_an_uninterrupted_run(setup):
    """Stopping and resuming gives the same weights: the reference is rebuilt from --model (the SFT start,
    not the resumed policy) and the data position comes back with the checkpoint."""
    tmp, data, sft = setup
    args = ["dpo", "--model", str(sft), "--data", str(data), "--max-steps", "4",
            "--eval-every", "0", *COMMON]
    main([*args, "--out", str(tmp / "straight")])
    main([*args, "--out", str(tmp / "split"), "--stop-at-step", "2"])
    main([*args, "--out", str(tmp / "split"), "--resume"])
    straight, split = GPT.from_pretrained(tmp / "straight" / "model"), GPT.from_pretrained(tmp / "split" / "model")
    for (name, a), b in zip(straight.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name
    losses = lambda run: [r["loss"] for r in _records(tmp / run, "train")]  # noqa: E731
    assert losses("straight") == losses("split")


def test_reward_command(setup):
    tmp, data, sft = setup
    out = tmp / "reward"
    main(["reward", "--model", str(sft), "--data", str(data), "--out", str(out), "--epochs", "2", *COMMON])
    assert len(_records(out, "train")) == 4 and "pref_acc" in _records(out, "eval")[-1]
    rm = RewardModel.from_pretrained(out)  # run dir: backbone + reward_head.safetensors under model/
    assert (out / "model" / "reward_head.safetensors").is_file() and rm.config.vocab_size < 1000
    assert (out / "model" / "tokenizer.json").is_file()  # a stage's model folder gets the tokenizer files too


def test_reward_command_with_the_likelihood_score_feeds_ppo(setup):
    tmp, data, sft = setup
    out = tmp / "reward-lik"
    main(["reward", "--model", str(sft), "--data", str(data), "--out", str(out), "--max-steps", "2",
          "--score", "likelihood", *COMMON])
    assert json.loads((out / "model" / "reward_model.json").read_text()) == {"score": "likelihood"}
    assert not (out / "model" / "reward_head.safetensors").exists()
    ppo = tmp / "ppo-lik"
    main(["ppo", "--model", str(sft), "--reward-model", str(out), "--data", str(data), "--out", str(ppo),
          "--max-new-tokens", "4", "--minibatch-size", "2", "--max-steps", "1", "--eval-prompts", "2", *COMMON])
    score = _records(ppo, "eval")[-1]["score"]
    assert score < 0  # a summed log-probability


def ppo_args(setup, out, *extra):
    """`gpt2 ppo` arguments for the tiny SFT model, with a reward model made from it (once)."""
    tmp, data, sft = setup
    if not (tmp / "rm").is_dir():
        RewardModel(GPT.from_pretrained(sft)).save_pretrained(tmp / "rm")
    return ["ppo", "--model", str(sft), "--reward-model", str(tmp / "rm"), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "4", "--minibatch-size", "2", *extra, *COMMON]


def test_ppo_command_and_resume(setup):
    tmp, data, sft = setup
    out = tmp / "ppo"
    args = ppo_args(setup, out, "--ppo-epochs", "2", "--eval-every", "1", "--eval-prompts", "2")
    main([*args, "--max-steps", "4", "--stop-at-step", "2"])
    assert [r["step"] for r in _records(out, "train")] == [1, 2]
    assert {"score", "kl", "policy_loss", "value_loss", "clip_frac", "loss", "lr"} <= _records(out, "train")[0].keys()
    assert (out / "model" / VALUE_HEAD).is_file()
    GPT.from_pretrained(out / "model")
    with pytest.raises(SystemExit):  # an existing run is never overwritten silently
        main([*args, "--max-steps", "4"])
    main([*args, "--max-steps", "4", "--resume", "--max-minutes", "1e-9"])  # out of time after one iteration
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    main([*args, "--max-steps", "4", "--resume"])
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in _records(out, "eval")] == [0, 1, 2, 3, 4]


def test_ppo_evaluates_where_an_early_stop_ends_the_session(setup):
    """--max-minutes ends the run after one iteration, between two --eval-every points: it is evaluated there."""
    tmp, data, sft = setup
    out = tmp / "ppo-early"
    args = ppo_args(setup, out, "--ppo-epochs", "1", "--eval-every", "10", "--eval-prompts", "2")
    main([*args, "--max-steps", "20", "--max-minutes", "1e-9"])
    assert [r["step"] for r in _records(out, "train")] == [1]
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [0, 1] and {"score", "kl"} <= evals[1].keys()
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 1 and ckpt["elapsed"] > 0  # resumable, with its training time


def test_ppo_sigterm_saves_then_resumes(setup, monkeypatch):
    """SIGTERM mid-run: PPO finishes the iteration, saves it, exits 143; --resume completes the run."""
    import os
    import signal

    import gpt2.rlhf.ppo as ppo

    tmp, data, sft = setup
    out = tmp / "ppo-sig"
    args = ppo_args(setup, out, "--ppo-epochs", "1", "--eval-every", "0", "--max-steps", "3")
    real_rollout, calls = ppo.rollout, []

    def rollout_then_sigterm(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # during iteration 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rollout(*a, **kw)

    monkeypatch.setattr(ppo, "rollout", rollout_then_sigterm)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 143
    assert [r["step"] for r in _records(out, "train")] == [1, 2]
    assert load_checkpoint(out)["step"] == 2
    main([*args, "--resume"])
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
