"""`gpt2 chat`: talk to a model in the terminal, answers streamed token by token.

    gpt2 chat --model RUN_DIR                       # interactive: /temperature X, /reset, /quit
    gpt2 chat --model RUN_DIR --prompt "Give three tips for staying healthy."

The session (`ChatSession`, `interact`) is this command's terminal front end and lives with it; decoding is
the library's (`gpt2.inference.generate_stream` on a `gpt2.decode` decoder).

Design decisions:
- The whole conversation is rendered with `gpt2.template.format_chat` (the fine-tuning template) at every
  turn, so the model sees exactly the prompt format it was tuned on; the KV cache is not kept between turns
  (the template re-renders history into the "### Input:" block, so the prefix changes anyway).
- When the conversation no longer fits the context window (with room for an answer), the oldest turns are
  dropped; a system message (`--system`) is kept.
- One decoder for the session (the weights do not change). It answers eagerly from the first message; where
  compiling is wanted (see `--compile`) the pieces are made ready in the background and the decoder switches
  to them between two tokens. The line that says so is printed after the answer in progress, not inside it.
- Tokens are decoded through `TextStream`, so a character split over several tokens prints whole.
- `--prompt` answers one message and exits (for scripts); otherwise lines are read from stdin, with
  /temperature X, /reset, /help and /quit (end of input also quits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

import torch

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg, check_sampling, check_values
from gpt2.decode import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPE_METAVAR, Decoder, TextStream, decoder_for, load_dtype
from gpt2.errors import UserError, note
from gpt2.inference import generate_stream, pad_right
from gpt2.model import GPT
from gpt2.template import format_chat
from gpt2.tokenizer import encode

HELP = "commands: /temperature X (0 = greedy), /reset (forget the conversation), /quit"


@dataclass
class ChatConfig:
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory or hub name")
    prompt: str | None = arg(None, help="answer this one message, print the answer and exit (for scripts)",
                             hint="give the message, or leave --prompt out to chat interactively")
    system: str | None = arg(None, help="a system message that opens the conversation")
    temperature: float = arg(0.7, help="sampling temperature; 0 = greedy (change with /temperature X)")
    top_k: int | None = arg(None, help="sample only among the k most likely tokens")
    top_p: float | None = arg(0.95, help="nucleus sampling: smallest token set with this probability mass")
    max_tokens: int = arg(256, help="longest answer, in tokens", minimum=1)
    seed: int = arg(1337, help="random seed, for reproducible answers")
    device: str = arg("auto", help="cpu, cuda, mps or auto")
    weights_dtype: str = arg("float32", help=WEIGHTS_DTYPE_HELP, metavar=WEIGHTS_DTYPE_METAVAR, aliases=("--dtype",))
    compile: bool | None = arg(None, help="decode with the model compiled for this CPU (AOTInductor) once it is "
                                          "ready: answers start at once, eagerly, while the pieces compile in the "
                                          "background (once per model, torch and CPU; cached, see `gpt2 cache`). "
                                          "default: on for models of 50M+ parameters on a CPU, off with --prompt; "
                                          "--no-compile: never")

    def validate(self) -> None:
        check_values(self)  # an empty --prompt or --system is refused there
        check_sampling(self.temperature, self.top_k, self.top_p)
        load_dtype(self.weights_dtype)


class ChatSession:
    """A conversation with a model: `reply(text)` streams the answer to `out` and remembers both turns."""

    def __init__(self, model: GPT, cfg: ChatConfig, out: TextIO | None = None, decoder: Decoder | None = None,
                 notes: list[str] | None = None):
        self.model, self.cfg, self.out = model, cfg, out or sys.stdout
        self.notes = notes if notes is not None else []  # lines for stderr, said after the answer in progress
        self.decoder = decoder or Decoder(model)  # one for the session: its weights stay fixed
        self.temperature = cfg.temperature
        self.device = self.decoder.device  # (a compiled decoder's model may hold no weights)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """format_chat(messages) as tokens, dropping the oldest turns until an answer has room."""
        block = self.model.config.block_size
        room = min(self.cfg.max_tokens, block // 2)  # tokens kept free for the answer
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids = encode(format_chat(messages))
            if len(ids) + room <= block or len(messages) <= first + 1:
                break
            messages = messages[:first] + messages[first + 1:]
        if len(ids) >= block:
            raise UserError(f"the message is too long: {len(ids)} tokens with the template, the model's context "
                            f"window is {block}")
        return ids

    def reply(self, text: str) -> str:
        messages = self.messages + [{"role": "user", "content": text}]
        ids, mask = pad_right([self.prompt_ids(messages)])
        stream = TextStream()
        answer = []
        for produced in generate_stream(self.model, ids, mask, self.temperature, self.cfg.max_tokens,
                                        top_k=self.cfg.top_k, top_p=self.cfg.top_p, generator=self.generator,
                                        decoder=self.decoder):
            for _, token in produced:
                answer.append(stream.push(token))
                self.out.write(answer[-1])
                self.out.flush()
        answer.append(stream.finish())
        self.out.write(answer[-1] + "\n")
        self.out.flush()
        while self.notes:
            print(self.notes.pop(0), file=sys.stderr, flush=True)
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]
        return "".join(answer)

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        name, _, value = line.strip().partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.reset()
            self.out.write("(conversation cleared)\n")
        elif name == "/temperature":
            try:
                t = float(value)
                check_sampling(t, None, None, prefix="/")  # the flags' check: nan and inf are refused too
                self.temperature = t
                self.out.write(f"(temperature {t})\n")
            except ValueError:
                self.out.write("usage: /temperature X with X >= 0, e.g. /temperature 0.7\n")
            except UserError as e:
                self.out.write(f"error: {e}; the temperature stays {self.temperature}\n")
        else:
            self.out.write(HELP + "\n")
        return True


def interact(session: ChatSession, inp: TextIO | None = None) -> None:
    """Read messages and commands line by line (from stdin by default) until /quit or end of input."""
    out, inp = session.out, inp or sys.stdin
    out.write(f"chatting with {session.cfg.model} ({session.decoder.weights_dtype} weights); {HELP}\n")
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        try:
            session.reply(line)
        except UserError as e:  # too long a message: say so and keep the conversation going
            out.write(f"error: {e}\n")
        except Exception as e:  # never lose the conversation to one failed answer
            out.write(f"\nerror: this answer failed ({type(e).__name__}: {e}); the conversation is kept\n")


def run(cfg: ChatConfig) -> list[dict]:
    cfg.validate()
    model = load_model(cfg.model, cfg.device, load_dtype(cfg.weights_dtype), reads_text="--model").eval()
    # one-shot (--prompt): eager unless --compile; its process ends before loading pieces (seconds) or building
    # them (minutes) would pay, and an exit has to wait for a load in progress
    compile = cfg.compile if cfg.prompt is None else bool(cfg.compile)
    notes: list[str] = []  # the switch's line, printed between answers rather than inside one
    decoder = decoder_for(model, compile, label=cfg.model, say=notes.append, weights_dtype=cfg.weights_dtype,
                          now=note)
    session = ChatSession(model, cfg, decoder=decoder, notes=notes)
    if cfg.prompt is not None:
        session.reply(cfg.prompt)
    else:
        interact(session)
    return session.messages


COMMAND = Command("chat", "chat with a model in the terminal (the fine-tuning template, streamed answers)",
                  ChatConfig, run)
