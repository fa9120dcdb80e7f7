"""The HTTP API: OpenAI-compatible chat, feedback capture, models, health, metrics, the chat page.

Bodies are read and validated here (not by FastAPI's automatic parsing) so that every bad input
gets the status that names its problem:

  400 undecodable body (bad JSON, invalid UTF-8, not an object, nested deeper than
      http.max_json_depth, a number longer than http.max_number_chars, NaN/Infinity, a lone UTF-16
      surrogate) or a request we cannot serve (n above http.max_n, last message not from the user,
      prompt too long, max_tokens above the ceiling, an OpenAI field we do not implement: tools,
      response_format other than text, ...: `unsupported_parameter`, `param` naming it)
  401 missing/invalid API key (when keys are configured); forged, malformed or retired feedback token
  403 the (verified) token was given to another user or app
  404 unknown model / adapter version, unknown route   405 wrong method
  409 event_id reused with a different body           410 feedback token expired
  413 body too large        415 not JSON             422 wrong fields or types (pydantic's message)
  429 per-user rate limit, or too many failed token verifications from one client address

Errors use OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, so the openai client
surfaces the message. A 5xx means a fault of this server, never of the input: anything a handler
did not expect is answered 500 in the same shape (and logged) without dropping the connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from serving.feedback import LRU, ApiKeys, FeedbackClaims, FeedbackTokens, RateLimiter, TokenError
from serving.metrics import ServingMetrics, version_label

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


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopText = Annotated[str, Field(min_length=1, max_length=256)]


class ChatIn(BaseModel):
    # Every OpenAI field that changes the answer is declared here and either honoured or refused
    # with a 400 naming it (`Service.check_openai_fields`), so a client never silently gets an answer
    # it did not ask for. Fields nobody defines (or OpenAI's bookkeeping: store, metadata,
    # service_tier, ...) are ignored, as OpenAI ignores unknown fields.
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
    n: Annotated[int, Field(ge=1)] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # token id (as a string, OpenAI's form) -> bias added to its logit
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None = None
    # Declared so that they are refused by name (not supported yet), never dropped.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    user: Id | None = None
    conversation_id: Id | None = None
    regenerates: Id | None = None
    adapter: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    response_id: Id
    feedback_token: Annotated[str, Field(min_length=1, max_length=2048)]
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

ROUTED_MODEL = "flywheel"  # `model` that lets routing (champion, A/B) choose, like the served name


@dataclass
class Service:
    """Everything a request needs; built by serving.serve.build()."""

    cfg: Any  # serving.serve.Config
    backend: Any  # serving.engine.Engine | serving.vllm.VllmBackend
    router: AdapterRouter
    publisher: Any  # serving.publisher.EventPublisher
    secrets: list[bytes]  # feedback-token secrets, the signing one first
    served_name: str
    api_keys: list[str] = field(default_factory=list)  # `key:tenant` entries; [] = open
    app: FastAPI | None = None
    tokens: FeedbackTokens = field(init=False)
    keys: ApiKeys = field(init=False)
    # Not a source of truth (tokens are): lets this replica refuse a regenerate of another user's answer.
    owners: LRU = field(init=False)
    feedback_events: LRU = field(init=False)
    feedback_limit: RateLimiter = field(init=False)
    bad_token_limit: RateLimiter = field(init=False)
    chat_limit: RateLimiter = field(init=False)
    metrics: ServingMetrics = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        h = self.cfg.http
        self.tokens = FeedbackTokens(self.secrets)
        self.keys = ApiKeys(self.api_keys)
        self.owners = LRU(h.max_responses)
        self.feedback_events = LRU(h.max_responses)
        self.feedback_limit = RateLimiter(h.feedback_per_minute, h.feedback_burst)
        self.bad_token_limit = RateLimiter(h.bad_token_per_minute, h.bad_token_burst)
        self.chat_limit = RateLimiter(h.chat_per_minute, h.chat_burst)
        self.metrics = ServingMetrics(self.backend.state, self.publisher.state)
        self.topics = endpoints.topics()

    def close(self) -> None:
        self.router.stop()
        self.publisher.close()
        self.backend.close()

    # --- models -------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every `model` value a chat request may name: the base, the routed alias, loaded adapters."""
        return [self.served_name, ROUTED_MODEL, *sorted(s.label for s in self.router.loaded.values())]

    def explicit_adapter(self, req: ChatIn) -> str | None:
        """The adapter a request names (`adapter`, or `model` = an adapter id), or None for routing;
        ApiError 404 model_not_found for a model or adapter this server does not serve."""
        base_names = {"base", self.cfg.model.base, self.served_name}
        if req.model is not None and req.model not in (self.served_name, self.cfg.model.base, ROUTED_MODEL):
            if not _ADAPTER_ID.fullmatch(req.model) or not req.model.startswith(self.router.model_name + "/"):
                raise ApiError(404, f"model {req.model!r} is not served here; use one of "
                                    f"{', '.join(self.model_names())} (GET /v1/models)",
                               code="model_not_found", param="model")
            if req.adapter is None:
                return req.model
        wanted = req.adapter
        if wanted is None or wanted in base_names:
            return wanted
        aliases = (self.router.champion_alias, self.router.challenger_alias)
        if not self.cfg.registry.enabled or not (wanted in aliases or _ADAPTER_ID.fullmatch(wanted)):
            raise ApiError(404, f"adapter {wanted!r} is not served here; use 'base', "
                                f"{' or '.join(repr(a) for a in aliases)}, a version number or one of "
                                f"{', '.join(self.model_names()[2:]) or '(no adapter loaded)'}",
                           code="model_not_found", param="adapter")
        return wanted

    # --- chat ---------------------------------------------------------------------------------

    def finalize(self, req: ChatIn, messages: list[dict], choice, result, *, response_id: str,  # noqa: ANN001
                 conversation_id: str, user: str, tenant: str | None, seed: int, temperature: float,
                 top_p: float, max_tokens: int, t0: float) -> dict:
        """Emit the response event and mint its feedback token (worker thread)."""
        expires = int(time.time()) + self.cfg.http.token_ttl_s
        seconds = time.perf_counter() - t0
        event = ResponseEvent(
            event_id=response_id, created_at=now(), user_id=user, conversation_id=conversation_id,
            response_id=response_id, adapter_version=choice.label, prompt=messages, completion=result.text,
            finish_reason=result.finish_reason, base_model=self.cfg.model.base, ab_arm=choice.arm,
            sampling={"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed},
            completion_logprob=result.logprob, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, latency_ms=seconds * 1000,
            regenerates=req.regenerates, tenant=tenant)
        self.owners.put(response_id, (tenant, user))
        self.publisher.publish(self.topics["responses"].name, conversation_id, encode_event(event))
        m, label = self.metrics, version_label(choice.label)
        m.responses.labels(label, choice.arm).inc()
        m.completion_tokens.labels(label).inc(result.completion_tokens)
        if result.completion_tokens and seconds > 0:
            m.tokens_per_second.observe(result.completion_tokens / seconds)
        token = self.tokens.issue(FeedbackClaims(response_id, user, conversation_id, choice.label, expires, tenant))
        return {"response_id": response_id, "feedback_token": token, "adapter_version": choice.label,
                "ab_arm": choice.arm, "conversation_id": conversation_id}

    def check_openai_fields(self, req: ChatIn) -> dict:
        """The engine options for the OpenAI fields a request sets; ApiError 400 naming the first field
        this server cannot honour."""
        def refuse(param: str, why: str) -> ApiError:
            return ApiError(400, f"{param}: {why}", code="unsupported_parameter", param=param)

        if req.tools:
            raise refuse("tools", "tool calling is not supported by this server; send the request without tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise refuse("tool_choice", "tool calling is not supported by this server; omit tool_choice or use 'none'")
        if req.functions or req.function_call not in (None, "none", "auto"):
            raise refuse("functions" if req.functions else "function_call", "function calling is not supported")
        if req.response_format is not None and req.response_format != {"type": "text"}:
            raise refuse("response_format", f"only {{'type': 'text'}} is supported, not {req.response_format!r}; "
                                            f"JSON mode and structured outputs are not implemented")
        if req.modalities is not None and req.modalities != ["text"]:
            raise refuse("modalities", "this server answers in text only; use ['text'] or omit it")
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(req, name) is not None:
                raise refuse(name, "not supported by this server; omit it")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_n = self.cfg.http.max_n
        if req.n > max_n:
            raise ApiError(400, f"n={req.n} is above this server's limit of {max_n} choices (http.max_n)", param="n")
        options: dict[str, Any] = {}
        if req.stop:
            options["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if req.logprobs:
            options["logprobs"] = req.top_logprobs or 0
        if req.presence_penalty:
            options["presence_penalty"] = req.presence_penalty
        if req.frequency_penalty:
            options["frequency_penalty"] = req.frequency_penalty
        if req.logit_bias:
            vocab = getattr(self.backend, "vocab_size", None)
            bias = {}
            for key, value in req.logit_bias.items():
                if not re.fullmatch(r"[0-9]{1,9}", key) or (vocab is not None and int(key) >= vocab):
                    raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0..{(vocab or 1) - 1})",
                                   param="logit_bias")
                bias[int(key)] = value
            options["logit_bias"] = bias
        supported = getattr(self.backend, "options", frozenset())
        for name in options:
            if name not in supported:
                field_name = "top_logprobs" if name == "logprobs" and req.top_logprobs else name
                raise refuse(field_name, f"not supported by this server's {self.backend.state().get('backend')} backend")
        return options

    def begin_chat(self, req: ChatIn, tenant: str | None, on_delta=None):  # noqa: ANN001, ANN201
        """Validate, route and start one chat request: `n` generations, each its own response (event,
        response_id, feedback token). Returns (one final future per choice, meta); `on_delta(index,
        text, entries)` streams. meta["cancel"] stops every choice that is still decoding."""
        options = self.check_openai_fields(req)
        messages = [m.plain() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        user = req.user or "anonymous"
        if not self.chat_limit.allow(_user_key(tenant, user)):
            raise ApiError(429, f"user {user} sent too many chat requests; limit is "
                                f"{self.cfg.http.chat_per_minute:g}/minute", code="rate_limit_exceeded")
        if req.regenerates:
            owner = self.owners.get(req.regenerates)
            if owner is not None and owner != (tenant, user):
                raise ApiError(403, f"response {req.regenerates} belongs to another user", param="regenerates")
        g = self.cfg.generation
        max_tokens = req.max_tokens or req.max_completion_tokens or g.max_tokens
        if max_tokens > g.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit {g.max_tokens_limit}",
                           param="max_tokens")
        temperature = g.temperature if req.temperature is None else req.temperature
        top_p = g.top_p if req.top_p is None else req.top_p
        explicit = self.explicit_adapter(req)
        conversation_id = req.conversation_id or f"conv-{uuid.uuid4().hex}"
        cancel = threading.Event()
        if "cancel" in getattr(self.backend, "options", frozenset()):
            options["cancel"] = cancel
        finals: list[Future] = []
        meta: dict[str, Any] = {"cancel": cancel}
        for index in range(req.n):
            # A given seed makes the whole request reproducible; its choices still differ.
            seed = (req.seed + index) % 2**63 if req.seed is not None else random.getrandbits(31)
            delta = None if on_delta is None else functools.partial(on_delta, index)
            try:
                final, model, response_id = self._start_choice(req, messages, explicit, user, tenant, conversation_id, seed,
                                                  temperature, top_p, max_tokens, delta, options)
            except Exception:
                cancel.set()  # the choices already started would never be read
                raise
            finals.append(final)
            meta.setdefault("model", model)
            meta.setdefault("response_id", response_id)
        return finals, meta

    def _start_choice(self, req: ChatIn, messages: list[dict], explicit: str | None, user: str,  # noqa: ANN202
                      tenant: str | None, conversation_id: str, seed: int, temperature: float, top_p: float,
                      max_tokens: int, on_delta, options: dict):  # noqa: ANN001
        try:
            choice = self.router.choose(user, explicit)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), code="model_not_found", param="adapter") from None
        t0 = time.perf_counter()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        final: Future = Future()
        try:
            gen = self.backend.start(messages, max_tokens, temperature, top_p, seed, choice.name, on_delta, **options)
        except Exception as e:
            choice.release()
            from serving.engine import PromptTooLong

            if isinstance(e, PromptTooLong):
                raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
            raise
        self.metrics.generation_started()

        def done(f: Future) -> None:
            try:
                result = f.result()
                # The client went away before the answer (and its feedback token) reached it: no
                # response event, since no feedback can ever name it.
                extras = None if result.finish_reason == "cancelled" else self.finalize(
                    req, messages, choice, result, response_id=response_id, conversation_id=conversation_id,
                    user=user, tenant=tenant, seed=seed, temperature=temperature, top_p=top_p,
                    max_tokens=max_tokens, t0=t0)
                final.set_result((result, extras))
            except Exception as e:  # noqa: BLE001 - handed to the request
                from serving.engine import RequestRefused

                if isinstance(e, RequestRefused):  # the request's own fault: a 400, nothing to log
                    final.set_exception(ApiError(400, str(e), param=e.param))
                else:
                    log.exception("chat request %s failed", response_id)
                    final.set_exception(e)
            finally:
                self.metrics.generation_ended()
                choice.release()

        gen.add_done_callback(done)
        return final, choice.label or self.served_name, response_id

    # --- feedback -----------------------------------------------------------------------------

    def verify_feedback(self, fb: FeedbackIn, tenant: str | None, client: str) -> FeedbackClaims:
        """The token's claims, checked against the body. The token is verified before anything is
        charged to the user it names, so forgeries in a victim's name cannot use up the victim's
        limit; failures are limited per client address instead, and a 403 (which says who received
        an answer) is only given to a caller holding a genuine token."""
        if not self.bad_token_limit.has_room(client):
            raise ApiError(429, f"too many invalid feedback tokens from {client}; limit is "
                                f"{self.cfg.http.bad_token_per_minute:g}/minute", code="rate_limit_exceeded")
        try:
            claims = self.tokens.verify(fb.feedback_token)
            if claims.response_id != fb.response_id:
                raise TokenError(401, f"feedback_token was not issued for response {fb.response_id}; send the "
                                      f"feedback_token returned with that response")
        except TokenError as e:
            self.bad_token_limit.allow(client)
            raise ApiError(e.status, str(e), code="bad_token" if e.status == 401 else "token_expired",
                           param="feedback_token") from None
        if claims.tenant != tenant:
            raise ApiError(403, f"response {fb.response_id} was given through another API key's app; send "
                                f"feedback with the key that asked for it", code="wrong_tenant")
        if claims.user_id != fb.user:
            raise ApiError(403, f"response {fb.response_id} was not given to user {fb.user}; send feedback as "
                                f"the user who received it", code="wrong_user", param="user")
        return claims


_ADAPTER_ID = re.compile(r"(?:[A-Za-z0-9_.-]{1,200}/)?[0-9]{1,12}", re.ASCII)


def _user_key(tenant: str | None, user: str) -> str:
    # Apps assert their users' ids: "alice" of one app is not "alice" of another.
    return user if tenant is None else f"{tenant}\x00{user}"


def _chunk(response_id: str, model: str, created: int, delta: dict, finish: str | None = None,
           extras: dict | None = None, index: int = 0, logprobs: list[dict] | None = None) -> str:
    choice = {"index": index, "delta": delta, "finish_reason": finish,
              "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}
    if extras:
        choice.update(extras)
    body = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice], **(extras or {})}
    return f"data: {json.dumps(body)}\n\n"


def _usage(results: list) -> dict:
    # OpenAI counts the prompt once however many choices it was answered with.
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(result) -> dict | None:  # noqa: ANN001
    return None if result.token_logprobs is None else {"content": result.token_logprobs, "refusal": None}


# --- bounded JSON ---------------------------------------------------------------------------

# Strings are removed before counting brackets. Possessive (`*+`), so an unterminated string costs
# one pass to the end of the body, never a rescan per quote: ~80 ms for 1 MiB of `"a\"`.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _BadNumber(ValueError):
    pass


def json_depth(raw: bytes) -> int:
    """Nesting depth of a JSON text, from its bytes (strings skipped), without parsing it."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return max(accumulate(_BRACKET_STEP[b] for b in brackets), default=0)


def _has_lone_surrogate(obj: object) -> bool:
    """True if a string anywhere in obj holds a lone UTF-16 surrogate (which UTF-8 cannot encode)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            if not o.isascii():
                try:
                    o.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False


def parse_json_body(raw: bytes, max_depth: int, max_number_chars: int) -> dict:
    """A JSON object from request bytes, every bound checked before the parser can be hurt:
    ApiError 400 saying which bound (or which JSON rule) the body breaks."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth and (depth := json_depth(raw)) > max_depth:
        raise ApiError(400, f"body is nested {depth} levels deep; the limit is {max_depth}", code="json_too_deep")

    def number(s: str) -> int | float:
        if len(s) > max_number_chars:
            raise _BadNumber(f"a number of {len(s)} characters; the limit is {max_number_chars}")
        if any(c in s for c in ".eE"):
            v = float(s)
            if v in (float("inf"), float("-inf")):
                raise _BadNumber(f"the number {s}, out of range for a 64-bit float")
            return v
        return int(s)

    def constant(s: str) -> None:
        raise _BadNumber(f"{s}, which JSON does not allow (use a finite number or null)")

    try:
        obj = json.loads(text, parse_int=number, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except _BadNumber as e:
        raise ApiError(400, f"body holds {e}", code="invalid_json") from None
    except RecursionError:  # the depth scan is approximate on invalid JSON; the parser's own bound
        raise ApiError(400, f"body is nested too deeply; the limit is {max_depth}", code="json_too_deep") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        raise ApiError(400, "body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                            "send text as valid Unicode", code="invalid_json")
    return obj


def check_body_headers(content_length: str | None, content_type: str, limit: int) -> None:
    """ApiError 413 for a declared length over `limit`, 415 for a content-type that is not JSON."""
    if content_length and re.fullmatch(r"[0-9]{1,20}", content_length) and int(content_length) > limit:
        raise ApiError(413, f"body is {content_length} bytes; the limit is {limit}", code="body_too_large")
    if content_type and "json" not in content_type.lower():
        raise ApiError(415, f"content-type {content_type!r} is not JSON; send application/json",
                       code="unsupported_media")


async def _read_json(request: Request, limit: int, http_cfg: Any) -> dict:  # noqa: ANN401
    check_body_headers(request.headers.get("content-length"), request.headers.get("content-type", ""), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is larger than the limit of {limit} bytes", code="body_too_large")
    return parse_json_body(bytes(body), http_cfg.max_json_depth, http_cfg.max_number_chars)


async def _await_unless_gone(request: Request, finals: list[Future], cancel: threading.Event) -> list | None:
    """Every choice's (result, extras), or None if the client disconnected first (then `cancel` is
    set, so the rows leave the batch at their next decode step instead of decoding to the end)."""
    waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in finals)))
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.1)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            cancel.set()
            waiting.add_done_callback(lambda w: w.exception())  # retrieved: no "never retrieved" warning
            return None


def error_body(message: str, typ: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": typ, "code": code, "param": param}}


class CatchAll:
    """Outermost app code: times every request per route for /metrics, answers an exception no handler
    expected with a 500 in OpenAI's shape *without* re-raising it, so uvicorn keeps the connection open
    (Starlette's ServerErrorMiddleware re-raises, and uvicorn then drops it). Most feedback does not come
    through here: `serving.fastpath` answers it in the HTTP protocol and times it the same way."""

    def __init__(self, app, metrics: ServingMetrics):  # noqa: ANN001
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}

        async def tracked(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                status["code"] = 500
                body = json.dumps(error_body("internal server error; the request was not completed (this is a "
                                              "fault of the server, logged there)", "server_error",
                                              "internal_error")).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")
            # Only route templates as labels: a fuzzer's random paths must not grow the label set.
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(name, scope.get("method", ""), str(status["code"])).observe(
                time.perf_counter() - t0)


def api_error_response(e: ApiError, metrics: ServingMetrics) -> JSONResponse:
    """An ApiError as OpenAI's error body, counted by status and code."""
    status, body, headers = api_error_body(e, metrics)
    return JSONResponse(body, status_code=status, headers=headers)


def api_error_body(e: ApiError, metrics: ServingMetrics) -> tuple[int, dict, dict | None]:
    """An ApiError's (status, OpenAI error body, extra headers), counted by status and code."""
    typ = {401: "authentication_error", 429: "rate_limit_error"}.get(e.status, "invalid_request_error")
    metrics.api_errors.labels(str(e.status), e.code).inc()
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 and e.code == "invalid_api_key" else None
    return e.status, error_body(e.message, typ, e.code, e.param), headers


# --- routes: thin handlers over the Service; each reads it from app.state --------------------------------

routes = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


def tenant_of(service: Service, request: Request) -> str | None:
    """The calling app's tenant from `Authorization: Bearer <key>`; None while no keys are set."""
    return tenant_for(service, request.headers.get("authorization", ""))


def tenant_for(service: Service, authorization: str) -> str | None:
    """The tenant of an Authorization header's value; ApiError 401 when keys are set and it holds none of them."""
    if not service.keys.required:
        return None
    scheme, _, key = authorization.partition(" ")
    tenant = service.keys.tenant(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    return tenant


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:  # noqa: ANN401 - an instance of model
    """The request's JSON (bounded by `limit` bytes and the http config) validated as `model`; 422 naming
    the fields otherwise."""
    raw = await _read_json(request, limit, _service(request).cfg.http)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, _describe(e), code="invalid_fields") from None


def _body_schema(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


@routes.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@routes.get("/healthz")
async def healthz(request: Request) -> dict:
    service = _service(request)
    return {"status": "ok", "base_model": service.cfg.model.base, "served_name": service.served_name,
            "uptime_s": round(time.time() - service.started, 1), "adapters": service.router.state(),
            "events": service.publisher.state(), "backend": service.backend.state(),
            "api_keys_required": service.keys.required}


@routes.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_cards(service: Service) -> list[dict]:
    """/v1/models: the base, the routed name, and every loaded adapter with the aliases it holds."""
    created = int(service.started)
    data = [{"id": service.served_name, "object": "model", "created": created, "owned_by": "flywheel"},
            {"id": ROUTED_MODEL, "object": "model", "created": created, "owned_by": "flywheel",
             "parent": service.served_name, "root": service.served_name,
             "description": "routed: the champion adapter (or the A/B challenger), else the base"}]
    aliased = service.router.routes
    for s in sorted(service.router.loaded.values(), key=lambda s: int(s.ref.version)):
        aliases = [a for a, r in (("champion", aliased.champion), ("challenger", aliased.challenger))
                   if r is not None and r.name == s.name]
        data.append({"id": s.label, "object": "model", "created": created, "owned_by": "flywheel",
                     "parent": service.served_name, "root": service.served_name, "aliases": aliases})
    return data


@routes.get("/v1/models")
async def models(request: Request) -> dict:
    tenant_of(_service(request), request)
    return {"object": "list", "data": model_cards(_service(request))}


@routes.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict:
    service = _service(request)
    tenant_of(service, request)
    for card in model_cards(service):
        if card["id"] == model_id:
            return card
    raise ApiError(404, f"model {model_id!r} is not served here; use one of "
                        f"{', '.join(service.model_names())} (GET /v1/models)", code="model_not_found", param="model")


@routes.post("/v1/chat/completions", openapi_extra=_body_schema("ChatIn"))
async def chat(request: Request):  # noqa: ANN201
    service = _service(request)
    tenant = tenant_of(service, request)
    req = await _body(request, ChatIn, service.cfg.http.max_body_bytes)
    if req.stream:
        return _stream_chat(service, req, tenant)
    created = int(time.time())
    finals, meta = service.begin_chat(req, tenant)
    outcomes = await _await_unless_gone(request, finals, meta["cancel"])
    if outcomes is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    choices = [{"index": i, "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason, "logprobs": _logprobs(result), **extras}
               for i, (result, extras) in enumerate(outcomes)]
    return {"id": meta["response_id"], "object": "chat.completion", "created": created, "model": meta["model"],
            "system_fingerprint": None, "choices": choices, "usage": _usage([r for r, _ in outcomes]),
            **outcomes[0][1]}


def _stream_chat(service: Service, req: ChatIn, tenant: str | None) -> StreamingResponse:
    """Start the generations with a callback that forwards every text delta, in order, from the engine's
    thread to this event loop; the response streams them as SSE chunks (`_sse`)."""
    loop = asyncio.get_running_loop()
    # (choice index, text, log-prob entries) per delta; (choice index, None, None) when it ends
    deltas: asyncio.Queue[tuple[int, str | None, list | None]] = asyncio.Queue()
    t0 = time.perf_counter()
    first = [True]

    def on_delta(index: int, text: str, entries: list | None = None) -> None:  # worker thread -> loop, in order
        if first[0]:
            first[0] = False
            service.metrics.first_token_seconds.observe(time.perf_counter() - t0)
        loop.call_soon_threadsafe(deltas.put_nowait, (index, text, entries))

    finals, meta = service.begin_chat(req, tenant, on_delta)
    for i, final in enumerate(finals):
        final.add_done_callback(lambda _f, i=i: loop.call_soon_threadsafe(deltas.put_nowait, (i, None, None)))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_sse(finals, meta, deltas, int(time.time()), include_usage, service.cfg.http.sse_keepalive_s),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(finals: list[Future], meta: dict, deltas: asyncio.Queue, created: int, include_usage: bool,
               keepalive: float):  # noqa: ANN202 - an async generator of SSE lines
    """The SSE body: a role chunk per choice, then text chunks as they come, each choice's finish chunk,
    the usage chunk if asked, [DONE]. Keep-alive comments while nothing comes; a client that leaves
    early cancels the rows still generating."""
    rid, model = meta["response_id"], meta["model"]
    open_choices = set(range(len(finals)))
    getter: asyncio.Future | None = None
    try:
        for i in range(len(finals)):
            yield _chunk(rid, model, created, {"role": "assistant", "content": ""}, index=i)
        while open_choices:
            # One get outlives the keep-alive timeouts, so a delta can never be lost to one.
            getter = getter or asyncio.ensure_future(deltas.get())
            if not (await asyncio.wait({getter}, timeout=keepalive))[0]:
                # An SSE comment: proxies and clients see a live stream while the answer waits
                # (for a batch slot, say); clients skip it.
                yield ": keep-alive\n\n"
                continue
            (index, text, entries), getter = getter.result(), None
            if text is not None:
                yield _chunk(rid, model, created, {"content": text}, index=index, logprobs=entries)
                continue
            open_choices.discard(index)
            try:
                result, extras = finals[index].result()
            except Exception as e:  # noqa: BLE001 - the status line is gone; say it in the stream
                body = (error_body(e.message, "invalid_request_error", e.code, e.param) if isinstance(e, ApiError)
                        else error_body(str(e), "server_error", "internal_error"))
                yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield _chunk(rid, model, created, {}, finish=result.finish_reason, extras=extras, index=index)
        if include_usage:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                    "usage": _usage([f.result()[0] for f in finals]), **finals[0].result()[1]}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if getter is not None:
            getter.cancel()
        # Closed early (the client disconnected, or the server stops): free the batch rows.
        if open_choices:
            meta["cancel"].set()


@routes.post("/v1/feedback", status_code=202, openapi_extra=_body_schema("FeedbackIn"))
async def feedback(request: Request):  # noqa: ANN201
    service = _service(request)
    tenant = tenant_of(service, request)
    raw = await _read_json(request, service.cfg.http.max_feedback_bytes, service.cfg.http)
    status, answer, headers = accept_feedback(service, tenant, raw, request.client.host if request.client else "unknown")
    return JSONResponse(answer, status_code=status, headers=headers)


def accept_feedback(service: Service, tenant: str | None, raw: dict, client: str) -> tuple[int, dict, dict | None]:
    """A feedback body (parsed JSON) checked, recorded once and published: (status, answer, extra headers),
    or ApiError. Synchronous, so that `serving.fastpath` can answer feedback without an ASGI round."""
    try:
        fb = FeedbackIn.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, _describe(e), code="invalid_fields") from None
    claims = service.verify_feedback(fb, tenant, client)
    if not service.feedback_limit.allow(_user_key(tenant, fb.user)):
        raise ApiError(429, f"user {fb.user} sent too much feedback; limit is "
                            f"{service.cfg.http.feedback_per_minute:g}/minute", code="rate_limit_exceeded")
    fingerprint = json.dumps(fb.model_dump(), sort_keys=True)
    if fb.event_id and (seen := service.feedback_events.get(fb.event_id)) is not None:
        return _replay(seen, fingerprint, fb.event_id)
    event_id = fb.event_id or f"fb-{uuid.uuid4().hex}"
    try:
        event = FeedbackEvent(event_id=event_id, created_at=now(), user_id=fb.user,
                              conversation_id=claims.conversation_id, response_id=fb.response_id,
                              adapter_version=claims.adapter_version, kind=fb.kind, edited_text=fb.edited_text,
                              dwell_seconds=fb.dwell_seconds, comment=fb.comment, tenant=claims.tenant)
    except ValidationError as e:
        raise ApiError(422, _describe(e), code="invalid_fields") from None
    answer = {"event_id": event_id, "status": "accepted"}
    stored = service.feedback_events.setdefault(event_id, (fingerprint, answer))
    if stored[1] is not answer:  # a concurrent duplicate won the race: it published, we do not
        return _replay(stored, fingerprint, event_id)
    try:
        service.publisher.publish(service.topics["feedback"].name, fb.response_id, encode_event(event))
    except BaseException:  # not published: a retry with this event_id must publish, not be told "replayed"
        service.feedback_events.discard(event_id, stored)
        raise
    service.metrics.feedback.labels(fb.kind, version_label(claims.adapter_version)).inc()
    return 202, answer, None


def _replay(seen: tuple[str, dict], fingerprint: str, event_id: str) -> tuple[int, dict, dict]:
    if seen[0] != fingerprint:
        raise ApiError(409, f"event_id {event_id} was already used for different feedback; use a new "
                            f"event_id per feedback", code="event_id_conflict", param="event_id")
    return 202, seen[1], {"Idempotent-Replayed": "true"}


# --- the app --------------------------------------------------------------------------------------------

def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="Flywheel assistant", version="1", docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(CatchAll, metrics=service.metrics)
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return api_error_response(e, metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404) and wrong methods (405) answer in the same shape as everything else.
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        metrics.api_errors.labels(str(e.status_code), code).inc()
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    app.include_router(routes)
    app.openapi = functools.partial(openapi, app, service)
    return app


def openapi(app: FastAPI, service: Service) -> dict:
    """FastAPI's schema plus the request bodies this module validates itself (for clients and fuzzers)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in (ChatIn, FeedbackIn):
            js = body.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[body.__name__] = js
        if service.keys.required:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema
