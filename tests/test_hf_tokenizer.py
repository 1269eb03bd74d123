"""A model folder (`gpt2.export.save_model_folder`, what a run's model/ is) carries GPT-2's tokenizer: transformers'
AutoTokenizer gives tiktoken's ids on real text (Shakespeare, Alpaca, unicode, <|endoftext|>), and
pipeline("text-generation") runs on it; without the BPE files the weights are still saved, with one warning line.
The model itself writes its config and weights only."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2.export import save_model_folder
from gpt2.hf_tokenizer import TOKENIZER_FILES
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import get_encoding

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_ok):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exported")
    save_model_folder(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)), out)
    return out


def real_texts(shared_data) -> list[str]:
    shakespeare = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    records = json.loads((shared_data / "alpaca_sample.json").read_text(encoding="utf-8"))
    alpaca = "\n\n".join(" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in records)
    odd = ("naïve café — 東京 🦜🦜 \u200b tab\there  \n\n  trailing   spaces   "
           "<|endoftext|>next document<|endoftext|> it's we'll I'M 12345 3.14")
    return [shakespeare[:200_000], alpaca, odd, " leading space", "", "<|endoftext|>"]


def test_autotokenizer_ids_equal_tiktoken(folder, shared_data):
    assert all((folder / name).is_file() for name in (*TOKENIZER_FILES, "generation_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = get_encoding()
    assert tok.eos_token_id == 50256 and tok.model_max_length == 128 and len(tok) == 50257
    for text in real_texts(shared_data):
        ids = enc.encode(text, allowed_special="all")
        assert tok(text)["input_ids"] == ids
        assert tok.decode(ids) == text
    slow = transformers.GPT2Tokenizer.from_pretrained(folder)  # vocab.json + merges.txt alone
    assert slow("Hello world, naïve 🦜<|endoftext|>")["input_ids"] == enc.encode(
        "Hello world, naïve 🦜<|endoftext|>", allowed_special="all")


def test_pipeline_generates(folder):
    generator = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    out = generator("Hello, my name is", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("Hello, my name is") and len(text) > len("Hello, my name is")
    config = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == 50256


def test_weights_saved_without_tokenizer_files(tmp_path, monkeypatch, capsys):
    import gpt2.hf_tokenizer as hf

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(hf, "read_gpt2_files", offline)
    save_model_folder(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)), tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not (tmp_path / "vocab.json").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: tokenizer files not written") and "\n" not in err


def test_the_model_writes_only_its_config_and_weights(tmp_path):
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
