"""An OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine, plus the web chat page.

Endpoints: `POST /v1/completions` (raw prompt), `POST /v1/chat/completions` (messages rendered with
`gpt2.template.format_chat`, the one prompt template), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /openapi.json` and `/docs` (the request schemas of `gpt2.serve.schema`), and `GET /` (the chat page in
`static/index.html`).

Design decisions:
- Request and response bodies follow OpenAI's schemas, so the `openai` client, curl scripts and browsers
  work unchanged: temperature, top_p, max_tokens (max_completion_tokens), stop, n, seed, echo, stream
  (server-sent events ending with `data: [DONE]`, `stream_options.include_usage`), finish_reason
  "stop"/"length" and usage counts. Every OpenAI field is declared in `gpt2.serve.schema` and either honoured
  or refused with a 400 naming it; fields OpenAI does not have are ignored (clients send many).
- Model names, as OpenAI and vLLM have them: a request's `model` must be one this server serves, else a 404
  with code `model_not_found` (a missing `model` means the served one). The served name is `--model-name`
  (default: the `--model` folder's name); its aliases are the `--model` value as given (a path or a hub name
  such as `gpt2`) and that folder's name, so a client may name the model the way it was started. `GET
  /v1/models` lists the served name first, then each alias (`"parent"`: the served name); responses always
  carry the served name.
- Every bad request gets a 4xx with OpenAI's error object `{"error": {"message", "type", "param", "code"}}`,
  never a 500 or a hung connection: the body is read here with a size limit and parsed by pydantic, so
  FastAPI's own 422 format never shows; 404/405 use the same object (a 405 keeps its `Allow` header), a
  429 (queue full) carries `Retry-After`. An unexpected exception is a 500 for that request alone, logged as
  one line with its cause; a client that hangs up mid-body is one info line, not a traceback.
- The engine runs in its own thread; each HTTP request gets one asyncio queue that the engine's callbacks
  fill through `call_soon_threadsafe`. When a client goes away (a closed stream, or a dropped connection
  while queued or waiting for a non-streamed answer) its generations in the engine are cancelled, which frees
  their batch slots at the next step.
- A stream's headers wait for the engine's first event (its first token, in practice), so a request that ends
  before producing anything gets a status like a non-streamed one: a 503 when the server's shutdown refused it
  while it was queued (`Engine.drain`), a 500 when its prefill failed. Once streaming, an end of that kind is
  an error event, then the choice's last chunk and `data: [DONE]`; a non-streamed answer gets the 503 or 500.
- Stop strings are the engine's stop rule (it ends a choice whose text contains one); here the same
  `TextStream` cuts the text before the stop string and holds back a tail that may begin one, so a stop string
  never leaks to the client, even across token boundaries.
- Log-probabilities (`logprobs`; chat's `logprobs` + `top_logprobs`) are the decoding core's: each of the engine's
  token events carries its token's entry, and `echo` scores the prompt with one full forward (`score_tokens`, in
  the engine's thread through `Engine.call`, so the event loop keeps serving). They follow the text the client
  gets: a token is returned once some of its text is (a chunk carries the tokens whose text starts in that chunk's
  text; a character split over tokens goes with the token that completes it), and a stop string's cut drops the
  tokens that begin after it. A choice that ends on <|endoftext|> lists that token last (no text), as OpenAI and
  vLLM do, so `echo` + `max_tokens: 1` always ends with one generated entry (lm-evaluation-harness drops the last
  entry when it sums a continuation)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gpt2.decode import SHUTDOWN, Decoder, Engine, TextStream, TokenEvent, TokenLogprob, score_tokens
from gpt2.decode.engine import Request as Generation
from gpt2.errors import UserError
from gpt2.serve import logprobs as lp
from gpt2.serve.schema import APIError, ChatRequest, CompletionRequest, Job, chat_job, completion_job
from gpt2.tokenizer import decode

log = logging.getLogger("gpt2.serve")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a GPT-2 context window
RETRY_AFTER_S = 1  # a 429's Retry-After: a queue slot frees as soon as one request finishes

# Names in this module: `request` is the HTTP request, `body` its parsed JSON (a `schema` request model), a `Job`
# what the engine runs for it, and a `Generation` the engine's handle on one choice being generated.
Body = TypeVar("Body", bound=BaseModel)


def error_response(err: APIError) -> JSONResponse:
    content = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = dict(err.headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(content, status_code=err.status, headers=headers or None)


# ---------------------------------------------------------------------------------------- the app

@dataclass
class ServerState:
    engine: Engine
    model_name: str
    model_names: list[str]  # the served name, then its aliases (module docstring)
    api_key: str | None
    default_max_tokens: int  # chat requests without max_tokens
    max_waiting: int  # requests queued beyond this get 429
    created: int


def _body_doc(schema: type[BaseModel]) -> dict:
    """OpenAPI text for a body this module parses itself (with a size limit and OpenAI's error object)."""
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": {"400": {"description": "invalid or unsupported field: OpenAI's error object naming it"},
                          "429": {"description": "queue full; see Retry-After"}}}


def _openapi(app: FastAPI):
    """app.openapi with the request schemas added (the routes read their bodies themselves)."""
    def build() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="OpenAI-compatible completions over a GPT-2 model")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = doc
        return app.openapi_schema
    return build


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A 500 for this request alone: the client gets the exception's name (or a UserError's own one-line
    message); the log gets one line with the cause and where it was raised."""
    log.error("%s %s failed: %s", request.method, request.url.path, _describe(exc))
    detail = str(exc) if isinstance(exc, UserError) else type(exc).__name__
    return error_response(APIError(500, f"internal error: {detail}", type="server_error"))


def _guarded(route):
    """Answer an unexpected exception inside `route` here: past the route, Starlette's error middleware would
    answer it too but then re-raise it, and uvicorn would log a multi-line traceback."""
    @functools.wraps(route)
    async def wrapper(request: Request):
        try:
            return await route(request)
        except (APIError, StarletteHTTPException, ClientDisconnect):
            raise
        except Exception as e:
            return _internal_error(request, e)
    return wrapper


def _describe(exc: BaseException) -> str:
    """One line: the exception and where it was raised (the log's cause, without a multi-line traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def create_app(engine: Engine, model_name: str = "gpt2", api_key: str | None = None,
               default_max_tokens: int = 256, max_waiting: int = 256, start_engine: bool = True,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app. With `start_engine`, the engine thread runs for the app's lifetime. `aliases`: other
    names a request's `model` may give for `model_name`."""
    names = list(dict.fromkeys([model_name, *(a for a in aliases if a)]))
    # a chat request without max_tokens may run to the end of the context window, no further
    state = ServerState(engine, model_name, names, api_key, min(default_max_tokens, engine.block_size), max_waiting,
                        int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="gpt2-scratch", lifespan=lifespan, redoc_url=None)
    app.openapi = _openapi(app)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        # keep the exception's headers: a 405 carries `Allow`
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # routine (a client timed out or was killed): one line, no traceback; nobody reads the answer
        log.info("%s %s: client disconnected before sending the whole request body", request.method,
                 request.url.path)
        return JSONResponse({}, status_code=499)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request, exc)  # last resort: Starlette re-raises, so uvicorn logs it again

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        # reads counters only: never waits on the engine thread
        return {"status": "ok", "model": state.model_name, "active": engine.num_active,
                "waiting": engine.num_waiting, "max_batch_size": engine.max_batch_size, **engine.decoder.status()}

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "gpt2-scratch",
                "weights_dtype": engine.decoder.weights_dtype}  # beside OpenAI's fields: what the answers run on
        return card if name == state.model_name else {**card, "parent": state.model_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorize(request, state)
        return {"object": "list", "data": [model_card(name) for name in state.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        _authorize(request, state)
        _check_model(model_id, state)
        return model_card(model_id)

    @app.post("/v1/completions", openapi_extra=_body_doc(CompletionRequest))
    @_guarded
    async def completions(request: Request):
        _authorize(request, state)
        body = await _parse(request, CompletionRequest)
        _check_model(body.model, state)
        return await _serve(request, state, completion_job(body, engine.block_size))

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(ChatRequest))
    @_guarded
    async def chat_completions(request: Request):
        _authorize(request, state)
        body = await _parse(request, ChatRequest)
        _check_model(body.model, state)
        return await _serve(request, state, chat_job(body, engine.block_size, state.default_max_tokens))

    return app


def _authorize(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


def _check_model(name: str | None, state: ServerState) -> None:
    """A 404 `model_not_found` for a model this server does not serve (None: the request names none)."""
    if name is not None and name not in state.model_names:
        served = ", ".join(f"'{n}'" for n in state.model_names)
        raise APIError(404, f"the model '{name}' does not exist; this server serves {served}", param="model",
                       code="model_not_found")


async def _read_body(request: Request) -> bytes:
    """The request's raw body, refusing more than MAX_BODY_BYTES (by header, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, schema: type[Body]) -> Body:
    """The request's body parsed by `schema`, or a 400 naming the field at fault."""
    raw = await _read_body(request)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {err['msg']}", code="invalid_json") from e
        loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
        # for a union, pydantic appends the member it tried ("prompt.str"): name the field itself
        param = loc[0] if loc else None
        where = f" (field '{'.'.join(str(x) for x in err['loc'])}')" if err["loc"] else ""
        raise APIError(400, f"{err['msg']}{where}", param=param, code="invalid_value") from e


# ---------------------------------------------------------------------------------------- generation

Entry = tuple[int, TokenLogprob]  # a generated token's log-prob entry and its character offset in the completion


@dataclass
class _ResponseChoice:
    """One of a response's `choices` (OpenAI's word): a prompt's completion as it is generated and sent."""

    index: int
    text: TextStream
    prompt: list[int]
    top: int | None = None  # log-probs asked: alternatives per token (None: not asked)
    echo: str = ""  # the prompt's text, returned before the completion (`echo`)
    echo_logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's, with `echo` and `logprobs`
    generation: Generation | None = None  # the engine's handle (`Engine.submit`); None when max_tokens is 0
    tokens: int = 0
    finish_reason: str | None = None
    generated: list[int] = field(default_factory=list)
    pending: list[Entry] = field(default_factory=list)  # entries whose text has not reached the client yet


def _score_prompts(decoder: Decoder, prompts: list[list[int]], top: int) -> list[list[TokenLogprob]]:
    """Echo's log-probs: each prompt token given the ones before it (the first one unscored). One forward per
    prompt, so memory stays that of one prompt's (T, vocab) log-probs however many prompts a request has."""
    out = []
    for p in prompts:
        row = score_tokens(decoder, [p], top)[0]
        out.append([lp.unscored(p[0]), *row[1:]] if p else [])
    return out


async def _serve(request: Request, state: ServerState, job: Job):
    """Run the job's prompts x n choices on the engine (every 400 has been raised by `schema` already)."""
    engine = state.engine
    _check_room(state)
    echo_text = [decode(p) for p in job.echo] if job.echo is not None else [""] * len(job.prompts)
    echo_logprobs: list[list[TokenLogprob]] = [[] for _ in job.prompts]
    if job.echo is not None and job.logprobs is not None:
        # in the engine's thread, the one that does the server's tensor work (see `gpt2.decode.engine`)
        echo_logprobs = await asyncio.wrap_future(
            engine.call(lambda: _score_prompts(engine.decoder, job.echo, job.logprobs)))
    queue: asyncio.Queue = asyncio.Queue()
    choices = _submit(engine, job, queue, echo_text, echo_logprobs)
    meta = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": state.model_name}
    events = _events(queue, choices, meta["id"])
    if job.body.stream:
        return await _stream(request, job, choices, events, meta)
    return await _answer(request, job, choices, events, meta)


def _check_room(state: ServerState) -> None:
    """A 503 while the server shuts down, a 429 when its queue is full: before any work is done."""
    if state.engine.draining:
        raise _shutting_down()
    if state.engine.num_waiting >= state.max_waiting:
        raise APIError(429, "server busy: too many queued requests, retry later", type="server_error",
                       code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: retry later or elsewhere", type="server_error",
                    code="server_shutting_down")


def _submit(engine: Engine, job: Job, queue: asyncio.Queue, echo_text: list[str],
            echo_logprobs: list[list[TokenLogprob]]) -> list[_ResponseChoice]:
    """Start every choice on the engine; its events arrive on `queue` as (choice index, TokenEvent)."""
    loop = asyncio.get_running_loop()
    choices: list[_ResponseChoice] = []
    try:
        for i, prompt in enumerate(job.prompts):
            for j in range(job.n):
                index = i * job.n + j
                choice = _ResponseChoice(index, TextStream(job.body.stops()), prompt, job.logprobs, echo_text[i],
                                         echo_logprobs[i])
                choices.append(choice)
                if job.max_tokens == 0:  # scoring a prompt (`echo`): nothing to generate
                    queue.put_nowait((index, TokenEvent(None, finish_reason="length")))
                    continue

                def sink(event: TokenEvent, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                choice.generation = engine.submit(prompt, job.params(index), sink)
    except BaseException:  # a choice that cannot start must not leave its siblings running unread
        _cancel(choices)
        raise
    return choices


async def _stream(request: Request, job: Job, choices: list[_ResponseChoice], events: AsyncIterator[Event],
                  meta: dict) -> StreamingResponse | JSONResponse:
    """Server-sent events, whose headers wait for the engine's first event: a request ended before it produced
    anything (refused at shutdown while queued, a failed prefill) gets a status and an error object instead of
    a stream, and a client that leaves while queued is dropped from the queue."""
    first = None
    try:
        first = await _until_done_or_disconnect(request, anext(events))
    finally:
        if first is None or _failed(first[0]):  # gone, or failed before its first token: stop the siblings too
            _cancel(choices)
    if first is None:  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    _raise_if_failed(choices)  # a choice ended before producing anything: a status, not a stream
    include_usage = bool(job.body.stream_options and job.body.stream_options.include_usage)
    prompt_tokens = sum(len(p) for p in job.prompts)
    chunks = _sse(_chain(first, events), choices, meta, job.chat, prompt_tokens, include_usage)
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request: Request, job: Job, choices: list[_ResponseChoice], events: AsyncIterator[Event],
                  meta: dict) -> JSONResponse:
    """The whole completion as one JSON body, once every choice has finished."""
    try:
        done = await _until_done_or_disconnect(request, _collect(events, choices))
    finally:
        _cancel(choices)
    if done is None:  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    _raise_if_failed(choices)
    return JSONResponse({**meta, "object": "chat.completion" if job.chat else "text_completion",
                         "choices": [_final_choice(c, *done[c.index], job.chat) for c in choices],
                         "usage": _usage(sum(len(p) for p in job.prompts), choices)})


Event = tuple[_ResponseChoice, str, list[Entry]]  # a choice, its new text, and the log-prob entries that go with it


async def _events(queue: asyncio.Queue, choices: list[_ResponseChoice], rid: str) -> AsyncIterator[Event]:
    """(choice, new text, entries) as tokens arrive; a choice's last event comes with its finish_reason set.
    A choice the engine failed is logged here with the engine's reason (the cause), once."""
    by_index = {c.index: c for c in choices}
    remaining = len(choices)
    while remaining:
        index, event = await queue.get()
        token, reason = event.token, event.finish_reason
        c = by_index[index]
        if token is not None:
            if event.logprob is not None:
                c.pending.append((len(c.text.text), event.logprob))
            c.tokens += 1
            c.generated.append(token)
            delta = c.text.push(token)  # cut before a stop string, which the engine ends the choice on
        else:
            delta = c.text.finish()
            c.finish_reason = reason
            if reason.startswith("error") and reason != SHUTDOWN:  # the engine logs a shutdown once, not per request
                log.error("%s choice %d failed in the engine: %s", rid, index, reason)
        entries = _released(c)
        if reason == "stop" and event.logprob is not None:  # ended on <|endoftext|> (not a stop string)
            entries.append((len(c.text.text), event.logprob))
        if c.finish_reason is not None:
            remaining -= 1
        if delta or entries or c.finish_reason is not None:
            yield c, delta, entries


def _released(c: _ResponseChoice) -> list[Entry]:
    """The pending entries whose token's text starts in the text sent so far; once the choice is finished the
    rest (tokens wholly past a stop string's cut) are dropped."""
    out = [e for e in c.pending if e[0] < c.text.sent]
    c.pending = [] if c.finish_reason is not None else c.pending[len(out):]
    return out


async def _chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


async def _collect(events: AsyncIterator[Event], choices: list[_ResponseChoice]) -> dict[int, tuple[str, list[Entry]]]:
    """Each choice's whole text (the echo first) and its generated tokens' entries."""
    done: dict[int, tuple[str, list[Entry]]] = {c.index: (c.echo, []) for c in choices}
    async for c, delta, entries in events:
        text, all_entries = done[c.index]
        done[c.index] = (text + delta, all_entries + entries)
    return done


async def _until_done_or_disconnect(request: Request, work):
    """Await `work`, or return None as soon as the client disconnects."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for t in (task, watch):
            t.cancel()


async def _sse(events: AsyncIterator[Event], choices: list[_ResponseChoice], meta: dict, chat: bool,
               prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; cancelling this generator (client gone) frees the slots."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice_list: list[dict], **extra) -> str:
        return "data: " + _json({**meta, "object": obj, "choices": choice_list, **extra}) + "\n\n"

    def error_event(message: str) -> str:
        return "data: " + _json({"error": {"message": message, "type": "server_error", "param": None,
                                          "code": None}}) + "\n\n"

    try:
        for c in choices:
            if chat:  # OpenAI opens each choice with the role
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif c.echo or c.echo_logprobs:
                yield chunk([{"index": c.index, "text": c.echo, "logprobs": _logprobs(c, [], chat, echo=True),
                              "finish_reason": None}])
        async for c, delta, entries in events:
            reason = c.finish_reason
            if reason is not None and reason.startswith("error"):
                yield error_event(reason)
                reason = "stop"
            logprobs = _logprobs(c, entries, chat, echo=False)
            if chat:
                yield chunk([{"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                              "finish_reason": reason}])
            else:
                yield chunk([{"index": c.index, "text": delta, "logprobs": logprobs, "finish_reason": reason}])
        if include_usage:
            yield chunk([], usage=_usage(prompt_tokens, choices))
    except Exception as e:  # the headers are sent: end this stream with an error event, log one line
        log.error("%s failed while streaming: %s", meta["id"], _describe(e))
        yield error_event(f"internal error: {type(e).__name__}")
    finally:
        _cancel(choices)
    yield "data: [DONE]\n\n"


def _cancel(choices: list[_ResponseChoice]) -> None:
    for c in choices:
        if c.finish_reason is None and c.generation is not None:
            c.generation.cancel()


def _failed(c: _ResponseChoice) -> bool:
    return c.finish_reason is not None and c.finish_reason.startswith("error")


def _raise_if_failed(choices: list[_ResponseChoice]) -> None:
    """A 503 if the server's shutdown ended a choice, else a 500 if the engine failed one."""
    if any(c.finish_reason == SHUTDOWN for c in choices):
        raise _shutting_down()
    for c in choices:
        if _failed(c):
            raise APIError(500, c.finish_reason, type="server_error")


def _logprobs(c: _ResponseChoice, entries: list[Entry], chat: bool, echo: bool) -> dict | None:
    """A choice's `logprobs` object for `entries` (generated tokens), in the endpoint's shape; with `echo`
    the legacy object starts with the prompt's entries. None when the request did not ask."""
    if c.top is None:
        return None
    generated = [e for _, e in entries]
    if chat:
        return lp.chat(generated)
    parts = [lp.legacy(c.echo_logprobs)] if echo else []
    parts.append(lp.legacy(generated, start=len(c.echo), offsets=[o for o, _ in entries]))
    return lp.merge_legacy(parts)


def _final_choice(c: _ResponseChoice, text: str, entries: list[Entry], chat: bool) -> dict:
    logprobs = _logprobs(c, entries, chat, echo=True)
    if chat:
        return {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": c.finish_reason}
    return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def _usage(prompt_tokens: int, choices: list[_ResponseChoice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
