"""OpenAI-compatible HTTP API over the serving engine (FastAPI on uvicorn).

  app = create_app(ServerState(worker, tokenizer, "readme-smollm2", max_len=1024))
  uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template),
GET /v1/models, GET /health, GET /metrics (Prometheus text, see `metrics.py`).
Request fields: model, prompt (a string or a list of token ids) | messages, max_tokens
(chat: also max_completion_tokens), temperature (default 1, as OpenAI), top_p, top_k
(extension; 0 = off), seed, stop (a string or up to 4), n (1 only), stream, stream_options
{include_usage}, user (accepted, unused); completions: logprobs (0..5 alternatives) and echo
(max_tokens 0 with echo scores the prompt alone); chat: logprobs (bool), top_logprobs (0..20).
Log-probabilities come from a scoring pass over the same model (`logprobs.py`), before
temperature; streamed chunks carry those of the tokens they add. Any other field is refused
with a 400 naming it, so that a client never gets an answer that silently ignored what it
asked for: the request models below are the one allowlist (add a field there when it is
implemented). Responses carry `usage` (prompt, completion and total tokens). Streams are
server-sent events in the OpenAI chunk format, ending `data: [DONE]`.

Errors use the OpenAI body {"error": {"message", "type", "param", "code"}}: malformed JSON, a
field of the wrong type, bad sampling values, n != 1, a prompt longer than the context or
max_tokens past it -> 400 (the message names the limit); an unknown model -> 404; a full queue
-> 429 with Retry-After (an estimate of when a slot frees, growing with the queue and the recent
service time: `retry_after_estimate`, so that rejected clients spread their retries); shutting
down -> 503 with Retry-After `retry_after_s`; a request that fails inside the engine -> 500 for
that request alone. After the engine failed (`worker.EngineFailed`), GET /health and new
requests get 503 naming the reason, and requests in flight get their error (500, or an error
event in a stream). A client that disconnects (stream or not) has its request
cancelled, which frees its request slot.

Threads: the `EngineWorker` thread owns the engine; handlers run on the event loop and only
submit, cancel, and read their request's events (handed over with call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.engine import CANCELLED, ERROR
from readme_jax.serve.logprobs import (
    TOP_MAX,
    Scorer,
    chat_logprobs,
    completion_entries,
    completion_logprobs,
)
from readme_jax.serve.textstream import TextStream
from readme_jax.serve.worker import Draining, EngineWorker, QueueFull

FINISH = {"eos": "stop", "length": "length", "stop": "stop"}


@dataclasses.dataclass
class ServerState:
    """What the handlers need: the worker, the tokenizer, the model's name and limits."""

    worker: EngineWorker
    tokenizer: Any
    model_name: str
    max_len: int  # serving context per request (prompt + max_tokens), EngineConfig.max_len
    retry_after_s: int = 1  # Retry-After of a 503, and the least of a 429's (seconds)
    disconnect_poll_s: float = 0.25
    retry_after_max_s: int = 60  # the most a 429's Retry-After says (seconds)
    _scorer: Scorer | None = dataclasses.field(default=None, repr=False)

    def scorer(self) -> Scorer:
        """The logprobs scoring pass over the served model (built on first use). ApiError 400
        when the backend runs no model (a replayed run)."""
        if self._scorer is None:
            decoder = getattr(self.worker.engine.backend, "decoder", None)
            if decoder is None:
                raise ApiError(400, "logprobs are not available from a replayed run", "logprobs")
            self._scorer = Scorer(decoder.rc, decoder.graph, self.max_len)
        return self._scorer

    def busy_retry_after(self) -> int:
        """The Retry-After of a 429 now (seconds): `retry_after_estimate` over the requests
        that hold no slot, the request slots and the worker's recent mean service time."""
        w = self.worker
        slots = w.engine.cfg.num_slots
        queued = max(0, w.outstanding - slots)
        return retry_after_estimate(
            queued, slots, w.mean_service_s, self.retry_after_s, self.retry_after_max_s
        )


def retry_after_estimate(queued: int, slots: int, service_s: float | None, lo: int, hi: int) -> int:
    """Seconds until a request slot is likely free for a client turned away now:
    ceil((queued + 1) / slots * service_s), clamped to [lo, hi] (whole seconds, as HTTP's
    Retry-After). `queued`: requests waiting for a slot (ahead of this client); `slots`: the
    request slots; `service_s`: the recent mean time a request holds a slot (seconds; None
    before any request finished: then `lo`). With N slots busy, one frees about every
    service_s / N seconds, and the client needs the queue ahead of it, then one more, to go."""
    if service_s is None:
        return lo
    est = math.ceil((queued + 1) / max(1, slots) * service_s)
    return int(min(max(est, lo), max(lo, hi)))


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


_KIND = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, param=None, headers=None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _KIND.get(status, "server_error"),
            "param": param,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- request bodies


# extra="forbid": an unknown field is a 400 naming it (see `_unsupported`); the fields declared
# here are what the server implements.
_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id (abuse monitoring): no effect on the output


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]  # a batch of one (lm_eval sends that)
    max_tokens: int | None = 16  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=5)  # top alternatives per token
    echo: bool = False  # the prompt (and its tokens' logprobs, the first null) comes first


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_MAX)


# ----------------------------------------------------------------------------- validation


def _unsupported(locs: list[tuple], body: type[BaseModel]) -> JSONResponse:
    """The 400 for request fields the server does not implement. `locs`: each field's path in
    the body (("logprobs",), ("messages", 0, "name")); `body`: the endpoint's request model.
    The error's `param` is the first field; the message names them all."""
    names = [".".join(str(x) for x in loc) for loc in locs]
    what = "field " + repr(names[0]) if len(names) == 1 else "fields " + ", ".join(map(repr, names))
    msg = f"the request {what} {'is' if len(names) == 1 else 'are'} not supported by this server"
    if any(len(loc) == 1 for loc in locs):
        msg += f"; supported fields: {', '.join(body.model_fields)}"
    return _error(400, msg, names[0])


def _sampling(b: _Common) -> SamplingParams:
    if b.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {b.n}", "n")
    try:
        return SamplingParams(b.temperature, b.top_k, b.top_p)
    except ValueError as e:
        param = next((p for p in ("temperature", "top_k", "top_p") if p in str(e)), None)
        raise ApiError(400, str(e), param) from None


def _stops(b: _Common) -> list[str]:
    stops = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"at most 4 stop strings, got {len(stops)}", "stop")
    return stops


def _budget(
    st: ServerState, n_prompt: int, max_tokens: int | None, default_rest: bool, echo: bool = False
) -> int:
    T = st.max_len
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", "prompt")
    if n_prompt >= T:
        raise ApiError(
            400,
            f"the prompt has {n_prompt} tokens but the context is {T} tokens (max_len {T}; "
            f"a prompt may hold at most {T - 1}); shorten the prompt",
            "prompt",
        )
    if max_tokens is None:
        return T - n_prompt if default_rest else min(16, T - n_prompt)
    if max_tokens == 0 and echo:
        return 0  # scoring the prompt only
    if max_tokens < 1:
        raise ApiError(
            400, f"max_tokens must be >= 1 (0 only with echo), got {max_tokens}", "max_tokens"
        )
    if n_prompt + max_tokens > T:
        raise ApiError(
            400,
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
            f"exceeds the context of {T} tokens (max_len); lower max_tokens to at most "
            f"{T - n_prompt}",
            "max_tokens",
        )
    return max_tokens


def _prompt_ids(st: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return st.tokenizer.encode(prompt)
    if prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "a list of prompts is not supported; send one prompt", "prompt")
        if isinstance(prompt[0], str):
            return st.tokenizer.encode(prompt[0])
        prompt = prompt[0]
    V = st.worker.engine.backend.vocab_size
    bad = [t for t in prompt if not 0 <= t < V]
    if bad:
        raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {V})", "prompt")
    return list(prompt)


def _echo_text(st: ServerState, prompt, ids: list[int]) -> str:
    """The prompt as the choice's text starts with it under echo (token ids: decoded)."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[0]
    return st.tokenizer.decode(ids)  # token ids, or a batch of one token list


def _check_model(st: ServerState, model: str | None) -> None:
    if model and model != st.model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {st.model_name!r}",
            "model",
        )


# ----------------------------------------------------------------------------- generation


class _Generation:
    """One submitted request as seen by its handler: events arrive on an asyncio queue."""

    def __init__(self, st: ServerState, ids, max_tokens, sp, seed, stops):
        self.st, self.stream = st, TextStream(st.tokenizer, stops)
        self.prompt_tokens, self.completion_tokens = len(ids), 0
        self.prompt, self.ids = list(ids), []  # prompt and completion token ids
        self.finish, self.error = None, None
        self._q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if max_tokens == 0:  # echo scoring only: nothing to generate
            self.rid, self.done, self.finish = None, True, "length"
            return
        sink = lambda ev: loop.call_soon_threadsafe(self._q.put_nowait, ev)  # noqa: E731
        try:
            self.rid = st.worker.submit(ids, max_tokens, sp, seed, sink)
        except QueueFull as e:
            hdr = {"Retry-After": str(st.busy_retry_after())}
            raise ApiError(429, f"the server is busy: {e}; retry later", headers=hdr) from None
        except Draining as e:
            hdr = {"Retry-After": str(st.retry_after_s)}
            raise ApiError(503, str(e), headers=hdr) from None
        self.done = False

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as tokens arrive; sets finish (stop | length) or error at the end."""
        while not self.done:
            kind, val = await self._q.get()
            if kind == "token":
                if self.stream.stopped:
                    continue
                self.completion_tokens += 1
                self.ids.append(int(val))
                piece = self.stream.add(val)
                if self.stream.stopped:
                    self.st.worker.cancel(self.rid, "stop string")
                    self.finish = "stop"
                if piece:
                    yield piece
            else:
                self.done = True
                if val.status == ERROR:
                    self.error = val.error or "engine error"
                elif val.status != CANCELLED or self.finish is None:
                    self.finish = self.finish or FINISH.get(val.finish_reason, val.finish_reason)
                rest = self.stream.finish()
                if rest and not self.error:
                    yield rest

    def cancel(self) -> None:
        if not self.done:
            self.st.worker.cancel(self.rid, "client disconnected")

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(gen: _Generation, request: Request) -> str:
    """The whole text; a watcher cancels the request if the client goes away meanwhile."""

    async def watch() -> None:
        while not gen.done:
            if await request.is_disconnected():
                gen.cancel()
                return
            await asyncio.sleep(gen.st.disconnect_poll_s)

    watcher = asyncio.create_task(watch())
    try:
        return "".join([p async for p in gen.pieces()])
    finally:
        watcher.cancel()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect (whatever the ASGI
    spec version) and closes its iterator, so the request is cancelled at once."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
        await self.body_iterator.aclose()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclasses.dataclass(frozen=True)
class _Logprobs:
    """What a request asked of `logprobs`: n_top alternatives per token; echo (completions):
    the prompt's tokens come first in the choice."""

    chat: bool
    n_top: int
    echo: bool = False

    @classmethod
    def of(cls, body: _Common, chat: bool) -> _Logprobs | None:
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            return cls(True, body.top_logprobs or 0) if body.logprobs else None
        return None if body.logprobs is None else cls(False, body.logprobs, body.echo)

    async def of_tokens(self, gen: _Generation, a: int, b: int) -> dict:
        """The logprobs object of the choice's tokens a..b-1 (with echo the prompt's tokens
        come first: 0..P-1), from one scoring pass over the prompt and completion so far."""
        st, P = gen.st, len(gen.prompt)
        off = P if self.echo else 0
        full = gen.prompt + gen.ids[: max(0, b - off)]
        lp = await anyio.to_thread.run_sync(st.scorer().score, full)
        if self.chat:
            return chat_logprobs(st.tokenizer, full[P + a :], lp.tail(b - a), self.n_top)
        lps, tops = completion_entries(lp, first=True)  # entry j: token j of `full`
        shift = P - off
        choice = full[shift:]
        return completion_logprobs(
            st.tokenizer, choice, lps[shift:], tops[shift:], self.n_top, start=a
        )


async def _stream_events(
    gen: _Generation, head: dict, chat: bool, usage: bool, lpr: _Logprobs | None, echo: str | None
):
    """SSE chunks for one generation (with echo: the prompt text first); each chunk carries
    the logprobs of the tokens it adds when asked; cancels the request if the stream is torn
    down."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    off = len(gen.prompt) if echo is not None else 0

    def chunk(delta: str | None, finish=None, role=False, logprobs=None) -> dict:
        if chat:
            d = ({"role": "assistant"} if role else {}) | (
                {} if delta is None else {"content": delta}
            )
            choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        else:
            text = delta or ""
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return head | {"object": obj, "choices": [choice]}

    sent = 0  # completion tokens whose logprobs went out

    async def lp_upto(n: int):
        nonlocal sent
        if lpr is None or n == sent:
            return None
        a, sent = sent, n
        return await lpr.of_tokens(gen, off + a, off + n)

    try:
        if chat:
            yield _sse(chunk("", role=True))
        if echo is not None:
            lp = await lpr.of_tokens(gen, 0, off) if lpr is not None else None
            yield _sse(chunk(echo, logprobs=lp))
        async for piece in gen.pieces():
            yield _sse(chunk(piece, logprobs=await lp_upto(len(gen.ids))))
        if gen.error:
            err = {"message": gen.error, "type": "server_error", "param": None, "code": None}
            yield _sse({"error": err})
        else:
            rest = await lp_upto(len(gen.ids)) if len(gen.ids) > sent else None
            yield _sse(chunk(None if chat else "", gen.finish, logprobs=rest))
            if usage:
                yield _sse(head | {"object": obj, "choices": [], "usage": gen.usage()})
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()


# ----------------------------------------------------------------------------- app


def create_app(st: ServerState) -> FastAPI:
    """The FastAPI app; the caller starts `st.worker` and drains it on shutdown."""
    app = FastAPI(title="readme_jax server", version="1")
    app.state.serve = st
    metrics = st.worker.metrics
    metrics.retry_after.set_function(st.busy_retry_after)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if e.status in (400, 404):
            metrics.requests.labels("invalid").inc()
        elif e.status in (429, 503):
            metrics.requests.labels("rejected").inc()
        return _error(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.requests.labels("invalid").inc()
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg')}")
        extra = [r for r in errs if r.get("type") == "extra_forbidden"]
        if extra:
            body = ChatBody if request.url.path.endswith("/chat/completions") else CompletionBody
            return _unsupported([r["loc"][1:] for r in extra], body)
        msgs = "; ".join(f"{'.'.join(str(x) for x in r['loc'][1:])}: {r['msg']}" for r in errs)
        return _error(400, f"invalid request: {msgs}", loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        if st.worker.failure is not None:  # the process is stopping; a supervisor restarts it
            return _error(503, f"the engine failed: {st.worker.failure}")
        if st.worker.draining:
            return _error(503, "shutting down", headers={"Retry-After": str(st.retry_after_s)})
        return {"status": "ok", "outstanding": st.worker.outstanding}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": st.model_name, "object": "model", "created": 0, "owned_by": "readme_jax"}
        return {"object": "list", "data": [card | {"max_model_len": st.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _check_model(st, body.model)
        ids = _prompt_ids(st, body.prompt)
        return await _serve(st, body, ids, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        _check_model(st, body.model)
        msgs = [m.model_dump() for m in body.messages]
        try:
            text = st.tokenizer.apply_chat_template(msgs)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = st.tokenizer.encode(text)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _serve(st, body, ids, request, chat=True)

    return app


async def _serve(st: ServerState, body: _Common, ids: list[int], request: Request, chat: bool):
    sp = _sampling(body)
    stops = _stops(body)
    lpr = _Logprobs.of(body, chat)
    echo = None if chat or not body.echo else _echo_text(st, body.prompt, ids)
    if lpr is not None:
        st.scorer()  # a 400 before anything runs when this backend cannot score
    max_tokens = _budget(st, len(ids), body.max_tokens, chat, echo is not None)
    seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**32
    gen = _Generation(st, ids, max_tokens, sp, seed, stops)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "created": int(time.time()), "model": st.model_name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _stream_events(gen, head, chat, usage, lpr, echo)
        return _EventStream(events, media_type="text/event-stream")
    text = await _collect(gen, request)
    if gen.error:
        raise ApiError(500, f"the request failed in the engine: {gen.error}")
    off = len(ids) if echo is not None else 0
    lp = None if lpr is None else await lpr.of_tokens(gen, 0, off + len(gen.ids))
    if chat:
        msg = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": msg, "logprobs": lp, "finish_reason": gen.finish}
        return head | {"object": "chat.completion", "choices": [choice], "usage": gen.usage()}
    text = text if echo is None else echo + text
    choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": gen.finish}
    return head | {"object": "text_completion", "choices": [choice], "usage": gen.usage()}
