"""OpenAI's request schemas for `/v1/completions` and `/v1/chat/completions`, validated strictly, and turned
into the engine's work: `completion_job` and `chat_job` take a parsed request to a `Job` (the prompts' tokens,
max_tokens, choices, echo, log-probs and each choice's `SamplingParams`) or raise its 400, all of them here.

Design decisions:
- Every field of OpenAI's current request reference is declared here, so none is silently ignored: it is
  either honoured or refused with a 400 whose `param` names it (`code: "unsupported_parameter"` or
  `"unsupported_value"`). Fields that are not OpenAI's are still ignored: clients add their own.
- Known fields are typed strictly (a string where a number belongs is an error, not a guess), JSON's
  NaN/Infinity are refused, and numbers are range-checked before anything touches the model, so no value
  within a field's type can reach the engine and fail there (5xx). Ranges follow OpenAI's reference; where it
  gives none (seed, stop length, logit_bias size) the limit is what the engine can represent.
- Sampling knobs beyond the basic ones (logit_bias, penalties, logprobs) are looked up on `SamplingParams`'
  dataclass fields: present -> passed through, absent -> a 400 naming the field when a request asks for a
  non-default value, so this layer never silently drops a knob a decoding core lacks.
- Numerically extreme values that are valid requests are normalised to what they mean: a temperature below
  `MIN_TEMPERATURE` is greedy (logits / 1e-40 overflow float32 to inf, and the argmax is what such a
  temperature selects anyway); top_p below `MIN_TOP_P` keeps exactly the top token, as any top_p <= 1/vocab
  does, without the float32 underflow to 0 that would drop every token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt2.decode import SamplingParams
from gpt2.template import format_chat
from gpt2.tokenizer import EOT, VOCAB_SIZE, encode

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 1000  # one stop string's length: matching is quadratic in it
MAX_COMPLETION_LOGPROBS = 5  # legacy completions' `logprobs` (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs` (OpenAI's limit)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below: greedy
MIN_TOP_P = 1e-6  # below 1/vocab (2e-5) every top_p keeps just the top token; this floor keeps it off 0
ENGINE_FIELDS = frozenset(f.name for f in fields(SamplingParams))


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server: {why}", param=param,
                    code="unsupported_parameter")


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against length side channels; nothing to pad


class _Common(_Strict):
    """Fields both endpoints share. `None` (JSON null) means the default everywhere, as in OpenAI's API."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for abuse monitoring: accepted, not used
    safety_identifier: str | None = None  # the newer name of `user`
    prompt_cache_key: str | None = None  # a caching hint: there is no cross-request cache to key
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None  # one tier here
    store: bool | None = None
    metadata: dict[str, str] | None = None  # tags for stored completions: accepted, not used

    def common_checks(self) -> None:
        stops = self.stops()
        if len(stops) > MAX_STOP:
            raise invalid("stop", f"at most {MAX_STOP} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise invalid("stop", f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        if self.store:
            raise unsupported("store", "completions are not stored")
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) < VOCAB_SIZE):
                raise invalid("logit_bias", f"logit_bias keys must be token ids in [0, {VOCAB_SIZE}), got {key!r}")
            if not -100 <= value <= 100:
                raise invalid("logit_bias", f"logit_bias values must be in [-100, 100], got {value}")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def choices(self) -> int:
        return self.n or 1

    def wanted(self) -> dict[str, Any]:
        """Non-default sampling knobs beyond the basic ones, by OpenAI name -> value for `SamplingParams`."""
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return {"logit_bias": bias or None, "presence_penalty": self.presence_penalty or None,
                "frequency_penalty": self.frequency_penalty or None}

    def sampling_params(self, max_tokens: int, index: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters for choice `index` (each choice of a seeded request gets its own seed)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        seed = None if self.seed is None else (self.seed + index) % 2**63  # fits any 64-bit generator seed
        extra = {k: v for k, v in {**self.wanted(), "logprobs": logprobs}.items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                              top_p=None if top_p >= 1 else max(top_p, MIN_TOP_P), seed=seed,
                              stop=self.stops() or None, **extra)

    def require_engine_support(self, logprobs: int | None, logprobs_param: str) -> None:
        """400 for each requested knob the engine's `SamplingParams` does not have."""
        for name, value in self.wanted().items():
            if value is not None and name not in ENGINE_FIELDS:
                raise unsupported(name, "the decoding engine has no such control yet")
        if logprobs is not None and "logprobs" not in ENGINE_FIELDS:
            raise unsupported(logprobs_param, "the decoding engine does not compute log-probabilities")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def check(self) -> None:
        self.common_checks()
        if self.suffix:
            raise unsupported("suffix", "insertion (text after the completion) needs a fill-in-the-middle model")
        if self.best_of is not None and self.best_of < self.choices():
            raise invalid("best_of", f"best_of ({self.best_of}) must be at least n ({self.choices()})")
        if self.best_of is not None and self.best_of > self.choices():
            raise unsupported("best_of", "best_of > n (server-side ranking of candidates); ask for n choices")
        if self.best_of is not None and self.stream:
            raise invalid("best_of", "best_of cannot be used with stream")
        self.require_engine_support(self.logprobs, "logprobs")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # no tool/function roles: no tool calling
    content: str | list[TextPart]
    name: str | None = None  # a participant's name: accepted, not rendered by the template
    refusal: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # json_schema carries more
    type: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools, which are refused
    functions: list[dict[str, Any]] | None = None  # the deprecated name of tools
    function_call: str | dict[str, Any] | None = None  # the deprecated name of tool_choice
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # a speed hint (predicted output): the answer is the same without
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    def check(self) -> None:
        self.common_checks()
        if self.max_tokens == 0:
            raise invalid("max_tokens", "max_tokens must be at least 1")
        if self.tools:
            raise unsupported("tools", "this model has no tool calling")
        if self.functions:
            raise unsupported("functions", "this model has no function calling")
        for param in ("tool_choice", "function_call"):
            if getattr(self, param) not in (None, "none"):
                raise unsupported(param, "this model has no tool calling; only 'none' is accepted")
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", f"type {self.response_format.type!r}: only 'text' is produced")
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise unsupported("modalities", "only ['text'] is produced")
        if self.audio is not None:
            raise unsupported("audio", "this model produces text only")
        for param in ("reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, param) is not None:
                raise unsupported(param, "only for reasoning/search models")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs requires logprobs: true")
        self.require_engine_support(self.num_logprobs(), "logprobs")

    def num_logprobs(self) -> int | None:
        """Alternatives per token wanted (None = no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------------------- a request -> a job


@dataclass
class Job:
    """What the engine runs for one request: `n` choices of each prompt."""

    body: _Common  # the parsed request body
    prompts: list[list[int]]  # what the engine decodes (never empty: an empty prompt starts at <|endoftext|>)
    max_tokens: int  # 0: score the prompts only (`echo`)
    chat: bool
    echo: list[list[int]] | None  # the prompts' own tokens, returned before the completions; None: no echo
    logprobs: int | None  # alternatives per token when log-probs are asked; None: not asked

    @property
    def n(self) -> int:
        return self.body.choices()

    def params(self, index: int) -> SamplingParams:
        return self.body.sampling_params(self.max_tokens, index, self.logprobs)


def completion_job(req: CompletionRequest, block_size: int) -> Job:
    req.check()
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompts = completion_prompts(req.prompt, block_size, scoring_only=max_tokens == 0)
    return _checked(Job(req, [p or [EOT] for p in prompts], max_tokens, chat=False,
                        echo=prompts if req.echo else None, logprobs=req.logprobs), block_size)


def chat_job(req: ChatRequest, block_size: int, default_max_tokens: int) -> Job:
    req.check()
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        prompt = encode(format_chat(messages))
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    check_prompt_length(prompt, block_size, "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    return _checked(Job(req, [prompt], max_tokens, chat=True, echo=None, logprobs=req.num_logprobs()), block_size)


def _checked(job: Job, block_size: int) -> Job:
    if job.max_tokens > block_size:
        raise APIError(400, f"max_tokens ({job.max_tokens}) is larger than the context window "
                            f"({block_size} tokens)", param="max_tokens", code="invalid_value")
    if len(job.prompts) * job.n > MAX_N:
        raise APIError(400, f"prompts x n must be at most {MAX_N}", param="n")
    return job


def check_prompt_length(prompt: list[int], block_size: int, param: str, scoring_only: bool = False) -> None:
    if scoring_only and len(prompt) > block_size:
        raise APIError(400, f"prompt has {len(prompt)} tokens; this model's context window is {block_size} tokens",
                       param=param, code="context_length_exceeded")
    if not scoring_only and len(prompt) >= block_size:
        raise APIError(400, f"prompt has {len(prompt)} tokens; this model's context window is {block_size} tokens "
                            f"and at least one must be left for the answer", param=param,
                       code="context_length_exceeded")


def completion_prompts(prompt: str | list, block_size: int, scoring_only: bool = False) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a token list, or a list of token lists.
    An empty prompt is returned empty; the caller starts it from <|endoftext|>, as GPT-2's unconditional
    samples do. With `scoring_only` (max_tokens 0) a prompt may fill the whole context window."""
    if isinstance(prompt, str):
        prompts = [encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or len(prompts) > MAX_N:
        raise APIError(400, f"prompt must hold 1 to {MAX_N} prompts", param="prompt")
    for p in prompts:
        if any(not 0 <= t < VOCAB_SIZE for t in p):
            raise APIError(400, f"token ids must be in [0, {VOCAB_SIZE})", param="prompt")
        check_prompt_length(p, block_size, "prompt", scoring_only)
    return prompts
