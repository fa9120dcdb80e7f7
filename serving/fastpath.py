"""Feedback answered in uvicorn's HTTP protocol, without an ASGI round.

At 1,000 feedback requests/s a 2-core machine spends most of a feedback request's CPU outside the
feedback code: uvicorn's ASGI cycle (a task, a scope, two sends, events) and the framework's layers cost
about as much again as checking the token, validating the body and publishing the event. This protocol is
uvicorn's httptools protocol; for a plain `POST /v1/feedback` it reads the body itself and calls the same
synchronous `accept_feedback` as the FastAPI route, with the same header checks, JSON bounds, API keys,
limits, idempotency, error bodies and metrics, and writes the whole response in one write.

Everything else, and any feedback request with something unusual about it, takes uvicorn's ordinary
path to the app: another request still being answered on the connection (pipelining), `Expect:
100-continue`, HTTP/1.0, an upgrade, `X-Forwarded-*` headers (the proxy-headers middleware decides the
client address), a root path, a concurrency limit, a declared length over the limit. Set
`http.fast_feedback: false` to send all feedback through the app.

The subclass reads HttpToolsProtocol's own state (its parser, `url`, `headers`, `cycle`, `pipeline`,
`on_response_complete`), which uvicorn does not promise to keep: the locks pin uvicorn, and
tests/test_serving_fastpath.py is what says an upgrade broke it (every answer is compared with the route's).

Every connection also makes sure the event loop's lag probe runs (`ServingMetrics.watch_event_loop`):
the protocol is where Flywheel's code first meets a running server's loop.
"""

from __future__ import annotations

import json
import logging
import time

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.app import (
    ApiError,
    Service,
    accept_feedback,
    api_error_body,
    check_body_headers,
    error_body,
    parse_json_body,
    tenant_for,
)

log = logging.getLogger("serving.fastpath")
PATH = b"/v1/feedback"
ROUTE = "/v1/feedback"


def feedback_protocol(service: Service, fast: bool = True) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class for `service`: it starts the event-loop lag probe of /metrics
    and, when `fast`, answers feedback itself."""

    class FeedbackProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - uvicorn's own signature
            super().__init__(*args, **kwargs)
            self._feedback: bytearray | None = None  # the body, while this protocol reads a feedback request
            self._too_large = False
            self._t0 = 0.0

        def connection_made(self, transport) -> None:  # noqa: ANN001 - an asyncio transport
            super().connection_made(transport)
            service.metrics.watch_event_loop()

        def on_headers_complete(self) -> None:
            if fast and self._takes_this_request():
                self._feedback, self._too_large, self._t0 = bytearray(), False, time.perf_counter()
                return
            super().on_headers_complete()

        def _takes_this_request(self) -> bool:
            if (self.parser.get_method() != b"POST" or self.url.partition(b"?")[0] != PATH or self.root_path
                    or self.parser.get_http_version() != "1.1" or self.parser.should_upgrade()
                    or self.expect_100_continue or self.limit_concurrency is not None or self.pipeline
                    or not (self.cycle is None or self.cycle.response_complete)):
                return False
            for name, value in self.headers:
                if name.startswith(b"x-forwarded-") or name == b"forwarded":
                    return False
                if name == b"content-length" and (not value.isdigit() or int(value) > service.cfg.http.max_feedback_bytes):
                    return False  # the app's path refuses these before it reads the body
            return True

        def on_body(self, body: bytes) -> None:
            if self._feedback is None:
                super().on_body(body)
            elif not self._too_large:
                self._feedback += body
                if len(self._feedback) > service.cfg.http.max_feedback_bytes:
                    self._too_large, self._feedback = True, bytearray()

        def on_message_complete(self) -> None:
            if self._feedback is None:
                super().on_message_complete()
                return
            body, self._feedback = bytes(self._feedback), None
            try:
                status, answer, headers = self._answer(body)
            except Exception:  # raised out of a parser callback, it would reach the client as a 400
                log.exception("unhandled error on POST %s", ROUTE)
                status, answer, headers = 500, error_body(
                    "internal server error; the request was not completed (this is a fault of the server, "
                    "logged there)", "server_error", "internal_error"), None
            try:
                self._respond(status, answer, headers)
            except Exception:
                log.exception("could not write the answer to POST %s; closing the connection", ROUTE)
                self.transport.close()
            service.metrics.request_seconds.labels(ROUTE, "POST", str(status)).observe(time.perf_counter() - self._t0)

        def _answer(self, body: bytes) -> tuple[int, dict, dict | None]:
            http = service.cfg.http
            first: dict[bytes, bytes] = {}
            for name, value in self.headers:
                first.setdefault(name, value)
            try:
                tenant = tenant_for(service, first.get(b"authorization", b"").decode("latin-1"))
                length = first.get(b"content-length")
                check_body_headers(length and length.decode("latin-1"),
                                   first.get(b"content-type", b"").decode("latin-1"), http.max_feedback_bytes)
                if self._too_large:
                    raise ApiError(413, f"body is larger than the limit of {http.max_feedback_bytes} bytes",
                                   code="body_too_large")
                raw = parse_json_body(body, http.max_json_depth, http.max_number_chars)
                return accept_feedback(service, tenant, raw, self.client[0] if self.client else "unknown")
            except ApiError as e:
                return api_error_body(e, service.metrics)

        def _respond(self, status: int, answer: dict, headers: dict | None) -> None:
            # rendered as Starlette's JSONResponse renders it
            content = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
            keep_alive = self.parser.should_keep_alive()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(content))
            for name, value in (headers or {}).items():
                head += [name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
            if not keep_alive:
                head.append(b"connection: close\r\n")
            self.transport.write(b"".join(head) + b"\r\n" + content)
            if not keep_alive:
                self.transport.close()
            # uvicorn's own end of a response: counts it, re-arms the keep-alive timeout, resumes reading
            self.on_response_complete()

    return FeedbackProtocol
