"""Training across machines as docs/gpu.md tells a user to run it: one `torchrun --nnodes 2 --nproc-per-node 1
--rdzv-backend c10d` per machine, here two launches on 127.0.0.1 with a free port as the rendezvous endpoint.

- The two machines' per-step losses equal one process's with the same global batch (two accumulated micro
  batches); only global rank 0 writes the run folder: each launch runs in a folder of its own with a relative
  --out (two machines' disks), and one folder is written, the same files as the one process's.
- Resuming needs the folder on every machine: with it on one only, both launches end with the same one line;
  copied to the other, `--resume` continues exactly (steps 3-4 equal the one process's).
- A machine that dies mid-run (its launcher and worker SIGKILLed) or hangs (SIGSTOPped, with --dist-timeout)
  ends the other launch, within a bound, with one line from `gpt2` rather than a traceback or a hang.
- Without launches: only a job's communication failures become that line (a bug keeps its traceback), and a job
  started with other settings on some machine is refused naming the flags, ranks and hosts.

Which launch holds global rank 0 is torchrun's choice (the c10d rendezvous orders the machines), so the tests
find it from the folders rather than assume it. Every wait is bounded, and every process is killed at the end."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_pretrain import VOCAB, synthetic_shards
from torchrun_helpers import (
    TOLERANCE,
    free_port,
    metrics,
    same_run,
    signal_tree,
    torchrun_command,
    torchrun_env,
)

from gpt2.cli import main
from gpt2.distributed import DistInfo, lost_contact
from gpt2.errors import UserError
from gpt2.train import run_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LAUNCH_SECONDS = 180  # a launch on two busy cores: two interpreters importing torch, then a few tiny steps
WORKER_TRACEBACK = re.compile(r"\[rank\d+\]: Traceback")  # torch's excepthook marks a worker's traceback so


def pretrain_args(data: Path, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "tiny", "--data", str(data), "--vocab-size", str(VOCAB), "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--micro-batch", "2", "--seq-len", "16",
            "--global-batch", "64", "--warmup-steps", "1", "--val-tokens", "256", "--device", "cpu",
            "--no-progress", *extra]


@dataclass
class Node:
    """One machine's `torchrun`: its launcher process and the files its output goes to."""

    proc: subprocess.Popen
    logs: Path

    def output(self) -> tuple[str, str]:
        return (self.logs / "stdout").read_text(), (self.logs / "stderr").read_text()

    def wait(self, seconds: float) -> int:
        """Its exit status; fails the test (with its output) when it runs longer than `seconds`."""
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            signal_tree(self.proc.pid)
            out, err = self.output()
            pytest.fail(f"torchrun still running after {seconds:.0f} s:\n{out[-2000:]}\n{err[-3000:]}")


@contextmanager
def two_machines(argv: list[str], cwds: tuple[Path, Path], logs: Path) -> Iterator[tuple[Node, Node]]:
    """`torchrun --nnodes 2 --nproc-per-node 1 -m gpt2 ARGV` twice, in `cwds`: the first launch hosts the
    rendezvous store (so stopping the second never stalls the first launcher's own shutdown). Every process of
    both is killed when the block ends."""
    port = free_port()
    nodes = []
    try:
        for i, cwd in enumerate(cwds):
            launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "--rdzv-conf", f"is_host={int(i == 0)}"]
            folder = logs / f"machine{i}"
            folder.mkdir(parents=True)
            with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
                proc = subprocess.Popen(torchrun_command(launcher, argv), cwd=cwd, env=torchrun_env(), stdout=out,
                                        stderr=err, start_new_session=True)
            nodes.append(Node(proc, folder))
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            signal_tree(node.proc.pid)
            node.proc.wait(timeout=30)


def succeed(nodes: tuple[Node, Node]) -> None:
    for node in nodes:
        code = node.wait(LAUNCH_SECONDS)
        out, err = node.output()
        assert code == 0, out[-2000:] + err[-3000:]
        assert "Traceback" not in err, err[-3000:]


def one_line_error(node: Node, seconds: float, pattern: str) -> str:
    """The launch ends non-zero within `seconds` with exactly one `gpt2 pretrain: error: ...` line matching
    `pattern` and no traceback of its worker (torchrun's own summary of the failure follows it)."""
    code = node.wait(seconds)
    _, err = node.output()
    lines = [x for x in err.splitlines() if x.startswith("gpt2 pretrain: error: ")]
    assert code != 0 and len(lines) == 1 and re.search(pattern, lines[0]), err[-3000:]
    assert not WORKER_TRACEBACK.search(err), err[-3000:]
    return lines[0]


def train_steps(run: Path) -> int:
    return len(metrics(run, "train", "loss")) if (run / "metrics.jsonl").exists() else 0


def test_two_machines_train_and_resume_as_one_process(tmp_path):
    data = synthetic_shards(tmp_path / "shards", 2_000, [3_000, 3_000])
    common = pretrain_args(data, "--max-steps", "4", "--eval-every", "2")
    main([*common, "--out", str(tmp_path / "one")])  # one process: 2 micro batches of 2 x 16 per step
    disks = (tmp_path / "a", tmp_path / "b")
    for disk in disks:
        disk.mkdir()

    with two_machines([*common, "--stop-at-step", "2", "--out", "run"], disks, tmp_path / "first") as nodes:
        succeed(nodes)
    written = [d / "run" for d in disks if (d / "run").exists()]
    assert len(written) == 1, "only global rank 0 writes the run folder"
    first, other = written[0], next(d for d in disks if d / "run" != written[0]) / "run"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert metrics(first, "train", "loss") == pytest.approx(metrics(tmp_path / "one", "train", "loss")[:2],
                                                            abs=TOLERANCE["float32"])

    with two_machines([*common, "--out", "run", "--resume"], disks, tmp_path / "apart") as nodes:
        for node in nodes:  # the same refusal on each machine, whichever holds rank 0 this time
            line = one_line_error(node, LAUNCH_SECONDS, r"--out run: the processes of this job do not see the "
                                                        r"same checkpoint\.pt \(rank \d \(\S+\): .*; rank \d")
            assert re.search(r": sha256 [0-9a-f]{12}[;)]", line) and re.search(r": none[;)]", line), line

    shutil.copytree(first, other, dirs_exist_ok=True)  # as docs/gpu.md says: copy it to each machine
    with two_machines([*common, "--out", "run", "--resume"], disks, tmp_path / "resumed") as nodes:
        succeed(nodes)
    steps = {d: train_steps(d / "run") for d in disks}
    assert sorted(steps.values()) == [2, 4], steps  # rank 0's folder went on to step 4, the other's stayed
    same_run(tmp_path / "one", next(d for d in disks if steps[d] == 4) / "run", "float32", 4)


@contextmanager
def stepping(tmp_path: Path, *extra: str) -> Iterator[tuple[Node, Node]]:
    """Two machines sharing `tmp_path` (shared storage) on a long run, once rank 0 has logged two steps."""
    data = synthetic_shards(tmp_path / "shards", 2_000, [3_000, 3_000])
    argv = pretrain_args(data, "--max-steps", "1000000", "--eval-every", "0", "--save-every", "0", "--out", "run",
                         *extra)
    with two_machines(argv, (tmp_path, tmp_path), tmp_path / "logs") as nodes:
        deadline = time.monotonic() + LAUNCH_SECONDS
        while train_steps(tmp_path / "run") < 2:
            if time.monotonic() > deadline or any(n.proc.poll() is not None for n in nodes):
                pytest.fail(f"no two steps within {LAUNCH_SECONDS} s: {[n.output() for n in nodes]}")
            time.sleep(0.2)
        yield nodes


def test_a_machine_that_dies_ends_the_other_with_one_line(tmp_path):
    with stepping(tmp_path) as (survivor, victim):
        signal_tree(victim.proc.pid, signal.SIGKILL)  # the machine is gone: its launcher and its worker
        start = time.monotonic()
        one_line_error(survivor, 60, r"rank \d of 2 lost contact with the other processes of this job \(.*"
                                     r"(closed|reset) by peer.*\): another process or its machine stopped")
        assert time.monotonic() - start < 60


def test_a_machine_that_hangs_is_given_up_after_dist_timeout(tmp_path):
    with stepping(tmp_path, "--dist-timeout", "0.3") as (survivor, victim):
        signal_tree(victim.proc.pid, signal.SIGSTOP)  # frozen, its connections open: only the timeout ends it
        start = time.monotonic()
        one_line_error(survivor, 18 + 60, r"rank \d of 2 lost contact .*\(Timed out waiting 18000ms")
        assert time.monotonic() - start >= 17  # it waited for --dist-timeout, not less


def test_only_a_jobs_communication_failures_become_one_line(monkeypatch):
    gloo = RuntimeError("[/src/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.0.0.2]:40311. This is typically caused by a remote worker crashing. Check the logs")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_contact(gloo) is None  # one process: nothing to lose contact with, the traceback stays
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "3")
    assert lost_contact(gloo).startswith("rank 3 of 16 lost contact with the other processes of this job "
                                         "(Connection closed by peer [10.0.0.2]:40311): ")
    try:  # a collective's failure under another error raised while handling it
        try:
            raise gloo
        except RuntimeError as e:
            raise KeyError("step") from e
    except KeyError as e:
        assert lost_contact(e) == lost_contact(gloo)
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), ValueError(str(gloo))):
        assert lost_contact(bug) is None  # a bug keeps its traceback


def test_a_job_started_with_other_settings_is_refused_on_every_rank(monkeypatch, tmp_path):
    """What each rank gathers is faked (a real job's refusal of a missing checkpoint is tested above)."""
    settings = {"lr": 0.001, "data": "/data/fineweb", "command": "pretrain"}
    ranks = [("node-a", None, settings), ("node-a", None, settings), ("node-b", None, {**settings, "lr": 0.002}),
             ("node-b", None, {**settings, "lr": 0.002, "data": "data/fineweb"})]
    monkeypatch.setattr(run_dir, "all_gather_object", lambda _: ranks)
    info = DistInfo(rank=0, local_rank=0, world_size=4, device=torch.device("cpu"))
    with pytest.raises(UserError) as e:
        run_dir.check_same_run(tmp_path / "run", settings, info)
    assert str(e.value) == ('the processes of this job were started with different settings (--data "/data/fineweb" '
                            'on ranks 0-2 (node-a, node-b), "data/fineweb" on rank 3 (node-b); --lr 0.001 on ranks '
                            '0-1 (node-a), 0.002 on ranks 2-3 (node-b)): run the same command on every machine')
    monkeypatch.setattr(run_dir, "all_gather_object", lambda _: [ranks[0]] * 4)
    run_dir.check_same_run(tmp_path / "run", settings, info)  # the same everywhere: no error
