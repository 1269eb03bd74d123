"""`--logger tensorboard wandb` on the training commands: each tracker holds exactly metrics.jsonl's numbers at its
steps, also after a --resume that redoes steps past the checkpoint; W&B (offline) keeps one run id per run folder;
a value that is no tracker, or a tracker whose package is missing, is one line before any work."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from rlhf_data import pair_stage_inputs
from test_pretrain import shards  # noqa: F401  (fixture: a few synthetic token shards)
from test_resume import start
from test_user_errors import error_line

from gpt2.cli import main
from gpt2.train.trackers import WandbTracker, scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def jsonl_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by tracker tag: {"train/loss": [(step, value), ...], ...}, in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        step, values = scalars(json.loads(line))
        for tag, value in values.items():
            series.setdefault(tag, []).append((step, value))
    return series


def tensorboard(run):
    """TensorBoard's own event reader over RUN_DIR/tensorboard (every event file, purges applied), all kept."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0,
                                                                                       event_accumulator.TENSORS: 0})
    return acc.Reload()


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows as scalars: {tag: [(step, value), ...]}."""
    acc = tensorboard(run)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_config(run) -> tuple[list[tuple[int, dict]], dict]:
    """(the `config` text of each session as (step, settings), the settings in TensorBoard's HParams table)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = tensorboard(run)
    texts = [(e.step, json.loads(e.tensor_proto.string_val[0].decode().strip("`\n").removeprefix("json")))
             for e in acc.Tensors("config/text_summary")]
    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    table = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}
    return texts, table


def assert_tensorboard_matches_jsonl(run) -> dict[str, list[tuple[int, float]]]:
    expected, seen = jsonl_scalars(run), tensorboard_scalars(run)
    assert sorted(seen) == sorted(expected)
    for tag, points in expected.items():
        steps = [s for s, _ in seen[tag]]
        assert steps == [s for s, _ in points], tag  # the same steps, each once
        assert [v for _, v in seen[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32
    return expected


def test_tensorboard_holds_metrics_jsonl_through_a_resume_that_redoes_steps(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # A session that saved nothing leaves no run to continue: the next starts afresh, and so does TensorBoard.
    start(shards, run, "--logger", "tensorboard", "--max-steps", "2", "--eval-every", "0", "--no-save-final")
    # This one runs to step 6 but checkpoints only at step 4: steps 5 and 6 are redone on resume.
    start(shards, run, "--logger", "tensorboard", "--save-every", "4", "--no-save-final")
    first = assert_tensorboard_matches_jsonl(run)
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in first["eval/val_loss"]] == [0, 3, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= first.keys()
    assert "train/mfu" not in first  # null on a CPU: no value to show
    # A longer schedule from step 4 (other LRs at 5 and 6); --logger is inherited from the saved settings.
    main(["pretrain", "--out", str(run), "--resume", "--max-steps", "8"])
    after = assert_tensorboard_matches_jsonl(run)
    assert [s for s, _ in after["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [s for s, _ in after["eval/val_loss"]] == [0, 3, 6, 8]
    assert after["train/lr"][4][1] != first["train/lr"][4][1]  # step 5 redone: TensorBoard shows the new value
    # The run's settings: each session's as text at its first step, the first session's in the HParams table.
    texts, table = tensorboard_config(run)
    assert [(step, config["max_steps"]) for step, config in texts] == [(0, 6), (5, 8)]
    assert (table["max_steps"], table["n_layer"], table["command"], table["logger"]) == (6, 1, "pretrain",
                                                                                        '["tensorboard"]')
    # `--logger none` turns the saved tracker off: metrics.jsonl goes on alone.
    main(["pretrain", "--out", str(run), "--resume", "--max-steps", "9", "--logger", "none"])
    steps = lambda series: {tag: [s for s, _ in points] for tag, points in series.items()}  # noqa: E731
    assert steps(tensorboard_scalars(run)) == steps(after)  # as the second session left it
    assert [s for s, _ in jsonl_scalars(run)["train/loss"]] == list(range(1, 10))


def test_rlhf_metrics_reach_tensorboard(tmp_path, shared_data, tokenizer_ok):
    """A stage's own metrics (DPO's reward margin, preference accuracy, KL) are tags like the loop's."""
    data, sft = pair_stage_inputs(tmp_path, shared_data, n=12, n_train=8)
    out = tmp_path / "dpo"
    main(["dpo", "--model", str(sft), "--data", str(data), "--out", str(out), "--max-steps", "2", "--eval-every", "2",
          "--device", "cpu", "--no-progress", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
          "--logger", "tensorboard"])
    series = assert_tensorboard_matches_jsonl(out)
    assert {"train/reward_margin", "train/pref_acc", "train/kl", "eval/val_loss", "eval/pref_acc"} <= series.keys()


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, its settings and caches in the test's folder (not the user's home)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path) -> list:
    """The records of an offline W&B run file (run-ID.wandb): a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of chunks, each a 7-byte header: checksum, little-endian length, type FULL 1 / FIRST 2 /
    MIDDLE 3 / LAST 4), each record a `wandb_internal_pb2.Record`. W&B itself only reads it back to upload."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, chunks, found = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            found.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return found


def wandb_session(folder) -> tuple[str, list[int], dict]:
    """(run id, the steps of its history rows, its summary as it stands at the end) of one offline session."""
    run_id, steps, summary = None, [], {}
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            steps.append(record.history.step.num)
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return run_id, steps, summary


def test_both_trackers_and_an_offline_wandb_run_resumed_under_its_id(shards, tmp_path, offline_wandb):  # noqa: F811
    import wandb

    run = tmp_path / "run"
    start(shards, run, "--logger", "tensorboard", "wandb", "--stop-at-step", "3")
    wandb.teardown()  # what the command's exit does: W&B's service writes its last records to disk
    run_id = (run / "wandb_id.txt").read_text().strip()
    main(["pretrain", "--out", str(run), "--resume"])
    wandb.teardown()
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    first, second = [wandb_session(f) for f in sorted((run / "wandb").glob("offline-run-*"))]  # one per session
    assert (first[0], second[0]) == (run_id, run_id)
    assert (first[1], second[1]) == ([0, 1, 2, 3], [4, 5, 6])
    final_step, final_loss = jsonl_scalars(run)["train/loss"][-1]
    assert final_step == 6 and second[2]["train/loss"] == pytest.approx(final_loss, rel=1e-12)
    assert second[2]["eval/val_loss"] == jsonl_scalars(run)["eval/val_loss"][-1][1]
    assert_tensorboard_matches_jsonl(run)


class _WandbRun:
    """What a W&B run resumed online looks like to the tracker: it already holds steps up to 6 (its next is 7)."""

    id, step = "abcd1234", 7

    def __init__(self):
        self.logged, self.exit_code = [], None

    def log(self, values, step):
        self.logged.append(step)

    def finish(self, exit_code):
        self.exit_code = exit_code


def test_wandb_steps_it_already_holds_are_not_sent_again(capsys):
    """Online, a resumed W&B run starts after the last step it holds and would drop lower ones with a warning
    each: the tracker skips them and says so once."""
    tracker = WandbTracker.__new__(WandbTracker)
    tracker.run, tracker.unsent = _WandbRun(), []
    for step in (5, 6, 7, 8):
        tracker.log({"kind": "train", "step": step, "loss": 1.0})
    tracker.close()
    assert tracker.run.logged == [7, 8] and tracker.run.exit_code == 0
    assert capsys.readouterr().err.strip() == ("note: W&B run abcd1234 already held steps 5-6 from an earlier "
                                               "session; they were not sent again (metrics.jsonl and TensorBoard "
                                               "hold the redone values)")


def test_arbitrary_metric_keys_become_tags_and_nulls_are_left_out():
    step, values = scalars({"kind": "eval", "step": 4, "val_loss": 2.5, "pref_acc": 0.75, "mfu": None,
                            "note": "text", "skipped": True})
    assert (step, values) == (4, {"eval/val_loss": 2.5, "eval/pref_acc": 0.75, "eval/skipped": 1.0})


@pytest.mark.parametrize("flags, message", [
    (["--logger", "foo"], "--logger foo: not a tracker; give tensorboard, wandb or both (space-separated), or none "
                          "for metrics.jsonl alone"),
    (["--logger", "none", "wandb"], "--logger none wandb: none means no tracker; give it alone"),
])
def test_a_bad_logger_is_one_line(shards, tmp_path, capsys, flags, message):  # noqa: F811
    assert error_line(capsys, lambda: start(shards, tmp_path / "run", *flags), alone=True) == (
        f"gpt2 pretrain: error: {message}")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_missing_tracker_package_names_the_extra_before_any_work(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: neither found nor importable
    line = error_line(capsys, lambda: start(shards, tmp_path / "run", "--logger", "tensorboard"), alone=True)
    assert line == ("gpt2 pretrain: error: --logger tensorboard: the tensorboard package is not installed; "
                    "pip install 'gpt2-scratch[trackers]'")
    assert not (tmp_path / "run").exists()
