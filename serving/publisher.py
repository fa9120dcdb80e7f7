"""Events to Kafka without ever blocking a request or losing an acknowledged event.

`publish()` only puts the record on a bounded in-memory queue (or, when that is full, appends it to
the disk spool) and returns. One sender thread owns one kafka-python producer (acks=all,
idempotent, gzip: the codecs with native libraries are not installed here).

Modes:
  direct    the sender hands records to the producer; a record whose delivery fails (the broker
            went away and `delivery_timeout_ms` passed) is appended to the spool by its errback,
            and the publisher switches to spooling.
  spooling  records go to the spool (JSON lines, in arrival order). Every `retry_interval_s` the
            sender tries a fresh producer; when one connects it replays the spool segment by
            segment, oldest first, deleting a segment only after every record in it was
            acknowledged (records that failed are written back, so nothing is sent twice by us),
            then returns to direct mode.

A fresh producer per connection, because an idempotent producer whose batches expired keeps
sequence numbers the broker no longer expects. A record whose send failed after it was handed to
the broker is *in doubt*: the broker may have written it without the acknowledgement arriving (a
frozen broker processes its socket backlog when it resumes). Before a replay, the publisher reads
each partition after the last offset it saw acknowledged and drops in-doubt records whose event
id is already there, so each event lands once. Ingest still dedups by event_id, as a second net.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("serving.publisher")


def put_or_spill(q: queue.SimpleQueue, bound: int, rec: Record, spill: Callable[[list[Record]], None]) -> bool:
    """Queue `rec` unless `bound` records already wait, else hand it to `spill` (the disk). True if queued."""
    if q.qsize() < bound:
        q.put_nowait(rec)
        return True
    spill([rec])
    return False


def wait_for(ready: Callable[[], bool], timeout: float) -> bool:
    """Ask `ready` every 50 ms until it says yes or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return ready()


@dataclass(frozen=True)
class Record:
    topic: str
    key: str
    value: bytes
    in_doubt: bool = False  # handed to the broker, outcome unknown (it may have landed)

    def line(self) -> str:
        d = {"t": self.topic, "k": self.key, "v": self.value.decode("utf-8")}
        if self.in_doubt:
            d["d"] = 1
        return json.dumps(d) + "\n"

    @staticmethod
    def from_line(line: str) -> Record:
        d = json.loads(line)
        return Record(d["t"], d["k"], d["v"].encode("utf-8"), bool(d.get("d")))

    def event_id(self) -> str | None:
        try:
            return json.loads(self.value).get("event_id")
        except (ValueError, AttributeError):
            return None


class Spool:
    """Append-only JSON-lines segments under `folder`, replayed oldest first."""

    def __init__(self, folder: Path, fsync: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.lock = threading.Lock()
        self._current: Path | None = None
        self.pending = sum(self._count(p) for p in self.segments())

    @staticmethod
    def _count(path: Path) -> int:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

    def segments(self) -> list[Path]:
        return sorted(self.folder.glob("seg-*.jsonl"))

    def append(self, records: list[Record]) -> None:
        with self.lock:
            if self._current is None:
                self._current = self.folder / f"seg-{time.time_ns():020d}.jsonl"
            self._write(self._current, "a", records)
            self.pending += len(records)

    def add_segment(self, records: list[Record]) -> None:
        """`records` as a segment of their own, written under a temporary name and renamed: a reader of
        the folder (another process) only ever sees whole segments."""
        with self.lock:
            tmp = self.folder / f"seg-{time.time_ns():020d}.tmp"
            self._write(tmp, "w", records)
            tmp.rename(tmp.with_suffix(".jsonl"))
            self.pending += len(records)

    def _write(self, path: Path, mode: str, records: list[Record]) -> None:
        with open(path, mode, encoding="utf-8") as f:
            f.write("".join(r.line() for r in records))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def seal(self) -> list[Path]:
        """Close the segment being written; later appends start a new one. Returns all segments."""
        with self.lock:
            self._current = None
            return self.segments()

    def read(self, path: Path) -> list[Record]:
        with open(path, encoding="utf-8") as f:
            return [Record.from_line(line) for line in f if line.strip()]

    def done(self, path: Path, sent: int, remaining: list[Record]) -> None:
        """After replaying `path`: drop it, or keep only the records that were not acknowledged."""
        with self.lock:
            if remaining:
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(r.line() for r in remaining), encoding="utf-8")
                tmp.replace(path)
            else:
                path.unlink(missing_ok=True)
            self.pending -= sent

    def empty(self) -> bool:
        with self.lock:
            return not self.segments()


class EventPublisher:
    """Non-blocking, spool-backed Kafka publishing for the serving process."""

    def __init__(self, bootstrap: str, spool_dir: str | Path, queue_size: int = 10_000, compression: str = "gzip",
                 delivery_timeout_ms: int = 10_000, retry_interval_s: float = 1.0, fsync: bool = False,
                 linger_ms: int = 50):
        self.bootstrap = bootstrap
        self.linger_ms = linger_ms
        self.compression = None if compression in ("", "none") else compression
        self.delivery_timeout_ms = delivery_timeout_ms
        self.retry_interval_s = retry_interval_s
        self.spool = Spool(Path(spool_dir), fsync=fsync)
        # SimpleQueue: its put is one C call, where queue.Queue runs a Python Condition.notify on the event
        # loop for every record; the bound is checked on qsize instead.
        self._queue: queue.SimpleQueue[Record] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._producer = None
        self._mode = "spooling"  # until the first producer connects
        self._failed = threading.Event()  # set by an errback: leave direct mode
        self._stop = threading.Event()
        self._pending: dict[int, Record] = {}  # handed to the producer, not yet acknowledged
        self._serial = 0
        self._lock = threading.Lock()
        self._last_probe = 0.0
        self.last_error: str | None = None
        self.counts = {"published": 0, "sent": 0, "spooled": 0, "replayed": 0, "overflow": 0,
                       "already_landed": 0}
        self._acked: dict[tuple[str, int], int] = {}  # (topic, partition) -> highest acknowledged offset
        self._thread = threading.Thread(target=self._run, name="serving-publisher", daemon=True)
        self._thread.start()

    # --- the request side ---------------------------------------------------------------------

    def publish(self, topic: str, key: str, value: bytes) -> None:
        """Queue one record; never blocks. A full queue spills to the disk spool."""
        with self._lock:
            self.counts["published"] += 1
        if not put_or_spill(self._queue, self._queue_size, Record(topic, key, value), self._to_spool):
            with self._lock:
                self.counts["overflow"] += 1

    def state(self) -> dict:
        return {"mode": self._mode, "queue": self._queue.qsize(), "in_flight": len(self._pending),
                "spool_pending": self.spool.pending, "spool_dir": str(self.spool.folder),
                "last_error": self.last_error, **self.counts}

    def idle(self) -> bool:
        """True when every published record has been acknowledged by the broker."""
        return (self._mode == "direct" and self._queue.empty() and not self._pending
                and self.spool.pending == 0)

    def wait_idle(self, timeout: float) -> bool:
        return wait_for(self.idle, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Drain: send what can be sent within `timeout`, spool the rest."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.idle() and self._mode == "direct":
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()) + 5)

    # --- the sender thread --------------------------------------------------------------------

    def _to_spool(self, records: list[Record]) -> None:
        self.spool.append(records)
        with self._lock:
            self.counts["spooled"] += len(records)

    def _new_producer(self):  # noqa: ANN202 - kafka.KafkaProducer
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, compression_type=self.compression,
            linger_ms=self.linger_ms, max_in_flight_requests_per_connection=5, retries=5,
            request_timeout_ms=min(5_000, self.delivery_timeout_ms // 2), delivery_timeout_ms=self.delivery_timeout_ms,
            max_block_ms=5_000, reconnect_backoff_ms=200, reconnect_backoff_max_ms=1_000,
            # a dead broker must fail the probe fast: the sender thread is the one that spools
            bootstrap_timeout_ms=2_000,
        )

    def _send(self, rec: Record) -> None:
        with self._lock:
            self._serial += 1
            serial = self._serial
            self._pending[serial] = rec

        def ok(md) -> None:  # noqa: ANN001
            with self._lock:
                if self._pending.pop(serial, None) is None:
                    return  # already given up on (spooled as in doubt)
                self.counts["sent"] += 1
                self._note_ack(md)

        def failed(exc) -> None:  # noqa: ANN001
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._failed.set()
            with self._lock:
                if self._pending.pop(serial, None) is None:
                    return
            self._to_spool([Record(rec.topic, rec.key, rec.value, in_doubt=True)])

        try:
            fut = self._producer.send(rec.topic, key=rec.key.encode("utf-8"), value=rec.value)
        except Exception as e:  # noqa: BLE001 - e.g. metadata timeout: the broker is gone
            failed(e)
            return
        fut.add_callback(ok)
        fut.add_errback(failed)

    def _note_ack(self, md) -> None:  # noqa: ANN001 - kafka RecordMetadata
        tp = (md.topic, md.partition)
        if md.offset > self._acked.get(tp, -1):
            self._acked[tp] = md.offset

    def _landed_ids(self, topics: set[str], quiet_s: float = 1.0, max_s: float = 15.0) -> set[str]:
        """Event ids written to `topics` after the last offsets we saw acknowledged."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 auto_offset_reset="earliest", request_timeout_ms=10_000)
        try:
            parts = [TopicPartition(t, p) for t in sorted(topics) for p in sorted(consumer.partitions_for_topic(t) or [])]
            consumer.assign(parts)
            for tp in parts:
                last = self._acked.get((tp.topic, tp.partition))
                consumer.seek(tp, last + 1) if last is not None else consumer.seek_to_beginning(tp)
            found: set[str] = set()
            start = last_new = time.monotonic()
            while time.monotonic() - last_new < quiet_s and time.monotonic() - start < max_s:
                for records in consumer.poll(timeout_ms=200).values():
                    for r in records:
                        with contextlib.suppress(ValueError, AttributeError):
                            found.add(json.loads(r.value).get("event_id"))
                        last_new = time.monotonic()
            return found
        finally:
            consumer.close()

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # close(timeout=0) aborts unsent batches; their errbacks spool them.
            with contextlib.suppress(Exception):
                producer.close(timeout=0)
        deadline = time.monotonic() + 2
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        # kafka-python does not always resolve the futures of requests already on the wire when it
        # is closed; such records are in doubt, and the replay checks whether they landed.
        with self._lock:
            stranded, self._pending = list(self._pending.values()), {}
        if stranded:
            self._to_spool([Record(r.topic, r.key, r.value, in_doubt=True) for r in stranded])

    def _run(self) -> None:
        while True:
            try:
                rec = self._queue.get(timeout=0.1)
            except queue.Empty:
                rec = None
            if self._failed.is_set() and self._mode == "direct":
                log.warning("Kafka delivery failed (%s); spooling events to %s", self.last_error, self.spool.folder)
                self._mode = "spooling"
                self._drop_producer()
            if self._mode == "direct":
                if rec is not None:
                    self._send(rec)
            elif rec is not None:
                # Drain everything queued in one append: while spooling, events belong on disk, not
                # in memory waiting for the next (slow, failing) connection probe.
                batch = [rec]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._to_spool(batch)
            if self._stop.is_set() and rec is None:
                break
            if self._mode == "spooling" and not self._stop.is_set() \
                    and time.monotonic() - self._last_probe > self.retry_interval_s:
                self._last_probe = time.monotonic()
                self._try_reconnect()
        # shutting down: whatever is still queued goes to the spool, in-flight records get a moment
        rest = []
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if rest:
            self._to_spool(rest)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(timeout=5)
            self._drop_producer()

    def _try_reconnect(self) -> None:
        try:
            self._producer = self._new_producer()
        except Exception as e:  # noqa: BLE001 - NoBrokersAvailable and friends: stay spooling
            self.last_error = f"{type(e).__name__}: {e}"
            self._producer = None
            return
        self._failed.clear()
        # Each pass replays what was spooled while the previous one ran; a few passes converge.
        for _ in range(20):
            if not self._replay():
                break
            with self.spool.lock:  # no append can slip in between "spool empty" and "direct"
                if not self.spool.segments():
                    self._mode = "direct"
                    log.info("Kafka reachable; publishing directly")
                    return
        self._drop_producer()

    def _replay(self) -> bool:
        """Send every sealed segment in order; False as soon as one record fails."""
        for seg in self.spool.seal():
            records = self.spool.read(seg)
            doubtful = [r for r in records if r.in_doubt]
            if doubtful:
                try:
                    landed = self._landed_ids({r.topic for r in doubtful})
                except Exception as e:  # noqa: BLE001 - cannot check yet: retry the whole replay later
                    self.last_error = f"checking in-doubt records: {type(e).__name__}: {e}"
                    return False
                kept = [r for r in records if not (r.in_doubt and r.event_id() in landed)]
                with self._lock:
                    self.counts["already_landed"] += len(records) - len(kept)
                self.spool.done(seg, len(records) - len(kept), kept)
                records = [Record(r.topic, r.key, r.value) for r in kept]
            futures = []
            for rec in records:
                try:
                    futures.append(self._producer.send(rec.topic, key=rec.key.encode("utf-8"), value=rec.value))
                except Exception as e:  # noqa: BLE001
                    self.last_error = f"{type(e).__name__}: {e}"
                    futures.append(None)
            with contextlib.suppress(Exception):
                self._producer.flush(timeout=self.delivery_timeout_ms / 1000 + 5)
            remaining = []
            for rec, fut in zip(records, futures, strict=True):
                ok = fut is not None and fut.is_done and fut.succeeded()
                if ok:
                    with self._lock:
                        self._note_ack(fut.value)
                else:
                    remaining.append(Record(rec.topic, rec.key, rec.value, in_doubt=fut is not None))
            sent = len(records) - len(remaining)
            self.spool.done(seg, sent, remaining)
            with self._lock:
                self.counts["replayed"] += sent
                self.counts["sent"] += sent
            if remaining:
                log.warning("replay of %s stopped: %d records not acknowledged", seg.name, len(remaining))
                return False
            if self._queue.qsize() > self._queue_size // 2:  # let the sender drain the queue meanwhile
                while True:
                    try:
                        self._to_spool([self._queue.get_nowait()])
                    except queue.Empty:
                        break
        return True


def read_topic(bootstrap: str, topic: str, until: set[str] | None = None, timeout: float = 30.0,
               quiet_s: float = 2.0) -> list[dict]:
    """Every record of `topic` from the beginning, as parsed JSON (for checks, tests and the demo).

    Stops when every event id in `until` has been seen, or after `quiet_s` without new records
    (`end_offsets` is not trusted: tansu can report a stale one after pipelined produce).
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[dict] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for records in batch.values():
                for r in records:
                    ev = json.loads(r.value)
                    out.append(ev)
                    seen.add(ev.get("event_id"))
                    last_new = time.monotonic()
            if until is not None and until <= seen:
                break
            if until is None and time.monotonic() - last_new > quiet_s:
                break
        return out
    finally:
        consumer.close()
