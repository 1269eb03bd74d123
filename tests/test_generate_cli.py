"""`gpt2 generate`: streamed output equals the library's greedy generation; bad input is one line."""

from __future__ import annotations

import pytest
import torch

from gpt2.cli import main
from gpt2.inference import generate, tokenize_batch_input
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import decode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m")
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).save_pretrained(path)
    return path


def expected(model_dir, prompts, steps):
    model = GPT.from_pretrained(model_dir).eval()
    return [decode(t) for t in generate(model, *tokenize_batch_input(prompts), 0.0, steps)]


def test_single_prompt_streams_greedy_text(tokenizer_ok, model_dir, capsys):
    main(["generate", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "12", "Once upon a"])
    assert capsys.readouterr().out == "Once upon a" + expected(model_dir, ["Once upon a"], 12)[0] + "\n"


def test_the_old_flag_name_max_steps_still_sets_max_tokens(tokenizer_ok, model_dir, capsys):
    main(["generate", "--model", str(model_dir), "--temperature", "0", "--max-steps", "7", "Once upon a"])
    assert capsys.readouterr().out == "Once upon a" + expected(model_dir, ["Once upon a"], 7)[0] + "\n"


def test_several_prompts(tokenizer_ok, model_dir, capsys):
    prompts = ["Hello there", "A"]
    main(["generate", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "5", *prompts])
    out = capsys.readouterr().out
    for i, (p, text) in enumerate(zip(prompts, expected(model_dir, prompts, 5))):
        assert f"--- [{i + 1}] ---\n{p}{text}\n" in out


def test_errors_are_one_line(tokenizer_ok, model_dir, tmp_path, capsys):
    for argv in (["generate", "--model", str(tmp_path / "nope"), "hi"], ["generate", "--model", str(model_dir)],
                 ["generate", "--model", str(model_dir), "--max-tokens", "-1", "hi"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpt2 generate: error:") and "\n" not in err


def made_decoders(monkeypatch) -> list:
    """The decoders `gpt2 generate` makes, for a test to look at after the command."""
    import gpt2.commands.generate as command
    import gpt2.decode

    made = []
    real = gpt2.decode.decoder_for

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(command, "decoder_for", spy)
    return made


def test_compile_flag_gives_the_same_text_and_says_it_compiles(tokenizer_ok, model_dir, capsys, monkeypatch):
    """--compile starts a build in the background (a stand-in here: compiling is tested elsewhere) and generates
    at once, eagerly, the same text."""
    import threading

    import gpt2.decode.compiled

    building_started, release = threading.Event(), threading.Event()

    def building(model, directory, progress, label=""):
        building_started.set()
        assert release.wait(60)
        raise RuntimeError("stopped")

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", building)
    made = made_decoders(monkeypatch)
    prompts = ["Hello there", "A", "Once upon a time"]
    main(["generate", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "6", "--compile", *prompts])
    # the text may be done before the background thread has hashed the weights and said that it compiles
    assert building_started.wait(60)
    captured = capsys.readouterr()
    assert "compiling the model's" in captured.err and "decoding eagerly until they are ready" in captured.err
    for i, (p, text) in enumerate(zip(prompts, expected(model_dir, prompts, 6))):
        assert f"--- [{i + 1}] ---\n{p}{text}\n" in captured.out
    assert made[0].status()["compile"]["state"] == "compiling"
    release.set()
    assert made[0]._background.wait(60)


def test_a_failed_compile_leaves_decoding_eager_with_one_line(tokenizer_ok, model_dir, capsys, monkeypatch):
    """No C++ compiler (or any other compile failure) must not cost the user their output or show a traceback."""
    import gpt2.decode.compiled

    def broken(model, directory, progress, label=""):
        raise RuntimeError("C++ compile error: g++ not found\nlong compiler output")

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", broken)
    made = made_decoders(monkeypatch)
    main(["generate", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "6", "--compile", "Hello there"])
    assert made[0]._background is None or made[0]._background.wait(60)
    made[0].maybe_switch()  # what the next step would do: say so
    captured = capsys.readouterr()
    assert ("note: compiling failed (RuntimeError: C++ compile error: g++ not found); decoding stays eager "
            "(--no-compile skips it)") in captured.err
    assert "Traceback" not in captured.err and "long compiler output" not in captured.err
    assert captured.out == "Hello there" + expected(model_dir, ["Hello there"], 6)[0] + "\n"
