"""HellaSwag: the official record format, completion-style scoring checked against per-ending losses
computed one row at a time with `model.loss`, padding/batching invariance, rank sharding, file errors."""

from __future__ import annotations

import io
import json
import os
import socket
import urllib.error

import pytest
import torch
import torch.multiprocessing as mp

import gpt2.evaluate as ev
from gpt2.cli import main
from gpt2.errors import UserError
from gpt2.evaluate import ending_losses, hellaswag_eval, load_hellaswag, read_hellaswag, render_example
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import encode

pytestmark = pytest.mark.usefixtures("tokenizer_ok")


def record(ind, ctx_a, ctx_b, endings, label):
    """A record with every field of the official hellaswag_val.jsonl."""
    return {"ind": ind, "activity_label": "Roof shingle removal", "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "label": label,
            "endings": endings, "source_id": f"activitynet~v_{ind:04d}"}


RECORDS = [
    record(24, "A man is sitting on a roof.", "he",
           ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
            "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    record(92, "A woman is outside with a bucket and a dog.", "the dog",
           ["is running around trying to avoid a bath.", "gets into a bath tub.",
            "is in the bath tub, getting washed with soap and a very long story about nothing at all.",
            "gets dried off."], 0),
    record(106, "Two girls are sailing on a lake.", "they",
           ["sail.", "are holding a sail and steering the small boat across the calm water.",
            "go fishing.", "jump into the water and swim to the shore where friends are waiting."], 1),
    record(114, "A lady walks to a barbell.", "she",
           ["bends down and grabs the pole.", "swings and lands in her arms.",
            "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."], 2),
    record(115, "A man is kneeling on a frozen lake.", "a video",
           ["is shown of the cold waters below.", "fades.", "is played of a fish being caught.",
            "demonstrates how to fish through a hole in the ice."], 3),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def manual_losses(model, example):
    """(summed, mean) loss of each ending, each row alone and unpadded, through `model.loss`."""
    ctx = encode(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = encode(" " + ending)
        idx = torch.tensor([ctx + end])
        targets = torch.full_like(idx, -100)
        targets[0, len(ctx):] = idx[0, len(ctx):]  # only the ending's tokens are scored
        with torch.no_grad():
            mean = model.loss(idx[:, :-1], targets[:, 1:]).item()
        sums.append(mean * len(end))
        means.append(mean)
    return torch.tensor(sums), torch.tensor(means)


def test_render_example_is_context_plus_space_prefixed_ending():
    rows, n_end = render_example(RECORDS[0])
    ctx = encode("A man is sitting on a roof. he")
    for row, n, ending in zip(rows, n_end, RECORDS[0]["endings"]):
        end = encode(" " + ending)
        assert row == ctx + end and n == len(end)
    short, n_short = render_example(RECORDS[1], block_size=12)
    assert all(len(r) <= 12 for r in short)
    assert [r[-n:] for r, n in zip(short, n_short)] == [encode(" " + e)[-n:] for e, n in
                                                       zip(RECORDS[1]["endings"], n_short)]


def test_ending_losses_of_a_padded_batch_match_each_row_alone(tiny):
    rows, n_end = [], []
    for ex in RECORDS[:3]:  # 12 rows of different lengths in one right-padded batch
        r, n = render_example(ex)
        rows += r
        n_end += n
    total, mean = ending_losses(tiny, rows, n_end)
    want_sum, want_mean = map(torch.cat, zip(*(manual_losses(tiny, ex) for ex in RECORDS[:3])))
    torch.testing.assert_close(total, want_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-4)


def test_accuracy_matches_argmin_of_manual_losses(tiny):
    preds_sum, preds_mean = [], []
    for ex in RECORDS:
        s, m = manual_losses(tiny, ex)
        preds_sum.append(int(s.argmin()))
        preds_mean.append(int(m.argmin()))
    # the endings differ a lot in length, so the two rules disagree somewhere: the test tells them apart
    assert preds_sum != preds_mean
    # labels chosen so acc and acc_norm have known, different values
    examples = [dict(ex, label=ps) for ex, ps in zip(RECORDS, preds_sum)]
    want_acc = 1.0
    want_norm = sum(ps == pm for ps, pm in zip(preds_sum, preds_mean)) / len(RECORDS)
    tiny.train()
    for batch_size in (1, 3):  # batching and padding change nothing
        got = hellaswag_eval(tiny, examples, batch_size=batch_size)
        assert got == {"acc": want_acc, "acc_norm": pytest.approx(want_norm), "n": len(RECORDS)}
    assert tiny.training  # mode restored
    tiny.eval()
    examples = [dict(ex, label=pm) for ex, pm in zip(RECORDS, preds_mean)]
    got = hellaswag_eval(tiny, examples, batch_size=8)
    assert got["acc_norm"] == 1.0 and got["acc"] == pytest.approx(want_norm)


def test_a_model_that_loves_one_token_picks_the_ending_made_of_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64)).eval()
    the = encode(" the")[0]
    direction = torch.zeros(64)
    direction[0] = 1.0
    with torch.no_grad():  # every position's final hidden state = direction; only " the" aligns with it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[the] += 20 * direction
    ex = record(1, "Some context here.", "then",
                ["cats and dogs.", "the the the the the", "a b c d e f g.", "yes."], 1)
    assert hellaswag_eval(model, [ex]) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    assert hellaswag_eval(model, [dict(ex, label=0)]) == {"acc": 0.0, "acc_norm": 0.0, "n": 1}


def test_ranks_score_disjoint_shares(tiny):
    full = hellaswag_eval(tiny, RECORDS)
    parts = [hellaswag_eval(tiny, RECORDS, rank=r, world_size=2) for r in range(2)]
    assert [p["n"] for p in parts] == [3, 2]
    assert sum(p["acc"] * p["n"] for p in parts) == pytest.approx(full["acc"] * full["n"])
    assert sum(p["acc_norm"] * p["n"] for p in parts) == pytest.approx(full["acc_norm"] * full["n"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gpt2.distributed import destroy_distributed, init_distributed

    info = init_distributed("cpu")
    try:
        result = hellaswag_eval(make_tiny(), RECORDS, rank=info.rank, world_size=info.world_size)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_gloo_ranks_return_the_global_accuracy(tmp_path, tiny):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "result")), nprocs=2, join=True)
    full = hellaswag_eval(tiny, RECORDS)
    for rank in range(2):
        got = json.loads((tmp_path / f"result.{rank}").read_text())
        assert got == pytest.approx(full)


def test_read_hellaswag_keeps_records_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", RECORDS)
    assert read_hellaswag(path) == RECORDS
    assert read_hellaswag(path, limit=2) == RECORDS[:2]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"hs.jsonl:2: invalid JSON"),
    (json.dumps({"ctx": "a", "label": 0}), r"hs.jsonl:2: missing field\(s\) endings"),
    (json.dumps(dict(RECORDS[0], endings=["a", "b", "c"])), r"hs.jsonl:2: 'endings' must be a list of 4"),
    (json.dumps(dict(RECORDS[0], label=4)), r"hs.jsonl:2: 'label' must be 0, 1, 2 or 3"),
    (json.dumps(dict(RECORDS[0], label="")), r"hs.jsonl:2: 'label'"),  # the unlabelled test split
    (json.dumps([1, 2]), r"hs.jsonl:2: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        read_hellaswag(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such HellaSwag file"):
        read_hellaswag(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no HellaSwag records"):
        read_hellaswag(tmp_path / "empty.jsonl")


def test_download_failure_names_source_flag(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ev.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--source FILE"):
        load_hellaswag(None, "val", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left in the cache


def test_download_is_cached(tmp_path, monkeypatch):
    body = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(ev.urllib.request, "urlopen", fake_urlopen)
    assert load_hellaswag(None, "val", tmp_path, limit=3) == RECORDS[:3]
    assert load_hellaswag(None, "val", tmp_path) == RECORDS
    assert urls == ["https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"]
    assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == body


def test_cli_eval_hellaswag(tmp_path, tiny, capsys):
    tiny.save_pretrained(tmp_path / "run" / "model")  # a training run directory's HF export
    src = write_jsonl(tmp_path / "hs.jsonl", RECORDS)
    main(["eval", "hellaswag", "--model", str(tmp_path / "run"), "--source", str(src), "--limit", "4",
          "--device", "cpu", "--batch-size", "3"])
    out = capsys.readouterr().out
    want = hellaswag_eval(tiny, RECORDS[:4])
    assert f"4 examples  acc {want['acc']:.4f}  acc_norm {want['acc_norm']:.4f}" in out
    with pytest.raises(SystemExit):
        main(["eval", "hellaswag", "--model", str(tmp_path / "run"), "--source", str(tmp_path / "x.jsonl")])
    assert "x.jsonl" in capsys.readouterr().err
