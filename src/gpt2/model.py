"""GPT-2: the model, its config, and Hugging Face checkpoint I/O.

Design decisions:
- Parameter names *and layouts* follow the OpenAI/Hugging Face checkpoint (`transformer.h.0.attn.c_attn.weight`,
  ...), so loading is a plain copy. The block projections store their weight as (in, out) (`Projection`, what HF
  calls Conv1D) rather than `nn.Linear`'s (out, in): for the few-row matmuls of decoding, CPU BLAS runs
  `x @ W` with W (in, out) faster than `x @ W.T` (measured: docs/benchmarks.md), and GPUs do not care.
- The token embedding is padded to a multiple of `vocab_pad_multiple` (50257 -> 50304) because matmuls with
  a round dimension are markedly faster on GPUs. The padding rows are never an input (token ids < 50257) and
  their logits are sliced off, so outputs are unchanged; `num_params()` does not count them and checkpoints
  are written without them.
- The model knows nothing of data, tokenizers or distributed training: `save_pretrained` writes its config and
  weights only, and whoever exports a model folder adds the tokenizer files (`gpt2.export`). It exposes
  `forward` (logits), `hidden_states` (the final LayerNorm output, for reward/value heads) and `logits`, and its
  parts as named pieces: attention's weightless middle (`CausalSelfAttention.attend`) and a block's second half
  (`Block.mlp_residual`), which the compiled decoder (`gpt2.decode.compiled`) runs between. Beyond the
  checkpoint's own layout it holds nothing that exists for decoding speed: incremental decoding passes a cache
  through one narrow interface (`KVStore`: attention stores its new keys/values and reads all of them back) and
  explicit positions and attention masks, which batched generation with padding needs. The cache and everything
  else about decoding live in `gpt2.decode`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.errors import UserError, as_json, json_kind
from gpt2.io import load_safetensors, save_safetensors, write_json_atomic


@dataclass
class GPTConfig:
    block_size: int = 1024  # context window (number of learned positions)
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    vocab_pad_multiple: int = 64  # embedding rows are padded to this multiple (speed); outputs unchanged

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.vocab_pad_multiple)
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


# The four OpenAI sizes, plus a model small enough to train on a laptop CPU in minutes.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128),
}
PRESETS["gpt2-124m"] = PRESETS["gpt2"]


class KVStore(Protocol):
    """The one interface through which attention reads a key/value cache (the decoder owns the cache).

    `update(layer, k, v)` stores the keys and values (B, nh, T, hs) of this forward's T new tokens for
    `layer` and returns every key and value the queries may attend to, each (B, nh, S, hs). Which of the S
    slots a query may see is the `attn_mask` passed to the forward alongside the cache."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout, skipped entirely when off (p = 0 or evaluation): decoding runs dozens per token."""
    return F.dropout(x, p) if p > 0 else x


def additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True = may attend) as SDPA's additive form: 0 where attending, -inf elsewhere.
    Made once per forward rather than inside SDPA in every layer; other masks are returned as they are."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))


class Projection(nn.Module):
    """Affine map `x @ weight + bias` with weight stored (in, out): OpenAI's checkpoint layout (HF's Conv1D)."""

    def __init__(self, n_in: int, n_out: int, residual_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.residual_scale = residual_scale  # GPT-2 init: residual projections scaled by 1/sqrt(2 * n_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (B*T, out)
        return y.view(*x.shape[:-1], y.size(-1))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = Projection(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Projection(config.n_embd, config.n_embd, residual_scale=True)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVStore | None) -> torch.Tensor:
        y = self.attend(self.c_attn(x), attn_mask, cache)
        return _dropout(self.c_proj(y), self.dropout if self.training else 0.0)

    def attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVStore | None) -> torch.Tensor:
        """The weightless middle of attention: queries, keys and values (B, T, 3 * C), as `c_attn` makes them,
        -> the heads' outputs side by side (B, T, C), before `c_proj`. (Separate so that the decoder can run the
        weight-bearing parts between two attentions as one compiled piece: `gpt2.decode.compiled`.)"""
        B, T, C3 = qkv.size()
        C = C3 // 3
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # each (B, nh, S, hs)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Fast path (training, unpadded input): flash/efficient kernels with SDPA's own causal mask. It
            # aligns queries with the *first* keys, so with a cache it is right for a first block (as many keys
            # as queries) and a single new token sees every key; otherwise the decoder passes a mask.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or T > 1, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble heads side by side


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Projection(config.n_embd, 4 * config.n_embd)
        self.c_proj = Projection(4 * config.n_embd, config.n_embd, residual_scale=True)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return _dropout(self.c_proj(x), self.dropout if self.training else 0.0)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVStore | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return self.mlp_residual(x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half, x + mlp(ln(x))."""
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, (nn.Linear, Projection)):
            if getattr(module, "residual_scale", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once, without the vocab padding rows (they are never used).
        With `non_embedding`, position embeddings are excluded too (the count used for FLOP estimates)."""
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * hs * T."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def hidden_states(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        """Final-LayerNorm activations (B, T, n_embd).

        idx: (B, T) token ids. position_ids: (B or 1, T), default 0..T-1.
        attn_mask: (B, 1, T, S) boolean (True = may attend) or additive float; None = plain causal over the
        T tokens. cache: where attention stores and reads keys/values (`KVStore`); then `attn_mask` says
        which of the cache's S slots each query sees. The decoder (`gpt2.decode`) owns both.
        """
        B, T = idx.size()
        if position_ids is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)[None]  # (1, T)
        tok = self.transformer.wte(idx)  # (B, T, C)
        pos = self.transformer.wpe(position_ids)  # (B or 1, T, C)
        x = _dropout(tok + pos, self.config.dropout if self.training else 0.0)
        attn_mask = additive_mask(attn_mask, x.dtype)
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVStore | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size); the padded vocabulary columns are sliced off."""
        return self.logits(self.hidden_states(idx, position_ids, attn_mask, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (..., n_embd) to vocabulary logits (..., vocab_size). Decoding calls this on
        the last position only: the 50304-wide head over a whole prompt would cost more than the prompt."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; target -100 is ignored (prompt and padding positions)."""
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **overrides) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint: a local directory with `config.json` and
        `model.safetensors` (or `pytorch_model.bin`), or a hub name such as "gpt2" (needs the network)."""
        path = resolve_checkpoint_dir(name_or_dir)
        config = replace(_config_from_hf(path / "config.json"), **overrides)
        model = cls(config)
        file, weights = _read_hf_weights(path)
        model.load_hf_state_dict(weights, source=str(file))
        return model

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy HF-named weights (`source` names their file in errors) into this model. Every tensor's shape is
        checked against the config first, the token embedding's included: it holds exactly `vocab_size` rows
        (HF files hold no padding, and `hf_state_dict` writes none), so a file for another vocabulary is
        refused rather than cut or filled with zero rows that would make nonsense."""
        names = {_own_name(k): k for k in sd}  # our name -> the file's (which may lack "transformer.")
        sd = {_own_name(k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        sd.pop("lm_head.weight", None)  # tied to wte
        own = self.state_dict()
        expected = {k for k in own if k != "lm_head.weight"}
        missing, unexpected = expected - sd.keys(), sd.keys() - expected
        if missing or unexpected:
            raise UserError(f"{source} does not match the model: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
        for k, v in sd.items():
            want = (self.config.vocab_size, self.config.n_embd) if k == "transformer.wte.weight" else own[k].shape
            if tuple(v.shape) != tuple(want):
                raise UserError(f"{source}: tensor {names[k]} has shape {tuple(v.shape)}, but the model's config "
                                f"(config.json) needs {tuple(want)}")
        with torch.no_grad():
            for k, v in sd.items():
                target = own[k]
                if k == "transformer.wte.weight":  # the padding rows are never read: zeros
                    target[: v.size(0)].copy_(v)
                    target[v.size(0):].zero_()
                else:
                    target.copy_(v)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under HF names and layouts (no vocab padding; lm_head omitted, it is tied to wte)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            v = v.detach()
            if k == "transformer.wte.weight":
                v = v[: self.config.vocab_size]
            out[k] = v.contiguous().cpu().clone()
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` that `transformers.GPT2LMHeadModel` loads (the tokenizer
        files of a model folder: `gpt2.export.save_model_folder`). Files are written under temporary names and
        renamed, so a crash never leaves half a checkpoint."""
        out = Path(directory)
        save_safetensors(self.hf_state_dict(), out / "model.safetensors")  # with a sha256, checked on load
        write_json_atomic(out / "config.json", _config_to_hf(self.config))


def _config_to_hf(config: GPTConfig) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "gpt2_scratch": {"vocab_pad_multiple": config.vocab_pad_multiple},
    }


def _own_name(key: str) -> str:
    """A weight's name in a HF file as our state dict names it (files saved from `GPT2Model` lack "transformer.")."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 1  # (bool is an int subclass: true is not a count)


def _is_epsilon(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0


def _is_probability(v: object) -> bool:
    return type(v) in (int, float) and 0 <= v < 1


# What each GPTConfig field may hold, and how an error says it: the rules `_config_from_hf` checks a file by.
_FIELD_RULES = {
    "block_size": (_is_count, "an integer >= 1"),
    "vocab_size": (_is_count, "an integer >= 1"),
    "n_layer": (_is_count, "an integer >= 1"),
    "n_head": (_is_count, "an integer >= 1"),
    "n_embd": (_is_count, "an integer >= 1"),
    "vocab_pad_multiple": (_is_count, "an integer >= 1"),
    "layer_norm_epsilon": (_is_epsilon, "a finite number > 0"),
    "dropout": (_is_probability, "a number in [0, 1)"),
}
# config.json's names of GPTConfig's fields, and Hugging Face's defaults for those a file leaves out
_HF_FIELDS = {"n_positions": ("block_size", 1024), "vocab_size": ("vocab_size", 50257), "n_layer": ("n_layer", 12),
              "n_head": ("n_head", 12), "n_embd": ("n_embd", 768), "layer_norm_epsilon": ("layer_norm_epsilon", 1e-5)}


def _config_from_hf(path: Path) -> GPTConfig:
    """The GPTConfig of a HF `config.json`, every field checked (`_FIELD_RULES`): a wrong type or range is a
    UserError naming the file and the field, never a crash while the model is built."""
    hf = _read_json_object(path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type {as_json(hf.get('model_type'))} is not gpt2")
    values = _checked_fields(hf, path)
    if values["n_embd"] % values["n_head"]:
        raise UserError(f"{path}: n_embd ({values['n_embd']}) must be divisible by n_head ({values['n_head']})")
    if hf.get("n_inner") not in (None, 4 * values["n_embd"]):
        raise UserError(f"{path}: n_inner={as_json(hf['n_inner'])} is not supported (only 4 * n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation_function {as_json(hf['activation_function'])} is not supported")
    return GPTConfig(**values)


def _checked_fields(hf: dict, path: Path) -> dict:
    """GPTConfig's fields from a config.json's settings (HF's defaults for those left out; ours under
    `gpt2_scratch`), each checked by its rule and named as the file names it when it breaks one."""
    values, names = {}, {}  # GPTConfig field -> value, and -> its name in the file
    for name, (field, default) in _HF_FIELDS.items():
        values[field], names[field] = hf.get(name, default), name
    extra = hf.get("gpt2_scratch", {})
    if not isinstance(extra, dict):
        raise UserError(f"{path}: gpt2_scratch must be a JSON object, got {json_kind(extra)}")
    for field in _FIELD_RULES.keys() & extra.keys():
        values[field], names[field] = extra[field], f"gpt2_scratch.{field}"
    for field, value in values.items():
        ok, expected = _FIELD_RULES[field]
        if not ok(value):
            raise UserError(f"{path}: {names[field]} must be {expected}, got {as_json(value)}")
    return values


def _read_json_object(path: Path) -> dict:
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object of settings, got {json_kind(hf)}")
    return hf


def resolve_checkpoint_dir(name_or_dir: str | os.PathLike) -> Path:
    """A local checkpoint directory as is; otherwise a hub name downloaded with huggingface_hub."""
    path = Path(name_or_dir)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists() or os.sep in str(name_or_dir) or str(name_or_dir).startswith("."):
        raise UserError(f"model {name_or_dir!r}: not a checkpoint directory")
    try:
        # not a declared dependency (it comes with datasets and transformers), and only a hub name needs it
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_dir), allow_patterns=["config.json", "*.safetensors",
                                                                        "pytorch_model.bin"]))
    except Exception as e:
        raise UserError(f"model {name_or_dir!r} is not a local directory and could not be downloaded from "
                        f"the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _read_hf_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a HF checkpoint folder and its tensors (by their names in the file)."""
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.exists():
            return st, load_safetensors(st)
        if pt.exists():
            sd = torch.load(pt, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise UserError(f"{pt}: not a state dict of tensors")
            return pt, sd
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read weights in {path}: {type(e).__name__}: {e}") from e
    raise UserError(f"{path} has neither model.safetensors nor pytorch_model.bin")
