"""The landing zone: validated events as Parquet files, written durably, deduplicated on read.

Layout (root = `endpoints.var_dir()/"landing"`):

    landing/responses/date=YYYY-MM-DD/hour=HH/b-<hash>.parquet   ResponseEvent rows
    landing/feedback/date=YYYY-MM-DD/hour=HH/b-<hash>.parquet    FeedbackEvent rows
    landing/_metrics/<group>.json                                 the consumer's last metrics

`date`/`hour` are the event's own `created_at` in UTC (not the arrival time), so a dataset window
reads only the folders it overlaps. One consumer batch writes one file per (type, date, hour); the
file name is a hash of the (topic, partition, offset) triples it holds, so an identical replay
overwrites the same file.

Durability and idempotence (the design the consumer relies on):
- a file is written under a temporary name, fsynced, renamed into place, and its folder fsynced;
  only then does the consumer commit the offsets it covers (`write_batch` returns after that);
- delivery is at-least-once: after a crash between rename and commit, the replayed records may land
  again in a file with a different name. Readers therefore **deduplicate on read by `event_id`**
  (`read_table` here, `dropDuplicates(["event_id"])` in the Spark builder). Duplicates of one
  `event_id` carry the same payload, so which copy is kept does not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ingest import endpoints
from ingest.events import FeedbackEvent, ResponseEvent

EVENT_TYPES = ("responses", "feedback")

_META = [
    ("event_id", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("user_id", pa.string()),
    ("conversation_id", pa.string()),
    ("response_id", pa.string()),
    ("adapter_version", pa.string()),
]
_KAFKA = [("_topic", pa.string()), ("_partition", pa.int32()), ("_offset", pa.int64())]

SCHEMAS: dict[str, pa.Schema] = {
    "responses": pa.schema(_META + [
        ("prompt_json", pa.string()),  # JSON list of {role, content}; kept as text so Spark reads it flat
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("base_model", pa.string()),
        ("ab_arm", pa.string()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_tokens", pa.int32()),
        ("seed", pa.int64()),
        ("completion_logprob", pa.float64()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_ms", pa.float64()),
        ("regenerates", pa.string()),
    ] + _KAFKA),
    "feedback": pa.schema(_META + [
        ("kind", pa.string()),
        ("edited_text", pa.string()),
        ("dwell_seconds", pa.float64()),
        ("comment", pa.string()),
    ] + _KAFKA),
}


def landing_dir() -> Path:
    return endpoints.var_dir() / "landing"


def event_type(ev: ResponseEvent | FeedbackEvent) -> str:
    return "responses" if isinstance(ev, ResponseEvent) else "feedback"


def to_row(ev: ResponseEvent | FeedbackEvent, topic: str, partition: int, offset: int) -> dict:
    """One landing row of a validated event (plus where it came from in Kafka)."""
    row = {
        "event_id": ev.event_id, "created_at": ev.created_at.astimezone(UTC), "user_id": ev.user_id,
        "conversation_id": ev.conversation_id, "response_id": ev.response_id,
        "adapter_version": ev.adapter_version, "_topic": topic, "_partition": partition, "_offset": offset,
    }
    if isinstance(ev, ResponseEvent):
        row.update(
            prompt_json=json.dumps([m.model_dump() for m in ev.prompt], ensure_ascii=False),
            completion=ev.completion, finish_reason=ev.finish_reason, base_model=ev.base_model,
            ab_arm=ev.ab_arm, temperature=ev.sampling.temperature, top_p=ev.sampling.top_p,
            max_tokens=ev.sampling.max_tokens, seed=ev.sampling.seed,
            completion_logprob=ev.completion_logprob, prompt_tokens=ev.prompt_tokens,
            completion_tokens=ev.completion_tokens, latency_ms=ev.latency_ms, regenerates=ev.regenerates,
        )
    else:
        row.update(kind=ev.kind, edited_text=ev.edited_text, dwell_seconds=ev.dwell_seconds, comment=ev.comment)
    return row


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(table: pa.Table, path: Path) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_batch(rows: Iterable[dict], root: Path | None = None) -> list[Path]:
    """Land validated rows (from `to_row`), one durable file per (type, date, hour); returns the files."""
    root = root or landing_dir()
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for row in rows:
        etype = "responses" if "completion" in row else "feedback"
        ts: datetime = row["created_at"]
        groups[(etype, ts.strftime("%Y-%m-%d"), ts.hour)].append(row)
    written = []
    for (etype, date, hour), group in sorted(groups.items()):
        group.sort(key=lambda r: (r["_topic"], r["_partition"], r["_offset"]))
        digest = hashlib.sha256()
        for r in group:
            digest.update(f"{r['_topic']}/{r['_partition']}/{r['_offset']};".encode())
        path = root / etype / f"date={date}" / f"hour={hour:02d}" / f"b-{digest.hexdigest()[:20]}.parquet"
        table = pa.Table.from_pylist(group, schema=SCHEMAS[etype])
        _write_durable(table, path)
        written.append(path)
    return written


def landed_files(etype: str, root: Path | None = None) -> list[Path]:
    root = root or landing_dir()
    return sorted((root / etype).glob("date=*/hour=*/b-*.parquet"))


def read_table(etype: str, root: Path | None = None, dedupe: bool = True) -> pa.Table:
    """All landed rows of one type (small data: tests, tools); the Spark builder reads the folders itself."""
    files = landed_files(etype, root)
    if not files:
        return SCHEMAS[etype].empty_table()
    table = pa.concat_tables(pq.read_table(f, schema=SCHEMAS[etype]) for f in files)
    if not dedupe:
        return table
    import polars as pl

    df = pl.from_arrow(table).sort(["_topic", "_partition", "_offset"]).unique("event_id", keep="first",
                                                                                 maintain_order=True)
    return df.to_arrow().cast(SCHEMAS[etype])
