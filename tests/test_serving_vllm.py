"""The vLLM backend (backend: vllm) against a small fake of the three vLLM endpoints this server uses:
/v1/chat/completions (streamed, with logprobs), /v1/load_lora_adapter, /v1/unload_lora_adapter. The
fake records the calls, so these tests check the promotion flow (load the new adapter into vLLM before
routing to it, route by name, unload the retired one), token-by-token streaming, the OpenAI options
passed on, a vLLM 400 answered as our 400, and a client's disconnect closing the stream to vLLM.
The same backend against a real vLLM server: tests/test_serving_vllm_real.py (opt-in, `make vllm`)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ingest.config import load_config
from serving.serve import BackgroundServer, Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from test_serving import private_topics, tiny_adapter  # noqa: E402

MODEL_NAME = "vllm-test-assistant"


def fake_vllm() -> tuple[FastAPI, dict]:
    app = FastAPI()
    seen: dict = {"loaded": [], "unloaded": [], "models": [], "adapters": set(), "bodies": [], "streams_open": 0}

    @app.post("/v1/load_lora_adapter")
    async def load(req: Request):  # noqa: ANN202
        body = await req.json()
        assert Path(body["lora_path"], "adapter_config.json").is_file()
        seen["loaded"].append(body["lora_name"])
        seen["adapters"].add(body["lora_name"])
        return "Success: LoRA adapter loaded"

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: Request):  # noqa: ANN202
        body = await req.json()
        seen["unloaded"].append(body["lora_name"])
        seen["adapters"].discard(body["lora_name"])
        return "Success"

    @app.post("/v1/chat/completions")
    async def chat(req: Request):  # noqa: ANN202
        body = await req.json()
        assert body["logprobs"] is True and body["stream"] is True and body["stream_options"]["include_usage"]
        model = body["model"]
        if model != "tiny" and model not in seen["adapters"]:
            return JSONResponse({"error": {"message": f"model {model} not found"}}, 404)
        if "too long" in json.dumps(body["messages"]):  # refused before the stream starts
            return JSONResponse({"error": {"message": "prompt too long for the context", "type": "BadRequestError",
                                           "param": "messages", "code": 400}}, 400)
        if any(int(t) >= 1000 for t in body.get("logit_bias", {})):  # refused as real vLLM refuses a stream
            error = {"error": {"message": "token_id in logit_bias out of vocabulary", "type": "BadRequestError",
                               "param": "logit_bias", "code": 400}}
            return StreamingResponse(iter([f"data: {json.dumps(error)}\n\n", "data: [DONE]\n\n"]),
                                     media_type="text/event-stream")
        seen["models"].append(model)
        seen["bodies"].append(body)
        # "slow" asks for a long answer, a token every 50 ms (a client can leave in the middle)
        slow = "slow" in json.dumps(body["messages"])
        tokens = [f" t{i}" for i in range(200)] if slow else ["Hello", " from", " " + model]

        async def sse():  # noqa: ANN202
            seen["streams_open"] += 1
            try:
                for i, t in enumerate(tokens):
                    if slow:
                        await asyncio.sleep(0.05)
                    entry = {"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "model": model, "choices": [
                        {"index": 0, "delta": {"content": t}, "logprobs": {"content": [entry]},
                         "finish_reason": "stop" if i == len(tokens) - 1 else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": 5, "completion_tokens": len(tokens), "total_tokens": 5 + len(tokens)}
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the gateway closed the connection (asyncio cancels the generator)
                seen["streams_open"] -= 1

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app, seen


@pytest.fixture
def vllm_url():  # noqa: ANN201
    from conftest import free_port

    app, seen = fake_vllm()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    th.join(timeout=10)


def test_vllm_backend_promotion_flow(stack, tiny_model, vllm_url, tmp_path):
    import mlflow

    from training import registry

    url, seen = vllm_url

    def register(seed: int, alias: str):  # noqa: ANN202
        folder = tiny_adapter(tiny_model, seed)
        registry.client()
        mlflow.set_experiment("serving-vllm-tests")
        with mlflow.start_run() as run:
            return registry.register_adapter(folder, run.info.run_id, name=MODEL_NAME, alias=alias)

    v1 = register(1, "champion")
    cfg = load_config(Config, REPO / "serving/configs/serve.vllm.yaml", [
        "http.port=0", "model.base=tiny", f"vllm.url={url}", f"registry.model_name={MODEL_NAME}",
        "registry.poll_interval_s=0.3", "registry.max_loaded=1", f"registry.adapters_dir={tmp_path / 'ad'}",
        f"events.spool_dir={tmp_path / 'spool'}"])
    with private_topics(stack.kafka) as topics, BackgroundServer(cfg) as srv:
        assert seen["loaded"] == ["vllm-test-assistant_1"]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "user": "u"}).json()
        assert r["adapter_version"] == v1.label and r["choices"][0]["message"]["content"].endswith("_1")
        assert seen["models"][-1] == "vllm-test-assistant_1"
        v2 = register(2, "challenger")
        deadline = time.monotonic() + 10
        while "vllm-test-assistant_2" not in seen["loaded"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "vllm-test-assistant_2" in seen["loaded"]  # prefetched before promotion
        registry.set_alias("champion", v2.version, name=MODEL_NAME)
        deadline = time.monotonic() + 10
        while srv.service.router.state()["champion"] != v2.label and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "user": "u"}).json()
        assert r["adapter_version"] == v2.label and seen["models"][-1] == "vllm-test-assistant_2"
        assert seen["unloaded"] == ["vllm-test-assistant_1"]  # retired once nothing used it
        assert srv.service.publisher.wait_idle(30)
    from serving.publisher import read_topic

    events = read_topic(stack.kafka, topics["responses"].name, until={r["response_id"]})
    ev = [e for e in events if e["event_id"] == r["response_id"]][0]
    assert ev["completion_logprob"] == pytest.approx(-1.5) and ev["adapter_version"] == v2.label
    assert json.loads(json.dumps(ev))["base_model"] == "tiny"


@pytest.mark.parametrize("token_logprob", [0.25, float("nan")])
def test_vllm_logprob_that_is_no_log_probability_raises(token_logprob):
    """A summed completion log-prob > 0 (or NaN) from vLLM is an error, not clamped to 0 into the event;
    the sum of the returned token log-probs goes through unchanged otherwise."""
    from serving.vllm import VllmBackend

    def chat(value: float) -> httpx.Response:
        chunks = [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": "stop" if t == "b" else None,
                                "logprobs": {"content": [{"token": t, "logprob": value}]}}]} for t in "ab"]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"  # NaN too
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    backend = VllmBackend("http://vllm.invalid", "tiny")
    try:
        backend._http = httpx.Client(transport=httpx.MockTransport(lambda req: chat(-0.75)))
        assert backend.start([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, None, None).result(10).logprob == -1.5
        backend._http = httpx.Client(transport=httpx.MockTransport(lambda req: chat(token_logprob)))
        with pytest.raises(RuntimeError, match="summed log-probability"):
            backend.start([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, None, None).result(10)
        assert backend.stats["errors"] == 1
    finally:
        backend.close()


def _vllm_server(url: str, tmp_path: Path, *overrides: str) -> BackgroundServer:
    cfg = load_config(Config, REPO / "serving/configs/serve.vllm.yaml", [
        "http.port=0", "model.base=tiny", f"vllm.url={url}", "registry.enabled=false",
        f"events.spool_dir={tmp_path / 'spool'}", *overrides])
    return BackgroundServer(cfg)


def test_vllm_streams_token_by_token_with_openai_options(stack, tiny_model, vllm_url, tmp_path):
    """Each vLLM chunk reaches the official client as its own chunk, with its log-prob entry; stop,
    top_logprobs, penalties and logit_bias reach vLLM; what vLLM refuses (before its stream starts, or in
    it, as vLLM refuses a streamed request) is our 400 naming the field, or an error chunk of the client's
    kind when streaming, never a server error."""
    import openai

    url, seen = vllm_url
    with private_topics(stack.kafka), _vllm_server(url, tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        stream = client.chat.completions.create(
            model="flywheel", messages=[{"role": "user", "content": "hi"}], stream=True, stop=["zz"],
            logprobs=True, top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"7": 2.0})
        chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
        assert [c.choices[0].delta.content for c in chunks] == ["Hello", " from", " tiny"]
        assert [[e.token for e in c.choices[0].logprobs.content] for c in chunks] == [["Hello"], [" from"], [" tiny"]]
        sent = seen["bodies"][-1]
        assert (sent["stop"], sent["top_logprobs"], sent["presence_penalty"], sent["frequency_penalty"],
                sent["logit_bias"]) == (["zz"], 2, 0.5, 0.25, {"7": 2.0})
        for messages, param in (([{"role": "user", "content": "hi"}], "logit_bias"),
                                ([{"role": "user", "content": "too long"}], "messages")):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="flywheel", messages=messages, logit_bias={"5000": 1.0})
            assert refused.value.body["param"] == param and "vLLM refused" in refused.value.body["message"]
            # streamed, the 200 has gone out: the refusal is an error chunk of the client's kind, not ours
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={
                    "messages": messages, "logit_bias": {"5000": 1.0}, "stream": True}) as r:
                errors = [json.loads(line[6:])["error"] for line in r.iter_lines() if line.startswith('data: {"error"')]
            assert [(e["type"], e["param"]) for e in errors] == [("invalid_request_error", param)]


def test_vllm_stream_closed_when_the_client_leaves(stack, tiny_model, vllm_url, tmp_path):
    """A client that leaves mid-answer closes the gateway's stream to vLLM (which aborts the request
    there) within a token or two, instead of the ~10 s the answer would still take."""
    url, seen = vllm_url
    with private_topics(stack.kafka), _vllm_server(url, tmp_path) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "slow"}], "stream": True}) as r:
            contents = 0
            for line in r.iter_lines():
                contents += '"content": " t' in line
                if contents == 3:
                    break
        assert seen["streams_open"] == 1  # vLLM is still generating when the client leaves
        left = time.monotonic()
        while seen["streams_open"] and time.monotonic() - left < 5:
            time.sleep(0.01)
        assert seen["streams_open"] == 0 and time.monotonic() - left < 1.0
        assert srv.service.backend.stats["cancelled"] == 1


@pytest.mark.parametrize(("finish", "outcome"), [("stop", "stop"), ("length", "length"), ("repetition", "stop"),
                                                 ("abort", "error"), (None, "error")])
def test_vllm_finish_reason(finish, outcome):
    """An answer vLLM ended is "stop" unless it was cut ("length"); one it aborted, or whose stream ended
    without saying how, is a failure (no response event, no feedback token), not an answer."""
    from serving.vllm import VllmBackend

    chunks = [{"choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": finish,
                            "logprobs": {"content": [{"token": "ab", "logprob": -0.5}]}}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    backend = VllmBackend("http://vllm.invalid", "tiny")
    backend._http = httpx.Client(transport=httpx.MockTransport(
        lambda req: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})))
    try:
        future = backend.start([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, None, None)
        if outcome == "error":
            with pytest.raises(RuntimeError, match="aborted|without a finish reason"):
                future.result(10)
        else:
            assert (future.result(10).finish_reason, future.result(10).text) == (outcome, "ab")
    finally:
        backend.close()
