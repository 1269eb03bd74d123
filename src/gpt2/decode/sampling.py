"""Choosing each row's next token, and the log-probabilities clients ask for.

Design decisions:
- **Choosing** (`choose`) is per row: temperature, top-k, top-p, logit bias, presence/frequency penalties
  (OpenAI semantics, over the tokens that row has generated) and a generator of its own. An all-greedy batch
  without extras takes one `argmax` for all rows. Sampling is numerically safe: a temperature whose inverse
  overflows float32 (1e-45, 1e-300) is greedy, top-p always keeps the most likely token, and probabilities
  are formed from max-subtracted logits, so they are never NaN. A row whose choice raises gets the exception
  back in its slot; its batch-mates still get their tokens (the engine ends only that request).
- **Log-probabilities** are the log-softmax of the model's raw logits (before temperature, bias and
  penalties), computed only for rows that ask (`SamplingParams.logprobs`), so they cost nothing otherwise.
  `score_tokens` gives every token's log-probability given its prefix with one full forward (for `echo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_F32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    """How one request's tokens are chosen (OpenAI's fields and meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # None = a fresh random seed
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before choosing
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence of every token generated so far
    logprobs: int | None = None  # None = not asked; k >= 0 = the chosen token's log-prob and the top-k
    stop: list[str] | None = None  # strings that end the generation when its text contains one (not included)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits) and the `top` most likely alternatives."""

    token: int
    logprob: float | None  # None only for echo's first prompt token (nothing predicts it)
    top: list[tuple[int, float]]


@dataclass
class RowSampler:
    """One row's choosing state: its parameters, its generator, and the tokens it has generated so far
    (what the presence and frequency penalties count)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    history: list[int] = field(default_factory=list)

    @property
    def plain_greedy(self) -> bool:
        p = self.params
        return (is_greedy(p.temperature) and not p.logit_bias and not p.presence_penalty
                and not p.frequency_penalty and p.logprobs is None)


@dataclass
class Choice:
    token: int
    logprob: TokenLogprob | None = None


def is_greedy(temperature: float) -> bool:
    """Temperature 0, or one so small that 1/temperature overflows float32: both mean argmax."""
    return temperature <= 0 or 1.0 / temperature > _F32_MAX


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy where `is_greedy(temperature)`, else softmax(logits / T)
    with optional top-k and nucleus (top-p) filtering. Never forms a NaN probability (see module docstring).

    Speed: a step samples from 50257 logits per row. Elementwise ops over that many run multi-threaded, and
    each costs a thread hand-off that can take longer than the op itself on a busy machine (as can
    `torch.multinomial`, with its input checks), while ops along the row (argmax, softmax, cumsum) stay on one
    thread. So the maximum is read through argmax, 1/T is applied with one multiply (the max-subtraction that
    keeps a tiny T finite only runs when max / T would overflow), and the draw is an inverse-CDF lookup: one
    uniform number per row against the cumulative probabilities."""
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    logits = logits.float()
    inv_t = 1.0 / temperature
    top = logits.gather(-1, logits.argmax(-1, keepdim=True))  # (B, 1) each row's maximum
    if not bool(torch.isfinite(top * inv_t).all()):
        # max-subtracted, then scaled by a finite 1/T: the top token is exactly 0, the others <= 0 or -inf
        logits = logits - top
    logits = logits * inv_t  # finite at the top: softmax (which subtracts the max itself) gives no NaN
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p; the most
        # likely token always stays (a top_p that rounds to 0 in float32 would otherwise drop them all)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V), non-decreasing, last column ~1
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    # the first token whose cumulative mass exceeds u: never a zero-probability one (its mass adds nothing)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row's logits (V,) with its logit bias and presence/frequency penalties applied (OpenAI: the
    penalties count the tokens generated so far, not the prompt)."""
    if not (params.logit_bias or params.presence_penalty or params.frequency_penalty):
        return logits
    logits = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        if bool(((ids < 0) | (ids >= logits.numel())).any()):
            raise ValueError(f"logit_bias has a token id outside the vocabulary (0..{logits.numel() - 1})")
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if history and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(history, device=logits.device), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under one row's raw logits (V,) and the `top` most likely tokens."""
    logp = logits.float().log_softmax(-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), alternatives)


def choose(logits: torch.Tensor, samplers: list[RowSampler]) -> list[Choice | Exception]:
    """Each row's next token from its logits (B, V) and its sampler (whose history it extends). A row whose
    choice raised gets the exception instead of a `Choice`; the other rows are unaffected."""
    if all(s.plain_greedy for s in samplers):
        tokens = logits.argmax(-1).tolist()  # the common case: one op for the whole batch
        out: list[Choice | Exception] = [Choice(t) for t in tokens]
    elif _shared_plain(samplers):  # `generate`: one temperature/top-k/top-p and generator for all rows
        p = samplers[0].params
        tokens = sample_next(logits, p.temperature, p.top_k, p.top_p, samplers[0].generator).tolist()
        out = [Choice(t) for t in tokens]
    else:
        out = [_choose_row(logits[i], s) for i, s in enumerate(samplers)]
    for s, c in zip(samplers, out):
        if isinstance(c, Choice):
            s.history.append(c.token)
    return out


def _shared_plain(samplers: list[RowSampler]) -> bool:
    """All rows share one parameter set and one generator, and nothing is per row (bias, penalties, log-probs)."""
    first = samplers[0]
    p = first.params
    return (not (p.logit_bias or p.presence_penalty or p.frequency_penalty) and p.logprobs is None
            and all(s.params is p and s.generator is first.generator for s in samplers))


def _choose_row(logits: torch.Tensor, s: RowSampler) -> Choice | Exception:
    try:
        p = s.params
        adjusted = adjusted_logits(logits, p, s.history)
        token = int(sample_next(adjusted[None], p.temperature, p.top_k, p.top_p, s.generator)[0])
        lp = token_logprob(logits, token, p.logprobs) if p.logprobs is not None else None
        return Choice(token, lp)
    except Exception as e:  # isolated: only this row fails
        return e
