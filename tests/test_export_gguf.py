"""`gpt2 export`: the GGUF file llama.cpp runs (read back with gguf's reader, then run by llama.cpp itself through
llama-cpp-python) and the Hugging Face folder, for a model trained a few steps by `gpt2 pretrain` and a random
124M-shaped one; and the one-line refusals.

llama.cpp's tokenizer must give tiktoken's ids, its logits ours (f32 within float error, f16 close, q8_0 the same
next token nearly everywhere) and its greedy continuation ours. The llama.cpp tests skip, with the reason, where
llama-cpp-python is not installed (`pip install -e ".[llama]"` builds it; `make test` tries once).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from gguf import GGUFReader

from gpt2.checkpoint import load_model
from gpt2.cli import main
from gpt2.data.shards import write_shard
from gpt2.hf_tokenizer import TOKENIZER_FILES
from gpt2.inference import generate
from gpt2.model import GPT, PRESETS, GPTConfig

pytestmark = pytest.mark.usefixtures("tokenizer_ok")

REPO = Path(__file__).resolve().parents[1]
UNICODE_TEXT = ("Héllo wörld, naïve café — crème brûlée! 😀🚀👍🏽 日本語のテキスト, 中文, 한국어.\n\n"
                "  Multiple   spaces\tand a tab,\r\nnumbers 12345 67 3.14159 and 1,000,000; "
                "don't, we'll, I'm, they've, she'd. ¿Qué tal? Ωμέγα. АБВ где.\n")
PROMPT = "The model writes the checkpoint and the model folder, then"
# llama.cpp vs ours, measured on this file's models (see the docstrings of the tests that use them)
F32_ATOL = 3e-3
F16_ATOL = 2e-2
Q8_TOP1_SHARE = 0.9


def export(*argv: str) -> None:
    main(["export", *argv])


def refusal(capsys, *argv: str) -> str:
    """The one error line of `gpt2 export ARGV`, which must exit with status 2."""
    with pytest.raises(SystemExit) as e:
        export(*argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_ok) -> Path:
    """A run folder of `gpt2 pretrain` (the tiny preset made smaller): a dozen steps on this repo's README, enough
    to leave the random start (loss 10.8 -> about 7.5) and make the logits peaked like a language model's."""
    root = tmp_path_factory.mktemp("trained")
    ids = np.array(tiktoken.get_encoding("gpt2").encode_ordinary((REPO / "README.md").read_text()))
    (root / "shards").mkdir()
    write_shard(root / "shards" / "readme_val_000000.bin", ids[:512])
    write_shard(root / "shards" / "readme_train_000001.bin", ids[512:])
    main(["pretrain", "--preset", "tiny", "--data", str(root / "shards"), "--out", str(root / "run"),
          "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
          "--micro-batch", "2", "--seq-len", "64", "--global-batch", "128", "--max-steps", "12",
          "--warmup-steps", "1", "--lr", "1e-2", "--eval-every", "0", "--save-every", "0", "--val-tokens", "128",
          "--no-progress"])
    return root / "run"


@pytest.fixture(scope="module")
def trained_gguf(trained, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("trained_gguf")
    for outtype in ("f32", "f16", "q8_0"):
        export("--model", str(trained), "--outtype", outtype, "--out", str(out / f"model-{outtype}.gguf"))
    return {outtype: out / f"model-{outtype}.gguf" for outtype in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A random-init model of the 124M shape (the default config) as a Hugging Face folder, exported f32 and q8_0."""
    root = tmp_path_factory.mktemp("gpt2_124m")
    torch.manual_seed(0)
    GPT(PRESETS["gpt2"]).save_pretrained(root / "hf")
    files = {t: root / f"gpt2-{t}.gguf" for t in ("f32", "q8_0")}
    for outtype, path in files.items():
        export("--model", str(root / "hf"), "--outtype", outtype, "--out", str(path))
    return root / "hf", files


def our_logits(model_path: Path, tokens: list[int]) -> np.ndarray:
    model = load_model(model_path).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float().numpy()


# ------------------------------------------------------------------------------------------- the file itself


@functools.cache  # reading the 50257 tokens and 50000 merges back takes seconds
def fields(path: Path) -> tuple[dict, list]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader.tensors


def test_the_file_holds_what_llama_cpp_reads_as_gpt2(trained, trained_gguf):
    kv, tensors = fields(trained_gguf["f32"])
    cfg = load_model(trained).config
    assert kv["general.architecture"] == "gpt2"
    assert (kv["gpt2.context_length"], kv["gpt2.embedding_length"], kv["gpt2.block_count"],
            kv["gpt2.feed_forward_length"], kv["gpt2.attention.head_count"]) == (64, 64, 2, 256, 2)
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    enc = tiktoken.get_encoding("gpt2")
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>"
    assert tokens[enc.encode(" the")[0]] == "Ġthe"  # the byte-level alphabet of vocab.json
    types = kv["tokenizer.ggml.token_type"]
    assert types[50256] == 3 and set(types[:50256]) == {1}  # control, normal
    assert len(kv["tokenizer.ggml.merges"]) == 50000 and kv["tokenizer.ggml.merges"][0] == "Ġ t"
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 50256
    assert kv["tokenizer.ggml.add_bos_token"] is False

    names = [t.name for t in tensors]
    per_block = [f"blk.0.{p}.{w}" for p in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                 for w in ("weight", "bias")]
    assert names[:2] == ["token_embd.weight", "position_embd.weight"] and names[2:14] == per_block
    assert names[-2:] == ["output_norm.weight", "output_norm.bias"] and len(names) == 2 + 2 * 12 + 2
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd


def test_weights_are_in_linear_order_and_the_padding_is_cut(trained, trained_gguf):
    model = load_model(trained)
    assert model.transformer.wte.weight.shape[0] == 50304  # padded in memory
    _, tensors = fields(trained_gguf["f32"])
    by_name = {t.name: t for t in tensors}
    emb = by_name["token_embd.weight"]
    assert emb.data.shape == (50257, 64)  # numpy order: rows = vocabulary
    np.testing.assert_array_equal(emb.data, model.transformer.wte.weight[:50257].detach().numpy())
    qkv = model.transformer.h[1].attn.c_attn.weight  # stored (in, out)
    np.testing.assert_array_equal(by_name["blk.1.attn_qkv.weight"].data, qkv.T.detach().numpy())
    down = model.transformer.h[0].mlp.c_proj.weight  # (4C, C) stored, (C, 4C) as nn.Linear
    np.testing.assert_array_equal(by_name["blk.0.ffn_down.weight"].data, down.T.detach().numpy())


@pytest.mark.parametrize("outtype, weight_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_only_two_d_weights_change_type(trained_gguf, outtype, weight_type):
    _, tensors = fields(trained_gguf[outtype])
    types = {t.name: t.tensor_type.name for t in tensors}
    assert types["position_embd.weight"] == "F32"
    assert {types[n] for n in types if n.endswith(".bias") or "norm" in n} == {"F32"}
    assert {types[n] for n in types if n == "token_embd.weight" or (n.endswith(".weight") and "norm" not in n
                                                                    and n != "position_embd.weight")} == {weight_type}


def test_hf_format_writes_the_folder_a_run_holds(trained, tmp_path):
    export("--model", str(trained), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", *TOKENIZER_FILES}
    ours, theirs = load_model(trained), load_model(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_a_killed_exports_leftover_is_removed_and_nothing_else_is_left(trained, tmp_path):
    dead = tmp_path / ".m.gguf.abcd1234.tmp"  # as gpt2.io.atomic_path names its temporary files
    dead.write_bytes(b"half a file")
    os.utime(dead, (time.time() - 60, time.time() - 60))
    export("--model", str(trained), "--outtype", "q8_0", "--out", str(tmp_path / "m.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------------------------------- refusals


def test_refusals_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300)).save_pretrained(tmp_path / "v300")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=48, block_size=16)).save_pretrained(tmp_path / "w48")
    out = str(tmp_path / "x.gguf")
    assert "vocabulary of 300 tokens, not GPT-2's 50257" in refusal(capsys, "--model", str(tmp_path / "v300"),
                                                                    "--out", out)
    assert "n_embd = 48: use --outtype f16 or f32" in refusal(capsys, "--model", str(tmp_path / "w48"),
                                                              "--outtype", "q8_0", "--out", out)
    assert "--outtype f16 applies to --format gguf only" in refusal(capsys, "--model", str(tmp_path / "w48"),
                                                                    "--format", "hf", "--outtype", "f16",
                                                                    "--out", str(tmp_path / "hf"))
    assert "not a checkpoint directory" in refusal(capsys, "--model", str(tmp_path / "missing"), "--out", out)
    assert "give the output path" in refusal(capsys, "--model", str(tmp_path / "w48"))
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in refusal(capsys, "--model", str(tmp_path / "w48"),
                                                "--out", str(tmp_path / "file" / "x.gguf"))
    assert "is a folder: name the .gguf file" in refusal(capsys, "--model", str(tmp_path / "w48"),
                                                         "--out", str(tmp_path))
    assert "invalid choice: 'onnx'" in refusal(capsys, "--format", "onnx", "--out", out)
    assert "invalid choice: 'q4_0'" in refusal(capsys, "--outtype", "q4_0", "--out", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "v300", "w48"]  # nothing written
    export("--model", str(tmp_path / "w48"), "--outtype", "f16", "--out", out)  # f16 takes any width
    assert Path(out).is_file()


# ------------------------------------------------------------------------------------------- llama.cpp runs it


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except Exception as e:  # not installed, or installed with a llama.cpp library that does not load
        pytest.skip(f"llama-cpp-python is not usable ({type(e).__name__}: {e}); pip install -e '.[llama]' builds it")
    return llama_cpp


def llama(llama_cpp, path: Path, n_ctx: int):
    """llama.cpp on `path` with an f32 K/V cache (the comparison is of the weights' types, not of llama.cpp's
    default f16 cache) and one thread (on a shared 2-core machine its threads spin waiting for each other)."""
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, n_batch=n_ctx, logits_all=True,
                           verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def top1_share(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def clear_top1_misses(theirs: np.ndarray, ours: np.ndarray) -> list[int]:
    """Positions where llama.cpp's top-1 token is not ours although our top two logits are 2 x F32_ATOL apart or
    more (closer ones, near-ties, may fall either way within f32's tolerance)."""
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 2 * F32_ATOL
    return np.flatnonzero(clear & (theirs.argmax(-1) != ours.argmax(-1))).tolist()


def greedy_pair(llama_cpp, model_path: Path, gguf: Path, steps: int) -> tuple[list[int], list[int], int]:
    """Our greedy continuation of PROMPT, llama.cpp's (its own sampler at temperature 0, top-k 1), and how many
    tokens must agree: up to the first step whose top two logits (ours) are closer than 2 x F32_ATOL, where
    llama.cpp's float error may pick the other one (a near-tie: random weights have a few)."""
    prompt = tiktoken.get_encoding("gpt2").encode_ordinary(PROMPT)
    model = load_model(model_path).eval()
    ours = generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 0.0, steps)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours]))[0, len(prompt) - 1: len(prompt) - 1 + len(ours)]
    top2 = logits.topk(2, dim=-1).values
    near_ties = ((top2[:, 0] - top2[:, 1]) < 2 * F32_ATOL).nonzero().flatten().tolist()
    llm = llama(llama_cpp, gguf, len(prompt) + steps)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(theirs) == steps:
            break
        theirs.append(token)
    return ours, theirs, (near_ties + [len(ours)])[0]


def test_llama_cpp_tokenizes_like_tiktoken(llama_cpp, trained_gguf):
    llm = llama(llama_cpp, trained_gguf["q8_0"], 64)
    enc = tiktoken.get_encoding("gpt2")
    for text in (UNICODE_TEXT, PROMPT, " leading space", "trailing spaces   ", "\n\n\n", "a" * 40):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == enc.encode_ordinary(text), text
    ids = enc.encode_ordinary(UNICODE_TEXT)
    assert llm.detokenize(ids) == UNICODE_TEXT.encode()
    assert llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [50256]
    assert llm.token_eos() == llm.token_bos() == 50256


def test_llama_cpp_logits_and_greedy_text_match_ours(llama_cpp, trained, trained_gguf):
    """Over a 64-token window (the whole context): f32 max |difference| measured 3e-5 (F32_ATOL: see the 124M
    test), f16 weights 8e-4, q8_0 1.4e-2 with the same top-1 token at every position (logits' std 0.33). The greedy
    continuation is llama.cpp's own sampling loop, K/V cache and positions; after a dozen steps this model mostly
    repeats its likeliest token, so the 124M test's random model checks varied text."""
    tokens = tiktoken.get_encoding("gpt2").encode_ordinary(UNICODE_TEXT + PROMPT)[:64]
    ours = our_logits(trained, tokens)
    theirs = {t: llama_logits(llama(llama_cpp, path, 64), tokens) for t, path in trained_gguf.items()}
    diff = {t: float(np.abs(logits - ours).max()) for t, logits in theirs.items()}
    print("max |logit diff|:", diff, "q8_0 top-1 share:", top1_share(theirs["q8_0"], ours))
    assert diff["f32"] < F32_ATOL and clear_top1_misses(theirs["f32"], ours) == []
    assert diff["f16"] < F16_ATOL
    assert top1_share(theirs["q8_0"], ours) >= Q8_TOP1_SHARE
    ours_text, theirs_text, agree = greedy_pair(llama_cpp, trained, trained_gguf["f32"], 32)
    assert len(ours_text) == 32 and theirs_text[:agree] == ours_text[:agree] and agree == 32


def test_a_124m_model_runs_in_llama_cpp_like_ours(llama_cpp, gpt2_124m):
    """The 124M shape (12 layers, 768 wide, 1024 positions), random weights (logits' std 0.55). f32: max |difference|
    measured 1.2e-3, mostly from ggml's GELU, which reads its input and writes its output as f16 through a table
    (rounding our GELU's input and output so brings our own logits 1e-3 apart); F32_ATOL leaves 2x margin and is
    still far below what a wrong layout makes (differences of the logits' own size). q8_0: measured 0.98 of
    positions with our top-1 token, as random weights make near-ties. Greedy: the same 32 varied tokens up to the
    first near-tie."""
    hf, files = gpt2_124m
    tokens = tiktoken.get_encoding("gpt2").encode_ordinary(UNICODE_TEXT)[:48]
    ours = our_logits(hf, tokens)
    f32 = llama_logits(llama(llama_cpp, files["f32"], 64), tokens)
    q8 = llama_logits(llama(llama_cpp, files["q8_0"], 64), tokens)
    print(f"124M: f32 max |diff| {np.abs(f32 - ours).max():.2e}, q8_0 max |diff| {np.abs(q8 - ours).max():.2e}, "
          f"q8_0 top-1 share {top1_share(q8, ours):.3f}")
    assert np.abs(f32 - ours).max() < F32_ATOL and clear_top1_misses(f32, ours) == []
    assert top1_share(q8, ours) >= Q8_TOP1_SHARE
    ours_text, theirs_text, agree = greedy_pair(llama_cpp, hf, files["f32"], 32)
    print(f"124M greedy: {agree} tokens before the first near-tie, {len(set(ours_text[:agree]))} distinct")
    assert agree >= 24 and len(set(ours_text[:agree])) >= 3
    assert theirs_text[:agree] == ours_text[:agree]
