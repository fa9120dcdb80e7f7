"""Feedback answered in the HTTP protocol (serving/fastpath.py) is the same API as the app's route.

A real uvicorn server with the fast-path protocol, and the same Service's ASGI app in process: for any
request hypothesis draws (good feedback, every way a body, a header or a token can be wrong), both
give the same status, the same error body and the same headers, and the fast path really answered
(its answers are counted). Then what it must leave to uvicorn: pipelined requests keep their order,
`Expect: 100-continue`, HTTP/1.0, proxy headers and over-long declared bodies go through the app, and
a fault in the handler is a 500 in OpenAI's shape on a connection that stays open. The broker is a
port nobody listens on (the publisher spools), as in tests/test_serving_api.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from ingest.config import load_config
from serving.fastpath import feedback_protocol
from serving.serve import Config, build

REPO = Path(__file__).resolve().parent.parent
KEY = "key-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):  # noqa: ANN201 - yields (service, port, fast-path answer count)
    var = tmp_path_factory.mktemp("fastpath")
    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "registry.enabled=false", f"events.bootstrap=127.0.0.1:{_free_port()}", f"events.spool_dir={var / 'spool'}",
        "events.retry_interval_s=30", "http.token_secrets=[s1]", f"http.api_keys=[{KEY}:acme]",
        "generation.max_tokens=4", "batching.max_wait_ms=0", "http.feedback_per_minute=0",
        "http.bad_token_per_minute=100000", "http.bad_token_burst=100000", "http.max_feedback_bytes=2048"])
    svc = build(cfg)
    answered = []

    class Counted(feedback_protocol(svc)):
        def _answer(self, body: bytes):  # noqa: ANN202
            answered.append(1)
            return super()._answer(body)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(svc.app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off", loop="uvloop", http=Counted))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield svc, port, answered
    server.should_exit = True
    thread.join(timeout=10)
    svc.close()


def _exchange(port: int, raw: bytes, answers: int = 1) -> list[tuple[int, dict, bytes]]:
    """Sends raw bytes on one connection; reads `answers` Content-Length framed responses:
    (status, lowercased headers, body)."""
    out, data = [], b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        while len(out) < answers:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                assert chunk, f"the server closed the connection after {len(out)} answers"
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
            length = int(headers.get("content-length", 0))
            while len(data) < length:
                chunk = s.recv(65536)
                assert chunk, "the server closed the connection mid-body"
                data += chunk
            out.append((int(lines[0].split()[1]), headers, data[:length]))
            data = data[length:]
    return out


def _request(body: bytes, headers: dict[str, str], path: str = "/v1/feedback", version: str = "1.1") -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


def _answer(svc, user: str) -> dict:  # noqa: ANN001
    with TestClient(svc.app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": user})
    assert r.status_code == 200, r.text
    return r.json()


def _masked(body: bytes) -> object:
    """The answer with its fresh event id blanked (each accepted feedback gets its own)."""
    try:
        j = json.loads(body)
    except ValueError:
        return body
    if isinstance(j, dict) and str(j.get("event_id", "")).startswith("fb-"):
        j["event_id"] = "fb-*"
    return j


FIELDS = ["response_id", "user", "kind", "feedback_token"]


def _mutate(draw, good: dict) -> bytes:  # noqa: ANN001
    """A body drawn around a good one; what is drawn never depends on the good body's values (hypothesis
    replays draws)."""
    kind = draw(st.sampled_from(["good", "drop", "retype", "extra", "user", "token", "kind", "long", "bytes",
                                 "deep", "number", "array"]))
    body = dict(good)
    if kind == "drop":
        body.pop(draw(st.sampled_from(FIELDS)))
    elif kind == "retype":
        body[draw(st.sampled_from(FIELDS))] = draw(st.one_of(st.integers(), st.none(), st.lists(st.integers())))
    elif kind == "extra":
        body[draw(st.text(min_size=1, max_size=10))] = draw(st.text(max_size=10))
    elif kind == "user":
        body["user"] = draw(st.text(max_size=20))
    elif kind == "token":
        t = body["feedback_token"]
        i = draw(st.integers(0, 10**6)) % len(t)
        body["feedback_token"] = t[:i] + draw(st.sampled_from("xyz.-_")) + t[i + 1:]
    elif kind == "kind":
        body["kind"] = draw(st.text(max_size=12))
    elif kind == "long":
        body["comment"] = "c" * draw(st.integers(1000, 3000))
    elif kind == "bytes":
        return draw(st.binary(max_size=300))
    elif kind == "deep":
        return b"[" * draw(st.integers(10, 40)) + b"]" * draw(st.integers(0, 40))
    elif kind == "number":
        body["dwell_seconds"] = float("1" * draw(st.integers(10, 80)))
    elif kind == "array":
        return json.dumps([body]).encode()
    return json.dumps(body).encode()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_fast_path_answers_every_request_as_the_app_route_does(served, data):
    svc, port, answered = served
    good_answer = _answer(svc, "alice")
    good = {"response_id": good_answer["response_id"], "user": "alice", "kind": "thumbs_up",
            "feedback_token": good_answer["feedback_token"]}
    body = _mutate(data.draw, good)
    headers = {"Content-Type": data.draw(st.sampled_from(["application/json", "text/plain", ""])),
               "Authorization": data.draw(st.sampled_from([f"Bearer {KEY}", "Bearer nope", "", f"Basic {KEY}"]))}
    headers = {k: v for k, v in headers.items() if v}
    before = len(answered)
    [(status, got_headers, got)] = _exchange(port, _request(body, headers))
    # a declared length over the limit is the app's to refuse, before the body is read
    fast = len(body) <= svc.cfg.http.max_feedback_bytes
    assert len(answered) == before + fast, "the fast path did not take the request" if fast else "it did"
    with TestClient(svc.app, raise_server_exceptions=False) as c:
        want = c.post("/v1/feedback", content=body, headers=headers)
    assert status == want.status_code < 500, (body, headers, got)
    assert _masked(got) == _masked(want.content), (body, headers)
    for name in ("content-type", "www-authenticate", "idempotent-replayed"):
        assert got_headers.get(name) == want.headers.get(name), name


def test_an_event_id_is_recorded_once_whichever_path_sees_it_first(served):
    svc, port, _ = served
    a = _answer(svc, "bob")
    body = json.dumps({"response_id": a["response_id"], "user": "bob", "kind": "copy", "event_id": "ev-fast-1",
                       "feedback_token": a["feedback_token"]}).encode()
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    [(first, h1, b1)] = _exchange(port, _request(body, auth))
    with TestClient(svc.app) as c:
        again = c.post("/v1/feedback", content=body, headers=auth)
    assert first == again.status_code == 202 and "idempotent-replayed" not in h1
    assert again.headers["idempotent-replayed"] == "true" and again.json() == json.loads(b1)


def test_pipelined_and_unusual_requests_keep_their_order_and_their_answers(served):
    svc, port, answered = served
    a = _answer(svc, "carol")
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}

    def good(kind: str) -> bytes:
        return json.dumps({"response_id": a["response_id"], "user": "carol", "kind": kind,
                           "feedback_token": a["feedback_token"]}).encode()

    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    # three requests in one write: the second is the app's, so the third waits its turn behind it
    got = _exchange(port, _request(good("copy"), auth) + health + _request(good("thumbs_up"), auth), answers=3)
    assert [g[0] for g in got] == [202, 200, 202]
    assert json.loads(got[1][2])["status"] == "ok"
    before = len(answered)
    assert [g[0] for g in _exchange(port, _request(good("copy"), auth) * 3, answers=3)] == [202] * 3
    assert len(answered) == before + 3
    before = len(answered)
    for extra, version in (({"Expect": "100-continue"}, "1.1"), ({"X-Forwarded-For": "10.1.2.3"}, "1.1"),
                           ({}, "1.0")):
        raw = _request(good("copy"), {**auth, **extra}, version=version)
        answers = _exchange(port, raw, answers=2 if "Expect" in extra else 1)
        assert [a[0] for a in answers] == ([100, 202] if "Expect" in extra else [202]), (extra, version)
    assert len(answered) == before, "these go through the app"
    # a declared body over the limit is refused before it is read; a chunked one once it passes the limit
    [(status, _, b)] = _exchange(port, b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 999999\r\n\r\n")
    assert status == 413 and json.loads(b)["error"]["code"] == "body_too_large"
    chunk = b"x" * 1500
    chunked = (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
               + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
               + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    [(status, _, b)] = _exchange(port, chunked)
    assert status == 413 and json.loads(b)["error"]["code"] == "body_too_large"
    body = good("copy")
    small = (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
             + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n" % 10 + body[:10] + b"\r\n" + b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
    assert _exchange(port, small)[0][0] == 202


def test_a_fault_in_the_handler_is_a_500_the_connection_stays_open_and_a_retry_publishes(served, monkeypatch):
    svc, port, _ = served
    a = _answer(svc, "dave")
    body = json.dumps({"response_id": a["response_id"], "user": "dave", "kind": "copy", "event_id": "ev-fault-1",
                       "feedback_token": a["feedback_token"]}).encode()
    published = []

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("publisher exploded")

    monkeypatch.setattr(svc.publisher, "publish", broken)
    raw = _request(body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    answers = _exchange(port, raw + raw, answers=2)
    for status, headers, payload in answers:
        assert status == 500 and headers.get("connection") != "close"
        assert json.loads(payload)["error"]["type"] == "server_error"
    monkeypatch.setattr(svc.publisher, "publish", lambda topic, key, value: published.append(key))
    [(status, headers, _)] = _exchange(port, raw)
    assert status == 202 and "idempotent-replayed" not in headers and published == [a["response_id"]]


def test_a_blocked_event_loop_shows_in_the_lag_metric(served, monkeypatch):
    """The probe measures the loop, not a constant: a handler that holds the loop for 0.4 s is seen as
    a lag of more than 0.25 s."""
    from prometheus_client.parser import text_string_to_metric_families

    svc, port, _ = served

    def over_quarter_second() -> float:
        for family in text_string_to_metric_families(svc.metrics.render().decode()):
            if family.name == "flywheel_event_loop_lag_seconds":
                b = {s.labels.get("le"): s.value for s in family.samples if s.name.endswith("_bucket")}
                return b["+Inf"] - b["0.25"]
        raise AssertionError("no flywheel_event_loop_lag_seconds in /metrics")

    before = over_quarter_second()
    accept = svc.publisher.publish

    def slow(*a, **k):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.4)  # on the event loop: the fast path runs there
        return accept(*a, **k)

    monkeypatch.setattr(svc.publisher, "publish", slow)
    a = _answer(svc, "erin")
    body = json.dumps({"response_id": a["response_id"], "user": "erin", "kind": "copy",
                       "feedback_token": a["feedback_token"]}).encode()
    assert _exchange(port, _request(body, {"Content-Type": "application/json",
                                           "Authorization": f"Bearer {KEY}"}))[0][0] == 202
    time.sleep(0.3)  # the probe's next wake-up records it
    assert over_quarter_second() == before + 1
