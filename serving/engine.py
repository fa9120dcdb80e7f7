"""Batched generation on one shared base model with LoRA adapters, for the chat server.

One worker thread owns the model. Requests from any thread are queued; the worker takes the first,
waits up to `max_wait_ms` for more (up to `max_batch`), and decodes the whole batch with one
forward pass per token. Each row keeps its own sampling parameters, seed, token limit and LoRA
adapter (serving/lora.py: stacked adapters, two matmuls per layer for any mix; PEFT's own mixed-adapter
path was measured 1.8-2.6x slower per step), so a batch never has to be split by adapter or
temperature. Rows that finish are dropped from the KV cache, so one long answer does
not make the short ones pay for padding, and queued requests join the running batch between decode
steps (continuous batching: their prompts are prefilled and their cache left-padded to the batch's
length), so a new request never waits for a long batch to end.

We decode with our own loop instead of `generate()` because `generate()` takes one set of sampling
parameters per call, cannot stream per row, and we need each chosen token's log-probability under
the serving model (the `completion_logprob` of the response event) anyway.

Adapter loads and unloads run on the worker thread between batches (while one waits, no request
joins the running batch, so it drains), so a forward pass never sees a
half-loaded adapter; a request keeps the adapter name it was admitted with, so in-flight requests
finish on the adapter they started with when the champion moves.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("serving.engine")

class PromptTooLong(ValueError):
    """The prompt plus the requested completion does not fit the model's context window."""


class RequestRefused(ValueError):
    """A backend refused the request itself (a remote server's 4xx): the client's fault, answered 400
    naming `param`, the request field at fault, when the backend said which."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterLoadError(RuntimeError):
    """An adapter folder that cannot be loaded on this base model."""


def adapter_name(label: str) -> str:
    """Adapter name for a registry label (`flywheel-assistant/3` -> `flywheel-assistant_3`).

    Safe as a PEFT / vLLM adapter name (no dots, no slashes); the version stays in the name so an
    old adapter can never be mistaken for a new one.
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", label)


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" (the client went away)
    prompt_tokens: int
    completion_tokens: int
    logprob: float  # summed log-probability of the completion tokens (incl. the final eos on "stop")
    # OpenAI's choices[].logprobs.content entries, when the request asked for log-probabilities
    token_logprobs: list[dict] | None = None


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    adapter: str | None = None  # PEFT adapter name; None = base model
    # called from the worker thread with new text (and, when `logprobs` is set, the entries of the
    # tokens since the last call: on_delta(text, entries))
    on_delta: Callable[..., None] | None = None
    ignore_eos: bool = False  # always generate max_tokens (benchmarks: equal work per setting, as vLLM's)
    stop: tuple[str, ...] = ()  # stop sequences: the answer ends before the first one, which is not returned
    logprobs: int | None = None  # None: none returned; k: each token's log-probability and its k likeliest rivals
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the answer so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    cancel: threading.Event | None = None  # set -> the row leaves the batch at the next decode step
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


class IncrementalText:
    """Detokenises one answer token by token in linear time, where decoding the whole answer at every
    token is quadratic: `tokenizers`' DecodeStream, which holds tokens back until their bytes make whole
    UTF-8 characters. `flush()` returns what is still held back at the end (a broken character decodes
    to U+FFFD), so the pieces add up to the backend's decode of the whole answer, which is
    `tokenizer.decode` for the tokenizers served here (tests/test_serving_openai.py checks it)."""

    def __init__(self, tokenizer: Any):  # noqa: ANN401 - a Hugging Face tokenizer with a `tokenizers` backend
        from tokenizers.decoders import DecodeStream

        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise ValueError(f"{type(tokenizer).__name__} has no fast (`tokenizers`) backend, which streamed "
                             f"detokenisation needs; use a model that ships a tokenizer.json")
        self.stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted = 0  # characters returned so far

    def step(self, token: int) -> str:
        self.ids.append(token)
        if self.stream is None:
            return ""
        try:
            piece = self.stream.step(self.backend, token) or ""
        except Exception as e:  # noqa: BLE001 - DecodeStream's InvalidPrefix, for decoders that rewrite earlier text
            # The answer stays right: the rest of it comes whole from flush(), only later.
            log.warning("streamed detokenisation stopped for this answer (%s); its text follows at the end", e)
            self.stream = None
            return ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        # The same decoder the stream used (not tokenizer.decode, whose clean-up of spaces may differ):
        # one decode per answer, so still linear.
        rest = self.backend.decode(self.ids, skip_special_tokens=True)[self.emitted:]
        self.emitted += len(rest)
        return rest


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 bytes), character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """A token's own bytes (OpenAI's `logprobs.content[].bytes`): for byte-level BPE a token may hold
    part of a UTF-8 character, which its decoded text can only show as U+FFFD; the bytes of the
    tokens of an answer add up to the answer's UTF-8."""

    def __init__(self, tokenizer: Any):  # noqa: ANN401 - any Hugging Face tokenizer
        from tokenizers import decoders

        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.tokenizer = tokenizer
        self.byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self.alphabet = _byte_level_alphabet()
        self.added = set(tokenizer.get_added_vocab().values())

    def __call__(self, token: int) -> bytes:
        if self.byte_level and token not in self.added:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if all(c in self.alphabet for c in piece):
                return bytes(self.alphabet[c] for c in piece)
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop sequence in text that ends after `start`, or -1."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits, default=-1)


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop sequence (so must not be streamed yet)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


@dataclass
class _Row:
    """One request being decoded: its sampler and what it has produced so far."""

    req: GenRequest
    gen: torch.Generator
    detok: IncrementalText
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    text: str = ""  # decoded so far (cut before a stop sequence once one is found)
    sent: str = ""  # the text already streamed
    entries: list[dict] = field(default_factory=list)  # log-prob entries (when asked for)
    entries_sent: int = 0  # entries already handed to on_delta
    counts: torch.Tensor | None = None  # per-token occurrence counts (penalties only)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (token ids, values)


@dataclass
class _Batch:
    """The rows being decoded together, their KV cache, attention mask ([B, L], left-padded), each
    row's last position id ([B, 1]) and the logits of their next token."""

    rows: list[_Row]
    past: Any
    attn: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor

    def mergeable(self) -> bool:
        """Continuous batching edits the cache tensors directly, which is exact for plain (non-sliding,
        non-quantized) layers; other cache types just finish their batch first."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(self.past, "layers", [None]))

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, then drop cache columns that no remaining row attends to."""
        idx = torch.tensor(keep, device=self.attn.device)
        self.rows = [self.rows[j] for j in keep]
        if not keep:
            return
        self.past.batch_select_indices(idx)
        self.attn, self.pos, self.logits = self.attn[idx], self.pos[idx], self.logits[idx]
        first = int(self.attn.any(0).nonzero()[0])
        if first > 0 and self.mergeable():
            self.attn = self.attn[:, first:]
            for layer in self.past.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: _Batch) -> _Batch:
        """Stack two batches' rows; the shorter cache is left-padded (masked) to the longer one."""
        width = max(self.attn.shape[1], other.attn.shape[1])
        for b in (self, other):
            pad = width - b.attn.shape[1]
            if pad:
                b.attn = torch.nn.functional.pad(b.attn, (pad, 0))
                for layer in b.past.layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
        for mine, theirs in zip(self.past.layers, other.past.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        return _Batch(self.rows + other.rows, self.past, torch.cat([self.attn, other.attn]),
                      torch.cat([self.pos, other.pos]), torch.cat([self.logits, other.logits]))


class Engine:
    """The base model, its tokenizer, its loaded adapters and the batching worker."""

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", max_batch: int = 8,
                 max_wait_ms: float = 10.0, threads: int | None = None, merge_hot: bool = True,
                 continuous: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from training import precision

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        if threads:
            torch.set_num_threads(threads)
        # After the thread count is set, so the log line and /healthz say what the engine runs with.
        self.precision = precision.announce(precision.decide(dtype, str(self.device)), log)
        self.dtype = self.precision.torch_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # batched decoding needs left padding
        IncrementalText(self.tokenizer)  # refuses a tokenizer it cannot stream at load, not in every batch
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.model_path = model_path
        from serving.lora import MultiLora

        self.lora = MultiLora(self.model)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id
        self.token_bytes = TokenBytes(self.tokenizer)
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch = max_batch
        self.continuous = continuous  # queued requests join a running batch between decode steps
        self.merge_hot = merge_hot
        self.max_wait = max_wait_ms / 1000.0
        self.adapters: dict[str, str] = {}  # PEFT name -> folder
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._control: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        self._stop = threading.Event()
        self.stats = {"batches": 0, "requests": 0, "tokens": 0, "max_batch_seen": 0, "joined": 0,
                      "steps": 0, "cancelled": 0}
        self.active_rows = 0  # rows in the running batch (cancelled rows leave it at the next step)
        self._worker = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._worker.start()

    # --- prompts ------------------------------------------------------------------------------

    def encode(self, messages: list[dict], max_tokens: int) -> list[int]:
        """Token ids of the chat-templated prompt (with the model's default system prompt, if any)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_tokens > self.context_len:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the model's "
                                f"context is {self.context_len} tokens; shorten the conversation or max_tokens")
        return ids

    # --- requests -----------------------------------------------------------------------------

    def submit(self, req: GenRequest) -> Future:
        if self._stop.is_set():
            raise RuntimeError("the engine is shut down")
        if req.adapter is not None and req.adapter not in self.adapters:
            raise AdapterLoadError(f"adapter {req.adapter} is not loaded")
        self._queue.put(req)
        return req.future

    # GenRequest options this backend honours (serving.app refuses them for a backend without them)
    options = frozenset({"stop", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "cancel"})

    def start(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float, seed: int | None,
              adapter: str | None, on_delta: Callable[..., None] | None = None, **options: Any) -> Future:  # noqa: ANN401
        """Queue one chat request; the future resolves to a GenResult. Raises PromptTooLong at once.
        `options`: the GenRequest fields named in `Engine.options`."""
        ids = self.encode(messages, max_tokens)
        return self.submit(GenRequest(ids, max_tokens, temperature, top_p, seed=seed, adapter=adapter,
                                      on_delta=on_delta, **options))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def state(self) -> dict:
        return {"backend": "transformers", "model_path": self.model_path, "dtype": str(self.dtype),
                "precision": self.precision.record(),
                "device": str(self.device), "queue": self._queue.qsize(), "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000,
                "continuous": self.continuous, "active_rows": self.active_rows, **self.stats}

    def generate(self, messages: list[dict], max_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, adapter: str | None = None) -> GenResult:
        """Blocking convenience wrapper (benchmarks, scripts)."""
        ids = self.encode(messages, max_tokens)
        return self.submit(GenRequest(ids, max_tokens, temperature, top_p, seed=seed, adapter=adapter)).result()

    # --- adapters (run on the worker thread, between batches) ---------------------------------

    def _call_on_worker(self, fn: Callable[[], object], timeout: float = 300.0) -> object:
        fut: Future = Future()
        self._control.put((fn, fut))
        self._queue.put(None)  # wake the worker if it waits for requests
        return fut.result(timeout=timeout)

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a LoRA folder under `name` (idempotent). Raises AdapterLoadError when it does not fit."""
        if name in self.adapters:
            return
        folder = str(folder)

        def load() -> None:
            try:
                self.lora.load(name, folder)
            except Exception as e:  # noqa: BLE001 - any format/shape error means "this adapter does not fit"
                self.lora.unload(name)
                raise AdapterLoadError(f"cannot load adapter {name} from {folder} on {self.model_path}: {e}") from e
            self.adapters[name] = folder

        t0 = time.perf_counter()
        self._call_on_worker(load)
        log.info("loaded adapter %s from %s in %.2fs", name, folder, time.perf_counter() - t0)

    def set_hot(self, name: str | None) -> None:
        """Serve `name` (the champion) from merged weights when a whole batch uses it."""
        if not self.merge_hot or (name is not None and name not in self.adapters):
            return
        self._call_on_worker(lambda: self.lora.merge(name))

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return

        def unload() -> None:
            self.lora.unload(name)
            self.adapters.pop(name, None)

        self._call_on_worker(unload)

    # --- the worker ---------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._run_control()
            first = self._queue.get()
            if first is None:
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # a control command waits: run this batch, then the command
                    break
                batch.append(nxt)
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                with torch.inference_mode():
                    self._decode(live)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                log.exception("batch of %d failed", len(live))
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(e)
        for _fn, fut in self._drain_control():
            fut.set_exception(RuntimeError("engine shut down"))

    def _drain_control(self) -> list[tuple[Callable[[], object], Future]]:
        out = []
        while True:
            try:
                out.append(self._control.get_nowait())
            except queue.Empty:
                return out

    def _run_control(self) -> None:
        for fn, fut in self._drain_control():
            try:
                fut.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(e)

    def _forward(self, rows: list[_Row], ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, past):  # noqa: ANN001
        self.lora.select([row.req.adapter for row in rows], self.device)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[:, -1, :]

    def _prefill(self, reqs: list[GenRequest]) -> _Batch | None:
        """One forward pass over the (left-padded) prompts of newly admitted requests."""
        from transformers import DynamicCache

        for r in [r for r in reqs if r.adapter is not None and r.adapter not in self.adapters]:
            r.future.set_exception(AdapterLoadError(f"adapter {r.adapter} is not loaded"))
            reqs = [q for q in reqs if q is not r]
        for r in [r for r in reqs if r.cancel is not None and r.cancel.is_set()]:  # gone while queued: no prefill
            self.stats["cancelled"] += 1
            r.future.set_result(GenResult("", [], "cancelled", len(r.prompt_ids), 0, 0.0))
            reqs = [q for q in reqs if q is not r]
        if not reqs:
            return None
        self.stats["batches"] += 1
        self.stats["requests"] += len(reqs)
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attn[i, width - len(r.prompt_ids):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(r, _generator(r.seed), IncrementalText(self.tokenizer)) for r in reqs]
        past, logits = self._forward(rows, ids, attn, pos, DynamicCache())
        return _Batch(rows, past, attn, pos[:, -1:], logits)

    def _admit(self, room: int, live: list[GenRequest]) -> list[GenRequest]:
        """Requests that may join the running batch now (continuous batching): none while an adapter
        load/unload waits, so the batch drains and the control command runs between batches."""
        out: list[GenRequest] = []
        if not self.continuous or self._stop.is_set() or not self._control.empty():
            return out
        while len(out) < room:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is None:  # a control command or shutdown: admit no more
                break
            if r.future.set_running_or_notify_cancel():
                out.append(r)
        live.extend(out)  # so that a failing batch fails these too
        self.stats["joined"] += len(out)
        return out

    def _decode(self, live: list[GenRequest]) -> None:
        """Decode until every row is done. Finished rows leave the batch and its KV cache; queued
        requests join it between steps (their prompts prefilled, their cache left-padded to the
        batch's length), so a short request never waits for a long batch to end."""
        batch = self._prefill(list(live))
        try:
            while batch is not None and batch.rows:
                self.active_rows = len(batch.rows)
                self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch.rows))
                self.stats["steps"] += 1
                logits = batch.logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                keep, next_ids = [], []
                for j, row in enumerate(batch.rows):
                    if row.req.cancel is not None and row.req.cancel.is_set():
                        self.stats["cancelled"] += 1
                        self._finish(row, "cancelled")
                        continue
                    tok = self._step(row, logits[j], logp[j])
                    if tok is not None:
                        keep.append(j)
                        next_ids.append(tok)
                self.stats["tokens"] += len(batch.rows)
                if len(keep) < len(batch.rows):
                    batch.select(keep)
                self.active_rows = len(batch.rows)
                if batch.rows:
                    batch.attn = torch.cat([batch.attn, batch.attn.new_ones((len(batch.rows), 1))], dim=-1)
                    batch.pos = batch.pos + 1
                    step_ids = torch.tensor(next_ids, device=self.device).unsqueeze(-1)
                    batch.past, batch.logits = self._forward(batch.rows, step_ids, batch.attn, batch.pos, batch.past)
                new = self._admit(self.max_batch - len(batch.rows), live) if batch.mergeable() else []
                joined = self._prefill(new) if new else None
                if joined is not None:
                    batch = batch.merge(joined) if batch.rows else joined
        finally:
            self.active_rows = 0

    def _step(self, row: _Row, logits: torch.Tensor, logp: torch.Tensor) -> int | None:
        """Sample one row's next token, stream what text is safe to send; the token to feed back, or
        None when the row is done (eos, a stop sequence, the token limit)."""
        r = row.req
        sampling = logp
        if r.presence_penalty or r.frequency_penalty or r.logit_bias:
            sampling = torch.log_softmax(self._processed(row, logits), dim=-1)
        tok = self._sample(sampling, r.temperature, r.top_p, row.gen)
        # The event's completion_logprob and the API's logprobs are the model's own (before
        # temperature, penalties and bias), like vLLM's default.
        row.logprob += float(logp[tok])
        if tok in self.eos_ids and not r.ignore_eos:  # eos is in completion_logprob, not in the content
            self._finish(row, "stop")
            return None
        if r.logprobs is not None:
            row.entries.append(self._entry(logp, tok, r.logprobs))
        row.tokens.append(tok)
        if row.counts is not None:
            row.counts[tok] += 1
        checked = len(row.text)
        row.text += row.detok.step(tok)
        if r.stop and (cut := find_stop(row.text, r.stop, checked)) >= 0:
            row.text = row.text[:cut]
            self._finish(row, "stop", flush=False)
            return None
        if len(row.tokens) >= r.max_tokens:
            self._finish(row, "length")
            return None
        ready = len(row.text) - (stop_holdback(row.text, r.stop) if r.stop else 0)
        if r.on_delta is not None and ready > len(row.sent):
            self._send(row, row.text[len(row.sent):ready])
        return tok

    def _processed(self, row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """Logits after OpenAI's presence/frequency penalties (over the answer so far) and logit_bias."""
        r = row.req
        out = logits.clone()
        if r.presence_penalty or r.frequency_penalty:
            if row.counts is None:
                row.counts = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
                for t in row.tokens:
                    row.counts[t] += 1
            out -= r.frequency_penalty * row.counts + r.presence_penalty * (row.counts > 0).to(out.dtype)
        if r.logit_bias:
            if row.bias is None:  # once per row: up to 1,024 entries, added in one indexed step
                items = [(t, b) for t, b in r.logit_bias.items() if t < out.numel()]
                row.bias = (torch.tensor([t for t, _ in items], dtype=torch.long, device=out.device),
                            torch.tensor([b for _, b in items], dtype=out.dtype, device=out.device))
            out.index_add_(0, *row.bias)
        return out

    def _entry(self, logp: torch.Tensor, tok: int, k: int) -> dict:
        """One token's entry in OpenAI's logprobs.content shape."""

        def item(t: int, lp: float) -> dict:
            text = self.tokenizer.decode([t], skip_special_tokens=False)
            return {"token": text, "logprob": lp, "bytes": list(self.token_bytes(t))}

        top = []
        if k:
            values, ids = torch.topk(logp, k)
            top = [item(int(t), float(v)) for v, t in zip(values.tolist(), ids.tolist(), strict=True)]
        return {**item(tok, float(logp[tok])), "top_logprobs": top}

    def _send(self, row: _Row, text: str) -> None:
        if row.req.logprobs is None:
            row.req.on_delta(text)
        else:
            row.req.on_delta(text, row.entries[row.entries_sent:])
            row.entries_sent = len(row.entries)
        row.sent += text

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        r = row.req
        if flush:
            row.text += row.detok.flush()
        unsent = len(row.text) > len(row.sent) or len(row.entries) > row.entries_sent
        if r.on_delta is not None and reason != "cancelled" and unsent:
            self._send(row, row.text[len(row.sent):])
        r.future.set_result(GenResult(text=row.text, token_ids=row.tokens, finish_reason=reason,
                                      prompt_tokens=len(r.prompt_ids), completion_tokens=len(row.tokens),
                                      logprob=row.logprob,  # log_softmax terms: <= 0 unless a bug
                                      token_logprobs=row.entries if r.logprobs is not None else None))

    @staticmethod
    def _sample(logp: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        """Greedy at temperature 0, else nucleus sampling with the row's own seeded generator.

        The nucleus is looked for in the 256 likeliest tokens first (topk: ~0.1 ms on SmolLM2's 49k
        vocabulary, where a full sort took ~3.5 ms per row per step); only when they hold less than
        top_p of the mass is the whole vocabulary sorted. Both give the same nucleus, so the same token."""
        if temperature <= 0.0:
            return int(torch.argmax(logp))
        probs = torch.softmax(logp / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.topk(probs, min(256, probs.numel()))
            cumulative = torch.cumsum(sorted_p, -1)
            if float(cumulative[-1]) < top_p:
                sorted_p, order = torch.sort(probs, descending=True)
                cumulative = torch.cumsum(sorted_p, -1)
            cut = int(torch.searchsorted(cumulative, torch.tensor(top_p))) + 1
            sorted_p = sorted_p[:cut]
            k = int(torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen))
            return int(order[k])
        return int(torch.multinomial(probs, 1, generator=gen))
