"""Event contract v1: the `response` and `feedback` events that serving emits and ingest lands.

Both ends validate with these models. `event_id` is the idempotency key everywhere: a producer that
retries sends the same id, and the landing keeps one row per id. The JSON Schema exported from
these models is committed under `ingest/schemas/` (`python -m ingest.events --write-schema`), and a
test fails when the models and the committed schema drift apart.

Wire format: UTF-8 JSON, one event per Kafka record, at most MAX_EVENT_BYTES.

Bounds are what storage can hold (ingest/contract.py derives the Arrow and Spark schemas from these
models and refuses an int field without a range): ints within their column's range, bounded strings
and lists, finite floats, timestamps that convert to UTC. Parsing is bounded too (pydantic-core's JSON
parser: nesting depth 200, numbers within float64 / 4300 digits, no lone surrogates), so a hostile
record costs an error message, never a crash.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 256 * 1024
MAX_TEXT_CHARS = 32_000
MAX_MESSAGES = 64
SCHEMA_DIR = Path(__file__).parent / "schemas"
INT32_MAX = 2**31 - 1

# Ids are opaque but bounded and printable, so they are safe as Kafka keys and file names.
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]

FeedbackKind = Literal["thumbs_up", "thumbs_down", "edit", "regenerate", "copy", "abandon", "dwell", "comment"]
FEEDBACK_KINDS: tuple[str, ...] = FeedbackKind.__args__  # type: ignore[attr-defined]


# The feedback kinds that carry a payload, and its field (only that kind may carry it).
PAYLOAD_FIELDS = {"edit": "edited_text", "dwell": "dwell_seconds", "comment": "comment"}
WIRE = {"wire": True}  # validation context of a record read from the wire


class _Strict(BaseModel):
    # NaN/Infinity are valid Python floats but no JSON number and no useful training signal.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class Sampling(_Strict):
    temperature: float = Field(ge=0.0, le=5.0)
    top_p: float = Field(gt=0.0, le=1.0)
    max_tokens: int = Field(ge=1, le=8192)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # the landing column is int64


class _EventBase(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    created_at: datetime
    user_id: Id
    conversation_id: Id
    response_id: Id
    adapter_version: str | None = Field(
        default=None, max_length=256, description="registry version that produced the response; null = base"
    )
    tenant: Id | None = Field(
        default=None, description="the app (API key) the request came through; null = no API keys configured"
    )

    @model_validator(mode="after")
    def _version_on_the_wire(self, info: ValidationInfo):  # noqa: ANN202 - pydantic hook
        # The default lets serving build events without naming the version; a wire record must name it.
        if (info.context or {}).get("wire") and "schema_version" not in self.model_fields_set:
            raise ValueError(f"unknown schema_version None; this consumer reads {SCHEMA_VERSION}")
        return self

    @model_validator(mode="after")
    def _aware_timestamp(self):  # noqa: ANN202 - pydantic hook
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must carry a timezone (e.g. 2026-11-23T18:00:00Z)")
        try:
            self.created_at.astimezone(UTC)  # storage keeps UTC; 0001-01-01T00:00+01:00 has no UTC value
        except OverflowError:
            raise ValueError("created_at is outside the range of UTC timestamps") from None
        return self


class ResponseEvent(_EventBase):
    """One answer the assistant gave."""

    type: Literal["response"] = "response"
    prompt: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    completion: Text
    finish_reason: Literal["stop", "length"]
    base_model: str = Field(min_length=1, max_length=256)
    ab_arm: Literal["base", "champion", "challenger", "explicit"] = Field(
        description="which arm of the A/B split served it (explicit = the request named a version)"
    )
    sampling: Sampling
    completion_logprob: float = Field(
        le=0.0, description="summed token log-probability of the completion under the serving model"
    )
    prompt_tokens: int = Field(ge=0, le=INT32_MAX)
    completion_tokens: int = Field(ge=0, le=INT32_MAX)
    latency_ms: float = Field(ge=0.0)
    regenerates: Id | None = Field(
        default=None, description="response_id this answer replaced when the user asked to regenerate"
    )


class FeedbackEvent(_EventBase):
    """One signal a user gave about a response."""

    type: Literal["feedback"] = "feedback"
    kind: FeedbackKind
    edited_text: Text | None = Field(default=None, description="the user's corrected answer (kind=edit)")
    dwell_seconds: float | None = Field(default=None, ge=0.0, le=86_400.0, description="kind=dwell")
    comment: Annotated[str, Field(max_length=4_000)] | None = Field(default=None, description="kind=comment")

    @model_validator(mode="after")
    def _payload_matches_kind(self):  # noqa: ANN202 - pydantic hook
        for kind, field in PAYLOAD_FIELDS.items():
            present = getattr(self, field) is not None
            if self.kind == kind and not present:
                raise ValueError(f"kind={kind} requires the field {field}")
            if self.kind != kind and present:
                raise ValueError(f"field {field} is only allowed with kind={kind}, not kind={self.kind}")
        if self.kind == "edit" and not self.edited_text.strip():
            raise ValueError("edited_text must not be empty")
        return self


Event = Annotated[ResponseEvent | FeedbackEvent, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)


class EventError(ValueError):
    """A record that does not satisfy the contract; `reason` is short and names the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(event)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_event(raw: bytes | str) -> ResponseEvent | FeedbackEvent:
    """Decode and validate one wire record, or raise EventError saying what is wrong."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_EVENT_BYTES:
        raise EventError(f"oversized: {len(raw)} bytes > limit {MAX_EVENT_BYTES}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:  # bounded: depth, digits and surrogates are errors here, not crashes
        raise EventError(f"bad JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EventError(f"bad JSON: expected an object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EventError(f"unknown schema_version {version!r}; this consumer reads {SCHEMA_VERSION}")
    try:
        # strict: a wire value has its JSON type (no "12" for an int, no epoch number for a timestamp)
        return _EVENT.validate_json(raw, strict=True, context=WIRE)
    except ValidationError as e:
        raise EventError(_describe(e)) from None


def encode_event(event: ResponseEvent | FeedbackEvent) -> bytes:
    """The wire bytes of an event (compact JSON, UTF-8)."""
    return event.model_dump_json().encode("utf-8")


def now() -> datetime:
    return datetime.now(UTC)


def json_schemas() -> dict[str, dict]:
    return {
        f"response.v{SCHEMA_VERSION}.json": ResponseEvent.model_json_schema(),
        f"feedback.v{SCHEMA_VERSION}.json": FeedbackEvent.model_json_schema(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Event contract v1: export or check the JSON Schemas.")
    parser.add_argument("--write-schema", action="store_true", help=f"write the schemas into {SCHEMA_DIR}")
    args = parser.parse_args(argv)
    schemas = json_schemas()
    if args.write_schema:
        SCHEMA_DIR.mkdir(exist_ok=True)
        for name, schema in schemas.items():
            (SCHEMA_DIR / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
            print(f"wrote {SCHEMA_DIR / name}")
    else:
        print(json.dumps(schemas, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
