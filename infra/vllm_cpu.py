"""vLLM's OpenAI server on this machine's CPUs, from the opt-in environment `.venv-vllm` (`make vllm`).

    python -m infra.vllm_cpu --model smollm2 --port 8100     # then: python -m serving --config serving/configs/serve.vllm.yaml

LoRA is enabled with runtime loading (what `backend: vllm` needs for promotions), and the dtype is the
one this CPU runs natively (training.precision: bf16 only with native bf16 matmuls, else fp32).
tests/test_serving_vllm_real.py and tests/benchmarks/bench_serving_vllm.py start it through `server()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.stack import http_ok

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MISSING = "no .venv-vllm: `make vllm` installs vLLM for CPUs (~3.5 GB)"


def available() -> bool:
    return VLLM_PYTHON.exists()


def native_dtype() -> str:
    """vLLM's name for the dtype training.precision picks for this CPU."""
    from training.precision import decide

    return {"bf16": "bfloat16", "fp32": "float32"}[decide("auto", "cpu").dtype]


def command(model: str, served_name: str, port: int, dtype: str, max_model_len: int | None = None,
            max_lora_rank: int = 64, max_loras: int = 2) -> list[str]:
    """The server's command line; `model` is a Hugging Face folder."""
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
    return cmd + (["--max-model-len", str(max_model_len)] if max_model_len else [])


def environment(kv_cache_gib: int = 1) -> dict[str, str]:
    # VLLM_CPU_KVCACHE_SPACE: vLLM-CPU reserves this much RAM for the KV cache (its default is sized for servers)
    return {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


@contextmanager
def server(model: str, served_name: str, port: int, log: Path, dtype: str | None = None,
           max_model_len: int | None = None, start_timeout: float = 300) -> Iterator[str]:
    """Run vLLM's OpenAI server until the block ends; yields its URL once /health answers 200."""
    if not available():
        raise FileNotFoundError(MISSING)
    with open(log, "w") as out:
        # its own process group: vLLM runs its engine in a child process, which must stop with it
        proc = subprocess.Popen(command(model, served_name, port, dtype or native_dtype(), max_model_len),
                                stdout=out, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while not http_ok(url + "/health"):
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; its log ({log}) ends:\n"
                                   + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not answer /health in {start_timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    from ingest import endpoints

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a model name `make models` provides (smollm2, tiny) or a folder")
    p.add_argument("--served-name", default=None, help="the name vLLM serves it under (default: --model)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: what this CPU runs natively)")
    args = p.parse_args()
    if not available():
        raise SystemExit(MISSING)
    cmd = command(endpoints.model_path(args.model), args.served_name or args.model, args.port, args.dtype or native_dtype())
    os.execve(cmd[0], cmd, environment())


if __name__ == "__main__":
    main()
