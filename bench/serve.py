"""Serving throughput: aggregate generated tokens/s with 1 and with N concurrent clients.

Starts `gpt2 serve` (a subprocess, 127.0.0.1 only) on a random-weight model of the chosen preset (GPT-2
124M by default), then runs a bounded load: each client sends `--requests` completions one after another
(distinct prompts of `--prompt-tokens` tokens, `--max-tokens` new tokens, greedy), and the run stops by
itself. With continuous batching the N clients' requests are decoded together, so aggregate tokens/s
should grow with N; the ratio to the single-client figure is printed (target: >= 3x at 8 clients on CPU).
The levels are measured in interleaved rounds and each level's median counts, so a burst of load from
other processes on a shared machine does not decide the ratio.

    python bench/serve.py                      # 124M, 1 vs 8 clients
    python bench/serve.py --preset tiny        # a quick run
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def start_server(model_dir: Path, port: int, args: argparse.Namespace, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpt2", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", args.device, "--max-batch-size", str(max(args.clients))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--no-compile"] if args.no_compile else ["--compile"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the server's log goes to a file (a pipe nobody reads would fill up and stall it), shown if anything fails
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 3600  # a first start compiles the model's pieces in the background (minutes)
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{log_tail(log)}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            # measure the decoder asked for: wait for the switch to the compiled pieces (or their failure)
            if args.no_compile or health.get("decoder") == "compiled" or "error" in health.get("compile", {}):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not switch to compiled decoding within an hour")


def prompt(client: int, request: int, n_tokens: int) -> list[int]:
    """A distinct token-id prompt per request (token prompts keep the count exact)."""
    return [(1000 + 97 * client + 13 * request + 7 * i) % 50000 for i in range(n_tokens)]


def run_load(url: str, clients: int, args: argparse.Namespace) -> tuple[int, float]:
    """(completion tokens, seconds) for `clients` clients each sending `args.requests` requests in turn."""
    def client(c: int) -> int:
        tokens = 0
        with httpx.Client(timeout=600) as http:
            for r in range(args.requests):
                body = {"prompt": prompt(c, r, args.prompt_tokens), "max_tokens": args.max_tokens,
                        "temperature": 0}
                resp = http.post(url + "/v1/completions", json=body)
                resp.raise_for_status()
                tokens += resp.json()["usage"]["completion_tokens"]
        return tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total, time.perf_counter() - t0


def main() -> None:
    from gpt2.model import GPT, PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="model size (random weights)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrency levels; first = baseline")
    ap.add_argument("--requests", type=int, default=1, help="requests per client in each round")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in the server")
    ap.add_argument("--no-compile", action="store_true", help="serve with the eager decoding step (gpt2 serve "
                                                               "--no-compile) instead of the compiled one")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of all concurrency levels, interleaved; each level's median rate counts "
                         "(a shared machine's load comes and goes)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # the weights bench/generate.py uses: their compiled pieces may already be cached
        model = GPT(PRESETS[args.preset])
        model.save_pretrained(tmp)
        n_params = model.num_params()
        del model
        port = free_port()
        log = open(Path(tmp) / "server.log", "w+")  # noqa: SIM115 (closed with the folder)
        server = start_server(Path(tmp), port, args, log)
        url = f"http://127.0.0.1:{port}"
        try:
            run_load(url, 1, argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 4}))  # warm-up
            print(f"model: {args.preset} ({n_params / 1e6:.0f}M params, random weights) on {args.device}; "
                  f"{args.requests} requests/client, {args.prompt_tokens}-token prompts, {args.max_tokens} new "
                  f"tokens, greedy")
            rates: dict[int, list[float]] = {c: [] for c in args.clients}
            for _ in range(args.repeats):
                for clients in args.clients:
                    tokens, secs = run_load(url, clients, args)
                    rates[clients].append(tokens / secs)
                    print(f"{clients:3d} client(s): {tokens:5d} tokens in {secs:6.1f} s = {tokens / secs:7.1f} "
                          f"tokens/s", flush=True)
            median = {c: statistics.median(r) for c, r in rates.items()}
            base = median[args.clients[0]]
            print("median: " + ", ".join(f"{c} client(s) {r:.1f} tokens/s ({r / base:.2f}x)"
                                         for c, r in median.items()))
        except httpx.HTTPStatusError as e:
            raise SystemExit(f"{e}\n{e.response.text}\nserver log:\n{log_tail(log)}") from None
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
