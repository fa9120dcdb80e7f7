"""Event contract v1: good events round-trip, bad ones are refused with a reason naming the field."""

from __future__ import annotations

import json

import pytest

from ingest import events
from ingest.events import EventError, FeedbackEvent, ResponseEvent, encode_event, parse_event


def response(**over) -> dict:
    base = {
        "schema_version": 1,
        "type": "response",
        "event_id": "resp-evt-1",
        "created_at": "2026-11-23T18:00:00Z",
        "user_id": "u1",
        "conversation_id": "c1",
        "response_id": "r1",
        "adapter_version": "flywheel-assistant/3",
        "prompt": [{"role": "user", "content": "Any tips for tea?"}],
        "completion": "- Use fresh water.",
        "finish_reason": "stop",
        "base_model": "tiny",
        "ab_arm": "champion",
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "seed": 1},
        "completion_logprob": -12.5,
        "prompt_tokens": 12,
        "completion_tokens": 6,
        "latency_ms": 40.0,
    }
    base.update(over)
    return base


def feedback(**over) -> dict:
    base = {
        "schema_version": 1,
        "type": "feedback",
        "event_id": "fb-1",
        "created_at": "2026-11-23T18:00:05+00:00",
        "user_id": "u1",
        "conversation_id": "c1",
        "response_id": "r1",
        "kind": "thumbs_up",
    }
    base.update(over)
    return base


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


def test_good_events_round_trip():
    r = parse_event(raw(response()))
    assert isinstance(r, ResponseEvent) and r.completion_logprob == -12.5 and r.ab_arm == "champion"
    assert parse_event(encode_event(r)) == r
    for kind, extra in [("thumbs_up", {}), ("thumbs_down", {}), ("edit", {"edited_text": "better"}),
                        ("regenerate", {}), ("copy", {}), ("abandon", {}), ("dwell", {"dwell_seconds": 12.5}),
                        ("comment", {"comment": "nice"})]:
        f = parse_event(raw(feedback(kind=kind, **extra)))
        assert isinstance(f, FeedbackEvent) and f.kind == kind
        assert parse_event(encode_event(f)) == f
    assert set(events.FEEDBACK_KINDS) == {"thumbs_up", "thumbs_down", "edit", "regenerate", "copy", "abandon",
                                          "dwell", "comment"}


@pytest.mark.parametrize(
    ("payload", "reason_part"),
    [
        (b"{not json", "bad JSON"),
        (b"\xff\xfe{}", "invalid UTF-8"),
        (b"[1, 2]", "expected an object"),
        (raw(response(schema_version=2)), "unknown schema_version 2"),
        (raw({k: v for k, v in response().items() if k != "schema_version"}), "unknown schema_version None"),
        (raw(response(type="other")), "type"),
        (raw(response(event_id="")), "event_id"),
        (raw(response(event_id="has space")), "event_id"),
        (raw(response(created_at="2026-11-23T18:00:00")), "timezone"),
        (raw(response(prompt=[])), "prompt"),
        (raw(response(prompt=[{"role": "robot", "content": "x"}])), "prompt.0.role"),
        (raw(response(completion_logprob=0.5)), "completion_logprob"),
        (raw(response(completion=123)), "completion"),
        (raw(response(sampling={"temperature": -1, "top_p": 0.9, "max_tokens": 5})), "sampling.temperature"),
        (raw(response(extra_field=1)), "extra_field"),
        (raw(feedback(kind="love")), "kind"),
        (raw(feedback(kind="edit")), "edited_text"),
        (raw(feedback(kind="edit", edited_text="   ")), "edited_text"),
        (raw(feedback(kind="dwell", dwell_seconds=-3)), "dwell_seconds"),
        (raw(feedback(kind="thumbs_up", dwell_seconds=3)), "dwell_seconds"),
        (raw(feedback(completion="x" * (events.MAX_TEXT_CHARS + 1))), "completion"),
        (b"{" + b" " * events.MAX_EVENT_BYTES + b"}", "oversized"),
    ],
)
def test_bad_events_are_refused_with_a_reason(payload: bytes, reason_part: str):
    with pytest.raises(EventError) as err:
        parse_event(payload)
    assert reason_part in err.value.reason


def test_committed_json_schema_matches_the_models():
    for name, schema in events.json_schemas().items():
        committed = json.loads((events.SCHEMA_DIR / name).read_text())
        assert committed == json.loads(json.dumps(schema)), (
            f"{name} drifted from the models; run `python -m ingest.events --write-schema`")
    assert "completion_logprob" in events.json_schemas()["response.v1.json"]["properties"]
