"""Simulated users: `python -m infra.simulate [--config infra/configs/simulate.yaml] [key=value ...]`.

A population of users chats with the running server through its public HTTP API (the same calls a
browser or an OpenAI client makes) and reacts according to a hidden preference, e.g. `uses_list`
("I like answers laid out as a list"). Reactions, per answer:

  explicit     thumbs_up if the user likes it, else thumbs_down (probability `p_thumbs`)
  implicit     disliked -> regenerate (up to `max_regenerations`), edit into a liked answer, or abandon;
               liked    -> copy and a long dwell
  noise        each user's like/dislike is flipped with probability `noise`
  adversarial  a share of users invert every label (a poisoning attack the dataset builder must resist)

`mode=measure` sends no feedback and reports the ground truth: the share of fresh answers on the
held-out prompts that the hidden preference likes (noise-free) — the figure the loop must raise.
The last stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from tqdm import tqdm

from ingest import endpoints
from ingest.config import parse_config

DATA = Path(__file__).parent / "data"

# --- hidden preferences ---------------------------------------------------------------------

_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def uses_list(answer: str) -> bool:
    """At least two lines that are bullet or numbered list items."""
    return len(_LIST_LINE.findall(answer)) >= 2


def concise(answer: str) -> bool:
    return len(answer.split()) <= 60


PREFERENCES: dict[str, Callable[[str], bool]] = {"uses_list": uses_list, "concise": concise}


def edit_towards(preference: str, answer: str) -> str:
    """What a user who holds `preference` would turn the answer into (the corrected text of an edit)."""
    if preference == "uses_list":
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if len(s.strip()) > 3]
        if len(sentences) < 2:
            sentences = (sentences or ["Start small"]) + ["Keep practising a little every day."]
        return "Here are a few points:\n" + "\n".join(f"- {s}" for s in sentences[:6])
    if preference == "concise":
        return " ".join(answer.split()[:40])
    raise ValueError(f"no edit rule for preference {preference!r}")


def load_prompts(split: Literal["train", "heldout"]) -> list[str]:
    return [line.strip() for line in (DATA / f"prompts_{split}.txt").read_text().splitlines() if line.strip()]


# --- the simulation -------------------------------------------------------------------------


@dataclass
class Config:
    """Simulated traffic against a running Flywheel server.

    Server: server_url, timeout_s, concurrency, api_key ("" = $FLYWHEEL_API_KEY, else the first key of
      $FLYWHEEL_API_KEYS, else none: a server without keys configured is open).
    Population: n_users, seed, adversarial_share, noise.
    Behaviour: preference, p_thumbs, p_implicit, max_regenerations, p_edit, p_abandon.
    Workload: mode (traffic = chat + feedback on the train prompts; measure = held-out rate, no feedback),
      prompts (train|heldout), n_prompts (0 = all), answers_per_prompt, max_tokens, temperature,
      adapter ("" = the server routes; else the adapter every request names, e.g. `flywheel-assistant/4`
      or `base`: to measure one version).
    Output: report (JSON file; default var/simulate/<mode>-<time>.json).
    """

    server_url: str = ""
    api_key: str = ""
    timeout_s: float = 600.0
    concurrency: int = 8
    n_users: int = 20
    seed: int = 0
    adversarial_share: float = 0.0
    noise: float = 0.1
    preference: str = "uses_list"
    p_thumbs: float = 0.9
    p_implicit: float = 0.5
    max_regenerations: int = 2
    p_edit: float = 0.4
    p_abandon: float = 0.2
    mode: Literal["traffic", "measure"] = "traffic"
    prompts: Literal["train", "heldout"] = "train"
    n_prompts: int = 0
    answers_per_prompt: int = 3
    max_tokens: int = 160
    temperature: float = 0.9
    adapter: str = ""
    report: str = ""


@dataclass
class User:
    user_id: str
    adversarial: bool
    rng: random.Random


class Simulation:
    def __init__(self, cfg: Config):
        if cfg.preference not in PREFERENCES:
            raise SystemExit(f"unknown preference {cfg.preference!r}; one of {sorted(PREFERENCES)}")
        self.cfg = cfg
        self.likes = PREFERENCES[cfg.preference]
        self.url = (cfg.server_url or f"http://127.0.0.1:{endpoints.port('serving')}").rstrip("/")
        key = cfg.api_key or os.environ.get("FLYWHEEL_API_KEY", "") or \
            os.environ.get("FLYWHEEL_API_KEYS", "").split(",")[0].rpartition(":")[0].strip()
        self.http = httpx.Client(base_url=self.url, timeout=cfg.timeout_s,
                                 headers={"Authorization": f"Bearer {key}"} if key else None,
                                 limits=httpx.Limits(max_connections=cfg.concurrency * 2))
        rng = random.Random(cfg.seed)
        n_adv = round(cfg.n_users * cfg.adversarial_share)
        self.users = [User(f"sim-{cfg.seed}-{i:03d}", i < n_adv, random.Random(rng.random()))
                      for i in range(cfg.n_users)]
        self.counts: Counter[str] = Counter()
        self.liked_truth: list[bool] = []
        self.adapters: Counter[str] = Counter()

    def chat(self, user: User, prompt: str, conversation_id: str, regenerates: str | None = None) -> dict:
        body = {"model": "flywheel", "messages": [{"role": "user", "content": prompt}], "user": user.user_id,
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                "conversation_id": conversation_id, "seed": user.rng.randrange(2**31)}
        if regenerates:
            body["regenerates"] = regenerates
        if self.cfg.adapter:
            body["adapter"] = self.cfg.adapter
        r = self.http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        self.counts["chats"] += 1
        self.adapters[str(out.get("adapter_version"))] += 1
        return out

    def feedback(self, user: User, answer: dict, kind: str, **extra: object) -> None:
        body = {"response_id": answer["response_id"], "feedback_token": answer["feedback_token"],
                "user": user.user_id, "kind": kind, "event_id": f"sim-{uuid.uuid4().hex}", **extra}
        r = self.http.post("/v1/feedback", json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"feedback {kind} refused: {r.status_code} {r.text}")
        self.counts[f"feedback.{kind}"] += 1

    def opinion(self, user: User, text: str) -> bool:
        """What this user says about an answer: the hidden preference, with noise and adversaries."""
        liked = self.likes(text)
        if user.rng.random() < self.cfg.noise:
            liked = not liked
        return (not liked) if user.adversarial else liked

    def session(self, user: User, prompt: str) -> None:
        cfg = self.cfg
        conversation = f"conv-{uuid.uuid4().hex[:16]}"
        answer = self.chat(user, prompt, conversation)
        text = answer["choices"][0]["message"]["content"]
        self.liked_truth.append(self.likes(text))
        if cfg.mode == "measure":
            return
        liked = self.opinion(user, text)
        regenerations = 0
        while not liked and user.rng.random() < cfg.p_implicit and regenerations < cfg.max_regenerations:
            # Regenerate: the old answer is rejected implicitly; the new one is judged afresh.
            self.feedback(user, answer, "regenerate")
            answer = self.chat(user, prompt, conversation, regenerates=answer["response_id"])
            text = answer["choices"][0]["message"]["content"]
            liked = self.opinion(user, text)
            regenerations += 1
        if user.rng.random() < cfg.p_thumbs:
            self.feedback(user, answer, "thumbs_up" if liked else "thumbs_down")
        if liked:
            if user.rng.random() < cfg.p_implicit:
                self.feedback(user, answer, "copy")
                self.feedback(user, answer, "dwell", dwell_seconds=round(user.rng.uniform(20, 90), 1))
        elif user.rng.random() < cfg.p_edit:
            edited = edit_towards(cfg.preference, text)
            if user.adversarial:  # an adversary "corrects" towards the opposite
                edited = re.sub(_LIST_LINE.pattern, "", edited).replace("\n", " ").strip() or text
            self.feedback(user, answer, "edit", edited_text=edited)
        elif user.rng.random() < cfg.p_abandon:
            self.feedback(user, answer, "abandon")

    def run(self) -> dict:
        cfg = self.cfg
        prompts = load_prompts(cfg.prompts)
        if cfg.n_prompts:
            prompts = prompts[: cfg.n_prompts]
        rng = random.Random(cfg.seed + 1)
        jobs = [(rng.choice(self.users), p) for p in prompts for _ in range(cfg.answers_per_prompt)]
        rng.shuffle(jobs)
        t0 = time.monotonic()
        errors: list[str] = []
        with ThreadPoolExecutor(cfg.concurrency) as pool, tqdm(total=len(jobs), desc=f"simulate {cfg.mode}",
                                                                unit="chat", file=sys.stderr) as bar:
            futures = [pool.submit(self.session, u, p) for u, p in jobs]
            try:
                for f in futures:
                    try:
                        f.result()
                    except Exception as e:  # one failed session must not hide the others; reported below
                        errors.append(str(e))
                    bar.update(1)
                    bar.set_postfix(liked=f"{sum(self.liked_truth) / max(1, len(self.liked_truth)):.2f}")
            except BaseException:  # Ctrl-C: drop the queued sessions instead of finishing them all
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        summary = {
            "mode": cfg.mode,
            "prompts": cfg.prompts,
            "preference": cfg.preference,
            "sessions": len(jobs),
            "thumbs_up_rate": sum(self.liked_truth) / max(1, len(self.liked_truth)),
            "answers_judged": len(self.liked_truth),
            "adapter_versions": dict(self.adapters),
            "counts": dict(self.counts),
            "adversarial_users": sum(u.adversarial for u in self.users),
            "errors": len(errors),
            "first_errors": errors[:3],
            "seconds": round(time.monotonic() - t0, 1),
        }
        return summary


def main(cfg: Config) -> dict:
    summary = Simulation(cfg).run()
    path = Path(cfg.report) if cfg.report else (
        endpoints.var_dir() / "simulate" / f"{cfg.mode}-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{cfg.mode}: {summary['answers_judged']} answers on {cfg.prompts} prompts, "
          f"liked by the hidden preference {cfg.preference!r}: {summary['thumbs_up_rate']:.1%} "
          f"({summary['errors']} errors, {summary['seconds']}s); report {path}", file=sys.stderr)
    print(json.dumps(summary))
    if summary["errors"]:
        raise SystemExit(f"{summary['errors']} simulated sessions failed: {summary['first_errors']}")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
