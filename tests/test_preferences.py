"""HH-RLHF pairs -> prompt/chosen/rejected ids: parsing, the template, over-length rule, batch layout."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from gpt2.data.preferences import (
    MalformedPair,
    collate_pairs,
    load_pairs,
    pair_length,
    split_pair,
    tokenize_record,
)
from gpt2.template import format_chat
from gpt2.tokenizer import EOT, decode, encode

CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: No idea."


def test_split_pair_into_shared_prompt_and_answers():
    prompt, c, r = split_pair(CHOSEN, REJECTED)
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"}]
    assert (c, r) == ("It is 4.", "No idea.")


@pytest.mark.parametrize("chosen,rejected,reason", [
    (CHOSEN, REJECTED.replace("Hi there", "Hey"), "prompt_mismatch"),
    (CHOSEN, CHOSEN, "identical_answers"),
    ("no turns here", REJECTED, "not_a_dialogue"),
    ("\n\nHuman: only a question", "\n\nHuman: only a question", "no_final_answer"),
    (None, REJECTED, "missing_field"),
])
def test_malformed_pairs_name_their_reason(chosen, rejected, reason):
    with pytest.raises(MalformedPair, match=reason):
        split_pair(chosen, rejected)


def test_tokenize_uses_the_chat_template_and_ends_answers_with_eot(tokenizer_ok):
    pair, truncated = tokenize_record({"chosen": CHOSEN, "rejected": REJECTED}, max_len=1024)
    assert not truncated
    assert decode(pair["prompt"]) == format_chat(split_pair(CHOSEN, REJECTED)[0])
    assert decode(pair["prompt"]).endswith("### Instruction:\nWhat is 2+2?\n\n### Input:\nUser: Hi there\n"
                                           "Assistant: Hello!\n\n### Response:\n")
    assert pair["chosen"] == encode("It is 4.") + [EOT] and pair["rejected"] == encode("No idea.") + [EOT]


def test_over_length_drops_oldest_turns_then_the_pair(tokenizer_ok):
    full, _ = tokenize_record({"chosen": CHOSEN, "rejected": REJECTED}, max_len=1024)
    last_only = encode(format_chat([{"role": "user", "content": "What is 2+2?"}]))
    need = len(full["prompt"]) + len(full["chosen"])  # chosen is the longer answer here
    assert len(full["chosen"]) > len(full["rejected"])
    pair, truncated = tokenize_record({"chosen": CHOSEN, "rejected": REJECTED}, max_len=need - 1)
    assert truncated and len(pair["prompt"]) + len(pair["chosen"]) <= need - 1
    assert "### Instruction:\nWhat is 2+2?\n\n### Input:\nAssistant: Hello!\n" in decode(pair["prompt"])
    pair, truncated = tokenize_record({"chosen": CHOSEN, "rejected": REJECTED},
                                      max_len=len(last_only) + len(full["chosen"]))
    assert truncated and pair["prompt"] == last_only
    with pytest.raises(MalformedPair, match="too_long"):
        tokenize_record({"chosen": CHOSEN, "rejected": REJECTED}, max_len=len(last_only) + len(full["chosen"]) - 1)


def test_collate_pairs_is_the_fine_tuning_layout_chosen_rows_first():
    ids, targets = collate_pairs([{"prompt": [1, 2], "chosen": [3, EOT], "rejected": [4, 5, EOT]}])
    assert ids.tolist() == [[1, 2, 3, EOT, 0], [1, 2, 4, 5, EOT]]
    assert targets.tolist() == [[-100, 3, EOT, -100, -100], [-100, 4, 5, EOT, -100]]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long


def test_load_pairs_reports_bad_lines(tmp_path):
    from gpt2.errors import UserError

    good = {"prompt": [1, 2], "chosen": [3, EOT], "rejected": [4, 5, 6, EOT]}
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(good) + "\n")
    assert load_pairs(f) == [good] and pair_length(good) == 6  # prompt + the longer answer
    f.write_text(json.dumps(good) + "\n{\"prompt\": [1]}\n")
    with pytest.raises(UserError, match="train.jsonl:2"):
        load_pairs(f)
    with pytest.raises(UserError, match="no such preference file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_real_hh_pairs_split_cleanly(shared_data, tokenizer_ok):
    """Every real record either yields a pair whose prompt ends at the final Assistant turn, or is
    counted as malformed; the test file has a few pairs whose dialogues differ before the last turn."""
    reasons: dict[str, int] = {}
    ok = 0
    with gzip.open(shared_data / "hh_rlhf_harmless_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 300:
                break
            try:
                pair, _ = tokenize_record(json.loads(line), max_len=1024)
                assert pair["chosen"][-1] == EOT and pair["rejected"][-1] == EOT
                assert decode(pair["prompt"]).endswith("### Response:\n")
                ok += 1
            except MalformedPair as e:
                reasons[str(e)] = reasons.get(str(e), 0) + 1
    assert ok > 280 and set(reasons) <= {"prompt_mismatch", "identical_answers", "too_long"}


def test_prepare_streams_the_hub_dataset_without_source(tmp_path, monkeypatch, tokenizer_ok):
    """With no --source, records come from `iter_records(None, "Anthropic/hh-rlhf", None, split)` (the
    hub path users take online), stubbed here; a malformed record is counted, not fatal."""
    from gpt2.commands import prepare_hh
    from gpt2.commands.prepare_hh import PrepareHHConfig, prepare

    calls = []

    def fake_iter_records(source, hub_id, hub_config=None, split="train"):
        calls.append((source, hub_id, hub_config, split))
        yield {"chosen": CHOSEN, "rejected": REJECTED}
        yield {"chosen": CHOSEN, "rejected": CHOSEN}

    monkeypatch.setattr(prepare_hh, "iter_records", fake_iter_records)
    meta = prepare(PrepareHHConfig(out=str(tmp_path), split="test", val_fraction=0.0))
    assert calls == [(None, "Anthropic/hh-rlhf", None, "test")]
    assert meta["train"] == 1 and meta["val"] == 0 and meta["identical_answers"] == 1
    assert load_pairs(tmp_path / "train.jsonl")[0]["chosen"] == encode("It is 4.") + [EOT]
