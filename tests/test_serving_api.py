"""The HTTP API in process (ASGI, no uvicorn, no broker): what no client input may do, and who may
give feedback.

One tiny-model engine is shared by several app instances ("replicas", with their own secrets, keys
and limits), which is what two serving processes behind one load balancer look like to a client:
the tokens they mint are all that carries state from the answer to the feedback. The broker is a
port nobody listens on, so the publisher spools (to a temp folder): events are read off
`publisher.publish` by a recorder.

The fuzz test sends schemathesis-generated requests (valid and schema-violating bodies, from the
app's OpenAPI schema) and hypothesis-generated raw bodies, and asserts that none gets a 5xx.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from ingest.config import load_config
from ingest.events import parse_event
from serving.app import Service, create_app
from serving.serve import Config, build

REPO = Path(__file__).resolve().parent.parent
FUZZ_EXAMPLES = 150  # per operation and generation mode; ~600 requests in all, ~20-40 s on 2 busy cores


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Service:
    var = tmp_path_factory.mktemp("serving-api")
    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "registry.enabled=false", f"events.bootstrap=127.0.0.1:{_dead_port()}", f"events.spool_dir={var / 'spool'}",
        "events.retry_interval_s=30", "http.token_secrets=[s1]", "generation.max_tokens=4",
        "generation.max_tokens_limit=8", "batching.max_wait_ms=0"])
    svc = build(cfg)
    yield svc
    svc.close()


def replica(base: Service, secrets: list[str], api_keys: list[str] | None = None, **http) -> Service:
    """Another app instance on the same engine: its own tokens, keys, limits and idempotency store."""
    cfg = copy.deepcopy(base.cfg)
    for k, v in http.items():
        setattr(cfg.http, k, v)
    svc = Service(cfg=cfg, backend=base.backend, router=base.router, publisher=base.publisher,
                  secrets=[s.encode() for s in secrets], api_keys=api_keys or [], served_name=base.served_name)
    svc.app = create_app(svc)
    return svc


def client(svc: Service, address: str = "10.0.0.1", key: str | None = None) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return TestClient(svc.app, raise_server_exceptions=False, client=(address, 40000), headers=headers)


@pytest.fixture
def events(base, monkeypatch) -> list[dict]:
    """Every event the shared publisher is handed, decoded with the contract."""
    got: list[dict] = []
    publish = base.publisher.publish

    def record(topic: str, key: str, value: bytes) -> None:
        got.append(parse_event(value).model_dump(mode="json"))
        publish(topic, key, value)

    monkeypatch.setattr(base.publisher, "publish", record)
    return got


def ask(c: TestClient, user: str, **kw) -> dict:
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": user, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def feedback(c: TestClient, answer: dict, user: str, kind: str = "thumbs_up", **kw):  # noqa: ANN201
    return c.post("/v1/feedback", json={"response_id": answer["response_id"], "user": user, "kind": kind,
                                        "feedback_token": answer["feedback_token"], **kw})


def test_any_replica_accepts_tokens_after_restarts_until_the_secret_is_retired(base, events):
    """A and B share secret s1: an answer from A gets feedback accepted by B, and by A after a
    restart (a new instance: nothing of the old one survives). Rotation: A'' signs with s2 and still
    accepts s1; a replica that retired s1 refuses s1 tokens but accepts s2 ones."""
    a, b = replica(base, ["s1"]), replica(base, ["s1"])
    answer = ask(client(a), "ann", conversation_id="conv-ann")
    got = feedback(client(b), answer, "ann")
    assert got.status_code == 202, got.text
    fb = [e for e in events if e["type"] == "feedback"][-1]
    assert (fb["response_id"], fb["conversation_id"], fb["user_id"]) == (answer["response_id"], "conv-ann", "ann")
    assert fb["adapter_version"] is None and fb["tenant"] is None

    a_restarted = replica(base, ["s1"])
    assert feedback(client(a_restarted), answer, "ann", kind="copy").status_code == 202

    rotated = replica(base, ["s2", "s1"])  # s2 signs, s1 still accepted during the rotation
    new_answer = ask(client(rotated), "ann")
    assert feedback(client(rotated), answer, "ann", kind="dwell", dwell_seconds=3.0).status_code == 202
    retired = replica(base, ["s2"])
    refused = feedback(client(retired), answer, "ann", kind="abandon")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_token", refused.text
    assert feedback(client(retired), new_answer, "ann").status_code == 202
    assert feedback(client(replica(base, ["s1"])), new_answer, "ann").status_code == 401  # s2 is not known there


def test_forged_token_flood_in_a_victims_name_does_not_lock_the_victim_out(base, events):
    """150 forged tokens in the victim's name from one address: all refused (401, then 429 for that
    address), none says whom a response went to (no 403), no event; the victim's own feedback from
    another address is still accepted although the victim's burst (10) is far below 150."""
    # The bad-token bucket barely refills (0.001/min), so the count of 401s is exactly its burst however
    # slowly a loaded machine sends the 150 requests.
    svc = replica(base, ["s1"], feedback_per_minute=60.0, feedback_burst=10, bad_token_per_minute=0.001,
                  bad_token_burst=30)
    victim = client(svc, "10.0.0.7")
    answer = ask(victim, "victim")
    other = ask(victim, "someone-else")
    attacker = client(svc, "10.6.6.6")
    published = len(events)
    forged = [answer["feedback_token"][:-6] + "AAAAAA", other["feedback_token"], "²³¹.abc", "x" * 300,
              answer["feedback_token"] + "."]
    codes = [feedback(attacker, {**answer, "feedback_token": forged[i % len(forged)]}, "victim").status_code
             for i in range(150)]
    assert set(codes) <= {401, 429} and codes.count(401) == 30 and codes[-1] == 429, sorted(set(codes))
    assert len(events) == published
    ok = [feedback(victim, answer, "victim", kind=k) for k in ("thumbs_up", "copy")]
    assert [r.status_code for r in ok] == [202, 202], [r.text for r in ok]
    # a genuine token presented by someone else: authentic, so naming the mismatch leaks nothing
    stolen = feedback(client(svc, "10.0.0.8"), answer, "mallory")
    assert stolen.status_code == 403 and stolen.json()["error"]["code"] == "wrong_user"


def test_api_keys_name_the_tenant_and_bind_its_feedback(base, events):
    """With keys configured: no key / a wrong key -> 401 in OpenAI's shape; each key's tenant is on
    the response and feedback events; a token is only good with the key of the app that asked."""
    k2_digest = hashlib.sha256(b"key-two").hexdigest()
    svc = replica(base, ["s1"], api_keys=["key-one:app-one", f"sha256-{k2_digest}:app-two"])
    for key in (None, "wrong", "key-one:app-one"):
        r = client(svc, key=key).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert client(svc).get("/v1/models").status_code == 401
    assert client(svc).get("/healthz").status_code == 200  # probes and scrapes need no key
    one, two = client(svc, key="key-one"), client(svc, key="key-two")
    answer = ask(one, "alice")
    assert events[-1]["type"] == "response" and events[-1]["tenant"] == "app-one"
    assert ask(two, "alice")["response_id"] and events[-1]["tenant"] == "app-two"
    cross = feedback(two, answer, "alice")
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "wrong_tenant"
    assert feedback(one, answer, "alice").status_code == 202
    assert events[-1]["type"] == "feedback" and events[-1]["tenant"] == "app-one"


def test_unknown_model_is_404_model_not_found_listing_what_is_served(base):
    c = client(replica(base, ["s1"]))
    for model in ("tiny", "flywheel", None):
        assert ask(c, "mo", **({"model": model} if model else {}))["ab_arm"] == "base"
    for model in ("gpt-4o", "flywheel-assistant/²", "", "tiny "):
        r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", r.text
        assert "tiny" in err["message"] and "flywheel" in err["message"]
    listed = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert listed[:2] == ["tiny", "flywheel"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_parse_and_move_under_load(base):
    svc = replica(base, ["s1"])
    c = client(svc)
    before = _samples(c.get("/metrics").text)
    for i in range(6):
        a = ask(c, f"m{i}")
        assert feedback(c, a, f"m{i}", kind="thumbs_up" if i % 2 else "thumbs_down").status_code == 202
    with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    c.post("/v1/feedback", json={"nonsense": 1})
    after = _samples(c.get("/metrics").text)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("flywheel_http_request_duration_seconds_count", route="/v1/chat/completions", method="POST",
                 status="200") == 7
    assert moved("flywheel_http_request_duration_seconds_count", route="/v1/feedback", method="POST",
                 status="202") == 6
    assert moved("flywheel_feedback_events_total", kind="thumbs_up", adapter_version="base") == 3
    assert moved("flywheel_feedback_events_total", kind="thumbs_down", adapter_version="base") == 3
    assert moved("flywheel_responses_total", adapter_version="base", ab_arm="base") == 7
    assert moved("flywheel_completion_tokens_total", adapter_version="base") >= 7
    assert moved("flywheel_time_to_first_token_seconds_count") == 1
    assert moved("flywheel_generation_tokens_per_second_count") == 7
    assert moved("flywheel_api_errors_total", status="422", code="invalid_fields") == 1
    assert moved("flywheel_engine_requests_total") == 7
    # the publisher is spooling (no broker): 13 events, all on their way to the spool
    assert moved("flywheel_publisher_records_total", outcome="published") == 13
    assert after[("flywheel_publisher_spooling", ())] == 1
    assert ("flywheel_publisher_spool_records", ()) in after and ("flywheel_batch_occupancy_ratio", ()) in after


# --- fuzzing ----------------------------------------------------------------------------------


def _check(r, where: str) -> None:  # noqa: ANN001
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, r.text[:300]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=20)
_hostile = st.sampled_from([b"[" * 5000, b"1" * 5000, b'{"a":' + b"9" * 400 + b"}", b'{"a": NaN}',
                            b'{"a": -Infinity}', b'{"a": 1e999}', b'{"a": "\\ud800"}', b'{"a": "\\udc00\\ud800"}',
                            b'"' + b'a\\"' * 3000, b"\xff\xfe", b"{" * 20 + b"}" * 20])


def test_fuzz_from_the_openapi_schema_no_5xx(base):
    """schemathesis (positive + negative bodies for every operation of /openapi.json), then raw
    hypothesis bodies (arbitrary JSON under real keys, arbitrary bytes, known-hostile texts) with
    hostile headers: 0 responses >= 500, and the server answers normally afterwards."""
    import schemathesis
    from schemathesis import GenerationMode

    svc = replica(base, ["s1"], feedback_per_minute=0.0, bad_token_per_minute=0.0)
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.app)
    sent = {"schemathesis": 0, "raw": 0}
    fast = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
    operations = [op.ok() for op in schema.get_all_operations()]

    def run_cases(cases: st.SearchStrategy, mode: str) -> None:
        @fast
        @given(case=cases)
        def one(case) -> None:  # noqa: ANN001
            sent["schemathesis"] += 1
            _check(case.call(), f"{case.method} {case.path} {mode} {case.body!r:.200}")

        one()

    assert {o.path for o in operations} >= {"/v1/chat/completions", "/v1/feedback", "/v1/models"}
    for op in operations:
        # a GET without parameters has no way to violate its schema
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            run_cases(op.as_strategy(generation_mode=mode), mode.value)

    c = client(svc)
    bodies = st.one_of(st.dictionaries(st.sampled_from(["messages", "model", "max_tokens", "user", "kind",
                                                        "response_id", "feedback_token", "seed", "stream"]),
                                       _json, max_size=5).map(lambda d: json.dumps(d).encode()),
                       st.binary(max_size=200), _hostile)
    headers = st.sampled_from([{}, {"content-length": "²".encode("latin-1")},
                               {"content-type": "text/plain"}, {"authorization": "Bearer ²".encode("latin-1")}])

    @fast
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/feedback"]), body=bodies, h=headers)
    def raw(path: str, body: bytes, h: dict) -> None:
        sent["raw"] += 1
        _check(c.post(path, content=body, headers={"content-type": "application/json", **h}), f"{path} {body!r:.200}")

    raw()
    assert client(svc).get("/healthz").json()["status"] == "ok"
    assert ask(client(svc), "after-fuzz")["feedback_token"]
    print(f"fuzz: {sent} requests, 0 responses >= 500")
    assert sent["schemathesis"] >= 2 * len(operations) and sent["raw"] >= FUZZ_EXAMPLES // 2


def test_json_bounds_hold_for_any_value():
    """Any JSON value nests as deep as json_depth says (strings with brackets and escaped quotes
    included); parse_json_body returns the object iff it is within the bounds, else a 400."""
    from serving.app import ApiError, json_depth, parse_json_body

    def depth(v: object) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    def longest_number(v: object) -> int:
        if isinstance(v, dict):
            return max((longest_number(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return max((longest_number(x) for x in v), default=0)
        return len(json.dumps(v)) if isinstance(v, int | float) and not isinstance(v, bool) else 0

    texts = st.text(alphabet=st.sampled_from('[]{}"\\ab\u00e9'), max_size=8)
    values = st.recursive(st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                          max_leaves=30)

    @settings(max_examples=400, deadline=None, database=None)
    @given(v=values, max_depth=st.integers(1, 8), max_chars=st.integers(1, 25))
    def prop(v: object, max_depth: int, max_chars: int) -> None:
        raw = json.dumps({"v": v}).encode()
        assert json_depth(raw) == 1 + depth(v)
        ok = 1 + depth(v) <= max_depth and longest_number(v) <= max_chars
        try:
            got = parse_json_body(raw, max_depth, max_chars)
        except ApiError as e:
            assert not ok and e.status == 400, e.message
        else:
            assert ok and got == json.loads(raw)

    prop()
    started = time.perf_counter()
    with pytest.raises(ApiError):
        parse_json_body(b'["' + b'a\\"' * 300_000, 16, 64)  # an unterminated string of escaped quotes
    assert time.perf_counter() - started < 2.0  # linear, not a rescan per quote


def test_a_server_fault_is_a_500_in_openai_shape_and_the_connection_stays_open(base, monkeypatch):
    """A genuine fault (the backend raises) is the only way to a 5xx: it answers 500 with the error
    shape, and uvicorn keeps the keep-alive connection (two requests, one socket)."""
    import threading

    import uvicorn

    svc = replica(base, ["s1"])

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(base.backend, "start", broken)
    port = _dead_port()
    server = uvicorn.Server(uvicorn.Config(svc.app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            answers = []
            for _ in range(2):
                s.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    chunk = s.recv(65536)
                    assert chunk, f"the server closed the connection after {len(answers)} answers"
                    data += chunk
                answers.append(data)
        for a in answers:
            head, _, payload = a.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500") and b"connection: close" not in head.lower(), head
            assert json.loads(payload)["error"]["type"] == "server_error"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_simulator_sends_an_api_key_when_keys_are_configured(monkeypatch):
    from infra.simulate import Config as SimConfig
    from infra.simulate import Simulation

    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    monkeypatch.delenv("FLYWHEEL_API_KEYS", raising=False)
    assert "authorization" not in Simulation(SimConfig(server_url="http://127.0.0.1:1")).http.headers
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "sim-key:simulator,other:app")
    sim = Simulation(SimConfig(server_url="http://127.0.0.1:1"))
    assert sim.http.headers["authorization"] == "Bearer sim-key"
    assert Simulation(SimConfig(server_url="http://127.0.0.1:1", api_key="k2")).http.headers[
        "authorization"] == "Bearer k2"
