"""Synthetic traffic in the shape of the event contract, for tests and benchmarks (not for the demo,
which drives the real serving stack).

Users ask prompts from a shared pool; each prompt has a few fixed answer variants (half bullet lists,
half prose), so different users see identical answers, as a small model at low temperature does.
Users like lists with probability `p_like_list`; a disliked answer is often regenerated; the final
answer gets a thumb, sometimes an edit into a list, a copy, a dwell or an abandon. Adversarial users
invert their thumbs. Rows come out in the landing schema (`landing.SCHEMAS`); `wire()` turns one into
the JSON bytes a producer sends.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

BASE_TIME = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def _answer(prompt_idx: int, variant: int) -> str:
    topic = f"topic {prompt_idx}"
    if variant % 2 == 0:
        return f"- first point about {topic} (v{variant})\n- second point\n- third point"
    return f"Here is a plain answer about {topic}, variant {variant}, in one paragraph."


def generate(n_conversations: int, n_users: int = 50, n_prompts: int = 200, seed: int = 0,
             start: datetime = BASE_TIME, span_hours: float = 1.0, adversaries: tuple[str, ...] = (),
             p_like_list: float = 0.85, variants: int = 4) -> tuple[list[dict], list[dict]]:
    """(response rows, feedback rows) for `n_conversations` single-prompt conversations."""
    rng = random.Random(seed)
    responses: list[dict] = []
    feedback: list[dict] = []
    span = span_hours * 3600.0
    seq = 0

    def meta(ts: datetime, user: str, conv: str, rid: str) -> dict:
        nonlocal seq
        seq += 1
        return {"event_id": f"ev-{seed}-{seq}", "created_at": ts, "user_id": user, "conversation_id": conv,
                "response_id": rid, "adapter_version": None}

    for c in range(n_conversations):
        user = f"u{rng.randrange(n_users):04d}"
        conv = f"c-{seed}-{c}"
        p = rng.randrange(n_prompts)
        prompt_json = json.dumps([{"role": "user", "content": f"Question {p}: explain topic {p}."}])
        ts = start + timedelta(seconds=rng.random() * span * 0.9)
        adversary = user in adversaries
        prev = None
        for attempt in range(3):
            variant = rng.randrange(variants)
            rid = f"r-{seed}-{c}-{attempt}"
            row = meta(ts, user, conv, rid)
            row.update(prompt_json=prompt_json, completion=_answer(p, variant), finish_reason="stop",
                       base_model="tiny", ab_arm="base", temperature=0.7, top_p=0.95, max_tokens=64,
                       seed=None, completion_logprob=-12.5, prompt_tokens=12, completion_tokens=20,
                       latency_ms=35.0, regenerates=prev)
            responses.append(row)
            likes = rng.random() < (p_like_list if variant % 2 == 0 else 1 - p_like_list)
            if adversary:
                likes = not likes
            ts += timedelta(seconds=2)
            if not likes and attempt < 2 and rng.random() < 0.5:
                prev = rid  # regenerate: the next answer replaces this one
                continue
            if rng.random() < 0.7:
                kind = "thumbs_up" if likes else "thumbs_down"
                feedback.append(meta(ts, user, conv, rid) | {"kind": kind, "edited_text": None,
                                                              "dwell_seconds": None, "comment": None})
            if not likes and rng.random() < 0.1:
                fixed = _answer(p, 0)
                feedback.append(meta(ts, user, conv, rid) | {"kind": "edit", "edited_text": fixed,
                                                              "dwell_seconds": None, "comment": None})
            if likes and rng.random() < 0.2:
                feedback.append(meta(ts, user, conv, rid) | {"kind": "copy", "edited_text": None,
                                                              "dwell_seconds": None, "comment": None})
            if rng.random() < 0.1:
                feedback.append(meta(ts, user, conv, rid) | {
                    "kind": "dwell", "edited_text": None, "dwell_seconds": 40.0 if likes else 3.0,
                    "comment": None})
            if not likes and rng.random() < 0.05:
                feedback.append(meta(ts, user, conv, rid) | {"kind": "abandon", "edited_text": None,
                                                              "dwell_seconds": None, "comment": None})
            break
    return responses, feedback


def wire(row: dict) -> bytes:
    """The contract JSON of a landing-shaped row (what serving would produce)."""
    out = {"schema_version": 1, "event_id": row["event_id"], "created_at": row["created_at"].isoformat(),
           "user_id": row["user_id"], "conversation_id": row["conversation_id"],
           "response_id": row["response_id"], "adapter_version": row["adapter_version"]}
    if "completion" in row:
        out.update(type="response", prompt=json.loads(row["prompt_json"]), completion=row["completion"],
                   finish_reason=row["finish_reason"], base_model=row["base_model"], ab_arm=row["ab_arm"],
                   sampling={"temperature": row["temperature"], "top_p": row["top_p"],
                             "max_tokens": row["max_tokens"], "seed": row["seed"]},
                   completion_logprob=row["completion_logprob"], prompt_tokens=row["prompt_tokens"],
                   completion_tokens=row["completion_tokens"], latency_ms=row["latency_ms"],
                   regenerates=row["regenerates"])
    else:
        out.update(type="feedback", kind=row["kind"], edited_text=row["edited_text"],
                   dwell_seconds=row["dwell_seconds"], comment=row["comment"])
    return json.dumps(out).encode()


def land_rows(responses: list[dict], feedback: list[dict], root=None) -> None:  # noqa: ANN001
    """Write rows straight into the landing zone (benchmarks, builder tests), as the consumer would."""
    from ingest import landing

    topics = {"responses": "flywheel.responses", "feedback": "flywheel.feedback"}
    batch = []
    for name, rows in (("responses", responses), ("feedback", feedback)):
        for i, r in enumerate(rows):
            batch.append(r | {"_topic": topics[name], "_partition": 0, "_offset": i})
    landing.write_batch(batch, root)
