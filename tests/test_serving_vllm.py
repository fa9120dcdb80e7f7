"""The GPU path (backend: vllm) against a fake vLLM OpenAI server, since vLLM cannot run on these CPU
machines (mock by necessity). The fake implements the three endpoints this server uses —
/v1/chat/completions with logprobs, /v1/load_lora_adapter, /v1/unload_lora_adapter — and records
the calls, so the test can check the promotion flow: load the new adapter into vLLM before routing
to it, route requests to it by name, unload the retired one."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from ingest.config import load_config
from serving.serve import BackgroundServer, Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from test_serving import private_topics, tiny_adapter  # noqa: E402

MODEL_NAME = "vllm-test-assistant"


def fake_vllm() -> tuple[FastAPI, dict]:
    app = FastAPI()
    seen: dict = {"loaded": [], "unloaded": [], "models": [], "adapters": set()}

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
        assert body["logprobs"] is True
        model = body["model"]
        if model != "tiny" and model not in seen["adapters"]:
            return {"error": f"model {model} not found"}, 404
        seen["models"].append(model)
        tokens = ["Hello", " from", " " + model]
        return {"id": "x", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                             "content": "".join(tokens)},
                             "logprobs": {"content": [{"token": t, "logprob": -0.5} for t in tokens]}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

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
        tokens = ["a", "b"]
        body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ab"},
                             "logprobs": {"content": [{"token": t, "logprob": value} for t in tokens]}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})  # NaN too

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
