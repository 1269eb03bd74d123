"""`gpt2 chat`: the non-interactive mode prints exactly the template-prompted greedy answer; the interactive
commands (/temperature, /reset, /quit) work when driven through stdin."""

from __future__ import annotations

import io

import pytest
from serve_helpers import one_torch_thread, tiny_checkpoint

from gpt2.cli import main
from gpt2.inference import generate, pad_right
from gpt2.model import GPT
from gpt2.template import format_chat
from gpt2.tokenizer import decode, encode

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_ok):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def greedy_answer(ckpt, messages, n):
    model = GPT.from_pretrained(ckpt).eval()
    return decode(generate(model, *pad_right([encode(format_chat(messages))]), 0.0, n)[0])


def test_prompt_mode_prints_the_answer(ckpt, capsys, tmp_path):
    # a training run directory (its HF export in RUN_DIR/model/) loads like the checkpoint itself
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").symlink_to(ckpt, target_is_directory=True)
    main(["chat", "--no-compile", "--model", str(tmp_path / "run"), "--prompt", "What is 2+2?", "--temperature", "0",
          "--max-tokens", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out == greedy_answer(ckpt, [{"role": "user", "content": "What is 2+2?"}], 12) + "\n"


def test_interactive_commands_via_stdin(ckpt, capsys, monkeypatch):
    script = "/temperature 0\nHello there\nHow are you?\n/reset\nHello there\n/bogus\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    main(["chat", "--no-compile", "--model", str(ckpt), "--max-tokens", "8", "--device", "cpu", "--system", "Be kind."])
    out = capsys.readouterr().out
    system = {"role": "system", "content": "Be kind."}
    first = greedy_answer(ckpt, [system, {"role": "user", "content": "Hello there"}], 8)
    second = greedy_answer(ckpt, [system, {"role": "user", "content": "Hello there"},
                                  {"role": "assistant", "content": first},
                                  {"role": "user", "content": "How are you?"}], 8)
    assert "(temperature 0.0)" in out and "(conversation cleared)" in out and "/temperature X" in out
    # after /reset the same message gets the same greedy answer as at the start; the second turn saw history
    assert out.count("> " + first + "\n") == 2
    assert "> " + second + "\n" in out
    assert "never read" not in out


def test_overlong_conversation_drops_oldest_turns(ckpt, capsys, monkeypatch):
    long_line = "tell me more " * 12  # each turn is ~40 tokens; the window (128) holds only a few
    monkeypatch.setattr("sys.stdin", io.StringIO((long_line + "\n") * 4 + ("word " * 200) + "\n"))
    main(["chat", "--no-compile", "--model", str(ckpt), "--max-tokens", "4", "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("error: the message is too long") == 1  # only the message that alone cannot fit


def test_bad_flags_are_user_errors(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--no-compile", "--model", str(ckpt), "--prompt", "hi", "--max-tokens", "0"])
    assert e.value.code == 2 and "--max-tokens" in capsys.readouterr().err
    for flag, value in (("--top-k", "0"), ("--top-p", "1.5"), ("--temperature", "-1")):
        with pytest.raises(SystemExit) as e:
            main(["chat", "--no-compile", "--model", str(ckpt), "--prompt", "hi", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"gpt2 chat: error: {flag} must be") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["chat", "--no-compile", "--model", str(ckpt / "missing"), "--prompt", "hi"])
