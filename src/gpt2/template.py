"""The one prompt template, shared by fine-tuning, generation, chat, RLHF and serving.

Design decisions:
- Stanford Alpaca's own template, so a model fine-tuned here reads prompts the way Alpaca-trained models do.
  A question is an instruction plus an optional input:

      Below is an instruction that describes a task[, paired with an input that provides further context].
      Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      [### Input:
      {input}

      ]### Response:
      {answer}<|endoftext|>

  The question is everything up to and including "### Response:\\n"; the answer is the output followed by
  `<|endoftext|>` (id 50256), which is how the model learns to stop. Fine-tuning tokenizes the two parts
  separately and trains on the answer tokens only (`gpt2.data.alpaca.encode_example` and `collate`);
  generation feeds the question and stops at `<|endoftext|>`.
- A chat (a list of {"role", "content"} messages, as in the OpenAI API or an HH-RLHF dialogue) becomes one
  question: the last user message is the instruction and earlier turns are the input, rendered as
  "User: ..." / "Assistant: ..." lines. A system message, if any, opens the input.
"""

from __future__ import annotations

from collections.abc import Sequence

_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_INTRO_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:
    """The question text for an instruction (and optional input), ending right where the answer starts."""
    instruction, input = instruction.strip(), (input or "").strip()
    if input:
        return f"{_INTRO_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n{RESPONSE_MARKER}"
    return f"{_INTRO}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}"


_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def format_chat(messages: Sequence[dict]) -> str:
    """The question text for a conversation whose last message is the user's."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a chat must end with a user message")
    for m in messages:
        if m.get("role") not in _ROLE_NAMES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}: needs role user/assistant/system and string content")
    history = "\n".join(f"{_ROLE_NAMES[m['role']]}: {m['content'].strip()}" for m in messages[:-1])
    return format_prompt(messages[-1]["content"], history)
