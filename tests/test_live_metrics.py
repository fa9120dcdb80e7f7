"""Live metrics per adapter version from landed events: each answer counts once per signal, the last
vote wins, the window selects answers by their own time. Landed into a temporary landing zone."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from ingest import landing, live_metrics
from ingest.events import FeedbackEvent, ResponseEvent

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count()


def answer(version: str | None, arm: str, at: datetime) -> ResponseEvent:
    rid = f"r{next(_ids)}"
    return ResponseEvent(event_id=rid, created_at=at, user_id="u", conversation_id="c", response_id=rid,
                         adapter_version=version, prompt=[{"role": "user", "content": "hi"}], completion="hello",
                         finish_reason="stop", base_model="tiny", ab_arm=arm,
                         sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "seed": 1},
                         completion_logprob=-1.0, prompt_tokens=1, completion_tokens=1, latency_ms=1.0)


def signal(r: ResponseEvent, kind: str, at: datetime, **extra) -> FeedbackEvent:  # noqa: ANN003
    return FeedbackEvent(event_id=f"f{next(_ids)}", created_at=at, user_id="u", conversation_id="c",
                         response_id=r.response_id, adapter_version=r.adapter_version, kind=kind, **extra)


def land(events: list, root) -> None:  # noqa: ANN001
    landing.write_batch([landing.to_row(e, landing.event_type(e), 0, i) for i, e in enumerate(events)], root)


def test_counts_per_version_last_vote_wins_and_window(tmp_path):
    """Champion v1: 3 answers. a: up then down (last vote: down); b: up, regenerated twice (counts once);
    c: unrated but abandoned -> answers 3, rated 2, up 1, regenerate 1, abandon 1. Challenger v2: d: up,
    copied; e was answered before the window (left out) though its vote lands inside it -> 1 answer.
    Base: f, edited, unrated."""
    a, b, c = (answer("m/1", "champion", T0 + timedelta(minutes=i)) for i in range(3))
    d = answer("m/2", "challenger", T0 + timedelta(minutes=1))
    e = answer("m/2", "challenger", T0 - timedelta(minutes=5))
    f = answer(None, "base", T0 + timedelta(minutes=2))
    later = T0 + timedelta(minutes=30)
    land([a, b, c, d, e, f,
          signal(a, "thumbs_up", T0 + timedelta(minutes=4)), signal(a, "thumbs_down", T0 + timedelta(minutes=5)),
          signal(b, "thumbs_up", later), signal(b, "regenerate", later), signal(b, "regenerate", later),
          signal(c, "abandon", later), signal(d, "thumbs_up", later), signal(d, "copy", later),
          signal(e, "thumbs_down", later), signal(f, "edit", later, edited_text="better")], tmp_path)

    stats = {(s.adapter_version, s.arm): s for s in
             live_metrics.version_stats(T0, T0 + timedelta(hours=1), root=tmp_path)}
    assert set(stats) == {("m/1", "champion"), ("m/2", "challenger"), ("base", "base")}
    v1 = stats[("m/1", "champion")]
    assert (v1.answers, v1.rated, v1.thumbs_up, v1.regenerate, v1.abandon) == (3, 2, 1, 1, 1)
    assert v1.thumbs_up_rate == 0.5 and abs(v1.rate("regenerate") - 1 / 3) < 1e-12
    v2 = stats[("m/2", "challenger")]
    assert (v2.answers, v2.rated, v2.thumbs_up, v2.copy) == (1, 1, 1, 1)  # e is outside the window
    base = stats[("base", "base")]
    assert (base.answers, base.rated, base.edit) == (1, 0, 1)
    assert base.thumbs_up_rate != base.thumbs_up_rate  # nan: no rated answers, not 0%


def test_duplicate_landing_counts_once(tmp_path):
    """At-least-once delivery lands an event twice; readers dedupe by event_id, so the counts do not move."""
    r = answer("m/1", "champion", T0)
    up = signal(r, "thumbs_up", T0)
    land([r, up], tmp_path)
    landing.write_batch([landing.to_row(up, "feedback", 1, 7)], tmp_path)  # the same event again
    (s,) = live_metrics.version_stats(root=tmp_path)
    assert (s.answers, s.rated, s.thumbs_up) == (1, 1, 1)


def test_empty_landing_zone_has_no_versions(tmp_path):
    assert live_metrics.version_stats(root=tmp_path) == []
