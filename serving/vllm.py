"""GPU production path: generation by a vLLM OpenAI server, adapters loaded into it at run time.

`backend: vllm` keeps everything else of this server (feedback tokens, events, the registry
poller, A/B routing) and swaps the transformers engine for HTTP calls to vLLM:

  vLLM is started with LoRA enabled and runtime updates allowed, e.g.
      VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve /models/SmolLM2-135M-Instruct \\
          --enable-lora --max-loras 4 --max-lora-rank 64 --port 8100
  promotion:   the poller downloads the new version and calls POST /v1/load_lora_adapter
               {"lora_name": "flywheel-assistant_7", "lora_path": ...}; the routing table switches
               only after vLLM answered 200, so no request names an adapter vLLM lacks
  retirement:  POST /v1/unload_lora_adapter once no admitted request still uses the old name
  a request:   POST /v1/chat/completions with model = the adapter name (or the base name) and
               logprobs=true; completion_logprob = the sum of the returned token log-probs

vLLM does its own continuous batching, so this backend just issues concurrent requests. Streaming
to our clients is emulated (the whole answer arrives as one delta) to keep the log-probs and the
event in one place. The adapter folder must be visible to the vLLM host: same path (shared
volume), or `vllm.adapters_root` = the folder that holds `<model name>/<version>/` over there.
vLLM cannot run on these CPU machines; tests/test_serving_vllm.py drives this against a fake.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from serving.engine import AdapterLoadError, GenResult


class VllmBackend:
    def __init__(self, url: str, model: str, timeout_s: float = 120.0, adapters_root: str | None = None,
                 max_concurrency: int = 64):
        self.url = url.rstrip("/")
        self.model = model
        self.adapters_root = adapters_root
        self.adapters: dict[str, str] = {}
        self._http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="serving-vllm")
        self.stats = {"requests": 0, "errors": 0}

    def _remote_path(self, folder: str | Path) -> str:
        folder = Path(folder)
        if not self.adapters_root:
            return str(folder)
        return f"{self.adapters_root.rstrip('/')}/{folder.parent.name}/{folder.name}"

    def load_adapter(self, name: str, folder: str | Path) -> None:
        if name in self.adapters:
            return
        r = self._http.post(f"{self.url}/v1/load_lora_adapter",
                            json={"lora_name": name, "lora_path": self._remote_path(folder)})
        if r.status_code != 200 and "already" not in r.text.lower():
            raise AdapterLoadError(f"vLLM at {self.url} refused adapter {name}: HTTP {r.status_code} {r.text[:300]}; "
                                   f"is it started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?")
        self.adapters[name] = str(folder)

    def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._http.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})

    def start(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float, seed: int | None,
              adapter: str | None, on_delta=None) -> Future:  # noqa: ANN001
        if adapter is not None and adapter not in self.adapters:
            raise AdapterLoadError(f"adapter {adapter} is not loaded in vLLM")
        body = {"model": adapter or self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "logprobs": True, "stream": False}
        return self._pool.submit(self._complete, body, on_delta)

    def _complete(self, body: dict, on_delta) -> GenResult:  # noqa: ANN001
        self.stats["requests"] += 1
        r = self._http.post(f"{self.url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            self.stats["errors"] += 1
            raise RuntimeError(f"vLLM answered HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        choice = out["choices"][0]
        text = choice["message"]["content"] or ""
        content = (choice.get("logprobs") or {}).get("content") or []
        if on_delta is not None and text:
            on_delta(text)
        usage = out.get("usage") or {}
        logprob = float(sum(t["logprob"] for t in content))
        if not logprob <= 0.0:  # a sum of log-probabilities; NaN fails this too
            self.stats["errors"] += 1
            raise RuntimeError(f"vLLM answered a summed log-probability of {logprob} (> 0 or NaN): its logprobs "
                               f"are not log-probabilities; check the server's --logprobs-mode")
        return GenResult(text=text, token_ids=[], finish_reason="length" if choice.get("finish_reason") == "length"
                         else "stop", prompt_tokens=int(usage.get("prompt_tokens", 0)),
                         completion_tokens=int(usage.get("completion_tokens", len(content))), logprob=logprob)

    def state(self) -> dict:
        return {"backend": "vllm", "url": self.url, "model": self.model, "adapters": sorted(self.adapters),
                **self.stats}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
