"""Benchmark: chat through Flywheel's gateway (`backend: vllm`) vs straight to vLLM's own OpenAI server.

Both on SmolLM2-135M-Instruct served by vLLM for CPUs (`.venv-vllm`: `make vllm`; skipped without it),
in the dtype this CPU runs natively. The same 16 requests (explicit system prompt, 64 max tokens,
temperature 0.7, a seed each) from 4 closed-loop clients, streamed and not, once to vLLM and once to
the gateway, which streams every request from vLLM and adds feedback tokens, events and routing.

Reported (var/bench/serving_vllm.json, with the machine record): tokens/s, time to first token p50 and
answer p50 for each of the four; ratios gateway vs direct (what the gateway costs) and, through the
gateway, streamed vs not. Target: the gateway keeps >= 0.9x vLLM's tokens/s, streamed and not.

    make vllm && make bench PYTEST_ARGS="-k vllm"
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import free_port, serving_process

from infra import vllm_cpu
from tests.benchmarks._machine import Target
from tests.benchmarks.bench_serving import PROMPTS, save

pytestmark = pytest.mark.skipif(not vllm_cpu.available(), reason=vllm_cpu.MISSING)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default
N, CONCURRENCY, MAX_TOKENS = 16, 4, 64


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):  # noqa: ANN201 - yields the URL
    from ingest import endpoints

    log = tmp_path_factory.mktemp("bench-vllm") / "vllm.log"
    with vllm_cpu.server(endpoints.model_path("smollm2"), "smollm2", free_port(), log, max_model_len=2048) as url:
        yield url


@pytest.fixture(scope="module")
def gateway_url(stack, vllm_url, tmp_path_factory):  # noqa: ANN201 - yields the URL
    with serving_process(tmp_path_factory.mktemp("bench-vllm-gateway"), "serving/configs/serve.vllm.yaml",
                         "model.base=smollm2", f"vllm.url={vllm_url}") as url:
        yield url


def _chat(url: str, i: int, stream: bool) -> dict:
    body = {"model": "smollm2", "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i, "stream": stream,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as c:
        if not stream:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            took = time.perf_counter() - t0
            return {"first_s": took, "total_s": took, "tokens": r.json()["usage"]["completion_tokens"]}
        first, tokens = None, 0
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                j = json.loads(line[6:])
                if first is None and j.get("choices") and j["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
                if j.get("usage"):
                    tokens = j["usage"]["completion_tokens"]
        assert first is not None, f"no text came back for request {i}"
        return {"first_s": first, "total_s": time.perf_counter() - t0, "tokens": tokens}


def _load(url: str, stream: bool) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as ex:
        runs = list(ex.map(lambda i: _chat(url, i, stream), range(N)))
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": round(sum(r["tokens"] for r in runs) / seconds, 1),
            "first_token_p50_s": round(statistics.median(r["first_s"] for r in runs), 3),
            "answer_p50_s": round(statistics.median(r["total_s"] for r in runs), 3)}


def test_gateway_vs_vllm_direct(vllm_url, gateway_url):
    for url in (vllm_url, gateway_url):  # warm-up: vLLM's first requests, the gateway's connections
        _chat(url, 0, True)
        _chat(url, 1, False)
    runs = {}
    for stream in (True, False):  # direct and gateway back to back, so both see the same machine
        for name, url in (("direct", vllm_url), ("gateway", gateway_url)):
            runs[f"{name}_{'streamed' if stream else 'not_streamed'}"] = _load(url, stream)
    ratio_streamed = runs["gateway_streamed"]["tokens_per_s"] / runs["direct_streamed"]["tokens_per_s"]
    ratio_plain = runs["gateway_not_streamed"]["tokens_per_s"] / runs["direct_not_streamed"]["tokens_per_s"]
    save("vllm", {"requests": N, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS, **runs,
                  "gateway_vs_direct_tokens_per_s_streamed": round(ratio_streamed, 2),
                  "gateway_vs_direct_tokens_per_s_not_streamed": round(ratio_plain, 2),
                  "gateway_streamed_vs_not_tokens_per_s": round(
                      runs["gateway_streamed"]["tokens_per_s"] / runs["gateway_not_streamed"]["tokens_per_s"], 2)},
         dtype={"bfloat16": "bf16", "float32": "fp32"}[vllm_cpu.native_dtype()], threads=None,
         targets=[Target("gateway_vs_direct_tokens_per_s_streamed", round(ratio_streamed, 2), ">=", 0.9),
                  Target("gateway_vs_direct_tokens_per_s_not_streamed", round(ratio_plain, 2), ">=", 0.9)])
