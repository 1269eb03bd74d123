"""8-bit weights (`--weights-dtype int8`, `Decoder(model, weights_dtype="int8")`, `gpt2.decode.int8`): a trained
model's greedy answers are fp32's, its log-probabilities are within quantization noise of fp32's, a row decodes the
same alone and in a batch, the model given is left alone, and chat, serve and generate take the flag (a bad value
is one line; `gpt2 cache build` says int8 has nothing to compile)."""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import ServerProcess

from gpt2.cli import main
from gpt2.decode import Decoder, score_tokens
from gpt2.inference import generate, pad_right
from gpt2.model import GPT, GPTConfig
from gpt2.template import format_chat
from gpt2.tokenizer import EOT, decode, encode

QA = [("Name a primary color.", "Red is a primary color."),
      ("What is the capital of France?", "The capital of France is Paris."),
      ("Give a synonym for happy.", "A synonym for happy is joyful."),
      ("How many legs does a spider have?", "A spider has eight legs.")]
# Log-probabilities, int8 against fp32. The weights are rounded to 1/254 of each output channel's largest magnitude
# and each token's activations to 1/127 of their own, so a logit moves by a small fraction of the logits' spread:
# measured on this model, at most 0.0025 nats at the answers' tokens (confident, as a trained model's answers
# are: log-probs about -0.05) and 0.084 at the prompt's (log-probs down to -10, where the spread is wide). The
# bounds leave about 3x (prompt) and 8x (answers) of room for other CPUs' float rounding, not for a real error.
ANSWER_TOLERANCE, PROMPT_TOLERANCE = 0.02, 0.25


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and quick on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def chat_ids(question: str) -> list[int]:
    return encode(format_chat([{"role": "user", "content": question}]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_ok):
    """A small model trained (seconds) to give QA's answers in the chat template, saved as a checkpoint: its
    greedy answers are confident, as a real model's are, unlike a random model's near-ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128))
    prompts = [chat_ids(q) for q, _ in QA]
    ids, mask = pad_right([p + encode(a) + [EOT] for p, (_, a) in zip(prompts, QA)])
    answer = torch.zeros_like(mask, dtype=torch.bool)  # the positions that predict an answer's token
    for row, p in enumerate(prompts):
        answer[row, len(p) - 1:int(mask[row].sum()) - 1] = True
    targets = ids[:, 1:][answer[:, :-1]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # the head on the answers' positions only: the 50k-wide head is most of a step
        logits = model.logits(model.hidden_states(ids)[answer])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(path)
    return path


def load(path) -> GPT:
    return GPT.from_pretrained(path).eval()


def test_greedy_answers_equal_fp32_and_log_probs_are_close(trained):
    model = load(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = Decoder(model, weights_dtype="int8")
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy was quantized
    prompts = [chat_ids(q) for q, _ in QA]
    fp32_answers = generate(model, *pad_right(prompts), 0.0, 16)
    assert [decode(a) for a in fp32_answers] == [a for _, a in QA]
    assert generate(model, *pad_right(prompts), 0.0, 16, decoder=int8) == fp32_answers
    assert generate(model, *pad_right(prompts), 0.0, 16, weights_dtype="int8") == fp32_answers
    sequences = [p + a for p, a in zip(prompts, fp32_answers)]
    want, got = score_tokens(model, sequences), score_tokens(int8, sequences)
    for p, w, g in zip(prompts, want, got):
        moved = [abs(a.logprob - b.logprob) for a, b in zip(w[1:], g[1:])]  # token 0 has no log-prob
        answer, prompt = moved[len(p) - 1:], moved[:len(p) - 1]
        assert max(answer) < ANSWER_TOLERANCE and max(prompt) < PROMPT_TOLERANCE, (max(answer), max(prompt))
        assert max(prompt) > 0  # the int8 weights, not fp32's


def test_a_row_decodes_the_same_alone_and_in_a_batch(trained):
    """Each token's activations are quantized on their own range, so batch-mates change no product, bit for bit
    (scoring pads rows to the longest, and attention's float rounding may then differ in the last bit, as fp32's)."""
    decoder = Decoder(load(trained), weights_dtype="int8")
    prompts = [chat_ids(q) for q, _ in QA] + [encode("Red is")]
    together = generate(decoder.model, *pad_right(prompts), 0.0, 12, decoder=decoder)
    alone = [generate(decoder.model, *pad_right([p]), 0.0, 12, decoder=decoder)[0] for p in prompts]
    assert together == alone
    batch = score_tokens(decoder, prompts)
    for p, row in zip(prompts, batch):
        alone = score_tokens(decoder, [p])[0]
        assert [t.logprob for t in row[1:]] == pytest.approx([t.logprob for t in alone[1:]], abs=1e-5)


def test_released_weights_leave_the_int8_copy_only(trained):
    model = load(trained)
    want = generate(model, *pad_right([chat_ids(QA[0][0])]), 0.0, 8, weights_dtype="int8")
    decoder = Decoder(model, weights_dtype="int8", release_weights=True)
    assert model.lm_head.weight.device.type == "meta"
    assert generate(model, *pad_right([chat_ids(QA[0][0])]), 0.0, 8, decoder=decoder) == want
    assert decoder.status() == {"decoder": "eager", "weights_dtype": "int8"}
    with pytest.raises(ValueError, match="not compiled"):
        Decoder(load(trained), compile=True, weights_dtype="int8")


def test_chat_and_generate_take_the_flag(trained, capsys):
    question, answer = QA[1]
    quantizing = "note: quantizing the weights to int8 ("  # said before the wait, on stderr
    main(["chat", "--model", str(trained), "--prompt", question, "--temperature", "0", "--max-tokens", "16",
          "--weights-dtype", "int8", "--device", "cpu"])
    said = capsys.readouterr()
    assert said.out == answer + "\n" and said.err.count(quantizing) == 1, said.err
    main(["generate", "--model", str(trained), "--temperature", "0", "--max-tokens", "6", "--weights-dtype", "int8",
          "--device", "cpu", "Red is"])
    said = capsys.readouterr()
    out = said.out
    assert said.err.count(quantizing) == 1, said.err
    main(["generate", "--model", str(trained), "--temperature", "0", "--max-tokens", "6", "--device", "cpu",
          "Red is"])
    assert out == capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["chat", "--prompt", "hi"], ["generate", "hi"], ["serve"], ["cache", "build"]])
def test_a_bad_value_is_one_line(trained, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--model", str(trained), "--weights-dtype", "int4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"gpt2 {' '.join(argv[:2 if argv[0] == 'cache' else 1])}: error: --weights-dtype int4: expected "
                   "one of float32, bfloat16, float16, int8\n")


def test_cache_build_says_int8_has_nothing_to_compile(trained, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--model", str(trained), "--weights-dtype", "int8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nothing to build" in err, err
    assert not (tmp_path / "cache").exists()


def test_serve_reports_and_answers_with_int8_weights(trained):
    prompt = chat_ids(QA[2][0])
    want = generate(load(trained), *pad_right([prompt]), 0.0, 10, weights_dtype="int8")[0]
    with ServerProcess(trained, "--weights-dtype", "int8") as s:
        health = httpx.get(s.url + "/health", timeout=10).json()
        assert health["weights_dtype"] == "int8" and health["decoder"] == "eager"
        cards = httpx.get(s.url + "/v1/models", timeout=10).json()["data"]
        assert cards and all(card["weights_dtype"] == "int8" for card in cards)
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == decode(want)


def test_a_cpu_without_avx2_is_told_in_one_line(trained, capsys, monkeypatch):
    """fbgemm needs AVX2: on an older CPU the command says so instead of failing inside the first product."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(trained), "--weights-dtype", "int8", "--device", "cpu", "Red is"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "AVX2" in err and "--weights-dtype float32" in err, err


def test_eval_val_loss_scores_the_int8_weights(trained, tmp_path, capsys):
    """`gpt2 eval val-loss --weights-dtype int8` scores the quantized copy: close to fp32's loss, not equal."""
    from gpt2.data.shards import write_shard

    rows = [chat_ids(q) + encode(a) + [EOT] for q, a in QA] * 3
    stream = torch.tensor([t for row in rows for t in row])
    write_shard(tmp_path / "qa_val_000000.bin", stream.numpy())
    losses = {}
    for dtype in ("float32", "int8"):
        main(["eval", "val-loss", "--model", str(trained), "--data", str(tmp_path), "--tokens", "256",
              "--batch-size", "2", "--seq-len", "64", "--device", "cpu", "--weights-dtype", dtype])
        said = capsys.readouterr()
        out = said.out  # "val loss 1.2345 (perplexity ...) over ... tokens ..., int8 weights"
        assert f"{dtype} weights" in out, out
        assert ("note: quantizing the weights to int8 (" in said.err) is (dtype == "int8"), said.err
        losses[dtype] = float(out.split("val loss ")[1].split()[0])
    fp32, int8 = losses["float32"], losses["int8"]
    assert fp32 != int8 and abs(int8 / fp32 - 1) < 0.05, (fp32, int8)


def test_a_product_is_the_documented_integer_arithmetic():
    """`Int8Linear` computes what the module docstring says, checked against that arithmetic written out in
    plain integers: weights round(w / s_w) per output row (s_w = max|w| / 127), each token's activations divided
    by their largest magnitude and quantized on the fixed range [-1, 1] with fbgemm's reduce_range parameters
    (scale 2/127, zero point 64: codes 0..128, so -64..64 around the zero point), integer sums, then scaled
    back. A different scheme (a batch-wide range, full 8 bits, a per-tensor weight scale) is off by about as much
    as int8 is from fp32; this one matches to float rounding, far inside the bound."""
    from gpt2.decode.int8 import Int8Linear

    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(5, 64) * torch.tensor([[0.1], [1.0], [30.0], [1.0], [3.0]])  # tokens of very different scales
    x[3, 7] = 25.0  # one outlier: only its own token's range widens
    ours = Int8Linear(w, b)(x)

    s_w = w.abs().amax(1) / 127
    q_w = torch.round(w / s_w[:, None]).long()
    amax = x.abs().amax(1, keepdim=True)
    scale, zero = 2 / 127, 64
    q_x = (torch.round(x / amax / scale) + zero).clamp(0, 255).long()  # quint8's range
    reference = ((q_x - zero) @ q_w.T).double() * scale * s_w.double() * amax.double() + b.double()

    exact = x.double() @ w.double().T + b.double()
    assert (ours.double() - reference).abs().max() < 1e-3 * (ours.double() - exact).abs().max()
    alone = torch.cat([Int8Linear(w, b)(x[i:i + 1]) for i in range(5)])
    assert torch.equal(alone, ours)  # each token on its own range: bit for bit the same in any batch


def test_bench_int8_quality_reports_the_commands_losses_and_unchanged_answers(trained, tmp_path, capsys):
    """`python bench/int8_quality.py`, run as a user runs it: its fp32 and int8 validation losses are the ones
    `gpt2 eval val-loss --weights-dtype float32|int8` reports on the same batches (both print four decimals; the
    slack is their last digit's rounding), its shares are shares, and a fine-tuned model's answers, compared with
    --answers, are fp32's own and unchanged by int8."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from gpt2.data.shards import write_shard

    rows = [chat_ids(q) + encode(a) + [EOT] for q, a in QA] * 3
    write_shard(tmp_path / "qa_val_000000.bin", torch.tensor([t for row in rows for t in row]).numpy())
    command = {}
    for dtype in ("float32", "int8"):
        main(["eval", "val-loss", "--model", str(trained), "--data", str(tmp_path), "--tokens", "256",
              "--batch-size", "2", "--seq-len", "64", "--device", "cpu", "--weights-dtype", dtype])
        command[dtype] = float(capsys.readouterr().out.split("val loss ")[1].split()[0])

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "int8_quality.py"), "--model", str(trained),
                           "--data", str(tmp_path), "--tokens", "256", "--batch-size", "2", "--seq-len", "64",
                           "--prompts", "4", "--prompt-len", "16", "--new-tokens", "8", "--threads", "1",
                           "--answers", str(trained), "--questions", *[q for q, _ in QA]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    loss = re.search(r"validation loss over (\d+) tokens: fp32 ([\d.]+), int8 ([\d.]+) .*agreement ([\d.]+)%", out)
    assert loss, out
    assert int(loss[1]) == 256
    assert float(loss[2]) == pytest.approx(command["float32"], abs=2e-4)
    assert float(loss[3]) == pytest.approx(command["int8"], abs=2e-4)
    assert 0 <= float(loss[4]) <= 100
    greedy = re.search(r"of 4 held-out 16-token prompts, 8 tokens each: ([\d.]+)% identical; ([\d.]+)% of", out)
    assert greedy and 0 <= float(greedy[1]) <= float(greedy[2]) <= 100, out
    assert f"(greedy): {len(QA)} of {len(QA)} unchanged" in out, out
    for _, answer in QA:
        assert f"fp32: {answer!r}\n    int8: {answer!r}\n" in out, out


def test_bench_int8_quality_bad_model_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "int8_quality.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "absent"), "--data",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("bench/int8_quality.py: ") and "absent" in proc.stderr
