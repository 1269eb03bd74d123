"""The one decoding core: the KV cache, prefill, one batched step, and choosing each row's next token.

`gpt2.inference.generate` (the seed's API, the chat) and `gpt2.serve.engine` (continuous batching) both run
on this module; nothing else reads or writes a cache. Its forward is the model's own or, compiled, the model's
pieces from `gpt2.compiled` with the same attention between them: the cache and the masks are the same. The
model (`gpt2.model`) stays pure: attention stores and reads keys/values through `KVStore.update`, and this
module passes it positions and masks.

Design decisions:
- **Rows and shared columns.** A `KVCache` is pre-allocated once per batch, (B, nh, S, hs) per layer for keys
  and for values, zero-filled (a slot that is masked out still enters attention with weight 0, and 0 * NaN from
  uninitialised memory would be NaN). Its columns are time slots shared by all rows: every row writes its
  next token into the same column, so one forward of shape (B, 1) advances the whole batch. `valid[b, s]`
  says whether slot `s` of row `b` holds a real token; positions are passed separately, so a row's slots
  need not equal its positions. Prompts are left-aligned (each row's last real token in the prompt's last
  column), which makes right-padded input exact: a row's output never depends on its batch-mates.
- **Masks only where needed.** A step attends to the used columns only (`cache.length`), and without any
  mask when no used slot is padding (`cache.holes` is False: an unpadded batch), which is the common case
  and spares building and reading a mask. The flag is kept on the host, so a step needs no device sync.
- **Rows come and go.** `Rows.keep` drops finished rows from the cache (a batch gets cheaper as its prompts
  end); `Rows.stack` admits new rows by re-packing several caches into one, right-aligned to a common column
  and without the leading columns no row uses any more, so a long-running server's cache stays at most
  `block_size` + headroom columns wide.
- **Last position only.** Prefill projects only each row's last hidden state onto the vocabulary: the
  50304-wide head over a whole prompt would cost more than the prompt itself.
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

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2.compiled import BackgroundCompile, CompiledForward
from gpt2.compiled import load as load_compiled
from gpt2.data.batching import PAD_ID, pad_right
from gpt2.model import GPT, GPTConfig

_F32_MAX = torch.finfo(torch.float32).max


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------- padding


def left_align(input_ids: torch.Tensor, attention_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each right-padded row's real tokens to end in the last column. Returns (ids, valid bool)."""
    B, T = input_ids.shape
    lengths = attention_masks.sum(dim=1)  # (B,)
    cols = torch.arange(T, device=input_ids.device)[None]  # (1, T)
    # For output column c of row b, take source column c - (T - len_b) (a real token, or padding before).
    src = cols - (T - lengths)[:, None]  # (B, T)
    valid = src >= 0
    ids = torch.gather(input_ids, 1, src.clamp(min=0)).masked_fill(~valid, PAD_ID)
    return ids, valid


# ---------------------------------------------------------------------------------------------- the cache


class KVCache:
    """Pre-allocated keys and values for a batch of rows (see the module docstring); a `gpt2.model.KVStore`.

    Between forwards, `length` columns are filled. `extend` claims the next T columns for a forward and
    returns its attention mask; attention then writes its keys/values there through `update`; `commit`
    makes them part of the cache once every layer has written."""

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, capacity, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # (B, nh, S, hs)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # (B, nh, S, hs)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # columns filled so far
        self.holes = False  # some filled slot is padding: attention needs a mask
        self._pending = 0  # columns claimed by the forward in progress

    @property
    def batch_size(self) -> int:
        return self.valid.size(0)

    @property
    def capacity(self) -> int:
        return self.valid.size(1)

    def extend(self, T: int, new_valid: torch.Tensor | None = None, any_padding: bool = False,
               ) -> torch.Tensor | None:
        """Claim T columns for the next forward. `new_valid` (B, T) marks which new slots are real (None = all,
        the decoding step); `any_padding` says whether any of them is not (the caller knows, without a sync).
        Returns the (B, 1, T, S_used) boolean mask, or None where plain causal attention is exact (no padding
        anywhere and either a first block or a single new token)."""
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} columns > capacity {self.capacity}")
        self.valid[:, start:end] = True if new_valid is None else new_valid
        self.holes = self.holes or any_padding
        self._pending = T
        if not self.holes and (start == 0 or T == 1):
            return None
        q = torch.arange(start, end, device=self.valid.device)[:, None]  # (T, 1)
        k = torch.arange(end, device=self.valid.device)[None, :]  # (1, S)
        mask = (k <= q)[None] & self.valid[:, None, :end]  # (B, T, S): causal, real slots only
        # a query always sees itself, so no row is fully masked (padded queries would give NaN otherwise)
        mask |= (k == q)[None]
        return mask[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the claimed columns' keys and values (B, nh, T, hs) for `layer`; return the used part of the
        cache, each (B, nh, S_used, hs)."""
        start, end = self.length, self.length + self._pending
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    @torch.inference_mode()
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given rows (in that order)."""
        self.k, self.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        self.valid = self.valid[rows]

    def used_span(self) -> tuple[int, int]:
        """(first, end): the columns some row still uses (leading ones may be unused after rows left)."""
        used = self.valid[:, : self.length].any(dim=0)  # (S,)
        first = int(used.float().argmax()) if bool(used.any()) else self.length
        return first, self.length

    @classmethod
    @torch.inference_mode()
    def stack(cls, caches: list[KVCache], headroom: int) -> KVCache:
        """The rows of all `caches` in one new cache, each right-aligned so that every row's next slot is the same
        column, without leading columns no row uses, with `headroom` free columns."""
        spans = [c.used_span() for c in caches]
        width = max(end - start for start, end in spans)
        first = caches[0].k[0]
        _, nh, _, hs = first.shape
        out = cls.__new__(cls)
        rows = [c.batch_size for c in caches]
        shape = (sum(rows), nh, width + headroom, hs)
        out.k = [first.new_zeros(shape) for _ in caches[0].k]
        out.v = [first.new_zeros(shape) for _ in caches[0].v]
        out.valid = torch.zeros(shape[0], shape[2], dtype=torch.bool, device=first.device)
        out.length, out._pending = width, 0
        out.holes = any(c.holes for c in caches) or len({end - start for start, end in spans}) > 1
        b = 0
        for c, n, (start, end) in zip(caches, rows, spans):
            span = end - start
            for dst, src in zip(out.k + out.v, c.k + c.v):
                dst[b:b + n, :, width - span:width] = src[:n, :, start:end]
            out.valid[b:b + n, width - span:width] = c.valid[:n, start:end]
            b += n
        return out


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """Sequences decoded together: their cache, each row's next position, and the logits (B, V) from
    which each row's next token is chosen."""

    cache: KVCache
    positions: list[int]  # position of each row's next token (its length so far)
    logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.positions)

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows whose `keep` is False."""
        if all(keep):
            return
        idx = [i for i, k in enumerate(keep) if k]
        rows = torch.tensor(idx, dtype=torch.long, device=self.logits.device)
        self.cache.select_rows(rows)
        self.positions = [self.positions[i] for i in idx]
        self.logits = self.logits[rows]

    @staticmethod
    def stack(parts: list[Rows], headroom: int) -> Rows:
        """Admit rows: one `Rows` holding all of `parts`' rows, in order (see `KVCache.stack`)."""
        cache = KVCache.stack([p.cache for p in parts], headroom)
        return Rows(cache, [q for p in parts for q in p.positions], torch.cat([p.logits for p in parts]))


class Decoder:
    """Prefill and batched single-token steps of a `GPT` (evaluation mode, no autograd).

    Two ways to run the forward, the same arithmetic:
    - **eager** (default): the model's own forward. The vocabulary head is applied with a transposed copy of the
      tied embedding, (n_embd, vocab_size), made when the decoder is: for the few-row products of decoding, CPU
      BLAS runs `x @ W` with W (in, out) faster than `x @ W.T` (measured on the 124M head on an AMD EPYC, AVX2:
      30% at one row, 12% at eight), and the head is a third of the weights a step reads. The copy leaves out
      the padding rows and costs n_embd * vocab_size floats (154 MB at 124M).
    - **compiled** (CPU): the model's weight-bearing parts compiled ahead of time for this machine
      (`gpt2.compiled`: AOTInductor, pre-packed weights, autotuned GEMMs), with attention between them on this
      decoder's cache as in eager. Prefill, steps and `score` all run on it. `compile=True` makes them ready
      here and now (compiling them in a child process if they are not cached: minutes for 124M; loading them
      from the cache: seconds; `compile_seconds` says how long it took); `compile_in_background()` decodes
      eagerly meanwhile and switches between two steps, which is what the commands do (`decoder_for`).
      `release_weights=True` empties the model once the pieces hold the weights, so they are held once.
    Either way a decoder belongs to one set of weights (the head copy; the compiled pieces): `generate` makes one
    per call (training may change the weights between calls, and fused optimizers do not bump tensor versions,
    so staleness cannot be detected); the chat and the serving engine, whose weights are fixed, keep one."""

    def __init__(self, model: GPT, compile: bool = False, release_weights: bool = False):
        self.model = model
        self.config = model.config
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.head: torch.Tensor | None = None
        self._compiled: CompiledForward | None = None
        self._background: BackgroundCompile | None = None
        self._release = release_weights
        self._say: Callable[[str], None] = _stderr
        self.compile_status: dict | None = None  # the background compile's last status, once it has ended
        t0 = time.perf_counter()
        if compile:
            self._compiled = load_compiled(model, release_weights=release_weights)
            return_freed_memory()  # the released weights and the packages' loading buffers
        else:
            with torch.no_grad():
                self.head = w[: self.config.vocab_size].t().contiguous()  # (C, V)
        self.compile_seconds = time.perf_counter() - t0 if compile else 0.0  # the one-time cost, paid here

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def compile_in_background(self, build: bool = True, label: str = "",
                              say: Callable[[str], None] = _stderr) -> BackgroundCompile:
        """Decode eagerly now and switch to the compiled pieces once a thread has them loaded (compiled first, in
        the child process, if they are not cached and `build`; else only if cached). The switch happens at the
        start of the next prefill, step or full forward, in the thread that decodes: rows in flight keep their
        cache and go on. `say` gets the one line that says so (default: stderr)."""
        self._say = say
        self._background = BackgroundCompile(self.model, build=build, label=label, progress=say)
        return self._background

    def status(self) -> dict:
        """Which forward runs ("compiled" or "eager") and, when compiling was asked for, how far it is."""
        bg = self._background
        compile_status = bg.status() if bg is not None else self.compile_status
        out: dict = {"decoder": "compiled" if self.compiled else "eager"}
        if compile_status is not None:
            out["compile"] = compile_status
        return out

    def maybe_switch(self) -> None:
        """Switch to the compiled pieces if the background has them loaded (every forward calls this; an idle
        engine calls it too, so that an idle server switches without waiting for a request)."""
        bg = self._background
        if bg is None or not bg.done:
            return
        self._background, self.compile_status = None, bg.status()
        if bg.state == "failed":
            self._say(f"note: compiling failed ({bg.error}); decoding stays eager (--no-compile skips it)")
        if bg.forward is None:
            return
        self._compiled, self.head = bg.forward, None
        if self._release:
            self.model.to("meta")  # the pieces hold the weights now
        return_freed_memory()
        how = f"compiled in {bg.seconds - bg.load_seconds:.0f} s, loaded" if bg.built else "loaded from the cache"
        self._say(f"switched to compiled decoding {bg.seconds:.0f} s after the start ({how} in "
                        f"{bg.load_seconds:.1f} s)")

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """`GPT.hidden_states` (B, T, C), compiled or eager."""
        self.maybe_switch()
        if self._compiled is None:
            return self.model.hidden_states(ids, positions, attn_mask, cache)
        return self._compiled.hidden_states(self.model, ids, positions, attn_mask, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states (..., C): `model.logits`, as `x @ W` when eager."""
        if self._compiled is not None:
            return self._compiled.logits(hidden)
        return hidden @ self.head

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], room: int) -> Rows:
        """Run the prompts together (left-aligned) into a new cache with `room` free columns for new tokens.
        The returned rows' logits are for each prompt's next token."""
        ids, mask = pad_right(prompts)
        ids, valid = left_align(ids.to(self.device), mask.to(self.device))  # (B, T): real tokens end at T-1
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T): each row's own positions
        B, T = ids.shape
        lengths = [len(p) for p in prompts]
        cache = KVCache(self.config, B, T + room, device=self.device, dtype=self.dtype)
        attn_mask = cache.extend(T, valid, any_padding=min(lengths) < T)
        hidden = self.hidden_states(ids, positions, attn_mask, cache)  # (B, T, C)
        cache.commit()
        return Rows(cache, lengths, self.logits(hidden[:, -1]))  # (B, V): last column only

    @torch.inference_mode()
    def step(self, rows: Rows, tokens: list[int]) -> None:
        """Feed each row its chosen token; the rows' logits become those for the token after it."""
        cache = rows.cache
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor(rows.positions, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        attn_mask = cache.extend(1)
        hidden = self.hidden_states(tok, pos, attn_mask, cache)  # (B, 1, C)
        cache.commit()
        rows.positions = [p + 1 for p in rows.positions]
        rows.logits = self.logits(hidden[:, -1])  # (B, V)

    @torch.inference_mode()
    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) at every position of unpadded or right-padded ids (B, T), no cache: `model(ids)`."""
        return self.logits(self.hidden_states(ids))


def return_freed_memory() -> bool:
    """Hand memory that has been freed but is still held by the C allocator back to the OS (glibc's
    `malloc_trim`); returns whether it could. A compiled decoder frees the released model's weights and the
    compiled pieces' loading buffers (together larger than the weights), but glibc keeps freed heap pages
    mapped, so a chat or server would carry them for its whole life.
    Elsewhere (macOS, musl) there is no such call and nothing happens."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)  # its result only says whether any page was released
    return True


# Below this many parameters compiling is not worth it by default (see `docs/compiled_decoding.md`): a small
# model decodes fast eagerly, so the pieces' one-time cost (minutes on 2 cores even for a 2-layer model) is
# repaid only after far more tokens than a chat or a short serving session produces.
COMPILE_MIN_PARAMS = 50_000_000


def wants_compile(model: GPT, compile: bool | None) -> bool:
    """Whether a command decodes compiled: `compile` when given (True: on a CPU only, said in one line), else
    (auto) on a CPU for models of at least `COMPILE_MIN_PARAMS` parameters."""
    on_cpu = model.lm_head.weight.device.type == "cpu"
    if compile is None:
        return on_cpu and model.num_params() >= COMPILE_MIN_PARAMS
    if compile and not on_cpu:
        _stderr(f"note: --compile is for CPUs; decoding on {model.lm_head.weight.device.type} runs eagerly")
    return compile and on_cpu


def decoder_for(model: GPT, compile: bool | None, build: bool = True, label: str = "",
                say: Callable[[str], None] = _stderr) -> Decoder:
    """The decoder a command runs on. It decodes eagerly from the first token; where compiling is wanted
    (`wants_compile`) the compiled pieces are made ready in the background (built when not cached, if `build`)
    and the decoder switches to them between two steps, taking the model's weights over (`release_weights`:
    the command uses the model only through the decoder). Nothing ever waits for the compiler."""
    decoder = Decoder(model, release_weights=True)
    if wants_compile(model, compile):
        decoder.compile_in_background(build=build, label=label, say=say)
    return decoder


# ---------------------------------------------------------------------------------------------- choosing


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy where `is_greedy(temperature)`, else softmax(logits / T)
    with optional top-k and nucleus (top-p) filtering. Never forms a NaN probability (see module docstring).

    Speed: a step samples from 50257 logits per row. Elementwise ops over that many run multi-threaded, and
    each costs a thread hand-off that is slow on a busy machine (4-5 ms each measured on a loaded 2-core
    AMD EPYC, where the whole of `torch.multinomial`, with its input checks, took 18 ms), while ops along the
    row (argmax, softmax, cumsum) stay on one thread. So the maximum is read through argmax, 1/T is applied
    with one multiply (the max-subtraction that keeps a tiny T finite only runs when max / T would overflow),
    and the draw is an inverse-CDF lookup: one uniform number per row against the cumulative probabilities."""
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


# ---------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def score_tokens(model: GPT | Decoder, sequences: list[list[int]], top: int = 0) -> list[list[TokenLogprob | None]]:
    """For each sequence, each token's log-probability given the tokens before it and the `top` most likely
    alternatives there, from one full forward (the model's, or a decoder's: compiled, if it is); the first token
    has no prefix (None)."""
    if not any(sequences):
        return [[] for _ in sequences]
    if isinstance(model, Decoder):  # (a compiled decoder's model may hold no weights: ask the decoder)
        forward, device, model = model.full_logits, model.device, model.model
    else:
        forward, device = model, model.lm_head.weight.device
    ids, mask = pad_right(sequences)
    if ids.size(1) > model.config.block_size:
        raise ValueError(f"a sequence of {ids.size(1)} tokens is longer than the context window "
                         f"({model.config.block_size} tokens)")
    # right padding needs no mask: a real token only attends to the real tokens before it
    logp = forward(ids.to(device)).float().log_softmax(-1)  # (B, T, V)
    out: list[list[TokenLogprob | None]] = []
    for b, seq in enumerate(sequences):
        row: list[TokenLogprob | None] = [None] if seq else []
        if len(seq) > 1:
            lp = logp[b, : len(seq) - 1]  # (n-1, V): predictions for tokens 1..n-1
            targets = torch.tensor(seq[1:], device=device)
            chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
            tops = torch.topk(lp, min(top, lp.size(-1))) if top > 0 else None
            for t, token in enumerate(seq[1:]):
                alts = list(zip(tops.indices[t].tolist(), tops.values[t].tolist())) if tops is not None else []
                row.append(TokenLogprob(token, chosen[t], alts))
        out.append(row)
    return out

