"""Every caller of the decoding engine gives the tokens of a fixed seeded model: `generate` greedy and sampled
with a seeded generator, the chat, PPO's rollouts, fine-tuning's samples and the server's engine."""

from __future__ import annotations

import io

import pytest
import torch
from serve_helpers import one_torch_thread

from gpt2.commands.chat import ChatConfig, ChatSession
from gpt2.decode.engine import Engine, SamplingParams
from gpt2.inference import generate, generate_stream, pad_right
from gpt2.model import GPT, GPTConfig
from gpt2.rlhf.heads import ActorCritic
from gpt2.rlhf.ppo import PPOHyper, rollout
from gpt2.train.finetune import answer_prompts

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

BLOCK = 64
# a full-window prompt and one near the window's end exercise the context-end rule
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 301], [42, 0, 0, 7], list(range(100, 100 + BLOCK - 3)), [1000],
           list(range(200, 200 + BLOCK))]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=BLOCK)).eval()


def run_generate(model: GPT, temperature: float = 0.0, seed: int | None = None, **kw) -> list[list[int]]:
    ids, mask = pad_right(PROMPTS)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return generate(model, ids, mask, temperature, 10, generator=generator, **kw)


def ppo_answers(model: GPT, temperature: float, seed: int | None) -> list[list[int]]:
    """The answer tokens of a PPO rollout (with the `<|endoftext|>` it may end on)."""
    actor = ActorCritic(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch, _ = rollout(actor, model, lambda ids, targets: torch.zeros(ids.size(0)), PROMPTS[:3],
                       PPOHyper(max_new_tokens=6, temperature=temperature), generator=generator)
    return [row[m].tolist() for row, m in zip(batch["targets"], batch["mask"])]


# tokens of a fixed seeded model (above), one list per prompt
GREEDY = [
    [11, 11, 5646, 5646, 5646, 5646, 5646, 5646, 5646, 5646],
    [301, 301, 301, 301, 28988, 28988, 28988, 28988, 28988, 28988],
    [7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
    [12471, 12471, 12471],
    [7454, 7454, 7454, 7454, 7454, 7454, 7454, 7454, 7454, 7454],
    [263],
]
TOP_K = [
    [23785, 19565, 19565, 35272, 33071, 16233, 12214, 9969, 7954, 28578],
    [38809, 47446, 1287, 39509, 43903, 25649, 22155, 22155, 46572, 9868],
    [3339, 23145, 8213, 9784, 17907, 47617, 17071, 9207, 37847, 25212],
    [6370, 28522, 11963],
    [11784, 19662, 24726, 14294, 41176, 147, 48847, 3044, 39263, 2130],
    [33608],
]
TOP_P = [
    [226, 38827, 40169, 8864, 32612, 9100, 6071, 7008, 18450, 29252],
    [5310, 37427, 7536, 47731, 10786, 9414, 5763, 2574, 226, 21513],
    [14396, 29856, 20228, 42560, 47719, 14672, 13153, 3354, 13366, 22222],
    [1337, 44636, 2722],
    [23748, 22680, 23081, 43989, 594, 30157, 40505, 12765, 25601, 8764],
    [3008],
]


def test_generate_greedy_tokens_are_unchanged(model):
    assert run_generate(model) == GREEDY


def test_generate_stops_at_its_eos_id(model):
    assert run_generate(model, eos_id=5646) == [GREEDY[0][:2], *GREEDY[1:]]


def test_generate_samples_the_same_tokens_for_a_seeded_generator(model):
    assert run_generate(model, 1.0, seed=0, top_k=50) == TOP_K
    assert run_generate(model, 0.8, seed=3, top_p=0.9) == TOP_P


def test_generate_stream_yields_the_same_steps(model):
    ids, mask = pad_right(PROMPTS)
    steps = generate_stream(model, ids, mask, 1.0, 10, generator=torch.Generator().manual_seed(5))
    assert [sorted(s) for s in steps] == [
        [(0, 41721), (1, 6350), (2, 45613), (3, 41223), (4, 46255), (5, 5867)],
        [(0, 8255), (1, 37081), (2, 1686), (3, 49964), (4, 30486)],
        [(0, 28361), (1, 3635), (2, 33123), (3, 35952), (4, 29152)],
        [(0, 49295), (1, 32671), (2, 2841), (4, 46248)],
        [(0, 33652), (1, 13140), (2, 2035), (4, 39457)],
        [(0, 49008), (1, 4529), (2, 26510), (4, 34155)],
        [(0, 13265), (1, 19639), (2, 8350), (4, 13222)],
        [(0, 2218), (1, 24543), (2, 40040), (4, 37364)],
        [(0, 48733), (1, 3070), (2, 22029), (4, 49595)],
        [(0, 29238), (1, 18036), (2, 2482), (4, 36798)],
    ]


def test_chat_greedy_answer_is_unchanged(model):
    session = ChatSession(model, ChatConfig(temperature=0.0, max_tokens=6, top_p=None), out=io.StringIO())
    assert session.reply("hi") == "\n" * 6


def test_ppo_rollout_answers_are_unchanged(model):
    assert ppo_answers(model, 0.0, None) == [tokens[:6] for tokens in GREEDY[:3]]
    assert ppo_answers(model, 1.0, 7) == [[26890, 33008, 10405, 42774, 14362, 18052],
                                          [9994, 11699, 31650, 42957, 10344, 36190],
                                          [33150, 21367, 18376, 27680, 22430, 3669]]


def test_finetune_samples_are_unchanged(model):
    assert answer_prompts(model, ["Say hi.", "Name a colour."], max_tokens=5) == [{"answer": "\n" * 5,
                                                                                  "stopped": False}] * 2


def test_server_engine_greedy_tokens_are_unchanged(model):
    engine = Engine(model, max_batch_size=2)  # the third request joins when a row is free
    got: dict[int, list] = {}
    for i, p in enumerate(PROMPTS[:3]):
        got[i] = []
        engine.submit(p, SamplingParams(max_tokens=8, temperature=0.0),
                      lambda e, i=i: got[i].append((e.token, e.finish_reason)))
    while engine.has_work():
        engine.step()
    for i, tokens in enumerate(GREEDY[:3]):
        assert got[i] == [(t, None) for t in tokens[:8]] + [(None, "length")]
