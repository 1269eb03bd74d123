"""What 8-bit weights (`--weights-dtype int8`, `gpt2.decode.int8`) cost a trained model, against its fp32 weights.

Printed, for `--model` on the `--data` shards' validation split:
- **validation loss**, fp32 and int8, over the same `--tokens` tokens, and int8's relative change;
- **next-token agreement**: at every one of those positions, whether int8's most likely next token is fp32's
  (the same text fed to both, so one disagreement does not cause the next);
- **greedy agreement** over `--prompts` held-out prompts (windows of `--prompt-len` tokens from the validation
  split): the share of prompts whose `--new-tokens`-token greedy continuation is identical, and the share of
  positions up to the first difference;
- with `--answers RUN` (a fine-tuned model, such as `make demo`'s runs/demo/finetune), its greedy answers to
  `--questions` (default: the demo's four), fp32 and int8 side by side, and whether each is unchanged.

    python bench/int8_quality.py --model runs/demo/pretrain --data runs/demo/data --answers runs/demo/finetune
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2.checkpoint import load_model  # noqa: E402
from gpt2.data.loader import ShardLoader  # noqa: E402
from gpt2.decode import Decoder  # noqa: E402
from gpt2.decode.int8 import quantized  # noqa: E402
from gpt2.errors import UserError  # noqa: E402
from gpt2.inference import generate, pad_right  # noqa: E402
from gpt2.template import format_prompt  # noqa: E402
from gpt2.tokenizer import EOT, decode, encode  # noqa: E402

DEMO_QUESTIONS = ["What is the capital of France?", "What are the three primary colors?",
                  "What does DNA stand for?", "Name three fruits that are rich in Vitamin C."]


@torch.inference_mode()
def loss_and_agreement(model, int8, data: str, tokens: int, batch_size: int, seq_len: int) -> dict[str, float]:
    """Validation loss of both and the share of positions where their argmax agrees, over the same batches."""
    loader = ShardLoader(data, "val", batch_size, seq_len, shuffle=False)
    steps = max(1, min(tokens // loader.window, loader.steps_per_epoch))
    total = {"fp32": 0.0, "int8": 0.0}
    agree = count = 0
    for _ in range(steps):
        x, y = loader.next_batch()
        argmax = {}
        for name, m in (("fp32", model), ("int8", int8)):
            logits = m(x).float()  # (B, T, V)
            total[name] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                             reduction="sum").item()
            argmax[name] = logits.argmax(-1)
        agree += int((argmax["fp32"] == argmax["int8"]).sum())
        count += y.numel()
    return {"fp32": total["fp32"] / count, "int8": total["int8"] / count, "agreement": agree / count,
            "tokens": count}


def held_out_prompts(data: str, n: int, prompt_len: int) -> list[list[int]]:
    """`n` consecutive windows of `prompt_len` tokens from the start of the validation split."""
    loader = ShardLoader(data, "val", 1, prompt_len, shuffle=False)
    n = min(n, loader.steps_per_epoch)
    return [loader.next_batch()[0][0].tolist() for _ in range(n)]


def greedy_agreement(model, fp32: Decoder, int8: Decoder, prompts: list[list[int]], new_tokens: int,
                     batch: int = 16) -> dict[str, float]:
    """Share of prompts whose greedy continuation is identical, and of positions before the first difference."""
    same = before = total = 0
    for i in range(0, len(prompts), batch):
        ids, mask = pad_right(prompts[i:i + batch])
        a = generate(model, ids, mask, 0.0, new_tokens, eos_id=None, decoder=fp32)
        b = generate(model, ids, mask, 0.0, new_tokens, eos_id=None, decoder=int8)
        for x, y in zip(a, b):
            same += x == y
            first = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
            before += first
            total += len(x)
    return {"identical": same / len(prompts), "positions": before / max(1, total), "prompts": len(prompts)}


def answers(path: str, questions: list[str], max_tokens: int) -> list[tuple[str, str, str]]:
    """(question, fp32 answer, int8 answer), greedy, with the fine-tuning template."""
    model = load_model(path, "cpu").eval()
    ids, mask = pad_right([encode(format_prompt(q)) for q in questions])
    out = []
    for dtype in ("float32", "int8"):
        out.append([decode(t) for t in generate(model, ids, mask, 0.0, max_tokens, eos_id=EOT, weights_dtype=dtype)])
    return list(zip(questions, *out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a pretrained model (run directory or checkpoint folder)")
    p.add_argument("--data", required=True, help="its token shards (the validation split is read)")
    p.add_argument("--tokens", type=int, default=65536, help="validation tokens scored (capped at the split)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per scoring batch")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the context window)")
    p.add_argument("--prompts", type=int, default=300, help="held-out prompts for greedy agreement")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per held-out prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    p.add_argument("--answers", help="a fine-tuned model whose answers to --questions are compared")
    p.add_argument("--questions", nargs="+", default=DEMO_QUESTIONS, help="questions for --answers")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.model, "cpu").eval()
    int8 = quantized(model)
    seq_len = args.seq_len or model.config.block_size
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters, {model.config.n_layer} layers x "
          f"{model.config.n_embd}; data {args.data}; torch {torch.__version__}")
    r = loss_and_agreement(model, int8, args.data, args.tokens, args.batch_size, seq_len)
    print(f"validation loss over {r['tokens']} tokens: fp32 {r['fp32']:.4f}, int8 {r['int8']:.4f} "
          f"({(r['int8'] / r['fp32'] - 1) * 100:+.2f}%; perplexity {math.exp(r['fp32']):.2f} -> "
          f"{math.exp(r['int8']):.2f}); next-token argmax agreement {r['agreement']:.2%}", flush=True)
    g = greedy_agreement(model, Decoder(model), Decoder(model, weights_dtype="int8"),
                         held_out_prompts(args.data, args.prompts, args.prompt_len), args.new_tokens)
    print(f"greedy continuations of {g['prompts']} held-out {args.prompt_len}-token prompts, {args.new_tokens} "
          f"tokens each: {g['identical']:.1%} identical; {g['positions']:.1%} of positions before the first "
          "difference", flush=True)
    if args.answers:
        rows = answers(args.answers, args.questions, 48)
        print(f"answers of {args.answers} (greedy): {sum(a == b for _, a, b in rows)} of {len(rows)} unchanged")
        for q, a, b in rows:
            print(f"  {q!r}\n    fp32: {a!r}\n    int8: {b!r}{'' if a == b else '  <- differs'}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --model, --data or --answers: one line, as the commands say it
        print(f"bench/int8_quality.py: {e}", file=sys.stderr)
        sys.exit(2)
