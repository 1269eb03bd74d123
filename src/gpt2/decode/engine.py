"""The decoding engine: continuous batching, many requests decoded together, one batched forward pass per step.

It is the one loop that steps the decoder: `gpt2.inference.generate` (and so the chat, fine-tuning's samples and
PPO's rollouts) runs its batches through `run_batch`, the server through `submit` and `run`. It admits rows,
chooses their tokens and states every stop rule once (`_deliver`): end-of-text, `max_tokens`, the context
window's end and stop strings.

Design decisions:
- The engine schedules: which requests run, when they join and leave, and where their tokens go. The tensor
  work (prefill, the batched step, the KV cache, choosing tokens, log-probs) is the decoder's and the sampler's,
  so a request's greedy tokens equal `generate`'s for its prompt alone whatever else is running (tested).
- `run_batch` decodes prompts submitted together in the calling thread, sharing one `SamplingParams` and one
  generator: `choose` then draws one uniform number per row per round for the whole batch, in row order, the
  draws `generate` makes, so a seeded generator gives the same tokens whichever caller runs it.
- A request joins at the next step: the requests admitted at a step are prefilled together, their first
  token is chosen from the prefill logits, and `Rows.stack` re-packs their cache and the running one into
  one (which also drops columns no row uses any more, so the cache stays at most `block_size` + headroom
  columns wide however long the server runs).
- A request leaves as soon as it finishes (end-of-text, `max_tokens`, the context window's end, one of its stop
  strings in its text, `cancel()` when its client went away, or an error in choosing its token): its row is
  dropped before the next step. Stop strings are matched on the decoded text (`TextStream`), where one can start
  inside a token; the caller cuts the text it shows with the same `TextStream`.
  A failure confined to one row (say a bad logit bias) ends only that request, with "error", and is logged
  with its cause; a failing forward pass ends the requests it served.
- Sampling is per row: each request's own parameters and a `torch.Generator` seeded from its seed, so a
  seeded request gives the same tokens alone or in a crowd.
- The engine is plain synchronous code (`step()`), which the tests drive by hand; `run()` runs it in the
  calling thread and `start()` in a background one, either sleeping while there is no work. Results go out
  through a per-request callback, `sink(TokenEvent)`: one event per generated token, then one with the finish
  reason; an event carries its token's `TokenLogprob` (log-prob and alternatives) when the request asked for
  them, and the end's event carries the `<|endoftext|>` entry a request stopped on. The HTTP layer turns the
  events into an asyncio queue with `call_soon_threadsafe`; nothing else flows between the two.
- **One thread does the tensor work.** PyTorch's CPU threads are OpenMP's, which keeps a pool of workers per
  thread that runs parallel work; once two threads have, their pools contend for the cores and every parallel
  region waits longer (measured: docs/benchmarks-log.md, "serve-2026-11-30-engine-thread"). So `gpt2 serve`
  runs the engine in its main thread, where it loaded the model (the HTTP server runs in another, which does
  no tensor work), and other tensor work the server needs (scoring a prompt for `echo`) goes through the
  engine's thread with `call()`.
- **Shutting down without leaving a client hanging.** `drain(grace)` (the server's Ctrl+C / SIGTERM) stops
  admitting: the waiting requests, and any submitted later, end at the next step with the finish reason
  `SHUTDOWN`, while the running ones may finish within `grace` seconds and are then ended with it too, so every
  client gets an end (the HTTP layer turns it into a 503, or a stream's error event and `[DONE]`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gpt2.decode.decoder import Decoder
from gpt2.decode.kv_cache import Rows
from gpt2.decode.sampling import Choice, RowSampler, SamplingParams, TokenLogprob, choose
from gpt2.decode.text import TextStream
from gpt2.model import GPT
from gpt2.tokenizer import EOT

__all__ = ["SHUTDOWN", "Engine", "Request", "SamplingParams", "Sink", "TokenEvent"]

log = logging.getLogger(__name__)

SHUTDOWN = "error: the server is shutting down"  # the finish reason of requests ended by `drain`


@dataclass(frozen=True)
class TokenEvent:
    """What a request's sink gets: a generated token, or (token None) the end with its finish reason."""

    token: int | None
    logprob: TokenLogprob | None = None  # asked for: the token's (or, at a "stop" end, <|endoftext|>'s)
    finish_reason: str | None = None  # "stop", "length", "error..." on the last event only


Sink = Callable[[TokenEvent], None]


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    cancelled: bool = False
    generated: int = 0
    sampler: RowSampler | None = field(default=None, repr=False)
    text: TextStream | None = field(default=None, repr=False)  # only with stop strings: what they are matched on
    error: Exception | None = field(default=None, repr=False)  # why the engine failed it, for `run_batch` to raise

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (thread-safe: a flag it polls)."""
        self.cancelled = True


class Engine:
    """Continuous-batching scheduler on the decoding core (see the module docstring)."""

    def __init__(self, model: GPT, max_batch_size: int = 16, eos_id: int | None = EOT, headroom: int = 64,
                 decoder: Decoder | None = None):
        """`decoder`: the decoder to run on, made for this model's current weights (the server keeps one for its
        life; `generate` makes one per call, as training may change the weights); default: an eager one. Make it
        in the thread that will run the engine (see "One thread does the tensor work")."""
        self.model = model.eval()
        self.decoder = decoder if decoder is not None else Decoder(self.model)
        self.device = self.decoder.device  # (a compiled decoder's model may hold no weights)
        self.block_size = model.config.block_size
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id
        self.headroom = headroom  # spare cache columns allocated at each re-pack
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # running requests, in the decoder's row order
        self.batch: Rows | None = None  # their cache and next-token logits
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_at: float | None = None  # see `drain`: time.monotonic() after which running rows end
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # see `call`
        self.steps = 0  # decode steps run (for tests and stats)

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; it joins the batch at the next step. The prompt must be 1..block_size-1 tokens
        (the HTTP layer checks this and answers 400 otherwise)."""
        self._check_prompt(prompt, self.block_size - 1)
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._queue(prompt, params, sink, generator)

    def run_batch(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                  ) -> Iterator[list[tuple[int, TokenEvent]]]:
        """Decode `prompts` together to their ends in the calling thread, on an idle engine: yield each round's
        events as (prompt index, event), the first round's from the prefill, then one per step. The rows share
        `params` and `generator` (None: torch's global one), see the module docstring. A prompt may fill the
        whole window (it gets the one token its last position predicts) unless they all do: then no row has
        room and nothing is yielded. A row that fails raises its error here."""
        if self.has_work():
            raise RuntimeError("run_batch needs an idle engine")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts, more than max_batch_size ({self.max_batch_size})")
        for p in prompts:
            self._check_prompt(p, self.block_size)
        if not prompts:
            return
        # the most tokens a row can get: its budget, or the shortest prompt's positions left in the window
        room = min(params.max_tokens, self.block_size - min(len(p) for p in prompts))
        if room <= 0:
            return
        events: list[tuple[int, TokenEvent]] = []
        reqs = [self._queue(p, params, lambda e, i=i: events.append((i, e)), generator)
                for i, p in enumerate(prompts)]
        self._admit(self._take_waiting()[0], room)
        while True:
            for r in reqs:
                if r.error is not None:
                    raise r.error
            yield list(events)
            events.clear()
            if not self.rows:
                return
            self._decode()

    def _check_prompt(self, prompt: list[int], longest: int) -> None:
        if not 0 < len(prompt) <= longest:
            raise ValueError(f"prompt has {len(prompt)} tokens; it must have 1 to {longest}")

    def _queue(self, prompt: list[int], params: SamplingParams, sink: Sink, generator: torch.Generator | None,
               ) -> Request:
        req = Request(list(prompt), params, sink, sampler=RowSampler(params, generator),
                      text=TextStream(params.stop) if params.stop else None)
        with self._cv:
            self.waiting.append(req)
            self._cv.notify()
        return req

    @property
    def cache(self):
        """The running rows' KV cache (None when idle), for inspection."""
        return self.batch.cache if self.batch is not None else None

    @property
    def num_active(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def draining(self) -> bool:
        """Whether `drain` was called: no request is admitted any more."""
        return self._drain_at is not None

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self._jobs)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` in the engine's thread before its next step (thread-safe); the future gets its result or
        its exception. For tensor work besides decoding, which would slow decoding from another thread (see the
        module docstring)."""
        future: Future = Future()
        with self._cv:
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    def run(self) -> None:
        """Run `step()` in the calling thread until `stop()` (from another thread or a signal handler). A `stop()`
        that came first (the HTTP server failing to bind before this thread got here) ends it at once: the flag
        is not reset here, or that stop would be lost and the process would never exit."""
        self._loop()

    def start(self) -> None:
        """Run `step()` in a daemon thread until `stop()` (for embedding the engine beside other work; see
        "One thread does the tensor work" for what a second thread doing tensor work costs)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after its current step; jobs given to `call` and not started are cancelled."""
        with self._cv:
            self._stopping = True
            for _, future in self._jobs:  # their callers get CancelledError rather than waiting for ever
                future.cancel()
            self._jobs.clear()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def drain(self, grace: float) -> None:
        """Admit no more requests: the waiting ones, and any submitted from now on, end at the next step with the
        finish reason `SHUTDOWN`; the running ones may go on for `grace` seconds, then end with it too. A later
        call may shorten the grace (a second Ctrl+C: 0), never lengthen it. Safe in a signal handler of the
        engine's own thread: it only sets a deadline, under the engine's re-entrant lock, and wakes the loop."""
        at = time.monotonic() + max(grace, 0.0)
        with self._cv:
            self._drain_at = at if self._drain_at is None else min(self._drain_at, at)
            self._cv.notify()

    # ------------------------------------------------------------------ one scheduling step

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones (prefill + first token), then decode one token for
        every running row in a single batched forward pass. Jobs given to `call` run first. While draining
        (see `drain`), the waiting requests are ended instead of admitted, and past the grace the running ones."""
        self._run_jobs()
        self._keep([not r.cancelled for r in self.rows])
        new, refused = self._take_waiting()
        if refused:
            log.info("shutting down: %d queued request(s) refused", len(refused))
        for r in refused:
            self._send(r, None, SHUTDOWN)
        if self.rows and self._drain_at is not None and time.monotonic() >= self._drain_at:
            log.warning("shutting down: %d request(s) still running after the grace period ended", len(self.rows))
            self._end_rows(SHUTDOWN)
        if new:
            self._admit(new)
        if self.rows:
            self._decode()

    def _take_waiting(self) -> tuple[list[Request], list[Request]]:
        """(requests to admit now, as many as there are free slots; requests to refuse: all of them while
        draining), dropping cancelled ones. Under the lock, so that a request submitted meanwhile is either taken
        here or left for the next step."""
        with self._cv:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
            if self._drain_at is not None:
                refused = list(self.waiting)
                self.waiting.clear()
                return [], refused
            free = self.max_batch_size - len(self.rows)
            return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))], []

    def _run_jobs(self) -> None:
        while True:
            with self._cv:
                if not self._jobs:
                    return
                fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller gets it; the engine goes on
                    future.set_exception(e)

    def _admit(self, new: list[Request], room: int | None = None) -> None:
        """Prefill `new` and choose their first tokens; `room`: free cache columns (default: the headroom when
        idle, none otherwise, as re-packing below adds the headroom anyway)."""
        if room is None:
            room = self.headroom if self.batch is None else 0
        try:
            batch = self.decoder.prefill([r.prompt for r in new], room=room)
        except Exception as e:  # e.g. out of memory: fail these requests, keep serving the others
            log.exception("prefill failed for %d request(s)", len(new))
            for r in new:
                r.error = e
                self._send(r, None, f"error: {type(e).__name__}: {e}")
            return
        keep = self._emit(new, choose(batch.logits, [r.sampler for r in new]), batch.positions)
        batch.keep(keep)
        new = [r for r, k in zip(new, keep) if k]
        if not new:
            return
        running = [self.batch] if self.batch is not None else []
        self.batch = Rows.stack(running + [batch], self.headroom) if running else batch
        self.rows += new

    def _decode(self) -> None:
        assert self.batch is not None
        if self.batch.cache.length >= self.batch.cache.capacity:
            self.batch = Rows.stack([self.batch], self.headroom)  # compacts, and makes room
        tokens = [r.sampler.history[-1] for r in self.rows]
        self.decoder.step(self.batch, tokens)
        self.steps += 1
        chosen = choose(self.batch.logits, [r.sampler for r in self.rows])
        self._keep(self._emit(self.rows, chosen, self.batch.positions))

    # ------------------------------------------------------------------ helpers

    def _emit(self, reqs: list[Request], chosen: list[Choice | Exception], positions: list[int]) -> list[bool]:
        """Send each row its token; return which rows keep running. `positions[i]` is where token i sits."""
        keep = []
        for r, c, pos in zip(reqs, chosen, positions):
            keep.append(self._deliver(r, c, pos))
        return keep

    def _deliver(self, r: Request, c: Choice | Exception, pos: int) -> bool:
        if r.cancelled:
            return False
        if isinstance(c, Exception):
            log.error("choosing a token failed for one request (%s: %s); ending it", type(c).__name__, c,
                      exc_info=c)
            r.error = c
            self._send(r, None, "error")
            return False
        if self.eos_id is not None and c.token == self.eos_id:
            self._send(r, None, "stop", c.logprob)  # its entry too: clients list the token a choice stopped on
            return False
        r.generated += 1
        if not self._send(r, c.token, None, c.logprob):
            return False
        if r.text is not None:
            r.text.push(c.token)
            if r.text.stopped:  # a stop string appeared: the caller cuts the text before it
                self._send(r, None, "stop")
                return False
        # the token just placed at `pos` used the window's last position, or the budget is spent
        if r.generated >= r.params.max_tokens or pos >= self.block_size - 1:
            self._send(r, None, "length")
            return False
        return True

    @staticmethod
    def _send(r: Request, token: int | None, reason: str | None, logprob: TokenLogprob | None = None) -> bool:
        """Deliver to the request's sink; a sink that fails (its client's event loop is gone) cancels it."""
        try:
            r.sink(TokenEvent(token, logprob, reason))
            return True
        except Exception:
            r.cancel()
            return False

    def _keep(self, keep: list[bool]) -> None:
        """Drop the running rows whose `keep` is False (finished or cancelled), freeing their slots."""
        if all(keep):
            return
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        if not self.rows:
            self.batch = None
            return
        assert self.batch is not None
        self.batch.keep(keep)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait(timeout=1.0)
                    self.decoder.maybe_switch()  # idle: a background compile that is ready takes over now
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        log.error("engine step failed: %s; ending the %d running request(s)", message, len(self.rows))
        self._end_rows("error: " + message)

    def _end_rows(self, reason: str) -> None:
        """End every running request with `reason` and drop its row."""
        for r in self.rows:
            self._send(r, None, reason)
        self._keep([False] * len(self.rows))
