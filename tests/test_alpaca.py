import json
import random

import pytest
import torch
import torch.nn.functional as F

from gpt2.commands.prepare_alpaca import PrepareAlpacaConfig, prepare
from gpt2.data.alpaca import (
    check_record,
    encode_example,
    fit_examples,
    fit_length,
    load_split,
    read_manifest,
    split_indices,
)
from gpt2.data.batching import LengthGroupedBatcher, collate
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
from gpt2.template import format_prompt
from gpt2.tokenizer import EOT, decode, encode

E, X = EOT, -100


def test_collate_layout_position_by_position():
    examples = [([1, 2, 3], [4, 5, E]), ([7], [8, E]), ([10, 11], [12, 13, 14, 15, E])]
    input_ids, targets = collate(examples)
    assert input_ids.tolist() == [
        [1, 2, 3, 4, 5, E, 0],
        [7, 8, E, 0, 0, 0, 0],
        [10, 11, 12, 13, 14, 15, E],
    ]
    assert targets.tolist() == [
        [X, X, 4, 5, E, X, X],
        [8, E, X, X, X, X, X],
        [X, 12, 13, 14, 15, E, X],
    ]
    assert input_ids.dtype == targets.dtype == torch.long


def test_collate_matches_the_issue_formula():
    rng = random.Random(0)
    examples = [([rng.randrange(50000) for _ in range(rng.randint(1, 9))],
                 [rng.randrange(50000) for _ in range(rng.randint(0, 6))] + [E]) for _ in range(6)]
    input_ids, targets = collate(examples)
    T = max(len(q) + len(a) for q, a in examples)
    assert input_ids.shape == targets.shape == (6, T)
    for i, (q, a) in enumerate(examples):
        seq = q + a
        assert input_ids[i].tolist() == seq + [0] * (T - len(seq))
        assert targets[i].tolist() == [X] * (len(q) - 1) + a + [X] * (T - len(seq) + 1)
        for t in range(T):  # the definition: seq[t + 1] where t + 1 is an answer position
            is_answer = len(q) <= t + 1 < len(seq)
            assert targets[i, t].item() == (seq[t + 1] if is_answer else X)


def test_collate_single_example_has_no_padding():
    input_ids, targets = collate([([5, 6], [7, E])])
    assert input_ids.tolist() == [[5, 6, 7, E]] and targets.tolist() == [[X, 7, E, X]]


def test_loss_is_mean_over_answer_tokens_only():
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = [([11, 12, 13, 14], [21, 22, E]), ([31, 32], [41, E]), ([51, 52, 53], [61, 62, 63, 64, 65, E])]
    input_ids, targets = collate(examples)
    with torch.no_grad():
        logits = model(input_ids)
        library = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        model_loss = model.loss(input_ids, targets)
        # by hand: -log p(answer token | everything before it), averaged over all answer tokens
        terms = []
        for i, (q, a) in enumerate(examples):
            seq = q + a
            logp = logits[i].log_softmax(-1)
            terms += [-logp[t - 1, seq[t]] for t in range(len(q), len(seq))]
        manual = torch.stack(terms).mean()
        # each row alone (no padding) gives the same per-token losses: padding changes nothing
        alone = torch.cat([F.cross_entropy(model(x)[0], y[0], ignore_index=-100, reduction="none")[y[0] != -100]
                           for x, y in (collate([ex]) for ex in examples)])
    assert len(terms) == sum(len(a) for _, a in examples) == int((targets != -100).sum())
    torch.testing.assert_close(library, manual)
    torch.testing.assert_close(model_loss, manual)
    torch.testing.assert_close(alone.mean(), manual)


@pytest.mark.parametrize("record,reason", [
    ([1, 2], "not an object"),
    ({"input": "", "output": "x"}, "missing instruction"),
    ({"instruction": "Hi", "input": ""}, "missing output"),
    ({"instruction": "Hi", "output": None}, "missing output"),
    ({"instruction": 3, "input": "", "output": "x"}, "instruction is not a string"),
    ({"instruction": "Hi", "input": ["a"], "output": "x"}, "input is not a string"),
    ({"instruction": "Hi", "input": "", "output": {"a": 1}}, "output is not a string"),
    ({"instruction": "  ", "input": "", "output": "x"}, "empty instruction"),
    ({"instruction": "Hi", "input": "", "output": " \n"}, "empty output"),
    ({"instruction": "Hi", "output": "x"}, None),
    ({"instruction": "Hi", "input": None, "output": "x"}, None),
])
def test_check_record(record, reason):
    assert check_record(record) == reason


def test_encode_example_uses_the_template_and_ends_with_eot(tokenizer_ok):
    rec = {"instruction": "Translate to French.", "input": "cheese", "output": " fromage \n"}
    q, a = encode_example(rec)
    assert q == encode(format_prompt("Translate to French.", "cheese"))
    assert a[-1] == EOT and decode(a[:-1]) == "fromage"
    assert decode(q).endswith("### Input:\ncheese\n\n### Response:\n")


def test_fit_length_truncates_question_from_the_left_or_drops():
    q, a = list(range(100, 140)), [1, 2, 3, E]  # 44 tokens
    ex = (q, a)
    assert fit_length(ex, 44) is ex
    q2, a2 = fit_length(ex, 30)
    assert a2 == a and q2 == q[-26:] and len(q2) + len(a2) == 30  # keeps the question's end (the marker)
    assert fit_length((q, list(range(20)) + [E]), 30) is None  # < MIN_QUESTION_TOKENS question tokens left
    kept, counts = fit_examples([ex, (q[:5], a), (q, list(range(20)) + [E])], 30)
    assert [len(k[0]) for k in kept] == [26, 5] and counts == {"truncated": 1, "dropped_too_long": 1}


def test_split_is_deterministic_and_disjoint():
    train, val = split_indices(500, 0.02, seed=3)
    assert len(val) == 10 and len(train) == 490 and not set(train) & set(val)
    assert sorted(train + val) == list(range(500))
    assert split_indices(500, 0.02, seed=3) == (train, val)
    assert split_indices(500, 0.02, seed=4)[1] != val
    assert len(split_indices(10, 0.02, seed=0)[1]) == 1  # at least one held out
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    with pytest.raises(UserError):
        split_indices(10, 1.0, seed=0)


def _lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(n)]


def test_batcher_covers_each_example_once_per_epoch_and_groups_lengths():
    lengths = _lengths()
    b = LengthGroupedBatcher(lengths, 8, seed=1, group_batches=8)
    epoch0 = [b.next_batch() for _ in range(b.batches_per_epoch)]
    assert b.batches_per_epoch == 26 and sorted(i for batch in epoch0 for i in batch) == list(range(203))
    assert max(lengths[i] for i in epoch0[0]) == max(lengths)  # the longest batch comes first
    epoch1 = [b.next_batch() for _ in range(b.batches_per_epoch)]
    assert b.epoch == 1 and epoch1 != epoch0 and sorted(sum(epoch1, [])) == list(range(203))

    def padding(batches):  # pad tokens collate would add
        return sum(len(bt) * max(lengths[i] for i in bt) - sum(lengths[i] for i in bt) for bt in batches)

    order = list(range(203))
    random.Random(1).shuffle(order)
    unsorted = [order[j:j + 8] for j in range(0, 203, 8)]
    assert padding(epoch0) < padding(unsorted) / 4
    # deterministic given the seed
    again = LengthGroupedBatcher(lengths, 8, seed=1, group_batches=8)
    assert [again.next_batch() for _ in range(26)] == epoch0


def test_batcher_ranks_take_disjoint_batches():
    lengths = _lengths(200)
    ranks = [LengthGroupedBatcher(lengths, 8, seed=5, rank=r, world_size=3) for r in range(3)]
    per_rank = [[bt for _ in range(r.batches_per_epoch) for bt in [r.next_batch()]] for r in ranks]
    assert len({r.batches_per_epoch for r in ranks}) == 1 and ranks[0].batches_per_epoch == 8  # 25 batches -> 24
    seen = [i for batches in per_rank for bt in batches for i in bt]
    assert len(seen) == len(set(seen))  # disjoint
    single = LengthGroupedBatcher(lengths, 8, seed=5).epoch_batches(0)
    assert [per_rank[k % 3][k // 3] for k in range(24)] == single[:24]  # rank r takes batches r, r+3, ...


def test_batcher_resume_is_exact_across_epochs():
    lengths = _lengths(50)
    a = LengthGroupedBatcher(lengths, 4, seed=9)
    for _ in range(17):  # 13 batches per epoch: stop inside epoch 1
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    rest = [a.next_batch() for _ in range(20)]
    b = LengthGroupedBatcher(lengths, 4, seed=9)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(20)] == rest
    with pytest.raises(UserError, match="batch_size"):
        LengthGroupedBatcher(lengths, 5, seed=9).load_state_dict(state)


def test_batcher_too_few_examples_is_a_user_error():
    with pytest.raises(UserError, match="batch size"):
        LengthGroupedBatcher([5, 6, 7], 4, world_size=2)


def test_prepare_shared_sample(shared_data, tokenizer_ok, tmp_path, capsys):
    src = shared_data / "alpaca_sample.json"
    manifest = prepare(PrepareAlpacaConfig(out=str(tmp_path / "a"), source=str(src)))
    records = json.loads(src.read_text())
    bad = [i for i, r in enumerate(records) if check_record(r)]
    assert manifest["records"] == 335 and manifest["valid"] == 335 - len(bad)
    assert manifest["malformed"] == {"empty output": len(bad)} and manifest["malformed_examples"]["empty output"] == bad
    assert manifest["val"] == round(manifest["valid"] * 0.02)
    assert manifest["train"] + manifest["val"] == manifest["valid"]
    assert read_manifest(tmp_path / "a") == manifest
    train, val = load_split(tmp_path / "a", "train"), load_split(tmp_path / "a", "val")
    assert len(train) == manifest["train"] and len(val) == manifest["val"]
    good = [r for r in records if not check_record(r)]
    assert sorted(train + val) == sorted(encode_example(r) for r in good)  # every valid record, once
    assert "empty output" in capsys.readouterr().out
    # deterministic: a second run writes the same files
    prepare(PrepareAlpacaConfig(out=str(tmp_path / "b"), source=str(src)))
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_prepare_reports_malformed_records(tokenizer_ok, tmp_path):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "input": ""},
        {"instruction": "Count.", "input": "", "output": ""},
        {"instruction": 7, "input": "", "output": "x"},
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Empty.", "input": "", "output": "  "},
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare(PrepareAlpacaConfig(out=str(tmp_path / "out"), source=str(src), val_fraction=0.0))
    assert m["records"] == 6 and m["valid"] == 2 and m["train"] == 2 and m["val"] == 0
    assert m["malformed"] == {"empty output": 2, "instruction is not a string": 1, "missing output": 1}
    assert m["malformed_examples"] == {"empty output": [2, 5], "instruction is not a string": [3],
                                       "missing output": [1]}
    m = prepare(PrepareAlpacaConfig(out=str(tmp_path / "out3"), source=str(src), val_fraction=0.0, limit=3))
    assert (m["records"], m["valid"], m["malformed"]) == (3, 1, {"empty output": 1, "missing output": 1})


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    from gpt2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prepare", "alpaca", "--source", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(UserError, match="prepare the data first"):
        load_split(tmp_path, "train")
