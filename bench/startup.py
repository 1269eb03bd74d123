"""Start-up and pay-off of compiled decoding, per model size, against eager decoding (`--no-compile`), one run.

For each preset a random-weight model is saved and, with an empty compile cache and then a warm one:
- `gpt2 serve --compile` is started and timed to `/health`, to its first completion (8 tokens, greedy) and to
  the switch to the compiled pieces (`/health` says `"decoder": "compiled"`); the compiled pieces' one-time
  cost and the compiler child's peak memory come from the server's own lines;
- `gpt2 chat --prompt ... --compile` is timed to its exit (it answers eagerly and stops an unfinished build).
Then, in this process, eager and compiled decoding tokens/s at batch 1 and 8 (64 new tokens after a 16-token
prompt, best of `--rounds` alternated rounds) give the pay-off: the tokens after which the compiled pieces'
one-time cost is repaid, cost / (1/eager - 1/compiled).

    python bench/startup.py [--presets tiny gpt2 gpt2-medium] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import alternate, cpu_description  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "GPT2_COMPILE_CACHE": str(cache),
            "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def time_serve(model_dir: str, cache: Path, switch_timeout: float) -> dict[str, float | str]:
    """Seconds from starting `gpt2 serve --compile` to /health, to a first completion and to the switch."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2", "serve", "--model", model_dir, "--port", str(port),
                             "--compile"], env=_env(cache), stdout=subprocess.DEVNULL, stderr=log, text=True)
    out: dict[str, float | str] = {}
    try:
        while "health" not in out:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    out["health"] = time.monotonic() - t0
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError("gpt2 serve exited") from None
                time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                      "temperature": 0}, timeout=120)
        r.raise_for_status()
        out["first_completion"] = time.monotonic() - t0
        health, slowest = {}, 0.0
        while time.monotonic() - t0 < switch_timeout:
            t_ask = time.monotonic()
            try:
                health = httpx.get(url + "/health", timeout=60).json()
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError("gpt2 serve exited") from None
                continue
            slowest = max(slowest, time.monotonic() - t_ask)
            out.setdefault("state_at_first", health.get("compile", {}).get("state", "-"))
            if health.get("decoder") == "compiled" or health.get("compile", {}).get("state") == "failed":
                break
            time.sleep(0.5)
        out["slowest_health"] = slowest  # the longest a /health answer took while the pieces were made ready
        out["switch"] = time.monotonic() - t0 if health.get("decoder") == "compiled" else float("nan")
        out["compile_state"] = health.get("compile", {}).get("state", "?")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.seek(0)
        text = log.read()
        m = re.search(r"compiled in (\d+) s[^,]*, loaded in ([\d.]+) s", text)
        if m:
            out["one_time"], out["load"] = float(m.group(1)), float(m.group(2))
        m = re.search(r"loaded from the cache in ([\d.]+) s", text)
        if m:
            out["load"] = float(m.group(1))
        m = re.search(r"peak memory (\d+) MB", text)
        if m:
            out["child_peak_mb"] = float(m.group(1))
    return out


def time_chat(model_dir: str, cache: Path) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "gpt2", "chat", "--model", model_dir, "--prompt",
                    "What is the capital of France?", "--temperature", "0", "--max-tokens", "32", "--compile"],
                   env=_env(cache), capture_output=True, check=True, timeout=600)
    return time.monotonic() - t0


def decode_rates(model, rounds: int) -> dict[str, float]:
    """Eager and compiled tokens/s at batch 1 and 8 (the compiled pieces are cached by then)."""
    from gpt2.decode import Decoder
    from gpt2.inference import generate

    eager, compiled = Decoder(model), Decoder(model, compile=True)
    rates = {}
    for B in (1, 8):
        ids = torch.randint(0, model.config.vocab_size, (B, 16))
        mask = torch.ones_like(ids)
        runs = {name: (lambda d=d, ids=ids, mask=mask: generate(model, ids, mask, 0.0, 64, eos_id=None, decoder=d))
                for name, d in (("eager", eager), ("compiled", compiled))}
        best, _ = alternate(runs, rounds)
        rates.update({f"{name}_b{B}": B * 64 / t for name, t in best.items()})
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "gpt2", "gpt2-medium"], help="model sizes")
    p.add_argument("--rounds", type=int, default=3, help="alternated timed rounds of the tokens/s (best kept)")
    p.add_argument("--switch-timeout", type=float, default=3600, help="seconds to wait for the switch with an empty "
                                                                      "cache (the one-time cost)")
    p.add_argument("--one-time", type=float, help="the one-time cost in seconds when the empty-cache run does not "
                                                   "wait for the switch (as bench/generate.py measured it)")
    p.add_argument("--cache", help="a compile cache that already holds the models' pieces, for the warm runs and "
                                   "the tokens/s (default: the one the empty-cache run filled)")
    args = p.parse_args()
    from gpt2.model import GPT, PRESETS

    print(f"CPU: {cpu_description()}; torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = GPT(PRESETS[preset]).eval()
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, cache = str(Path(tmp) / "model"), Path(tmp) / "cache"
            model.save_pretrained(model_dir)
            cold = time_serve(model_dir, cache, args.switch_timeout)
            cache = Path(args.cache) if args.cache else cache
            warm = time_serve(model_dir, cache, 3600)
            chat_warm = time_chat(model_dir, cache)
            chat_cold = time_chat(model_dir, Path(tmp) / "empty")
            os.environ["GPT2_COMPILE_CACHE"] = str(cache)
            rates = decode_rates(model, args.rounds)
        cost = float(cold.get("one_time", args.one_time or float("nan")))
        # seconds saved per token; none (never repaid) when compiled is not faster
        saved = {B: 1 / rates[f"eager_b{B}"] - 1 / rates[f"compiled_b{B}"] for B in (1, 8)}
        repay = {B: cost / s if s > 0 else float("inf") for B, s in saved.items()}
        row = {"preset": preset, "params_m": round(model.num_params() / 1e6, 1), "cold": cold, "warm": warm,
               "chat_cold": chat_cold, "chat_warm": chat_warm, **rates, "repay_b1": repay[1], "repay_b8": repay[8]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nserve --compile, seconds from start (empty cache | warm cache): /health, first completion, switch")
    print(f"{'preset':>12} {'params':>7} {'health':>13} {'first':>13} {'switch':>15} {'chat --prompt':>15} "
          f"{'one-time':>9} {'child peak':>10}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        print(f"{r['preset']:>12} {r['params_m']:>6}M {c['health']:>6.1f} |{w['health']:>5.1f} "
              f"{c['first_completion']:>6.1f} |{w['first_completion']:>5.1f} {c['switch']:>7.1f} |{w['switch']:>6.1f} "
              f"{r['chat_cold']:>7.1f} |{r['chat_warm']:>6.1f} {c.get('one_time', float('nan')):>8.0f}s "
              f"{c.get('child_peak_mb', float('nan')):>8.0f}MB")
    print("\ntokens/s eager -> compiled, and tokens of decoding that repay the one-time cost")
    for r in rows:
        print(f"{r['preset']:>12} batch 1: {r['eager_b1']:7.1f} -> {r['compiled_b1']:7.1f} "
              f"({r['compiled_b1'] / r['eager_b1']:.2f}x, repaid after {r['repay_b1']:,.0f} tokens); batch 8: "
              f"{r['eager_b8']:7.1f} -> {r['compiled_b8']:7.1f} ({r['compiled_b8'] / r['eager_b8']:.2f}x, "
              f"repaid after {r['repay_b8']:,.0f} tokens)")


if __name__ == "__main__":
    main()
