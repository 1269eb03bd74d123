"""The GPU checks in one call: correctness on CUDA, 124M training speed and MFU, a loss curve, the memory plan
against the real peak, fp16 training with the gradient scaler, exact resume, torchrun, generation speed against
transformers. Run it on your GPU machine from the repository root:

    python bench/gpu_check.py --text data/tinyshakespeare.txt      # the default --text; writes to $OUT or --out
    python bench/gpu_check.py --rerun-failed OUT/results.json      # again: only what failed, timed out, skipped
    python bench/gpu_check.py --check-sizes    # any machine: every section's data and batch arithmetic at the
                                               # GPU's sizes (CPU and meta tensors only), in seconds
    python bench/gpu_check.py --dry-run        # any machine: every section at tiny sizes on the CPU

Data: --text is tinyshakespeare (about 1 MB of text, e.g. input.txt of karpathy/char-rnn's data/tinyshakespeare);
the GPT-2 tokenizer comes from tiktoken as everywhere in the package (offline: set TIKTOKEN_CACHE_DIR to a folder
that holds its files).

Each section runs in its own process and session (a timeout ends the session's whole process group: SIGTERM,
then SIGKILL; torchrun, in it, stops its workers on SIGTERM) and its own time box; results.json and table.txt
are rewritten after every section, so a killed call keeps what it measured, and `--rerun-failed results.json`
runs again only what failed, timed out or was skipped.

Sections, most important first, and what each proves:

  parity            124M, random weights: CUDA fp32 logits == CPU fp32 to 1e-4 (TF32 off); bf16 autocast loss
                    within 1e-2 of fp32; greedy generation on the GPU (fp32) gives the CPU's tokens
  matmul            the measured bf16 matmul ceiling (8192^3, random data): the MFU denominator that is reachable
  speed-32-compiled 124M through the real loop (`gpt2 pretrain`), micro batch 32 x 1024, accumulation 1, bf16,
                    compiled, fused AdamW, no checkpoint: tokens/s (wall time between the logged steps after 5
                    warm-up steps, 30 timed), MFU against this card's datasheet peak (gpt2.train.runtime; none
                    for a card not in the table) and the measured ceiling, peak memory
  speed-32-eager    the same, eager
  compile           (from the two above: the same seed, data and steps) compiled == eager losses, first 10
                    steps, within 3e-2 (fusion keeps fp32 intermediates where eager rounds to bf16: ~1e-3)
  curve             what it proves: the real 124M training path on the GPU (eager, bf16, fused AdamW, the shuffled
                    loader, evaluation on held-out text) learns: train and val loss fall far below ln(50257) =
                    10.8. Tinyshakespeare is 304K train tokens: the seed's 2^19 tokens a step would be 1.7
                    epochs a step, so it runs 32 x 1024 tokens a step (9 steps an epoch), 120 steps, val on the
                    whole val split (32 of its 33 windows of 1024) each epoch. 124M memorises 304K tokens within
                    a few epochs, so the val loss turns up after its best: expected, reported, not a failure.
                    It does not reproduce the seed's FineWeb run. The graph is the loop's own (gpt2.plots)
  memory            the memory plan the trainer prints before step 1 (gpt2.train.memory.plan_memory, as
                    check_memory calls it) against torch.cuda.max_memory_allocated over 3 steps of the real loop
                    (eager, bf16, fused AdamW) at micro batch 32 and 64 x 1024, without and with
                    --activation-checkpointing: plan / real for each and checkpointing's saving, real and
                    planned. The goal is a plan within 15% of the real peak; one outside is reported (with the
                    numbers to correct the plan by), not failed. Eager, because compile fuses the loss and keeps
                    other activations: the compiled peaks of speed-32-compiled and speed-64-compiled (no
                    checkpointing) are set against the same plans when those ran
  fp16              speed-32-eager's run in float16 (`--dtype float16`: fp16 autocast with the gradient scaler,
                    the path for GPUs without bf16): its losses within 5e-2 of speed-32-eager's bf16 ones over
                    the first 10 steps, or up to the first skipped step (after it the runs are a step apart);
                    the skipped steps (metrics.jsonl), the loss scale at the end, tokens/s and its ratio to
                    bf16's. It must learn (last loss below the first) and skip fewer than half its steps
  resume            stop at 4 of 8 steps + `--resume` == the straight run (dropout on: the CUDA RNG state counts;
                    accumulation 2), eager with torch.use_deterministic_algorithms (CUBLAS_WORKSPACE_CONFIG
                    :4096:8): bit-exact when two straight runs agree bit for bit, else within 3x their spread
  torchrun          `torchrun --standalone --nproc_per_node=1 -m gpt2 pretrain` (tiny model, --no-compile):
                    proves the launcher and environment path (RANK/WORLD_SIZE/LOCAL_RANK, the NCCL process
                    group's init and teardown, rank 0's writes, exit 0), NOT DDP or NCCL collectives: with one
                    process the loop does not wrap DDP and runs no collective, and NCCL refuses two ranks on
                    one GPU. DDP's gradient sync is tested on the CPU with gloo (tests/test_train_loop.py)
  speed-64-compiled as speed-32-compiled at micro batch 64
  generate          `gpt2.inference.generate` greedy tokens/s at batch 1, 8, 64 against transformers `generate`
  bare-32           forward + backward + clip + AdamW alone (compiled, 32 x 1024, data on the GPU, one sync):
                    1 - bare / loop step time is the share of the loop's step spent outside them
  speed-64-eager    as speed-32-eager at micro batch 64

The budget (--budget SECONDS, default 510 on a GPU: a 9-minute window less a margin; none on the dry run): the
call starts a section only while its expected time (SECTIONS in bench/gpu_check_sections.py, estimated for one
H200 with a cold compile cache) fits what is left, and says so for those it skips: they are the ones
`--rerun-failed` runs next. At the expected times the default budget leaves out the two least important
sections, bare-32 and speed-64-eager; `--check-sizes` prints the plan (which start, which would be skipped).
No benchmark run writes a checkpoint (`--no-save-final`); only resume writes one (and torchrun two of the tiny
model).

Output: progress and a table printed last; under --out (default $OUT, else a new temporary folder, printed
first) at most 7 files: gpu_check.log (every section's output), results.json, table.txt, curve_metrics.jsonl,
loss.png (the curve's graph, drawn by gpt2.plots with matplotlib), speed_metrics.jsonl (the speed sections' and
fp16's train lines), torchrun.log. transformers is optional (`generate`'s baseline; without it, ours alone).

The runner is this file; the sections, their sizes and checks are bench/gpu_check_sections.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the checkout's package, as the sections' processes get it (PYTHONPATH), and the sections beside this file
sys.path.insert(0, str(ROOT / "src"))
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))

import torch  # noqa: E402
from gpu_check_sections import BY_NAME, SECTIONS, Section, check_sizes, derive, device_peak  # noqa: E402

from gpt2.io import write_text_atomic  # noqa: E402

T_START = time.time()  # the budget counts from here: the interpreter's start-up is outside it
DEFAULT_BUDGET = 510.0  # seconds for the whole call on CUDA: 9 minutes less a margin for start-up and teardown
START_OVERHEAD = 20  # seconds before the first section starts: the size check and the shards
DEFAULT_TEXT = "data/tinyshakespeare.txt"


# ----------------------------------------------------------------------------- child processes


def kill_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End `proc`, started with start_new_session=True, and every process in its session's group: SIGTERM to
    the group, SIGKILL to whatever is left after `grace` seconds. A process that left the group (torchrun's
    workers, in sessions of their own) is its parent's to stop: torchrun stops its workers on SIGTERM."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the section itself, so only the rest of its group can keep it alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.2)


def row_for(name: str, res: dict) -> str:
    status = "ok" if res.get("ok") else res.get("status", "FAIL")
    return f"{name:<18} {status:<8} {res.get('seconds', 0):>5.0f}s  {res.get('summary') or res.get('error', '')}"


# ----------------------------------------------------------------------------- results


def write_outputs(out: Path, run_info: dict, results: dict) -> str:
    """results.json and table.txt, rewritten whole (atomically) after every section; returns the table."""
    order = [s.name for s in SECTIONS if s.name in results]
    elapsed = time.time() - T_START
    table = "\n".join([run_info["header"], f"{'section':<18} {'status':<8} {'time':>6}  result"]
                      + [row_for(n, results[n]) for n in order]
                      + [f"total {elapsed:.0f} s; {sum(bool(results[n].get('ok')) for n in order)}/{len(order)} ok"])
    payload = {"run": {**run_info, "elapsed_s": elapsed}, "sections": {n: results[n] for n in order}}
    write_text_atomic(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    write_text_atomic(out / "table.txt", table + "\n")
    return table


def select(args) -> list[str]:
    """The sections this call runs, in SECTIONS order: --only's (with what a derived check needs and what a
    section compares with), or with --rerun-failed those that were not ok in that results.json."""
    names = [s.name for s in SECTIONS]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"bench/gpu_check.py: --only {','.join(sorted(unknown))}: unknown; choose from "
                             f"{','.join(names)}")
        names = [n for n in names if n in wanted]
    previous = load_previous(args.rerun_failed) if args.rerun_failed else {}
    if args.rerun_failed:
        names = [n for n in names if not previous.get(n, {}).get("ok")]
    for n in list(names):
        names += [d for d in BY_NAME[n].needs if d not in names]
        # what a section's check compares with, unless the earlier call's results (merged in) hold it
        names += [d for d in BY_NAME[n].uses if d not in names and not previous.get(d, {}).get("ok")]
    return [s.name for s in SECTIONS if s.name in names]


def load_previous(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench/gpu_check.py: --rerun-failed {path}: {e}") from None
    return data.get("sections", data)


# ----------------------------------------------------------------------------- the command


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Sections, most important first: " + ", ".join(s.name for s in SECTIONS))
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU (--device cpu)")
    p.add_argument("--check-sizes", action="store_true",
                   help="check every section's data and batch arithmetic at the GPU's sizes on the CPU (no GPU\n"
                        "work: CPU and meta tensors); exit 1 if one fails. With --dry-run: at the tiny sizes")
    p.add_argument("--only", default=None, metavar="SECTION[,SECTION...]", help="run only these sections")
    p.add_argument("--rerun-failed", default=None, metavar="RESULTS_JSON",
                   help="run only the sections not ok in that results.json (failed, timed out, skipped) and\n"
                        "merge: the new results.json holds them all")
    p.add_argument("--text", default=DEFAULT_TEXT, metavar="FILE",
                   help=f"tinyshakespeare's text: the sections' training data (default: {DEFAULT_TEXT})")
    p.add_argument("--out", default=os.environ.get("OUT"), metavar="DIR",
                   help="folder for logs, JSON and loss.png (default: $OUT, else a new temporary folder)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"seconds for the whole call; a section whose expected time no longer fits is skipped\n"
                        f"(default: {DEFAULT_BUDGET:g} on CUDA, none on the dry run)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dry_run:
        args.device = "cpu"
    if args.check_sizes and not args.dry_run:
        args.device = args.device or "cuda"  # the configs name it; nothing touches it
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not args.check_sizes and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: --device cuda but CUDA is not available (try --dry-run)")
    args.text = str(Path(args.text).resolve())  # the children run in the repository root
    if args.section:  # child
        t0 = time.perf_counter()
        try:
            res = BY_NAME[args.section].run(args, Path(args.work))
        except BaseException as e:  # reported in the table; the parent goes on
            import traceback

            traceback.print_exc()
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        res["seconds"] = time.perf_counter() - t0
        write_text_atomic(args.result, json.dumps(res, default=str))
        return

    if not Path(args.text).is_file():
        raise SystemExit(f"bench/gpu_check.py: --text {args.text}: no such file (tinyshakespeare's text; pass "
                         "--text FILE)")
    names = select(args)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    signal.signal(signal.SIGTERM, _terminated)  # a killed call takes the running section's processes along
    try:
        if args.check_sizes:
            sys.exit(check_sizes_main(args, work, names))
        run_all(args, work, names)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def check_sizes_main(args, work: Path, names: list[str]) -> int:
    t0 = time.perf_counter()
    checked = check_sizes(args, work, names)
    sizes_name = "tiny (dry run)" if args.dry_run else "the GPU's"
    print(f"gpu_check --check-sizes: every section at {sizes_name} sizes, no GPU work "
          f"(torch {torch.__version__})")
    for name in names:
        res = checked[name]
        print(f"{name:<18} {'ok' if res['ok'] else 'FAIL':<5} {res.get('summary') or res.get('error')}")
    plan = [BY_NAME[n] for n in names]
    expected, boxes = sum(s.expected for s in plan), sum(s.box for s in plan)
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET
    _, skipped = time_plan(names, budget)
    print(f"time plan on the GPU: expected {expected} s of the {budget:g} s budget"
          + (f" (at the expected times not started: {', '.join(skipped)}; --rerun-failed runs them)" if skipped
             else "") + f"; boxes {boxes} s; checked in {time.perf_counter() - t0:.1f} s")
    return 0 if all(r["ok"] for r in checked.values()) else 1


def time_plan(names: list[str], budget: float = DEFAULT_BUDGET) -> tuple[list[str], list[str]]:
    """(the sections of `names` with a process that start within `budget`, those that are skipped) when each
    takes its expected time after START_OVERHEAD: run_child's rule, which skips a section that does not fit
    and goes on to the next."""
    used, started, skipped = float(START_OVERHEAD), [], []
    for section in (BY_NAME[n] for n in names if not BY_NAME[n].needs):
        if budget - used < section.expected + 5:
            skipped.append(section.name)
        else:
            started.append(section.name)
            used += section.expected
    return started, skipped


def run_all(args, work: Path, names: list[str]) -> None:
    budget = args.budget if args.budget is not None else (None if args.dry_run else DEFAULT_BUDGET)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_out."))
    out.mkdir(parents=True, exist_ok=True)
    dev_text = ""
    if args.device.startswith("cuda"):
        name, _, peak_text = device_peak(torch.device(args.device))
        dev_text = f" ({peak_text})"
    header = (f"gpu_check: device {args.device}{dev_text}, torch {torch.__version__}, "
              f"{'dry run (tiny sizes)' if args.dry_run else 'full sizes'}, budget {budget or 'none'} s, "
              f"sections {','.join(names)}")
    run_info = {"header": header, "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
                "dry_run": args.dry_run, "budget_s": budget, "argv": sys.argv[1:]}
    results: dict[str, dict] = {}
    if args.rerun_failed:
        results = {n: r for n, r in load_previous(args.rerun_failed).items() if n not in names}
    print(header, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.dry_run:  # one thread: tiny models gain nothing from more, and a shared CPU loses by them
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"results: {out}", flush=True)
    with open(out / "gpu_check.log", "a" if args.rerun_failed else "w") as log:
        log.write(header + "\n")
        # every section's sizes first, on the CPU (seconds): a size error is reported before any GPU time
        checked = check_sizes(args, work, [n for n in names if not BY_NAME[n].needs])
        for n, res in checked.items():
            log.write(f"size check {n}: {'ok' if res['ok'] else 'FAIL'} {res.get('summary') or res.get('error')}\n")
        for section in (BY_NAME[n] for n in names):
            name = section.name
            if section.needs:
                continue  # computed by derive() from the sections it needs
            if not checked[name]["ok"]:  # reported before any GPU time
                results[name] = {"ok": False, "status": "FAIL", "seconds": 0,
                                 "summary": f"size check: {checked[name]['error']}"}
            else:
                results[name] = run_child(section, args, work, out, env, log, budget)
            derive(results)
            write_outputs(out, run_info, results)
            print(row_for(name, results[name]), flush=True)
    for n in names:
        if BY_NAME[n].needs and n not in results:
            results[n] = {"ok": False, "status": "skipped", "seconds": 0,
                          "summary": f"needs {', '.join(BY_NAME[n].needs)} with their losses"}
    table = write_outputs(out, run_info, results)
    print("\n" + table, flush=True)


def run_child(section: Section, args, work: Path, out: Path, env: dict, log, budget: float | None) -> dict:
    """One section in a process of its own session, within its time box (cut to what the budget leaves)."""
    name = section.name
    box = section.box_for(args)
    left = None if budget is None else budget - (time.time() - T_START)
    if left is not None and left < section.expected + 5:
        return {"ok": False, "status": "skipped", "seconds": 0,
                "summary": f"out of time: {left:.0f} s left, {section.expected} s expected (--rerun-failed)"}
    box = int(box if left is None else min(box, left - 5))
    result_file = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--section", name, "--work", str(work), "--result", str(result_file),
           "--device", args.device, "--text", args.text, "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
    child_env = {**env, **dict(section.env)}
    log.write(f"\n===== {name} (time box {box} s)\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=ROOT,
                            start_new_session=True)
    try:
        proc.wait(timeout=box)
        res = json.loads(result_file.read_text()) if result_file.is_file() else {
            "ok": False, "error": f"the section died (exit {proc.returncode}) without a result (see gpu_check.log)"}
    except subprocess.TimeoutExpired:
        kill_session(proc)
        res = {"ok": False, "status": "TIMEOUT", "summary": f"over its {box} s time box; killed with its processes"}
    except BaseException:  # Ctrl-C or a kill of the driver: take the section's processes along
        kill_session(proc, grace=3.0)
        raise
    res.setdefault("seconds", time.perf_counter() - t0)
    return res


if __name__ == "__main__":
    main()
