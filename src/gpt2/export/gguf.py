"""One GGUF file of a GPT-2 model, for llama.cpp's own `gpt2` architecture (and so for what runs on llama.cpp:
llama-cpp-python, ollama, LM Studio).

Design decisions:
- The file says what llama.cpp's `gpt2` loader reads: `general.architecture = "gpt2"`, the hyper-parameters
  (`gpt2.context_length`, `embedding_length`, `block_count`, `feed_forward_length` = 4 x width,
  `attention.head_count`, `attention.layer_norm_epsilon`) and the tensors `token_embd`, `position_embd`,
  `blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}` and `output_norm`, each with its bias.
  Weights are in `nn.Linear`'s (out, in) order, numpy's row-major shape, which the file stores reversed as
  ggml's (in, out); our projections keep OpenAI's (in, out) layout and are transposed on the way out. The
  query/key/value projection stays one tensor: its columns are q, k, v side by side, as llama.cpp splits them.
- The head is tied to the token embedding, so no `output.weight` is written: llama.cpp's loader uses
  `token_embd` for both when it is absent. The embedding's vocabulary padding (50257 -> 50304, for GPU matmuls)
  is cut off: llama.cpp takes the vocabulary size from the embedding's rows, and they must match the token list.
- llama.cpp tokenizes by itself from what the file holds, so the file carries GPT-2's tokenizer: model `gpt2`
  (byte-level BPE), pre-tokenizer `gpt-2` (GPT-2's split regex; without it llama.cpp falls back to another
  regex and tokenizes differently), the token strings and merges of `vocab.json` and `merges.txt` (the very
  files tiktoken's encoding is built from: `gpt2.hf_tokenizer.read_gpt2_files`), `<|endoftext|>` as the one
  control token, BOS = EOS = 50256 and no BOS added in front of a prompt (GPT-2 never had one; our generation
  adds none). Hence a model of any other vocabulary is refused: its ids would not mean these tokens.
- Types (`--outtype`): f32 keeps every weight; f16 converts the 2-D weights; q8_0 quantizes them with gguf's
  reference quantizer (blocks of 32 numbers along a row, one f16 scale each: every row length must be a multiple
  of 32). 1-D tensors (LayerNorm gains, biases) and the position embedding stay f32 in every type, as llama.cpp's
  own converter keeps them: they are small, and ggml adds them to f32 activations.
- Written in one pass that holds one converted tensor at a time (the tensor infos need only shapes and byte
  counts), with a progress bar by bytes, through `gpt2.io.atomic_path`: the file appears complete or not at all,
  and what a killed export left beside it is deleted by the next one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gpt2.errors import UserError
from gpt2.hf_tokenizer import EOT_ID, EOT_TEXT, merge_rules, read_gpt2_files
from gpt2.io import atomic_path, remove_dead_temps
from gpt2.model import GPT, Projection
from gpt2.tokenizer import VOCAB_SIZE

QType = gguf.GGMLQuantizationType
# --outtype -> (the type of the 2-D weights, the file type recorded in general.file_type)
OUTTYPES = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ALWAYS_F32 = ("position_embd.weight",)  # besides every 1-D tensor


@dataclass
class Tensor:
    """One tensor of the file: its GGUF name, its weights in llama.cpp's layout and the type it is stored in."""

    name: str
    weights: torch.Tensor
    qtype: QType

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(tuple(self.weights.shape), self.qtype)))

    def encoded(self) -> np.ndarray:
        """The bytes as the file stores them (a float32/float16 array, or uint8 blocks for a quantized type)."""
        data = self.weights.detach().to("cpu", torch.float32).contiguous().numpy()
        return gguf.quants.quantize(data, self.qtype)


def gguf_tensors(model: GPT, outtype: str) -> list[Tensor]:
    """The model's tensors under llama.cpp's `gpt2` names and layouts, in file order (see the module's notes)."""
    weight_type = OUTTYPES[outtype][0]
    t, vocab = model.transformer, model.config.vocab_size
    named: list[tuple[str, torch.Tensor]] = [("token_embd.weight", t.wte.weight[:vocab]),
                                             ("position_embd.weight", t.wpe.weight)]
    for i, block in enumerate(t.h):
        parts: dict[str, nn.Module] = {"attn_norm": block.ln_1, "attn_qkv": block.attn.c_attn,
                                       "attn_output": block.attn.c_proj, "ffn_norm": block.ln_2,
                                       "ffn_up": block.mlp.c_fc, "ffn_down": block.mlp.c_proj}
        for part, module in parts.items():
            weight = module.weight.T if isinstance(module, Projection) else module.weight  # (in, out) -> (out, in)
            named += [(f"blk.{i}.{part}.weight", weight), (f"blk.{i}.{part}.bias", module.bias)]
    named += [("output_norm.weight", t.ln_f.weight), ("output_norm.bias", t.ln_f.bias)]
    return [Tensor(name, w, QType.F32 if w.dim() == 1 or name in ALWAYS_F32 else weight_type) for name, w in named]


def check_exportable(model: GPT, outtype: str, source: str) -> None:
    """Refuse, in one line naming `source` (the --model value), what llama.cpp could not run as GPT-2."""
    cfg = model.config
    if cfg.vocab_size != VOCAB_SIZE:
        raise UserError(f"--model {source} has a vocabulary of {cfg.vocab_size} tokens, not GPT-2's {VOCAB_SIZE}: "
                        "the GGUF file carries GPT-2's tokenizer, whose ids would not mean this model's tokens")
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[QType.Q8_0][0]
        if cfg.n_embd % block:
            raise UserError(f"--outtype q8_0 quantizes blocks of {block} numbers along each weight row, but "
                            f"--model {source} has rows of n_embd = {cfg.n_embd}: use --outtype f16 or f32")


def tokenizer_fields() -> tuple[list[str], list[int], list[str]]:
    """GPT-2's token strings in id order, their types (`<|endoftext|>` control, the rest normal) and its merges."""
    try:
        files = read_gpt2_files()
    except Exception as e:  # offline without a cache: network errors come in many types
        raise UserError(f"GPT-2's BPE files (vocab.json, merges.txt) are unavailable ({type(e).__name__}): set "
                        "TIKTOKEN_CACHE_DIR to a tiktoken cache holding them, or connect to the internet once"
                        ) from e
    vocab: dict[str, int] = json.loads(files["vocab.json"])
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[s] for s in tokens] != list(range(VOCAB_SIZE)) or tokens[EOT_ID] != EOT_TEXT:
        raise UserError(f"GPT-2's vocab.json does not hold ids 0..{VOCAB_SIZE - 1} with {EOT_TEXT} last: "
                        "the tiktoken cache is not GPT-2's")
    types = [gguf.TokenType.CONTROL if s == EOT_TEXT else gguf.TokenType.NORMAL for s in tokens]
    return tokens, types, merge_rules(files["merges.txt"])


def _add_metadata(writer: gguf.GGUFWriter, model: GPT, outtype: str, name: str) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    tokens, types, merges = tokenizer_fields()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def write_gguf(model: GPT, path: str | os.PathLike, outtype: str = "f16", name: str = "gpt2",
               source: str | None = None, progress: bool = True) -> Path:
    """Write `model` as a GGUF file at `path` (atomically) with its 2-D weights in `outtype` ("f32", "f16",
    "q8_0"); `name` goes into `general.name`, `source` (default: `name`) names the model in refusals."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    check_exportable(model, outtype, source or name)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: name the .gguf file to write")
    tensors = gguf_tensors(model, outtype)
    writer = gguf.GGUFWriter(None, "gpt2")
    _add_metadata(writer, model, outtype, name)
    for t in tensors:
        writer.add_tensor_info(t.name, tuple(t.weights.shape), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    remove_dead_temps(path)
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in _progress(tensors, path.name, progress):
                writer.write_tensor_data(t.encoded())
        finally:
            writer.close()
    return path


def _progress(tensors: list[Tensor], label: str, shown: bool) -> Iterator[Tensor]:
    """`tensors`, advancing a bar by their bytes in the file (quantizing the embedding is the slow part)."""
    with tqdm(total=sum(t.nbytes for t in tensors), desc=f"writing {label}", unit="B", unit_scale=True,
              dynamic_ncols=True, disable=not shown) as bar:
        for t in tensors:
            yield t
            bar.update(t.nbytes)
