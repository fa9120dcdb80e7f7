"""The landing zone: validated events as Parquet files, written durably, deduplicated on read.

Layout (root = `endpoints.var_dir()/"landing"`):

    landing/responses/date=YYYY-MM-DD/hour=HH/b-<hash>.parquet   ResponseEvent rows
    landing/feedback/date=YYYY-MM-DD/hour=HH/b-<hash>.parquet    FeedbackEvent rows
    landing/dead-letter/<topic>/p<partition>/o<offset>.bin        raw bytes of a dead letter too big for
                                                                  the dead-letter topic (+ .json: reason)
    landing/_metrics/<group>.json                                 the consumer's last metrics

Columns are derived from the event models by ingest/contract.py (never written here).

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
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ingest import contract, endpoints
from ingest.events import FeedbackEvent, ResponseEvent

EVENT_TYPES = ("responses", "feedback")
MODELS: dict[str, type[ResponseEvent] | type[FeedbackEvent]] = {"responses": ResponseEvent, "feedback": FeedbackEvent}

# Derived from the event models (ingest/contract.py), plus the Kafka coordinates of each record.
SCHEMAS: dict[str, pa.Schema] = {etype: contract.arrow_schema(m, with_kafka=True) for etype, m in MODELS.items()}
DEAD_LETTER_DIR = "dead-letter"


def landing_dir() -> Path:
    return endpoints.var_dir() / "landing"


def event_type(ev: ResponseEvent | FeedbackEvent) -> str:
    return "responses" if isinstance(ev, ResponseEvent) else "feedback"


def to_row(ev: ResponseEvent | FeedbackEvent, topic: str, partition: int, offset: int) -> dict:
    """One landing row of a validated event (plus where it came from in Kafka)."""
    row = contract.to_row(ev)
    row.update(_topic=topic, _partition=partition, _offset=offset)
    return row


def row_type(row: dict) -> str:
    return "responses" if "completion" in row else "feedback"


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


def _tables(rows: list[dict], schema: pa.Schema) -> tuple[pa.Table | None, list[tuple[int, str]]]:
    """Rows -> one Arrow table; when the batch does not convert, find the rows that do not, one by one,
    and leave them out. Returns (table of the rows that convert, [(index, reason)] of those that do not)."""
    try:
        return pa.Table.from_pylist(rows, schema=schema), []
    except Exception:  # noqa: BLE001 - any conversion failure is some row's fault; find it below
        pass
    good, bad = [], []
    for i, row in enumerate(rows):
        try:
            good.append(pa.Table.from_pylist([row], schema=schema))
        except Exception as e:  # noqa: BLE001 - per record: what storage refused, as the reason
            bad.append((i, f"storage: {type(e).__name__}: {str(e)[:300]}"))
    return (pa.concat_tables(good) if good else None), bad


def land_batch(rows: list[dict], root: Path | None = None) -> tuple[list[Path], list[tuple[int, str]]]:
    """Land rows (from `to_row`), one durable file per (type, date, hour).

    Returns (files written, [(index into rows, reason)] of rows storage refused): a row that does not
    convert to its column types is left out and reported, the others land. Raises only when the
    filesystem fails (then nothing should be committed)."""
    root = root or landing_dir()
    groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    rejected: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        try:
            ts: datetime = row["created_at"]
            groups[(row_type(row), ts.strftime("%Y-%m-%d"), ts.hour)].append(i)
        except Exception as e:  # noqa: BLE001 - per record
            rejected.append((i, f"storage: {type(e).__name__}: {str(e)[:300]}"))
    written = []
    for (etype, date, hour), idx in sorted(groups.items()):
        idx.sort(key=lambda i: (rows[i]["_topic"], rows[i]["_partition"], rows[i]["_offset"]))
        table, bad = _tables([rows[i] for i in idx], SCHEMAS[etype])
        rejected.extend((idx[j], reason) for j, reason in bad)
        if table is None:
            continue
        digest = hashlib.sha256()
        for t, p, o in zip(*(table.column(c).to_pylist() for c in ("_topic", "_partition", "_offset")), strict=True):
            digest.update(f"{t}/{p}/{o};".encode())
        path = root / etype / f"date={date}" / f"hour={hour:02d}" / f"b-{digest.hexdigest()[:20]}.parquet"
        _write_durable(table, path)
        written.append(path)
    return written, sorted(rejected)


def write_batch(rows: Iterable[dict], root: Path | None = None) -> list[Path]:
    """Land rows that are known to be valid (benchmarks, tools); raises if storage refuses any."""
    written, rejected = land_batch(list(rows), root)
    if rejected:
        raise ValueError(f"{len(rejected)} rows do not fit the landing schema, first: {rejected[0][1]}")
    return written


def keep_dead_letter(raw: bytes, topic: str, partition: int, offset: int, reason: str,
                     root: Path | None = None) -> Path:
    """Keep the raw bytes of a dead letter in the landing zone, durably, named by its coordinates (a
    replay overwrites the same file); returns the path. Used when the dead-letter topic cannot carry it."""
    root = root or landing_dir()
    path = root / DEAD_LETTER_DIR / topic / f"p{partition}" / f"o{offset}.bin"
    _write_bytes_durable(raw, path)
    meta = {"topic": topic, "partition": partition, "offset": offset, "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(), "reason": reason}
    _write_bytes_durable((json.dumps(meta) + "\n").encode(), path.with_suffix(".json"))
    return path


def _write_bytes_durable(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
