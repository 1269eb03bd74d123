"""The decoder: prefill and one batched step of a model on a `KVCache`, eager or compiled; echo scoring.

The decoding engine (`gpt2.decode.engine`), which `gpt2.inference.generate`, the chat and the server run on, is
the one caller of its prefill and step; nothing else reads or writes a cache. Its forward is the model's own
or, compiled, the model's pieces from `gpt2.decode.compiled` with the same attention between them: the cache
and the masks are the same. The model (`gpt2.model`) stays pure: attention stores and reads keys/values through
`KVStore.update`, and this module passes it positions and masks.

Design decisions:
- **Last position only.** Prefill projects only each row's last hidden state onto the vocabulary: the
  50304-wide head over a whole prompt would cost more than the prompt itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from copy import deepcopy

import torch

from gpt2.decode.compiled import BackgroundCompile, CompiledForward, head_matrix
from gpt2.decode.compiled import load as load_compiled
from gpt2.decode.int8 import WEIGHTS_DTYPES, check_supported, quantized, quantizing_note
from gpt2.decode.kv_cache import KVCache, Rows
from gpt2.decode.sampling import TokenLogprob
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.padding import PAD_ID, pad_right


def _silent(line: str) -> None:
    pass


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


class Decoder:
    """Prefill and batched single-token steps of a `GPT` (evaluation mode, no autograd).

    Two ways to run the forward, the same arithmetic:
    - **eager** (default): the model's own forward. The vocabulary head is applied with a transposed copy of the
      tied embedding, (n_embd, vocab_size), made when the decoder is: for the few-row products of decoding, CPU
      BLAS runs `x @ W` with W (in, out) faster than `x @ W.T` (measured: docs/benchmarks.md), and the head is
      a third of the weights a step reads. The copy leaves out the padding rows and costs n_embd * vocab_size
      floats (154 MB at 124M).
    - **compiled** (CPU): the model's weight-bearing parts compiled ahead of time for this machine
      (`gpt2.decode.compiled`: AOTInductor, pre-packed weights, autotuned GEMMs), with attention between them on this
      decoder's cache as in eager. Prefill, steps and `score` all run on it. `compile=True` makes them ready
      here and now (compiling them in a child process if they are not cached: minutes for 124M; loading them
      from the cache: seconds; `compile_seconds` says how long it took); `compile_in_background()` decodes
      eagerly meanwhile and switches between two steps, which is what the commands do (`decoder_for`).
      `release_weights=True` empties the model once the pieces hold the weights, so they are held once.
    `weights_dtype` is the dtype the decoder holds the weights in: None, the model's own; a float dtype's name
    ("float32", "bfloat16", "float16"), a copy of the model cast to it; "int8", 8-bit weights with fp32
    activations on a CPU (`gpt2.decode.int8`: fbgemm's integer kernels, run eagerly, never compiled). A copy is
    made unless `release_weights`, which casts or quantizes the model's own weights and then empties the model.
    Either way a decoder belongs to one set of weights (the head copy; the compiled pieces): `generate` makes one
    per call (training may change the weights between calls, and fused optimizers do not bump tensor versions,
    so staleness cannot be detected); the chat and the serving engine, whose weights are fixed, keep one."""

    def __init__(self, model: GPT, compile: bool = False, release_weights: bool = False,
                 weights_dtype: str | None = None):
        self.model = model
        self.config = model.config
        self.weights_dtype = weights_dtype or str(model.lm_head.weight.dtype).removeprefix("torch.")
        if self.weights_dtype == "int8" and compile:
            raise ValueError("int8 weights are not compiled: make the decoder without compile=True")
        self._eager = _weights_in(model, self.weights_dtype, copy=not release_weights)  # what eager decoding runs
        if self.weights_dtype == "int8" and release_weights:
            model.to("meta")  # the int8 copy holds the weights now
        w = self._eager.transformer.wpe.weight
        self.device, self.dtype = w.device, w.dtype
        self.head: torch.Tensor | None = None
        self._compiled: CompiledForward | None = None
        self._background: BackgroundCompile | None = None
        self._release = release_weights
        self._say: Callable[[str], None] = _silent
        self.compile_status: dict | None = None  # the background compile's last status, once it has ended
        t0 = time.perf_counter()
        if compile:
            self._compiled = load_compiled(self._eager, release_weights=release_weights)
            return_freed_memory()  # the released weights and the packages' loading buffers
        elif self.weights_dtype != "int8":  # (int8: the copy's own head)
            self.head = head_matrix(self._eager)  # (C, V)
        self.compile_seconds = time.perf_counter() - t0 if compile else 0.0  # the one-time cost, paid here

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def compile_in_background(self, build: bool = True, label: str = "",
                              say: Callable[[str], None] = _silent) -> BackgroundCompile:
        """Decode eagerly now and switch to the compiled pieces once a thread has them loaded (compiled first, in
        the child process, if they are not cached and `build`; else only if cached). The switch happens at the
        start of the next prefill, step or full forward, in the thread that decodes: rows in flight keep their
        cache and go on. `say` gets the lines that say what happens (the start of a build, the switch, a failure)."""
        self._say = say
        if self.weights_dtype == "int8":
            raise ValueError("int8 weights are not compiled")
        self._background = BackgroundCompile(self._eager, build=build, label=label, progress=say)
        return self._background

    def status(self) -> dict:
        """Which forward runs ("compiled" or "eager") and, when compiling was asked for, how far it is."""
        bg = self._background
        compile_status = bg.status() if bg is not None else self.compile_status
        out: dict = {"decoder": "compiled" if self.compiled else "eager", "weights_dtype": self.weights_dtype}
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
            self._eager.to("meta")  # the pieces hold the weights now (the model, or the copy it was cast to)
        return_freed_memory()
        peak = f" (the compiling process's peak memory {bg.child_peak_mb} MB)" if bg.child_peak_mb else ""
        how = f"compiled in {bg.seconds - bg.load_seconds:.0f} s{peak}, loaded" if bg.built else "loaded from the cache"
        self._say(f"switched to compiled decoding {bg.seconds:.0f} s after the start ({how} in "
                        f"{bg.load_seconds:.1f} s)")

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """`GPT.hidden_states` (B, T, C), compiled or eager."""
        self.maybe_switch()
        if self._compiled is None:
            return self._eager.hidden_states(ids, positions, attn_mask, cache)
        return self._compiled.hidden_states(self._eager, ids, positions, attn_mask, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states (..., C): `model.logits`, as `x @ W` when eager."""
        if self._compiled is not None:
            return self._compiled.logits(hidden)
        return self._eager.logits(hidden) if self.head is None else hidden @ self.head

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


def _weights_in(model: GPT, weights_dtype: str, copy: bool) -> GPT:
    """`model` with its weights in `weights_dtype` (a name from `WEIGHTS_DTYPES`): itself when they already are;
    else a cast copy (`copy`) or the model cast in place; for "int8", always a new model (`gpt2.decode.int8`)."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype {weights_dtype!r}: expected one of {', '.join(WEIGHTS_DTYPES)}")
    if weights_dtype == "int8":
        return quantized(model)
    dtype = getattr(torch, weights_dtype)
    if model.lm_head.weight.dtype == dtype:
        return model
    return (deepcopy(model) if copy else model).to(dtype)


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


def wants_compile(model: GPT, compile: bool | None, say: Callable[[str], None] = _silent) -> bool:
    """Whether a command decodes compiled: `compile` when given (True: on a CPU only, said in one line), else
    (auto) on a CPU for models of at least `COMPILE_MIN_PARAMS` parameters."""
    on_cpu = model.lm_head.weight.device.type == "cpu"
    if compile is None:
        return on_cpu and model.num_params() >= COMPILE_MIN_PARAMS
    if compile and not on_cpu:
        say(f"note: --compile is for CPUs; decoding on {model.lm_head.weight.device.type} runs eagerly")
    return compile and on_cpu


# --weights-dtype of the commands that decode (chat, serve, generate, cache build). Float dtypes cast the weights,
# unlike training's --dtype (autocast over fp32 weights); --dtype stays its alias there.
WEIGHTS_DTYPE_HELP = ("the weights' dtype for decoding: float32, bfloat16 or float16 (the weights are cast and "
                      "decoding computes in it), or int8 (8-bit weights, float32 activations; CPU only)")
WEIGHTS_DTYPE_METAVAR = "|".join(WEIGHTS_DTYPES)


def load_dtype(weights_dtype: str, flag: str = "--weights-dtype") -> torch.dtype:
    """The dtype a command loads its model in for `weights_dtype`: the float dtype itself, float32 for "int8"
    (the decoder quantizes it). Any other name is a one-line UserError naming `flag`."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise UserError(f"{flag} {weights_dtype}: expected one of {', '.join(WEIGHTS_DTYPES)}")
    return torch.float32 if weights_dtype == "int8" else getattr(torch, weights_dtype)


def decoder_for(model: GPT, compile: bool | None, build: bool = True, label: str = "",
                say: Callable[[str], None] = _silent, weights_dtype: str | None = None,
                now: Callable[[str], None] | None = None) -> Decoder:
    """The decoder a command runs on, holding the weights in `weights_dtype` (None: the model's). It decodes
    eagerly from the first token; where compiling is wanted (`wants_compile`; never for int8 weights, whose
    kernels are fbgemm's) the compiled pieces are made ready in the background (built when not cached, if
    `build`) and the decoder switches to them between two steps, taking the model's weights over
    (`release_weights`: the command uses the model only through the decoder). Nothing ever waits for the
    compiler. `say` gets the lines a user should see (the commands pass stderr); `now` (default `say`) the line
    that announces a wait before this returns (quantizing int8 weights), which a command that defers `say`'s
    lines must still print at once."""
    if weights_dtype == "int8":
        check_supported(model)  # an unsupported CPU is one line, not an announced wait and then an error
        (now or say)(quantizing_note(model))
    decoder = Decoder(model, release_weights=True, weights_dtype=weights_dtype)
    if decoder.weights_dtype == "int8":
        if compile:
            say("note: --compile is for float weights; int8 weights run fbgemm's integer kernels, never compiled")
    elif wants_compile(model, compile, say):
        decoder.compile_in_background(build=build, label=label, say=say)
    return decoder


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
