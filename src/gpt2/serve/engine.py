"""Continuous batching: many requests decoded together, one batched forward pass per step.

Design decisions:
- One `KVCache` holds every running sequence ("row"). Its columns are shared time slots and all rows are
  *right-aligned*: every row writes its next token into the same column, so one forward of shape (B, 1)
  advances the whole batch. Each row carries its own positions (`position_ids`) and the cache's per-row
  `valid` mask hides the columns before the row started, so a sequence's tokens do not depend on what
  else is in the batch (tested: batched greedy == `gpt2.inference.generate` one prompt at a time).
- A request joins at the next step: the requests admitted at a step are prefilled together (left-aligned,
  exactly like `generate_stream`) in a cache of their own, their first token is sampled from the prefill
  logits, and the two caches are re-packed into one, right-aligned to a common column. Re-packing also
  drops leading columns that no row uses any more, so the cache stays at most `block_size` + headroom
  columns wide however long the server runs (a row never spans more columns than it has tokens).
- A request leaves as soon as it finishes (end-of-text, `max_tokens`, the context window's end, or
  `cancel()` when its client went away): its row is dropped from the cache before the next step.
- Sampling is per row: temperature, top-p, top-k and a `torch.Generator` of its own (seeded from the
  request's seed), so a seeded request gives the same tokens alone or in a crowd.
- The engine is plain synchronous code (`step()`), which the tests drive by hand; `start()` runs it in a
  background thread that sleeps while there is no work. Results go out through a per-request callback
  (`sink(token, None)` for each token, then `sink(None, finish_reason)`), which the HTTP layer turns into an
  asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2.inference import left_align, pad_right, sample_next
from gpt2.kernels import Head, freeze, frozen
from gpt2.model import GPT, KVCache
from gpt2.tokenizer import EOT

Sink = Callable[[int | None, str | None], None]  # (token, None) per token; (None, finish_reason) once


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # None = a fresh random seed


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    cancelled: bool = False
    generated: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (thread-safe: a flag it polls)."""
        self.cancelled = True


class Engine:
    """Continuous-batching decoder around a `GPT` (see the module docstring)."""

    def __init__(self, model: GPT, max_batch_size: int = 16, eos_id: int | None = EOT, headroom: int = 64):
        self.model = model.eval()
        freeze(model)  # the weights never change while serving: pack them for decoding once
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = model.config.block_size
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id
        self.headroom = headroom  # spare cache columns allocated at each re-pack
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # running requests, in cache row order
        self.cache: KVCache | None = None
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) position of next token
        self.last_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) token to feed next
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and stats)
        # the same products as `generate_stream` (gpt2.kernels.frozen), so outputs match it bit for bit;
        # set for the duration of each step
        self.head: Head | None = None

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; it joins the batch at the next step. The prompt must be 1..block_size-1 tokens
        (the HTTP layer checks this and answers 400 otherwise)."""
        if not 0 < len(prompt) < self.block_size:
            raise ValueError(f"prompt has {len(prompt)} tokens; it must have 1 to {self.block_size - 1}")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        req = Request(list(prompt), params, sink)
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._cv:
            self.waiting.append(req)
            self._cv.notify()
        return req

    @property
    def num_active(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def start(self) -> None:
        """Run `step()` in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ one scheduling step

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones (prefill + first token), then decode one token for
        every running row in a single batched forward pass."""
        self._drop_cancelled()
        with frozen(self.model) as head:
            self.head = head
            self._admit()
            if self.rows:
                self._decode()

    def _drop_cancelled(self) -> None:
        with self._cv:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
        self._keep([not r.cancelled for r in self.rows])

    def _admit(self) -> None:
        with self._cv:
            free = self.max_batch_size - len(self.rows)
            new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not new:
            return
        try:
            cache, last, next_pos = self._prefill([r.prompt for r in new])
            tokens = self._choose(last, new)
        except Exception as e:  # e.g. out of memory: fail these requests, keep serving the others
            for r in new:
                self._finish(r, f"error: {type(e).__name__}: {e}")
            return
        keep = self._emit(new, tokens, next_pos)
        rows = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        if len(rows) == 0:
            return
        cache.select_rows(rows)
        new = [r for r, k in zip(new, keep) if k]
        self.cache = self._repack([c for c in (self.cache, cache) if c is not None])
        self.rows += new
        self.next_pos = torch.cat([self.next_pos, next_pos[rows]])
        self.last_tokens = torch.cat([self.last_tokens, tokens[rows]])

    def _prefill(self, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Run the prompts through the model together, left-aligned as in `generate_stream`.
        Returns their cache, last-position hidden states (b, C) and each row's next position (b,)."""
        ids, mask = pad_right(prompts)
        ids, valid = left_align(ids.to(self.device), mask.to(self.device))  # (b, T), real tokens end at T-1
        position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)  # (b, T)
        cache = KVCache(self.model.config, len(prompts), ids.size(1), device=self.device, dtype=self.dtype)
        hidden = self.model.hidden_states(ids, position_ids, cache.attn_mask(valid), cache)  # (b, T, C)
        return cache, hidden[:, -1], mask.sum(1).to(self.device)

    def _decode(self) -> None:
        assert self.cache is not None
        if self.cache.length >= self.cache.max_len:
            self.cache = self._repack([self.cache])
        hidden = self.model.hidden_states(self.last_tokens[:, None], self.next_pos[:, None], None, self.cache)
        self.next_pos = self.next_pos + 1
        tokens = self._choose(hidden[:, -1], self.rows)
        self.last_tokens = tokens
        self.steps += 1
        self._keep(self._emit(self.rows, tokens, self.next_pos))

    # ------------------------------------------------------------------ helpers

    def _choose(self, last: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """One token per row from its last hidden state (B, C): greedy rows take the exact argmax (screened
        on CPU, as in `generate_stream`), the others sample with their own parameters and generator."""
        tokens = torch.empty(len(reqs), dtype=torch.long, device=last.device)
        greedy = [i for i, r in enumerate(reqs) if r.params.temperature <= 0]
        if greedy:
            h = last[greedy]
            tokens[greedy] = self.head.argmax(h) if self.head is not None else self.model.logits(h).argmax(-1)
        sampled = [i for i, r in enumerate(reqs) if r.params.temperature > 0]
        if sampled:
            logits = self.model.logits(last[sampled], self.head)  # (b, V)
            for j, i in enumerate(sampled):
                p = reqs[i].params
                tokens[i] = sample_next(logits[j:j + 1], p.temperature, p.top_k, p.top_p, reqs[i].generator)[0]
        return tokens

    def _emit(self, reqs: list[Request], tokens: torch.Tensor, positions: torch.Tensor) -> list[bool]:
        """Send each row its token; return which rows keep running. `positions[i]` is where token i sits."""
        keep = []
        for r, tok, pos in zip(reqs, tokens.tolist(), positions.tolist()):
            if r.cancelled:
                keep.append(False)
                continue
            if self.eos_id is not None and tok == self.eos_id:
                self._finish(r, "stop")
                keep.append(False)
                continue
            r.generated += 1
            if not self._send(r, tok, None):
                keep.append(False)
                continue
            # the token just placed at `pos` used the window's last position, or the budget is spent
            if r.generated >= r.params.max_tokens or pos >= self.block_size - 1:
                self._finish(r, "length")
                keep.append(False)
            else:
                keep.append(True)
        return keep

    def _finish(self, r: Request, reason: str) -> None:
        self._send(r, None, reason)

    @staticmethod
    def _send(r: Request, token: int | None, reason: str | None) -> bool:
        """Deliver to the request's sink; a sink that fails (its client's event loop is gone) cancels it."""
        try:
            r.sink(token, reason)
            return True
        except Exception:
            r.cancel()
            return False

    def _keep(self, keep: list[bool]) -> None:
        """Drop the running rows whose `keep` is False (finished or cancelled), freeing their slots."""
        if all(keep):
            return
        idx = [i for i, k in enumerate(keep) if k]
        self.rows = [self.rows[i] for i in idx]
        if not idx:
            self.cache = None
            self.next_pos = self.next_pos[:0]
            self.last_tokens = self.last_tokens[:0]
            return
        rows = torch.tensor(idx, dtype=torch.long, device=self.device)
        assert self.cache is not None
        self.cache.select_rows(rows)
        self.next_pos, self.last_tokens = self.next_pos[rows], self.last_tokens[rows]

    def _repack(self, caches: list[KVCache]) -> KVCache:
        """Stack the rows of `caches` into one fresh cache, each right-aligned so that all rows' next slot is
        the same column, without the leading columns that no row uses (plus `headroom` spare columns)."""
        spans = []
        for c in caches:
            used = c.valid[:, : c.length].any(dim=0)  # (S,) columns some row of this cache uses
            first = int(used.float().argmax()) if bool(used.any()) else c.length
            spans.append((first, c.length))
        width = max(end - start for start, end in spans)
        cap = width + self.headroom
        total = sum(c.valid.size(0) for c in caches)
        out = KVCache(self.model.config, total, cap, device=self.device, dtype=self.dtype)
        # KVCache memory starts uninitialised: zero the slots no row will write (masked, but NaN garbage
        # would survive the 0-weight in attention: 0 * NaN = NaN)
        out.k[:, :, :, :width] = 0
        out.v[:, :, :, :width] = 0
        b = 0
        for c, (start, end) in zip(caches, spans):
            n, span = c.valid.size(0), end - start
            out.k[:, b:b + n, :, width - span:width] = c.k[:, :, :, start:end]
            out.v[:, b:b + n, :, width - span:width] = c.v[:, :, :, start:end]
            out.valid[b:b + n, width - span:width] = c.valid[:, start:end]
            b += n
        out.length = width
        return out

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        for r in self.rows:
            self._send(r, None, "error: " + message)
        self._keep([False] * len(self.rows))
