"""The HTTP server: OpenAI (chat completions, completions, responses, models) and Anthropic
(messages, count_tokens) routes on FastAPI, one generation worker behind them.

A request is read (with a body size limit), authenticated, validated (pydantic), turned into a
conversation and a prompt, queued for the worker, and answered from the worker's events,
streamed as server-sent events or as one JSON body. Every error leaves in the API's own shape
(OpenAI `{"error": {...}}`, Anthropic `{"type": "error", "error": {...}}`) with a message
naming the field; nothing a client sends can stop the server.

While a streamed request waits in the queue or its prompt is prefilled, the stream carries SSE
comment lines (`: queued: 1 ahead`, `: prefill 4096/16384`), which official clients skip and a
browser page can show as progress.
"""

import asyncio
import fnmatch
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..chat_format import render_chat
from ..template_sandbox import TemplateError, TemplateRefusal
from ..tokens import THINK_BEGIN
from . import events, requests, schemas
from .engine import Engine, Job
from .page import add_page
from .requests import Conversation, RequestError

KEEPALIVE_SECONDS = 15.0
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                    503: "overloaded_error", 500: "api_error"}


@dataclass
class Service:
    """What the routes need: the engine and the server's settings."""

    engine: Engine
    tokenizer: Any
    model_names: List[str]  # served names; the first is reported, globs are accepted
    sampling: Dict[str, Any]  # defaults for temperature, top_p, top_k, min_p, ...
    max_tokens: int
    thinking: str = "adaptive"
    api_key: Optional[str] = None
    max_body: int = 32 << 20
    log: Callable[[str], None] = print
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> Optional[int]:
        return self.engine.context

    def check_model(self, name: str):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.model_names):
            raise RequestError(f"model {name!r} not found; this server serves "
                               f"{self.model_names[0]!r}", "model", 404)

    def sampling_for(self, request, keys=SAMPLING_KEYS) -> Dict[str, Any]:
        out = dict(self.sampling)
        for key in keys:
            value = getattr(request, key, None)
            if value is not None:
                out[key] = value
        if out.get("top_p") == 0:  # nothing but the most likely token: greedy
            out["temperature"], out["top_p"] = 0.0, 1.0
        return out

    def budget(self, prompt_tokens: int, requested: Optional[int]) -> int:
        """Tokens the reply may take: as requested (else the server's default), within the
        model's context."""
        if self.context is not None and prompt_tokens >= self.context:
            raise RequestError(f"the prompt is {prompt_tokens:,} tokens; the model's context is "
                               f"{self.context:,}", "messages")
        wanted = requested if requested is not None else self.max_tokens
        if self.context is not None:
            wanted = min(wanted, self.context - prompt_tokens)
        return wanted

    def render(self, convo: Conversation) -> Tuple[List[int], bool]:
        """The conversation's prompt tokens, and whether they end inside a reasoning block."""
        try:
            text = render_chat(convo.messages, tools=convo.tools,
                               thinking=convo.thinking or self.thinking,
                               template=self.tokenizer.chat_template,
                               template_name=getattr(self.tokenizer, "chat_template_file", None))
        except TemplateRefusal as e:
            raise RequestError(str(e), "messages") from None
        except TemplateError as e:
            raise RequestError(f"the server's chat template failed: {e}", None, 500) from None
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        return self.tokenizer.encode(text), text.endswith(THINK_BEGIN)

    def decode(self, token: int) -> str:
        return self.tokenizer.decode([token])


# -- errors --------------------------------------------------------------------------------------


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages") or (
        request.url.path.startswith("/v1/models") and "anthropic-version" in request.headers)


def error_body(anthropic: bool, status: int, message: str, param: Optional[str] = None):
    if anthropic:
        return {"type": "error", "error": {"type": ANTHROPIC_ERRORS.get(status, "api_error"),
                                           "message": message}}
    kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error",
            503: "server_error"}.get(status, "invalid_request_error")
    code = {401: "invalid_api_key", 404: "model_not_found" if param == "model" else None,
            413: "request_too_large"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, param=None) -> JSONResponse:
    return JSONResponse(error_body(_is_anthropic(request), status, message, param), status)


def _location(loc, anthropic: bool) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f".{part}" if anthropic else f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validate(model, payload: Any, anthropic: bool):
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        # Union members are reported by type name (str, list[...], constrained-str):
        # keep the field path only.
        loc = [p for p in first["loc"] if not (isinstance(p, str) and (
            p[:1].isupper() or "[" in p or "-" in p or p in _TYPE_TAGS))]
        param = _location(loc, anthropic)
        raise RequestError(f"{param}: {first['msg']}" if param else first["msg"], param or None,
                           400) from None


async def read_json(request: Request, service: Service) -> Any:
    """The body as JSON, after the API key check and within the size limit."""
    check_key(request, service)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > service.max_body:
        raise RequestError(f"the request body is {int(length):,} bytes; the limit is "
                           f"{service.max_body:,}", None, 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > service.max_body:
            raise RequestError(f"the request body is over the limit of {service.max_body:,} "
                               "bytes", None, 413)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 (byte {body[e.start]:#04x} at "
                           f"offset {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError("the request body nests too deeply") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, "
                           f"column {e.colno})") from None


def check_key(request: Request, service: Service):
    if service.api_key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), service.api_key.encode()):
        raise RequestError("a valid API key is required: send 'Authorization: Bearer KEY' or "
                           "'x-api-key: KEY'", None, 401)


# -- answering from the engine -------------------------------------------------------------------


def _merge(batch: List[tuple]) -> List[tuple]:
    """Consecutive text deltas as one, and only the latest prefill progress."""
    out: List[tuple] = []
    for event in batch:
        if out and event[0] == "delta" and out[-1][0] == "delta" and not event[3] \
                and not out[-1][3] and event[4] is None and out[-1][4] is None:
            prev = out[-1]
            if bool(prev[2]) == bool(event[2]) or not (prev[1] or event[2]):
                out[-1] = ("delta", prev[1] + event[1], prev[2] + event[2], [], None)
                continue
        if out and event[0] == "prefill" and out[-1][0] == "prefill":
            out[-1] = event
            continue
        out.append(event)
    return out


def _stream_error(anthropic: bool, message: str) -> str:
    if anthropic:
        return events.sse({"type": "error", "error": {"type": "api_error", "message": message}},
                          "error")
    return events.sse(error_body(False, 500, message)) + events.sse("[DONE]")


async def respond(request: Request, service: Service, job: Job, reply: events.Reply,
                  stream: bool):
    anthropic = _is_anthropic(request)
    job.bind(asyncio.get_running_loop())
    try:
        ahead = service.engine.submit(job)
    except RuntimeError as e:
        raise RequestError(str(e), None, 503) from None

    def handle(batch: List[tuple]) -> Tuple[List[str], Optional[str]]:
        out, error = [], None
        for event in _merge(batch):
            kind = event[0]
            if kind == "start":
                out += reply.start(event[1], event[2])
            elif kind == "prefill":
                out.append(events.comment(f"prefill {event[1]}/{event[2]}"))
                if anthropic:  # an event, not only a comment: clients' idle timers see it
                    out.append(events.sse({"type": "ping"}, "ping"))
            elif kind == "delta":
                out += reply.delta(*event[1:])
            elif kind == "done":
                out += reply.finish(event[1])
            elif kind == "error":
                error = event[1]
        return out, error

    if stream:
        async def generate():
            try:
                if ahead:
                    yield events.comment(f"queued: {ahead} ahead")
                async for batch in job.events(KEEPALIVE_SECONDS):
                    if not batch:
                        yield events.comment("keep-alive") + (
                            events.sse({"type": "ping"}, "ping") if anthropic else "")
                        continue
                    out, error = handle(batch)
                    if error is not None:
                        out.append(_stream_error(anthropic, error))
                    if out:
                        yield "".join(out)
            finally:
                job.cancelled = True  # the client went away, or the reply is complete

        return StreamingResponse(generate(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        job.cancelled = True

    watcher = asyncio.create_task(watch())
    try:
        async for batch in job.events(None):
            _, error = handle(batch)
            if error is not None:
                raise RequestError(error, None, 500)
    finally:
        watcher.cancel()
    return JSONResponse(reply.body())


# -- the app ---------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="m3mlx", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return error_response(request, error.status, error.message, error.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = f"no route {request.method} {request.url.path}" if error.status_code in (
            404, 405) else str(error.detail)
        return error_response(request, error.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        service.log(f"{request.method} {request.url.path} failed: {error!r}")
        return error_response(request, 500, f"internal error: {error}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_names[0],
                "waiting": service.engine._waiting}  # noqa: SLF001

    def model_card(name: str, anthropic: bool) -> Dict[str, Any]:
        if anthropic:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(service.started))
            return {"type": "model", "id": name, "display_name": name, "created_at": created}
        card = {"id": name, "object": "model", "created": service.started, "owned_by": "m3mlx"}
        if service.context is not None:
            card["context_length"] = service.context  # the prompt plus the reply, in tokens
        return card

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, service)
        anthropic = _is_anthropic(request)
        names = [n for n in service.model_names if not any(c in n for c in "*?[")]
        cards = [model_card(n, anthropic) for n in names]
        if anthropic:
            return {"data": cards, "has_more": False, "first_id": names[0], "last_id": names[-1]}
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request, service)
        service.check_model(name)
        return model_card(name, _is_anthropic(request))

    async def accept(request: Request, schema, anthropic: bool = False):
        """The request's JSON and its validated body, for a model this server serves."""
        payload = await read_json(request, service)
        body = validate(schema, payload, anthropic)
        service.check_model(body.model)
        return payload, body

    async def chat_job(convo: Conversation, body, max_tokens: Optional[int], stop: List[str],
                       sampling_keys=None, top_logprobs=None) -> Job:
        """A job for a conversation: its prompt rendered off the event loop."""
        ids, in_reasoning = await asyncio.to_thread(service.render, convo)
        sampling = service.sampling_for(body, sampling_keys or SAMPLING_KEYS)
        return Job(ids=ids, max_tokens=service.budget(len(ids), max_tokens), sampling=sampling,
                   stop=stop, chat=True, in_reasoning=in_reasoning, tools=convo.tools,
                   tool_choice=convo.tool_choice, top_logprobs=top_logprobs)

    def usage_wanted(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _, body = await accept(request, schemas.ChatCompletionRequest)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        job = await chat_job(requests.from_chat_completion(body), body, limit,
                             requests.stop_list(body.stop),
                             top_logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        reply = events.ChatCompletion(body.model, include_usage=usage_wanted(body),
                                      logprobs=body.logprobs, decode=service.decode)
        return await respond(request, service, job, reply, body.stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _, body = await accept(request, schemas.CompletionRequest)
        text, ids = requests.prompt_of(body.prompt)
        if ids is None:
            if not text:
                raise RequestError("prompt is empty", "prompt")
            ids = await asyncio.to_thread(service.tokenizer.encode, text)
        elif any(not 0 <= i < service.tokenizer.vocab_size for i in ids):
            raise RequestError(f"prompt holds token ids outside the vocabulary (0 to "
                               f"{service.tokenizer.vocab_size - 1})", "prompt")
        job = Job(ids=ids, max_tokens=service.budget(len(ids), body.max_tokens),
                  sampling=service.sampling_for(body), stop=requests.stop_list(body.stop),
                  chat=False, top_logprobs=body.logprobs)
        echo = (text if text is not None else service.tokenizer.decode(ids)) if body.echo else ""
        reply = events.TextCompletion(body.model, include_usage=usage_wanted(body),
                                      logprobs=body.logprobs, echo=echo, decode=service.decode)
        return await respond(request, service, job, reply, body.stream)

    @app.post("/v1/responses")
    async def responses(request: Request):
        payload, body = await accept(request, schemas.ResponsesRequest)
        job = await chat_job(requests.from_responses(body), body, body.max_output_tokens, [])
        reply = events.Response(body.model, payload, decode=service.decode)
        return await respond(request, service, job, reply, body.stream)

    @app.post("/v1/messages")
    async def messages(request: Request):
        _, body = await accept(request, schemas.MessagesRequest, anthropic=True)
        job = await chat_job(requests.from_anthropic(body), body, body.max_tokens,
                             requests.stop_list(body.stop_sequences, "stop_sequences"),
                             sampling_keys=("temperature", "top_p", "top_k"))
        return await respond(request, service, job, events.AnthropicMessage(body.model),
                             body.stream)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        _, body = await accept(request, schemas.CountTokensRequest, anthropic=True)
        ids, _ = await asyncio.to_thread(service.render, requests.from_anthropic(body))
        return {"input_tokens": len(ids)}

    add_page(app)  # the web chat at /
    return app
