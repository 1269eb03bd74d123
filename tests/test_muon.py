"""`--optimizer muon`: Muon for the 2-D weights inside the blocks and AdamW for the rest, each on its own LR of the
same schedule, saved and resumed exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_train_loop import ListTask, cfg_for, losses, make_data, make_model

from gpt2.checkpoint import load_checkpoint
from gpt2.errors import UserError
from gpt2.train.loop import train
from gpt2.train.optim import CombinedOptimizer, apply_lr, build_optimizer, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")




def test_muon_takes_the_block_matrices_and_adamw_the_rest(tmp_path):
    model = make_model()
    cfg = cfg_for(tmp_path, optimizer="muon", muon_lr=0.05)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "transformer.wte.weight" in in_adamw and "transformer.h.0.ln_1.weight" in in_adamw  # embeddings/head, LN
    assert not in_adamw & set(in_muon)
    lr = apply_lr(opt, 5, cfg)
    assert lr == lr_at(5, cfg) and muon.param_groups[0]["lr"] == pytest.approx(lr * 0.05 / cfg.lr)
    assert all(g["lr"] == lr for g in adamw.param_groups)
    assert isinstance(build_optimizer(model, replace(cfg, optimizer="adamw"), torch.device("cpu")),
                      torch.optim.AdamW)  # the default is the seed's AdamW alone


def test_muon_trains_and_resumes_exactly(tmp_path):
    cfg = cfg_for(tmp_path / "straight", optimizer="muon", muon_lr=0.02)
    train(make_model(dropout=0.1), ListTask(make_data()), cfg, grad_accum_steps=2)
    got = losses(tmp_path / "straight")
    assert got[-1] < got[0] - 0.05  # it learns
    part = replace(cfg, out=str(tmp_path / "part"), stop_at_step=3)
    train(make_model(dropout=0.1), ListTask(make_data()), part, grad_accum_steps=2)
    train(make_model(seed=4, dropout=0.1), ListTask(make_data()), replace(part, stop_at_step=None, resume=True),
          grad_accum_steps=2)
    assert losses(tmp_path / "part") == got
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert len(a["optimizer"]["optimizers"]) == 2  # each optimizer's state is saved


def test_muon_with_fsdp_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--optimizer muon needs each weight matrix whole"):
        build_optimizer(make_model(), cfg_for(tmp_path, optimizer="muon"), torch.device("cpu"), sharded=True)
