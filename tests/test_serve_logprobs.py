"""OpenAI's log-probability shapes (legacy completions and chat) from per-token entries: names of partial
UTF-8 tokens, text offsets across a character split over tokens, echo's null first token."""

from __future__ import annotations

from gpt2.serve.logprobs import TokenLogprob, chat, legacy, merge_legacy, text_offsets, token_text, unscored
from gpt2.tokenizer import decode, decode_bytes, encode


def test_token_text_names_partial_characters_by_their_bytes(tokenizer_ok):
    ids = encode("🦜")
    assert len(ids) > 1  # one character, several byte-level tokens
    names = [token_text(t) for t in ids]
    assert all(n.startswith("bytes:\\x") for n in names)
    assert bytes.fromhex("".join(n[6:].replace("\\x", "") for n in names)).decode() == "🦜"
    assert token_text(encode(" hello")[0]) == " hello"


def test_text_offsets_index_the_returned_text(tokenizer_ok):
    text = "A 🦜 said: naïve"
    ids = encode(text)
    offsets = text_offsets(ids)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # the emoji belongs to the token that completes its bytes: that token starts at the emoji's character
    k = next(i for i in range(len(ids)) if decode_bytes(ids[: i + 1]).endswith("🦜".encode()))
    assert offsets[k] == text.index("🦜") and offsets[k + 1] == text.index("🦜") + 1
    assert text[offsets[-1]:] == decode([ids[-1]])  # the last token's text ends the string
    assert text_offsets(ids, start=7) == [o + 7 for o in offsets]


def test_legacy_shape_with_echo(tokenizer_ok):
    prompt, answer = encode("Hello world"), encode("!")
    echoed = [unscored(prompt[0])] + [TokenLogprob(t, -1.5, [(t, -1.5), (0, -2.0)]) for t in prompt[1:]]
    generated = [TokenLogprob(answer[0], -0.25, [(answer[0], -0.25)])]
    out = merge_legacy([legacy(echoed), legacy(generated, start=len("Hello world"))])
    assert out["tokens"] == ["Hello", " world", "!"]
    assert out["token_logprobs"] == [None, -1.5, -0.25]
    assert out["top_logprobs"] == [None, {" world": -1.5, "!": -2.0}, {"!": -0.25}]
    assert out["text_offset"] == [0, 5, 11]


def test_chat_shape(tokenizer_ok):
    ids = encode("Hi")
    out = chat([TokenLogprob(ids[0], -0.5, [(ids[0], -0.5), (0, -3.0)])])
    assert out["content"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                               "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                                {"token": "!", "logprob": -3.0, "bytes": [33]}]}]
    assert out["refusal"] is None
