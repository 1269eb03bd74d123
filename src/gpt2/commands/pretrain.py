"""`gpt2 pretrain`: train GPT-2 from scratch on token shards, on one process or under torchrun.

    gpt2 pretrain --preset tiny --data data/shakespeare --out runs/tiny            # a laptop CPU, minutes
    torchrun --nproc_per_node=8 -m gpt2 pretrain --preset gpt2-124m --data data/fineweb --out runs/124m

Design decisions:
- The config is flat: every `TrainConfig` field (the shared loop's), every `GPTConfig` field and the data
  fields are one dataclass, so each is a flag (`--n-layer`, `--lr`, `--micro-batch`, ...) and a preset is
  one object. `model_config()` picks the GPTConfig fields back out.
- Batch size is given the way the seed states it, in tokens per optimizer step (`--global-batch 524288`);
  gradient accumulation follows from the micro batch, sequence length and number of processes, and must
  divide exactly (`gpt2.train.pretrain.grad_accum_steps`): a silently rounded batch would change the recipe.
- The training itself is `gpt2.train.pretrain.PretrainTask` on the shared loop (`gpt2.train.loop.train`).
- The `gpt2-124m` preset is the seed's recipe (build-nanogpt): 2^19 tokens/step, micro batch 32 x 1024,
  max LR 6e-4 with 715 warmup steps and cosine decay to 10% over 19073 steps (one epoch of FineWeb
  sample-10BT), AdamW (0.9, 0.95), weight decay 0.1, clip 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from gpt2.commands import Command
from gpt2.config import APPLY, arg
from gpt2.distributed import destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.model import GPT, PRESETS, GPTConfig
from gpt2.train.config import TrainConfig
from gpt2.train.loop import train
from gpt2.train.pretrain import PretrainTask, grad_accum_steps


@dataclass
class PretrainConfig(TrainConfig):
    # data and batch
    data: str = arg("data/fineweb", "folder of token shards (*_train_*.bin, *_val_*.bin) from gpt2 prepare")
    micro_batch: int = arg(32, "sequences per forward/backward pass on each process", minimum=1)
    seq_len: int = arg(1024, "tokens per training sequence (at most --block-size)", minimum=1)
    global_batch: int = arg(524_288, "tokens per optimizer step over all processes; must be a multiple of "
                                     "micro-batch x seq-len x processes", minimum=1)
    shuffle: bool = arg(True, "read training windows of --seq-len tokens in a seeded random order, each once per "
                              "epoch (--no-shuffle: in stream order, as the shards lie)")
    val_tokens: int = arg(10_485_760, "validation tokens per evaluation (capped at one pass over the val split)",
                          on_resume=APPLY, minimum=1, hint="use --eval-every 0 to skip evaluation")
    fused_loss: bool | None = arg(None, "chunked fused lm_head + cross-entropy (gpt2.losses); default: "
                                        "on for CPU, off for CUDA (where torch.compile fuses the loss)",
                                  on_resume=APPLY)
    hellaswag: bool = arg(False, "also measure HellaSwag accuracy (acc_norm) at each evaluation", on_resume=APPLY)
    hellaswag_source: str | None = arg(None, "local HellaSwag jsonl instead of downloading the validation set",
                                       on_resume=APPLY)
    hellaswag_limit: int | None = arg(None, "score only the first N HellaSwag examples", on_resume=APPLY, minimum=1)
    # the model (GPTConfig fields)
    block_size: int = arg(1024, "model: context window (learned positions)", minimum=1)
    vocab_size: int = arg(50257, "model: vocabulary size (GPT-2 BPE)", minimum=1)
    n_layer: int = arg(12, "model: transformer blocks", minimum=1)
    n_head: int = arg(12, "model: attention heads", minimum=1)
    n_embd: int = arg(768, "model: embedding width", minimum=1)
    dropout: float = arg(0.0, "model: dropout probability (0 for pretraining)")
    layer_norm_epsilon: float = arg(1e-5, "model: LayerNorm epsilon")
    vocab_pad_multiple: int = arg(64, "model: pad the embedding rows to this multiple (GPU speed; outputs "
                                      "unchanged)", minimum=1)

    def validate(self) -> None:
        super().validate()  # with each field's `minimum` (gpt2.config.check_values)
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not self.layer_norm_epsilon > 0:
            raise UserError(f"--layer-norm-epsilon must be > 0 (got {self.layer_norm_epsilon})")
        if self.seq_len > self.block_size:
            raise UserError(f"--seq-len {self.seq_len} exceeds --block-size {self.block_size}")

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})


def _model_fields(name: str) -> dict:
    return {f.name: getattr(PRESETS[name], f.name) for f in fields(GPTConfig)}


def _fineweb(model: str, lr: float, micro_batch: int, global_batch: int = 524_288, **kw) -> PretrainConfig:
    """The seed's recipe on FineWeb sample-10BT for a GPT-2 size: one epoch (10B tokens), warmup over 375M tokens
    (GPT-3's), cosine to lr / 10, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0."""
    steps = round(10e9 / global_batch)
    return PretrainConfig(
        out=f"runs/{model}", data="data/fineweb", max_steps=steps, warmup_steps=round(375e6 / global_batch), lr=lr,
        min_lr=round(lr / 10, 12), weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, micro_batch=micro_batch,
        seq_len=1024, global_batch=global_batch, val_tokens=10_485_760,
        **{**_model_fields(model.removesuffix("-124m")), **kw})


PRETRAIN_PRESETS = {
    "gpt2-124m": _fineweb("gpt2-124m", 6e-4, 32, eval_every=250, save_every=1000),
    # The larger GPT-2 sizes on the same recipe, with the batch and peak LR of the GPT-3 paper's model of the
    # nearest size (Brown et al. 2020, table 2.1: Medium 350M 0.5M tokens 3.0e-4, Large 760M 0.5M 2.5e-4, XL 1.3B
    # 1M 2.0e-4). Micro batches fit an 80 GB card under DDP in bf16 by the memory plan (scripts/gpu_settings.py);
    # smaller cards: --micro-batch, --activation-checkpointing or --parallel fsdp.
    "gpt2-medium": _fineweb("gpt2-medium", 3e-4, 32, eval_every=250, save_every=1000),
    "gpt2-large": _fineweb("gpt2-large", 2.5e-4, 16, eval_every=250, save_every=1000),
    "gpt2-xl": _fineweb("gpt2-xl", 2e-4, 8, global_batch=1_048_576, eval_every=125, save_every=500),
    # Minutes on a laptop CPU: a 4-layer, 128-wide model (most of its 6.6M parameters are the embedding)
    # on a small corpus such as tiny Shakespeare.
    "tiny": PretrainConfig(
        out="runs/tiny", data="data/shakespeare", max_steps=300, warmup_steps=30, lr=2e-3, min_lr=2e-4,
        weight_decay=0.1, eval_every=50, save_every=100, micro_batch=8, seq_len=128, global_batch=2048,
        val_tokens=16_384, **_model_fields("tiny")),
}


def run(cfg: PretrainConfig):
    cfg.validate()
    dist = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        model_cfg = cfg.model_config()
        accum = grad_accum_steps(cfg.global_batch, cfg.micro_batch, cfg.seq_len, dist.world_size)
        task = PretrainTask(cfg, dist)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = GPT(model_cfg)
        if dist.is_main:
            epoch = task.loader.num_tokens / cfg.global_batch
            print(f"pretrain: {model.num_params() / 1e6:.1f}M parameters on {dist.world_size} x {dist.device}; "
                  f"{cfg.global_batch:,} tokens/step = {cfg.micro_batch} x {cfg.seq_len} x {dist.world_size} "
                  f"process(es) x {accum} accumulation steps; {cfg.max_steps} steps "
                  f"({cfg.max_steps / epoch:.2f} epochs of {task.loader.num_tokens:,} train tokens)", flush=True)
        result = train(model, task, cfg, accum, dist=dist, run_config=cfg, command=COMMAND.name)
        if dist.is_main and cfg.save_final:
            print(f"pretrain: {result.step} steps done; model in {result.run_dir / 'model'} "
                  f"(gpt2 generate --model {result.run_dir / 'model'} \"...\")", flush=True)
        elif dist.is_main:
            print(f"pretrain: {result.step} steps done; --no-save-final: no final checkpoint", flush=True)
        return result
    finally:
        destroy_distributed()


COMMAND = Command("pretrain", "pretrain GPT-2 on token shards (one process or torchrun)", PretrainConfig, run,
                  presets=PRETRAIN_PRESETS)
