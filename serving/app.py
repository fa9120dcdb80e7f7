"""The HTTP API: OpenAI-compatible chat, feedback capture, models, health, and the chat page.

Bodies are read and validated here (not by FastAPI's automatic parsing) so that every bad input
gets the status that names its problem:

  400 undecodable body (bad JSON, invalid UTF-8, not an object) or a request we cannot serve (n>1,
      last message not from the user, prompt too long, max_tokens above the ceiling)
  401 forged or malformed feedback token        403 the response belongs to another user
  404 unknown response_id / adapter version     409 event_id reused with a different body
  410 feedback token expired                    413 body too large        415 not JSON
  422 wrong fields or types (pydantic's message) 429 per-user rate limit

Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, so the openai client surfaces
the message. The request's `model` field is accepted as anything: it selects an adapter only when
it names one listed by /v1/models (`flywheel-assistant/3`); otherwise routing (champion/A-B) decides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ingest import endpoints
from ingest.events import (
    MAX_MESSAGES,
    MAX_TEXT_CHARS,
    FeedbackEvent,
    FeedbackKind,
    ResponseEvent,
    encode_event,
    now,
)
from serving.adapters import AdapterRouter, UnknownAdapter
from serving.feedback import LRU, IssuedResponse, RateLimiter, TokenError, sign, verify

log = logging.getLogger("serving.app")
STATIC = Path(__file__).parent / "static"
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# --- request bodies -------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(422, f"a message is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatIn(BaseModel):
    # OpenAI clients send fields we do not implement (frequency_penalty, logit_bias, ...): ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: Annotated[list[MessageIn], Field(min_length=1, max_length=MAX_MESSAGES)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: Id | None = None
    conversation_id: Id | None = None
    regenerates: Id | None = None
    adapter: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    response_id: Id
    feedback_token: Annotated[str, Field(min_length=1, max_length=256)]
    user: Id
    kind: FeedbackKind
    edited_text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    dwell_seconds: float | None = None
    comment: Annotated[str, Field(max_length=4000)] | None = None
    event_id: Id | None = None


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


# --- the service ----------------------------------------------------------------------------


@dataclass
class Service:
    """Everything a request needs; built by serving.serve.build()."""

    cfg: Any  # serving.serve.Config
    backend: Any  # serving.engine.Engine | serving.vllm.VllmBackend
    router: AdapterRouter
    publisher: Any  # serving.publisher.EventPublisher
    secret: bytes
    served_name: str
    app: FastAPI | None = None
    responses: LRU = field(init=False)
    feedback_events: LRU = field(init=False)
    feedback_limit: RateLimiter = field(init=False)
    chat_limit: RateLimiter = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        h = self.cfg.http
        self.responses = LRU(h.max_responses)
        self.feedback_events = LRU(h.max_responses)
        self.feedback_limit = RateLimiter(h.feedback_per_minute, h.feedback_burst)
        self.chat_limit = RateLimiter(h.chat_per_minute, h.chat_burst)
        self.topics = endpoints.topics()

    def close(self) -> None:
        self.router.stop()
        self.publisher.close()
        self.backend.close()

    # --- chat ---------------------------------------------------------------------------------

    def finalize(self, req: ChatIn, messages: list[dict], choice, result, *, response_id: str,  # noqa: ANN001
                 conversation_id: str, user: str, seed: int, temperature: float, top_p: float, max_tokens: int,
                 t0: float) -> dict:
        """Emit the response event, remember the response, mint its feedback token (worker thread)."""
        expires = int(time.time()) + self.cfg.http.token_ttl_s
        event = ResponseEvent(
            event_id=response_id, created_at=now(), user_id=user, conversation_id=conversation_id,
            response_id=response_id, adapter_version=choice.label, prompt=messages, completion=result.text,
            finish_reason=result.finish_reason, base_model=self.cfg.model.base, ab_arm=choice.arm,
            sampling={"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed},
            completion_logprob=result.logprob, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, latency_ms=(time.perf_counter() - t0) * 1000,
            regenerates=req.regenerates)
        self.responses.put(response_id, IssuedResponse(response_id, user, conversation_id, choice.label, expires))
        self.publisher.publish(self.topics["responses"].name, conversation_id, encode_event(event))
        return {"response_id": response_id, "feedback_token": sign(self.secret, response_id, user, expires),
                "adapter_version": choice.label, "ab_arm": choice.arm, "conversation_id": conversation_id}

    def begin_chat(self, req: ChatIn, on_delta=None):  # noqa: ANN001, ANN201
        """Validate, route and start one chat request. Returns (final future, meta)."""
        if req.n != 1:
            raise ApiError(400, f"n={req.n} is not supported; this server returns one choice (n=1)", param="n")
        messages = [m.plain() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        user = req.user or "anonymous"
        if not self.chat_limit.allow(user):
            raise ApiError(429, f"user {user} sent too many chat requests; limit is "
                                f"{self.cfg.http.chat_per_minute:g}/minute", code="rate_limit_exceeded")
        if req.regenerates:
            prev = self.responses.get(req.regenerates)
            if prev is not None and prev.user_id != user:
                raise ApiError(403, f"response {req.regenerates} belongs to another user", param="regenerates")
        g = self.cfg.generation
        max_tokens = req.max_tokens or req.max_completion_tokens or g.max_tokens
        if max_tokens > g.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit {g.max_tokens_limit}",
                           param="max_tokens")
        temperature = g.temperature if req.temperature is None else req.temperature
        top_p = g.top_p if req.top_p is None else req.top_p
        seed = req.seed if req.seed is not None else random.getrandbits(31)
        explicit = req.adapter
        if explicit is None and req.model and req.model.startswith(self.router.model_name + "/"):
            explicit = req.model
        try:
            choice = self.router.choose(user, explicit)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), code="model_not_found", param="adapter") from None
        t0 = time.perf_counter()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        conversation_id = req.conversation_id or f"conv-{uuid.uuid4().hex}"
        final: Future = Future()
        try:
            gen = self.backend.start(messages, max_tokens, temperature, top_p, seed, choice.name, on_delta)
        except Exception as e:
            choice.release()
            from serving.engine import PromptTooLong

            if isinstance(e, PromptTooLong):
                raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
            raise

        def done(f: Future) -> None:
            try:
                result = f.result()
                extras = self.finalize(req, messages, choice, result, response_id=response_id,
                                       conversation_id=conversation_id, user=user, seed=seed,
                                       temperature=temperature, top_p=top_p, max_tokens=max_tokens, t0=t0)
                final.set_result((result, extras))
            except Exception as e:  # noqa: BLE001 - handed to the request
                log.exception("chat request %s failed", response_id)
                final.set_exception(e)
            finally:
                choice.release()

        gen.add_done_callback(done)
        return final, {"response_id": response_id, "model": choice.label or self.served_name}


def _chunk(response_id: str, model: str, created: int, delta: dict, finish: str | None = None,
           extras: dict | None = None) -> str:
    body = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **(extras or {})}
    return f"data: {json.dumps(body)}\n\n"


def _usage(result) -> dict:  # noqa: ANN001
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {declared} bytes; the limit is {limit}", code="body_too_large")
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype.lower():
        raise ApiError(415, f"content-type {ctype!r} is not JSON; send application/json", code="unsupported_media")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is larger than the limit of {limit} bytes", code="body_too_large")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
    return obj


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="Flywheel assistant", version="1", docs_url="/docs", redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        typ = "rate_limit_error" if e.status == 429 else "invalid_request_error"
        return JSONResponse({"error": {"message": e.message, "type": typ, "code": e.code, "param": e.param}},
                            status_code=e.status)

    @app.get("/")
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "base_model": service.cfg.model.base, "served_name": service.served_name,
                "uptime_s": round(time.time() - service.started, 1), "adapters": service.router.state(),
                "events": service.publisher.state(), "backend": service.backend.state()}

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(service.started)
        data = [{"id": service.served_name, "object": "model", "created": created, "owned_by": "flywheel"}]
        routes = service.router.routes
        for s in sorted(service.router.loaded.values(), key=lambda s: int(s.ref.version)):
            aliases = [a for a, r in (("champion", routes.champion), ("challenger", routes.challenger))
                       if r is not None and r.name == s.name]
            data.append({"id": s.label, "object": "model", "created": created, "owned_by": "flywheel",
                         "parent": service.served_name, "root": service.served_name, "aliases": aliases})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        raw = await _read_json(request, service.cfg.http.max_body_bytes)
        try:
            req = ChatIn.model_validate(raw)
        except ValidationError as e:
            raise ApiError(422, _describe(e), code="invalid_fields") from None
        created = int(time.time())
        if not req.stream:
            final, meta = service.begin_chat(req)
            result, extras = await asyncio.wrap_future(final)
            return {"id": meta["response_id"], "object": "chat.completion", "created": created,
                    "model": meta["model"], "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason, "logprobs": None}],
                    "usage": _usage(result), **extras}
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        def on_delta(text: str) -> None:  # worker thread -> event loop, in order
            loop.call_soon_threadsafe(deltas.put_nowait, text)

        final, meta = service.begin_chat(req, on_delta)
        final.add_done_callback(lambda _f: loop.call_soon_threadsafe(deltas.put_nowait, None))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():  # noqa: ANN202
            rid, model = meta["response_id"], meta["model"]
            yield _chunk(rid, model, created, {"role": "assistant", "content": ""})
            while (text := await deltas.get()) is not None:
                yield _chunk(rid, model, created, {"content": text})
            try:
                result, extras = final.result()
            except Exception as e:  # noqa: BLE001 - the status line is gone; say it in the stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield _chunk(rid, model, created, {}, finish=result.finish_reason, extras=extras)
            if include_usage:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(result), **extras}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/feedback", status_code=202)
    async def feedback(request: Request):  # noqa: ANN202
        raw = await _read_json(request, service.cfg.http.max_feedback_bytes)
        try:
            fb = FeedbackIn.model_validate(raw)
        except ValidationError as e:
            raise ApiError(422, _describe(e), code="invalid_fields") from None
        if not service.feedback_limit.allow(fb.user):
            raise ApiError(429, f"user {fb.user} sent too much feedback; limit is "
                                f"{service.cfg.http.feedback_per_minute:g}/minute", code="rate_limit_exceeded")
        fingerprint = json.dumps(fb.model_dump(), sort_keys=True)
        if fb.event_id:
            seen = service.feedback_events.get(fb.event_id)
            if seen is not None:
                return _replay(seen, fingerprint, fb.event_id)
        issued: IssuedResponse | None = service.responses.get(fb.response_id)
        if issued is None:
            raise ApiError(404, f"unknown response_id {fb.response_id}: this server did not issue it, or it "
                                f"was issued too long ago", code="unknown_response", param="response_id")
        if issued.user_id != fb.user:
            raise ApiError(403, f"response {fb.response_id} was not given to user {fb.user}; send feedback as "
                                f"the user who received it", code="wrong_user", param="user")
        try:
            verify(service.secret, fb.feedback_token, fb.response_id, fb.user)
        except TokenError as e:
            raise ApiError(e.status, str(e), code="bad_token" if e.status == 401 else "token_expired",
                           param="feedback_token") from None
        event_id = fb.event_id or f"fb-{uuid.uuid4().hex}"
        try:
            event = FeedbackEvent(event_id=event_id, created_at=now(), user_id=fb.user,
                                  conversation_id=issued.conversation_id, response_id=fb.response_id,
                                  adapter_version=issued.adapter_version, kind=fb.kind, edited_text=fb.edited_text,
                                  dwell_seconds=fb.dwell_seconds, comment=fb.comment)
        except ValidationError as e:
            raise ApiError(422, _describe(e), code="invalid_fields") from None
        answer = {"event_id": event_id, "status": "accepted"}
        stored = service.feedback_events.setdefault(event_id, (fingerprint, answer))
        if stored[1] is not answer:  # a concurrent duplicate won the race: it published, we do not
            return _replay(stored, fingerprint, event_id)
        service.publisher.publish(service.topics["feedback"].name, fb.response_id, encode_event(event))
        return JSONResponse(answer, status_code=202)

    def _replay(seen: tuple[str, dict], fingerprint: str, event_id: str) -> JSONResponse:
        if seen[0] != fingerprint:
            raise ApiError(409, f"event_id {event_id} was already used for different feedback; use a new "
                                f"event_id per feedback", code="event_id_conflict", param="event_id")
        return JSONResponse(seen[1], status_code=202, headers={"Idempotent-Replayed": "true"})

    return app
