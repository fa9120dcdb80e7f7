"""Serve the assistant: `python -m serving --config serving/configs/serve.yaml [key=value ...]`.

Builds the backend (transformers on this machine, or a vLLM OpenAI server on a GPU cluster), the
adapter router (MLflow registry aliases), the Kafka event publisher (with its disk spool) and the
HTTP app, then runs uvicorn on loopback until SIGINT/SIGTERM. On shutdown the publisher drains:
events it cannot send go to the spool and are replayed by the next start.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ingest import endpoints
from ingest.config import parse_config

log = logging.getLogger("serving")


@dataclass
class ModelConfig:
    """Base model and where it runs."""

    base: str = "smollm2"  # endpoints.model_path name ("tiny", "smollm2") or a folder
    dtype: str = "auto"  # auto = training.precision decides from the hardware (bf16 only where native)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    served_name: str = ""  # id of the base in /v1/models and responses; "" = the value of `base`
    merge_champion: bool = True  # keep champion-merged weights (one more copy of the LoRA-targeted weights)


@dataclass
class RegistryConfig:
    """Which adapters answer: registry model, aliases, A/B share, polling."""

    model_name: str = "flywheel-assistant"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    challenger_share: float = 0.0  # share of users (sticky by user id) answered by the challenger
    poll_interval_s: float = 2.0
    adapters_dir: str = ""  # "" = <var>/serving/adapters
    max_loaded: int = 4
    prefetch_challenger: bool = True  # load @challenger ahead of its promotion, even at share 0
    enabled: bool = True  # false: never ask MLflow, serve the base only


@dataclass
class HttpConfig:
    """Listener, API keys, feedback tokens, body bounds, limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    # `key:tenant` or `sha256-<hex>:tenant` entries; [] = $FLYWHEEL_API_KEYS (comma-separated), else open
    api_keys: list[str] = field(default_factory=list)
    token_secret: str = ""  # "" = $FLYWHEEL_TOKEN_SECRET or $FLYWHEEL_FEEDBACK_SECRET, else random per process
    # rotation: every secret verifies, the first signs; [] = $FLYWHEEL_TOKEN_SECRETS, else token_secret
    token_secrets: list[str] = field(default_factory=list)
    token_ttl_s: int = 7 * 24 * 3600
    max_body_bytes: int = 1_048_576  # chat requests
    max_feedback_bytes: int = 65_536
    max_json_depth: int = 16  # the deepest valid body (chat content parts) is 5 levels
    max_number_chars: int = 64  # a JSON number longer than this is refused before it is converted
    # per (tenant, user); a person gives a few signals per answer, the simulator more: 0 = unlimited
    feedback_per_minute: float = 600.0
    feedback_burst: int = 100
    # per client address: failed token verifications (forgery attempts), counted apart from users
    bad_token_per_minute: float = 60.0
    bad_token_burst: int = 30
    chat_per_minute: float = 0.0  # per user; 0 = unlimited
    chat_burst: int = 20
    max_responses: int = 200_000  # idempotency keys and regenerate-ownership hints remembered (LRU)
    max_n: int = 4  # most choices one chat request may ask for (each is a full generation)
    sse_keepalive_s: float = 15.0  # a streamed answer with nothing to send for this long gets an SSE comment
    log_level: str = "warning"
    gil_switch_interval_ms: float = 0.5  # Python's default is 5 ms
    # POST /v1/feedback answered in the HTTP protocol itself (serving/fastpath.py), not through the app
    fast_feedback: bool = True


@dataclass
class BatchingConfig:
    """Dynamic batching of concurrent chat requests into one decode loop."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    # Queued requests join the running decode loop between steps instead of waiting for it to end.
    continuous: bool = True


@dataclass
class GenerationConfig:
    """Defaults for requests that do not set them."""

    max_tokens: int = 256
    max_tokens_limit: int = 1024
    temperature: float = 0.7
    top_p: float = 1.0


@dataclass
class EventsConfig:
    """Kafka publishing and the disk spool."""

    bootstrap: str = ""  # "" = endpoints.kafka_bootstrap()
    spool_dir: str = ""  # "" = <var>/serving/spool
    queue_size: int = 10_000
    compression: str = "gzip"
    delivery_timeout_ms: int = 10_000
    retry_interval_s: float = 1.0
    fsync: bool = False  # fsync every spool append (slower; survives a power cut)
    # How long the producer waits to fill a batch. kafka-python's cost is mostly per produce request,
    # so a longer wait is less CPU per event on the serving host (events are not latency-critical).
    linger_ms: int = 50
    # sidecar: the publisher runs in a child process fed through a pipe (serving/sidecar.py), so Kafka's
    # client work does not take the event loop's GIL, and events a crashed server had accepted are still
    # sent; thread: in this process (one process fewer; its queue dies with the process)
    process: str = "sidecar"
    # sidecar only: added to the child's nice value, so that under CPU contention the serving process
    # (whose answers wait) runs before the child (whose sends are batched and can wait)
    sidecar_nice: int = 10
    # sidecar only: the child takes the pipe's records at most this often, all at once (0: as each
    # arrives); records wait in the pipe meanwhile, so this is CPU saved in the child, not latency added
    # to an answer
    sidecar_read_interval_ms: int = 10


@dataclass
class VllmConfig:
    """backend=vllm: a vLLM OpenAI server with runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."""

    url: str = "http://127.0.0.1:8100"
    model: str = ""  # the base model name vLLM serves; "" = model.served_name/base
    timeout_s: float = 120.0
    adapters_root: str = ""  # adapter folders as the vLLM host sees them; "" = same paths as here


@dataclass
class Config:
    """Serve the assistant with registry-managed LoRA adapters and feedback capture.

    model.*       base model, dtype, device
    registry.*    MLflow registry model name, aliases, A/B challenger share, poll interval
    http.*        host/port (loopback), API keys, feedback-token secrets and lifetime, body bounds,
                  rate limits
    batching.*    dynamic batching (max batch, max wait)
    generation.*  default max_tokens / temperature / top_p, and the max_tokens ceiling
    events.*      Kafka bootstrap, spool folder, queue size, compression
    backend       transformers (CPU/GPU here) or vllm (GPU cluster; see vllm.*)
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: VllmConfig = field(default_factory=VllmConfig)


def token_secrets(cfg: Config) -> list[bytes]:
    """Accepted feedback-token secrets, the signing one first: config before environment."""
    env = os.environ.get
    listed = cfg.http.token_secrets or [s for s in env("FLYWHEEL_TOKEN_SECRETS", "").split(",") if s.strip()]
    if cfg.http.token_secrets or (listed and not cfg.http.token_secret):
        return [s.strip().encode() for s in listed if s.strip()]
    # FLYWHEEL_FEEDBACK_SECRET is the name infra/deploy/serving.yaml mounts from its Secret.
    secret = cfg.http.token_secret or env("FLYWHEEL_TOKEN_SECRET", "") or env("FLYWHEEL_FEEDBACK_SECRET", "")
    if not secret:
        log.warning("no http.token_secret(s) / FLYWHEEL_TOKEN_SECRET(S) / FLYWHEEL_FEEDBACK_SECRET set: using a "
                    "random one, so feedback tokens stop working when this process restarts")
        secret = secrets.token_hex(32)
    return [secret.encode()]


def api_keys(cfg: Config) -> list[str]:
    """`key:tenant` entries from http.api_keys, else $FLYWHEEL_API_KEYS (comma-separated)."""
    return cfg.http.api_keys or [e for e in os.environ.get("FLYWHEEL_API_KEYS", "").split(",") if e.strip()]


def build(cfg: Config):  # noqa: ANN201 - returns serving.app.Service
    """Everything but the HTTP listener: backend, router, publisher, app. Used by main() and tests."""
    from serving.adapters import AdapterRouter
    from serving.app import Service, create_app
    from serving.publisher import EventPublisher
    from serving.sidecar import SidecarPublisher

    # MLflow's client retries a dead server for minutes by default; the poller retries on its own.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    var = endpoints.var_dir() / "serving"
    served_name = cfg.model.served_name or cfg.model.base
    if cfg.backend == "vllm":
        from serving.vllm import VllmBackend

        backend = VllmBackend(cfg.vllm.url, cfg.vllm.model or served_name, timeout_s=cfg.vllm.timeout_s,
                              adapters_root=cfg.vllm.adapters_root or None)
    else:
        from serving.engine import Engine

        backend = Engine(endpoints.model_path(cfg.model.base), dtype=cfg.model.dtype, device=cfg.model.device,
                         max_batch=cfg.batching.max_batch, max_wait_ms=cfg.batching.max_wait_ms,
                         threads=cfg.model.threads or None, merge_hot=cfg.model.merge_champion,
                         continuous=cfg.batching.continuous)
    router = AdapterRouter(backend, base_model=cfg.model.base, model_name=cfg.registry.model_name,
                           adapters_dir=Path(cfg.registry.adapters_dir or var / "adapters"),
                           champion_alias=cfg.registry.champion_alias,
                           challenger_alias=cfg.registry.challenger_alias,
                           challenger_share=cfg.registry.challenger_share, max_loaded=cfg.registry.max_loaded,
                           prefetch=cfg.registry.prefetch_challenger)
    if cfg.events.process not in ("thread", "sidecar"):
        raise ValueError(f"events.process={cfg.events.process!r}: thread | sidecar")
    sidecar = cfg.events.process == "sidecar"
    publisher = (SidecarPublisher if sidecar else EventPublisher)(
        cfg.events.bootstrap or endpoints.kafka_bootstrap(), cfg.events.spool_dir or var / "spool",
        queue_size=cfg.events.queue_size, compression=cfg.events.compression,
        delivery_timeout_ms=cfg.events.delivery_timeout_ms, retry_interval_s=cfg.events.retry_interval_s,
        fsync=cfg.events.fsync, linger_ms=cfg.events.linger_ms,
        **({"nice": cfg.events.sidecar_nice, "read_interval_ms": cfg.events.sidecar_read_interval_ms} if sidecar else {}))
    service = Service(cfg=cfg, backend=backend, router=router, publisher=publisher,
                      secrets=token_secrets(cfg), api_keys=api_keys(cfg), served_name=served_name)
    if cfg.registry.enabled:
        router.start(cfg.registry.poll_interval_s)
    service.app = create_app(service)
    return service


def http_protocol(service) -> type:  # noqa: ANN001 - a serving.app.Service
    """uvicorn's httptools protocol with the event-loop lag probe, answering feedback itself unless
    `http.fast_feedback` is off."""
    from serving.fastpath import feedback_protocol

    return feedback_protocol(service, fast=service.cfg.http.fast_feedback)


def main(cfg: Config) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every failed reconnect while the broker is down; the publisher reports its
    # own mode changes (and /healthz shows the spool), so its chatter is noise here.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # MLflow client retries
    if cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: this exposes the server beyond loopback", cfg.http.host)
    # The event loop shares the GIL with the publisher's sender and kafka-python's I/O thread; at
    # the default 5 ms switch interval a feedback request could wait a whole interval for the
    # loop to get the GIL back (measured p50 3.2 ms -> see tests/benchmarks/bench_serving.py).
    sys.setswitchinterval(cfg.http.gil_switch_interval_ms / 1000)
    service = build(cfg)
    # Move everything loaded so far (torch, transformers, the model) out of the collector's reach:
    # a full collection otherwise walks those millions of objects, in the middle of some request.
    gc.collect()
    gc.freeze()
    log.info("serving %s on http://%s:%d (backend %s)", service.served_name, cfg.http.host, cfg.http.port,
             cfg.backend)
    try:
        # uvloop + httptools (declared dependencies) rather than uvicorn's "auto", which would fall back to
        # asyncio + h11 without a word and double the per-request CPU.
        uvicorn.run(service.app, host=cfg.http.host, port=cfg.http.port, log_level=cfg.http.log_level,
                    loop="uvloop", http=http_protocol(service))
    finally:
        service.close()


if __name__ == "__main__":
    main(parse_config(Config))


class BackgroundServer:
    """The whole server in this process, on a uvicorn thread (tests, benchmarks, the demo).

    `with BackgroundServer(cfg) as srv: openai.OpenAI(base_url=srv.url + "/v1")`. Port 0 = a free port.
    """

    def __init__(self, cfg: Config):
        import socket

        if cfg.http.port == 0:
            with socket.socket() as s:
                s.bind((cfg.http.host, 0))
                cfg.http.port = s.getsockname()[1]
        self.cfg = cfg
        self.url = f"http://{cfg.http.host}:{cfg.http.port}"
        self.service = None
        self._server = None
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        import threading
        import time

        import uvicorn

        self.service = build(self.cfg)
        config = uvicorn.Config(self.service.app, host=self.cfg.http.host, port=self.cfg.http.port,
                                log_level=self.cfg.http.log_level, lifespan="off", loop="uvloop",
                                http=http_protocol(self.service))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="serving-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self.service.close()
