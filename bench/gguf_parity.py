"""GGUF export parity and speed: a model exported by `gpt2 export` at f32, f16 and q8_0, run by llama.cpp
(llama-cpp-python) against our own PyTorch model, one run.

For each type: the export's time and file size; over the prompt and our greedy continuation, the max absolute
logit difference from ours and the share of positions whose top-1 token is ours (llama.cpp with an f32 K/V cache,
so the difference is the weights' type); whether llama.cpp's greedy continuation equals ours; and batch-1 greedy
tokens/s of llama.cpp as users run it (its defaults: f16 K/V cache) against ours (`gpt2.inference.generate`,
eager fp32, the stop token disabled so both make exactly `--new-tokens` tokens), each timed over
`--new-tokens` new tokens after a `--prompt-len`-token prompt (prefill included), best of `--rounds` alternated
rounds. Both use `--threads` threads. Printed first: the CPU and torch's CPU capability.

Without `--model`, a random-weight model of the 124M shape (the default config) is saved and exported. Needs
llama-cpp-python (`pip install -e ".[llama]"`).

    python bench/gguf_parity.py [--model RUN_OR_HF_DIR] [--prompt-len 32] [--new-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import tiktoken  # noqa: E402
import torch  # noqa: E402
from generate import alternate, cpu_description  # noqa: E402  (bench/generate.py, beside this script)

from gpt2.checkpoint import load_model  # noqa: E402
from gpt2.cli import main as gpt2_main  # noqa: E402
from gpt2.inference import generate  # noqa: E402
from gpt2.model import GPT, PRESETS  # noqa: E402

OUTTYPES = ("f32", "f16", "q8_0")
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made books cheap "
        "enough for merchants, students and craftsmen to own, and changed how ideas travelled across Europe.")


def prompt_tokens(n: int) -> list[int]:
    ids = tiktoken.get_encoding("gpt2").encode_ordinary(TEXT * 4)
    return ids[:n]


def export(model: str, outtype: str, path: Path) -> float:
    t0 = time.perf_counter()
    gpt2_main(["export", "--model", model, "--outtype", outtype, "--out", str(path)])
    return time.perf_counter() - t0


def ours_greedy(model: GPT, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    return generate(model, ids, torch.ones_like(ids), 0.0, new, eos_id=None)[0]


def llama_greedy(llm, prompt: list[int], new: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new:
            return out
    return out


def parity(llama_cpp, path: Path, tokens: list[int], ours: np.ndarray, threads: int) -> tuple[float, float]:
    """(max |logit difference|, top-1 agreement share) of llama.cpp on `path` against our logits `ours`."""
    llm = llama_cpp.Llama(str(path), n_ctx=len(tokens), n_batch=len(tokens), n_threads=threads, logits_all=True,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)])
    return float(np.abs(theirs - ours).max()), float((theirs.argmax(-1) == ours.argmax(-1)).mean())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="run or Hugging Face folder to export (default: a random 124M-shaped model)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench/gguf_parity.py needs llama-cpp-python: pip install -e '.[llama]'")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"llama-cpp-python {llama_cpp.__version__}; {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            torch.manual_seed(0)
            model_path = os.path.join(tmp, "gpt2-124m-random")
            GPT(PRESETS["gpt2"]).save_pretrained(model_path)
        model = load_model(model_path).eval()
        prompt = prompt_tokens(args.prompt_len)
        ours_tokens = ours_greedy(model, prompt, args.new_tokens)
        sequence = prompt + ours_tokens
        with torch.no_grad():
            ours_logits = model(torch.tensor([sequence]))[0].float().numpy()
        print(f"model: {args.model or 'random weights, 124M shape'}; prompt {len(prompt)} tokens, "
              f"{args.new_tokens} new, logits compared over all {len(sequence)} positions; best of {args.rounds}")
        print(f"{'type':6} {'MB':>7} {'export s':>9} {'max|dlogit|':>12} {'top-1 same':>11} {'greedy same':>12} "
              f"{'llama tok/s':>12} {'ours tok/s':>11}")
        for outtype in OUTTYPES:
            path = Path(tmp) / f"model-{outtype}.gguf"
            seconds = export(model_path, outtype, path)
            diff, share = parity(llama_cpp, path, sequence, ours_logits, args.threads)
            llm = llama_cpp.Llama(str(path), n_ctx=len(sequence), n_threads=args.threads, verbose=False)
            best, outs = alternate({"llama": lambda llm=llm: llama_greedy(llm, prompt, args.new_tokens),
                                    "ours": lambda: ours_greedy(model, prompt, args.new_tokens)}, args.rounds)
            same = outs["llama"] == ours_tokens
            print(f"{outtype:6} {path.stat().st_size / 1e6:7.1f} {seconds:9.1f} {diff:12.2e} {share:11.3f} "
                  f"{str(same):>12} {args.new_tokens / best['llama']:12.1f} {args.new_tokens / best['ours']:11.1f}",
                  flush=True)
            del llm


if __name__ == "__main__":
    main()
