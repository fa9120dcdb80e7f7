"""The chat server end to end on the tiny model, against the real broker and the real MLflow registry.

One server per module (uvicorn on a free loopback port, in this process so the tests can read its
publisher's counters). Covers: the official openai client (plain and streamed), /v1/models, a
table of hostile inputs that must each get the right 4xx and emit nothing, feedback idempotency
and rate limiting, the events as they land in Kafka, an adapter promotion under concurrent load,
and a broker outage under traffic (the broker process is frozen with SIGSTOP, which keeps its data:
see test_serving_publisher.py for why it is not killed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from ingest import endpoints
from ingest.config import load_config
from ingest.events import FeedbackEvent, ResponseEvent, parse_event
from serving.feedback import FeedbackClaims, FeedbackTokens
from serving.publisher import read_topic
from serving.serve import BackgroundServer, Config

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-secret"
# A registered model of our own: other packages' tests promote versions of flywheel-assistant in the
# same session's MLflow, and this server must start on the base.
MODEL_NAME = "serving-test-assistant"
OUTAGE_S = float(os.environ.get("FLYWHEEL_TEST_OUTAGE_S", "8"))  # the acceptance run uses 60


@contextlib.contextmanager
def private_topics(bootstrap: str):  # noqa: ANN201
    """Topics of our own for the duration (FLYWHEEL_TOPIC_PREFIX), so the events these tests emit
    do not land in the topics that other packages' tests consume and count in the same session."""
    from infra.stack import ensure_topics

    old = os.environ.get("FLYWHEEL_TOPIC_PREFIX")
    os.environ["FLYWHEEL_TOPIC_PREFIX"] = f"serving-test-{uuid.uuid4().hex[:6]}."
    try:
        ensure_topics(bootstrap)
        yield endpoints.topics()
    finally:
        if old is None:
            os.environ.pop("FLYWHEEL_TOPIC_PREFIX", None)
        else:
            os.environ["FLYWHEEL_TOPIC_PREFIX"] = old


def tiny_adapter(base_path: str, seed: int) -> Path:
    """A random (non-zero) LoRA on the tiny model, so its answers differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = Path(tempfile.mkdtemp(prefix="tiny-adapter-"))
    model.save_pretrained(out)
    (out / "flywheel_adapter.json").write_text(json.dumps({"base_model": "tiny", "trainer": "dpo",
                                                           "dataset_version": f"test-{seed}"}))
    return out


def register(base_path: str, seed: int, alias: str | None = None):  # noqa: ANN201
    import mlflow

    from training import registry

    folder = tiny_adapter(base_path, seed)
    registry.client()
    mlflow.set_experiment("serving-tests")
    with mlflow.start_run() as run:
        return registry.register_adapter(folder, run.info.run_id, name=MODEL_NAME, alias=alias)


@pytest.fixture(scope="module")
def server(stack, tiny_model, tmp_path_factory):
    var = tmp_path_factory.mktemp("serving")
    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "http.port=0", f"http.token_secret={SECRET}", "http.feedback_per_minute=60", "http.feedback_burst=10",
        "registry.poll_interval_s=0.5", f"registry.model_name={MODEL_NAME}",
        f"registry.adapters_dir={var / 'adapters'}",
        f"events.spool_dir={var / 'spool'}", "events.delivery_timeout_ms=3000", "events.retry_interval_s=0.5",
        "generation.max_tokens=16", "batching.max_wait_ms=20",
    ])
    with private_topics(stack.kafka), BackgroundServer(cfg) as srv:
        yield srv


def client(srv) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(srv, user: str = "alice", **kw) -> dict:  # noqa: ANN001
    body = {"model": "tiny", "messages": [{"role": "user", "content": "how do I learn faster?"}], "user": user,
            "max_tokens": 8, **kw}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_plain_and_streamed(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12,
                                  user="alice", seed=7, temperature=0)
    extra = r.model_extra
    assert r.id == extra["response_id"] and r.choices[0].message.content
    assert extra["feedback_token"] and extra["ab_arm"] == "base" and extra["adapter_version"] is None
    # "length" exactly when the token limit was reached (eos, which ends a "stop", is not counted)
    used = r.usage.completion_tokens
    assert used <= 12 and (r.choices[0].finish_reason == "length") == (used == 12)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=12, user="alice", seed=7, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy is deterministic

    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=12, stream=True, temperature=0,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # streamed == batched answer, same seed and model
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert final.model_extra["response_id"] == final.id and final.model_extra["feedback_token"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    models = [m.id for m in c.models.list().data]
    assert models[0] == "tiny"
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["events"]["mode"] in ("direct", "spooling")


def test_hostile_inputs_get_4xx_and_emit_nothing(server):
    good = chat(server, user="bob")
    other = chat(server, user="carol")
    rid, tok = good["response_id"], good["feedback_token"]
    fb = {"response_id": rid, "feedback_token": tok, "user": "bob", "kind": "thumbs_up"}
    expired = FeedbackTokens([SECRET.encode()]).issue(
        FeedbackClaims(rid, "bob", good["conversation_id"], None, int(time.time()) - 10))
    forged = FeedbackTokens([b"not-the-secret"]).issue(
        FeedbackClaims(rid, "bob", good["conversation_id"], None, int(time.time()) + 100))
    msgs = [{"role": "user", "content": "hi"}]
    F, C = "/v1/feedback", "/v1/chat/completions"
    cases = [
        # (name, path, body or raw bytes, headers, expected status)
        ("forged token", F, {**fb, "feedback_token": forged}, None, 401),
        ("malformed token", F, {**fb, "feedback_token": "nonsense"}, None, 401),
        ("non-ASCII digits in token", F, {**fb, "feedback_token": "²³¹." + "a" * 64}, None, 401),
        ("other user's token", F, {**fb, "feedback_token": other["feedback_token"]}, None, 401),
        ("feedback as another user", F, {**fb, "user": "carol"}, None, 403),
        ("expired token", F, {**fb, "feedback_token": expired}, None, 410),
        ("token of another response", F, {**fb, "response_id": "chatcmpl-doesnotexist"}, None, 401),
        ("huge body", F, {**fb, "comment": "x" * 100_000}, None, 413),
        ("wrong type kind", F, {**fb, "kind": 5}, None, 422),
        ("unknown kind", F, {**fb, "kind": "love"}, None, 422),
        ("dwell as string", F, {**fb, "kind": "dwell", "dwell_seconds": "10"}, None, 422),
        ("negative dwell", F, {**fb, "kind": "dwell", "dwell_seconds": -1.0}, None, 422),
        ("edit without text", F, {**fb, "kind": "edit"}, None, 422),
        ("text on a thumbs", F, {**fb, "edited_text": "better"}, None, 422),
        ("missing token", F, {k: v for k, v in fb.items() if k != "feedback_token"}, None, 422),
        ("extra field", F, {**fb, "admin": True}, None, 422),
        ("bad event id", F, {**fb, "event_id": "id with spaces; DROP"}, None, 422),
        ("event id too long", F, {**fb, "event_id": "e" * 500}, None, 422),
        ("bad JSON", F, b'{"response_id": ', None, 400),
        ("invalid UTF-8", F, b'{"response_id": "\xff\xfe"}', None, 400),
        ("JSON array", F, b"[1, 2]", None, 400),
        ("huge number", F, b'{"response_id": ' + b"9" * 5000 + b"}", None, 400),
        ("deep nesting", F, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, 400),
        ("NaN", F, b'{"dwell_seconds": NaN}', None, 400),
        ("not JSON content-type", F, b"response_id=1", {"content-type": "application/x-www-form-urlencoded"}, 415),
        ("chat: no messages", C, {"messages": []}, None, 422),
        ("chat: messages not a list", C, {"messages": "hi"}, None, 422),
        ("chat: bad role", C, {"messages": [{"role": "tool", "content": "x"}]}, None, 422),
        ("chat: last turn not user", C, {"messages": [{"role": "assistant", "content": "x"}]}, None, 400),
        ("chat: n above http.max_n", C, {"messages": msgs, "n": 99}, None, 400),
        ("chat: temperature string", C, {"messages": msgs, "temperature": "hot"}, None, 422),
        ("chat: negative max_tokens", C, {"messages": msgs, "max_tokens": -5}, None, 422),
        ("chat: max_tokens above ceiling", C, {"messages": msgs, "max_tokens": 100_000}, None, 400),
        ("chat: unknown adapter", C, {"messages": msgs, "adapter": "999"}, None, 404),
        ("chat: adapter garbage", C, {"messages": msgs, "adapter": "drop table"}, None, 404),
        ("chat: unknown model", C, {"messages": msgs, "model": "gpt-4o"}, None, 404),
        ("chat: prompt too long", C, {"messages": [{"role": "user", "content": "word " * 3000}]}, None, 400),
        ("chat: huge body", C, {"messages": [{"role": "user", "content": "x" * 2_000_000}]}, None, 413),
        ("chat: regenerate other user's answer", C, {"messages": msgs, "user": "bob",
                                                     "regenerates": other["response_id"]}, None, 403),
    ]
    time.sleep(0.3)
    before = dict(server.service.publisher.counts)
    failures = []
    for name, path, body, headers, want in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        h = {"content-type": "application/json", **(headers or {})}
        r = httpx.post(server.url + path, headers=h, timeout=30, **kw)
        if r.status_code != want or "message" not in r.json().get("error", {}):
            failures.append((name, want, r.status_code, r.text[:200]))
    assert not failures, failures
    assert server.service.publisher.counts["published"] == before["published"], "a rejected request emitted"


def test_feedback_idempotency_and_rate_limit(server):
    r = chat(server, user="dave")
    fb = {"response_id": r["response_id"], "feedback_token": r["feedback_token"], "user": "dave",
          "kind": "edit", "edited_text": "A better answer.", "event_id": f"client-{uuid.uuid4().hex}"}
    before = server.service.publisher.counts["published"]
    first = httpx.post(server.url + "/v1/feedback", json=fb)
    second = httpx.post(server.url + "/v1/feedback", json=fb)
    assert first.status_code == second.status_code == 202 and first.json() == second.json()
    assert first.json()["event_id"] == fb["event_id"]
    assert server.service.publisher.counts["published"] == before + 1
    conflict = httpx.post(server.url + "/v1/feedback", json={**fb, "edited_text": "Something else."})
    assert conflict.status_code == 409
    # burst 10 per user: the 11th quick one is refused, and another user is unaffected
    codes = [httpx.post(server.url + "/v1/feedback", json={**fb, "kind": "copy", "edited_text": None,
                                                           "event_id": None}).status_code for _ in range(12)]
    assert 429 in codes and codes[0] == 202
    other = chat(server, user="erin")
    ok = httpx.post(server.url + "/v1/feedback", json={"response_id": other["response_id"], "user": "erin",
                                                       "feedback_token": other["feedback_token"], "kind": "copy"})
    assert ok.status_code == 202


def test_events_land_in_kafka_with_the_contract(server, stack):
    r = chat(server, user="frank", conversation_id="conv-frank-1", temperature=0.5, seed=3)
    fb = httpx.post(server.url + "/v1/feedback", json={
        "response_id": r["response_id"], "feedback_token": r["feedback_token"], "user": "frank",
        "kind": "dwell", "dwell_seconds": 12.5}).json()
    assert server.service.publisher.wait_idle(30), server.service.publisher.state()
    t = endpoints.topics()
    responses = read_topic(stack.kafka, t["responses"].name, until={r["response_id"]}, timeout=30)
    feedback = read_topic(stack.kafka, t["feedback"].name, until={fb["event_id"]}, timeout=30)
    resp = [parse_event(json.dumps(e)) for e in responses if e["event_id"] == r["response_id"]]
    fbe = [parse_event(json.dumps(e)) for e in feedback if e["event_id"] == fb["event_id"]]
    assert len(resp) == 1 and len(fbe) == 1
    ev, f = resp[0], fbe[0]
    assert isinstance(ev, ResponseEvent) and isinstance(f, FeedbackEvent)
    assert ev.conversation_id == "conv-frank-1" and ev.user_id == "frank" and ev.base_model == "tiny"
    assert ev.completion == r["choices"][0]["message"]["content"] and ev.completion_logprob < 0
    assert ev.sampling.temperature == 0.5 and ev.sampling.seed == 3 and ev.ab_arm == "base"
    assert ev.prompt[0].content == "how do I learn faster?" and ev.latency_ms > 0
    assert f.response_id == r["response_id"] and f.conversation_id == "conv-frank-1" and f.dwell_seconds == 12.5


def test_promotion_under_load_switches_without_failures(server, tiny_model):
    from training import registry

    v1 = register(tiny_model, seed=1, alias="champion")
    deadline = time.monotonic() + 15
    while server.service.router.state()["champion"] != v1.label and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chat(server, user="gina")["adapter_version"] == v1.label
    explicit = chat(server, user="gina", adapter="base")
    assert explicit["adapter_version"] is None and explicit["ab_arm"] == "explicit"
    by_model = chat(server, user="gina", model=v1.label)  # an id from /v1/models selects that adapter
    assert by_model["adapter_version"] == v1.label and by_model["ab_arm"] == "explicit"
    v2 = register(tiny_model, seed=2, alias="challenger")  # as training registers a candidate
    deadline = time.monotonic() + 15  # the server prefetches the challenger before any promotion
    while v2.label not in server.service.router.state()["loaded"] and time.monotonic() < deadline:
        time.sleep(0.1)

    results: list[tuple[float, str | None]] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        c = client(server)
        while not stop.is_set():
            try:
                r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tips?"}],
                                              max_tokens=8, user=f"load-{threading.get_ident()}")
                results.append((time.monotonic(), r.model_extra["adapter_version"]))
            except Exception as e:  # noqa: BLE001 - counted as a failure
                errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    promoted = time.monotonic()
    registry.set_alias("champion", v2.version, name=MODEL_NAME)
    seen_new = None
    while time.monotonic() - promoted < 10 and seen_new is None:
        seen_new = next((t for t, v in results if t > promoted and v == v2.label), None)
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert seen_new is not None and seen_new - promoted < 10, ("no switch within 10 s", server.service.router.state()["last_error"], server.service.router.switches)
    switched = min(t for t, v in results if v == v2.label)
    assert all(v == v2.label for t, v in results if t > switched + 0.5), "old adapter answered after the switch"
    models = [m.id for m in client(server).models.list().data]
    assert v2.label in models
    print(f"switch observed {seen_new - promoted:.2f}s after promotion; {len(results)} requests, 0 failed")


def test_broker_outage_under_traffic_loses_nothing(server, stack):
    """Freeze the broker for OUTAGE_S seconds under chat+feedback traffic: no request fails, and
    afterwards every response and feedback event is in Kafka exactly once."""
    from infra import stack as stack_mod

    pid = stack_mod._kafka().pid()
    assert pid, "the broker of the test stack is not running"
    t = endpoints.topics()
    response_ids: list[str] = []
    feedback_ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            r = chat(server, user=f"outage-{i}")
            f = httpx.post(server.url + "/v1/feedback", timeout=30, json={
                "response_id": r["response_id"], "feedback_token": r["feedback_token"],
                "user": f"outage-{i}", "kind": "thumbs_up" if i % 2 else "thumbs_down"})
            assert f.status_code == 202, f.text
            with lock:
                response_ids.append(r["response_id"])
                feedback_ids.append(f.json()["event_id"])
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, range(8)))  # before
        os.killpg(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            i = 8
            while time.monotonic() - frozen < OUTAGE_S:
                list(ex.map(one, range(i, i + 4)))
                i += 4
            spooling = server.service.publisher.state()
        finally:
            os.killpg(pid, signal.SIGCONT)
        list(ex.map(one, range(i, i + 8)))  # after
    assert not errors, errors[:3]
    assert server.service.publisher.wait_idle(90), server.service.publisher.state()
    got_r = Counter(e["event_id"] for e in read_topic(stack.kafka, t["responses"].name, until=set(response_ids)))
    got_f = Counter(e["event_id"] for e in read_topic(stack.kafka, t["feedback"].name, until=set(feedback_ids)))
    wrong = {i: got_r[i] for i in response_ids if got_r[i] != 1} | {i: got_f[i] for i in feedback_ids
                                                                      if got_f[i] != 1}
    state = server.service.publisher.state()
    print(f"outage {OUTAGE_S:.0f}s: {len(response_ids)} responses + {len(feedback_ids)} feedback; "
          f"during: {spooling}; after: {state}")
    assert not wrong, wrong
    assert spooling["mode"] == "spooling" or spooling["spool_pending"] or state["spooled"], \
        "the outage never reached the spool; raise FLYWHEEL_TEST_OUTAGE_S"


def test_two_server_processes_share_tokens_across_restarts_until_the_secret_is_retired(stack, tiny_model, tmp_path):
    """Two `python -m serving` processes with one secret: an answer from A gets feedback accepted by B;
    after A restarts, feedback on that answer is still accepted (s2 now signs, s1 still verifies); a
    process that retired s1 refuses it with 401 and accepts a token signed by s2. Each accepted feedback
    lands in Kafka once. (tests/test_serving_api.py checks the same rules on in-process replicas.)"""
    from conftest import serving_process

    def server(name: str, secrets: str):  # noqa: ANN202
        (tmp_path / name).mkdir()
        return serving_process(tmp_path / name, "serving/configs/serve.tiny.yaml", "generation.max_tokens=4",
                               f"http.token_secrets=[{secrets}]")

    def chat(url: str) -> dict:
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "user": "ann"})
        assert r.status_code == 200, r.text
        return r.json()

    def feedback(url: str, answer: dict, kind: str) -> httpx.Response:
        return httpx.post(url + "/v1/feedback", timeout=30, json={
            "response_id": answer["response_id"], "user": "ann", "kind": kind,
            "feedback_token": answer["feedback_token"]})

    accepted = []
    with private_topics(stack.kafka) as topics:
        with server("a", "s1") as a, server("b", "s1") as b:
            answer = chat(a)
            r = feedback(b, answer, "thumbs_up")
            assert r.status_code == 202, r.text
            accepted.append(r.json()["event_id"])
        with server("a-restarted", "s2,s1") as a:
            r = feedback(a, answer, "copy")
            assert r.status_code == 202, r.text
            accepted.append(r.json()["event_id"])
            signed_by_s2 = chat(a)
        with server("s1-retired", "s2") as c:
            refused = feedback(c, answer, "thumbs_down")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_token", refused.text
            r = feedback(c, signed_by_s2, "thumbs_up")
            assert r.status_code == 202, r.text
            accepted.append(r.json()["event_id"])
        landed = [e["event_id"] for e in read_topic(stack.kafka, topics["feedback"].name, until=set(accepted))]
    assert sorted(landed) == sorted(accepted)
