"""GPT-2 model: parameter count, HF weight parity in both directions, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from gpt2.errors import UserError
from gpt2.model import GPT, PRESETS, GPTConfig

transformers = pytest.importorskip("transformers")

SHAPES = [  # (n_layer, n_head, n_embd, vocab, block)
    (2, 2, 64, 1000, 64),
    (3, 4, 96, 50257, 128),
    (1, 1, 32, 257, 32),
]


def hf_model(n_layer, n_head, n_embd, vocab, block, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                                  n_positions=block, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; randomise them so their transposes are tested too
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return m


def test_124m_parameter_count():
    assert GPT(PRESETS["gpt2"]).num_params() == 124_439_808


def test_presets_have_openai_sizes():
    assert {k: (c.n_layer, c.n_head, c.n_embd) for k, c in PRESETS.items() if k.startswith("gpt2-")
            and k != "gpt2-124m"} == {"gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                                      "gpt2-xl": (48, 25, 1600)}


def test_vocab_padding_is_invisible():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    assert m.transformer.wte.weight.shape[0] == 50304
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50257)


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_hf_loading_hf_weights(tmp_path, shape):
    hf = hf_model(*shape)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, shape[3], (3, shape[4]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_loads_our_checkpoint(tmp_path, shape):
    n_layer, n_head, n_embd, vocab, block = shape
    ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                         block_size=block)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, vocab, (2, block))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)
    again = GPT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx), ours(idx), atol=0, rtol=0)


def test_pytorch_model_bin_is_read(tmp_path):
    hf = hf_model(*SHAPES[0])
    hf.config.save_pretrained(tmp_path)  # transformers 5 only writes safetensors: write the .bin ourselves
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    idx = torch.randint(0, SHAPES[0][3], (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(tmp_path)(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_bad_checkpoint_dirs_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        GPT.from_pretrained(tmp_path / "missing")
