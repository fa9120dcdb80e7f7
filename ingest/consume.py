"""Landing consumer: Kafka response + feedback topics -> validated Parquet in the landing zone.

    python -m ingest.consume --config ingest/configs/consume.yaml [until_idle=true idle_seconds=10]

One consumer group over both topics. Each record of a batch is decoded, validated against the event
contract and converted to its landing row on its own; the valid ones are landed (ingest/landing.py:
temp file, fsync, rename), a record failing any of those steps goes to the dead-letter topic, and only
then are the offsets committed ("commit after the sink"). No record stops the consumer; it exits on
SIGTERM, when idle (batch runs), or on an infrastructure failure (broker, disk) with a message saying
so. Delivery is at-least-once and readers dedupe by `event_id`, so a crash anywhere adds no
duplicates to what they see.

Dead-letter records: key = "<topic>/<partition>/<offset>" of the source record (a replay re-sends the
same key, so counting distinct keys counts each bad record once); headers `error` (the reason),
`source_topic`, `source_partition`, `source_offset` (+ `null_value` for a null record). Value = the
raw bytes as received, unless they exceed `dead_letter_max_bytes` (or the topic refuses them for size):
then the bytes are kept durably in landing/dead-letter/<topic>/p<P>/o<O>.bin (+ .json with the reason)
before the commit, and the value is a JSON pointer {"payload_path", "bytes", "sha256"} (header
`payload_path` too).

SIGTERM/SIGINT finish the batch in hand, commit and stop. The consumer does not send LeaveGroup: the
broker drops it from the group when its session times out (`session_timeout_ms`, like a crashed member),
and only then hands its partitions to the others. Why: when the leader leaves while the group re-forms
(another member just joined or left), tansu (0.6 up to its current main) keeps the departed member as the
group's leader, so every other member -- and every later one, the group state is durable -- gets
REBALANCE_IN_PROGRESS on each SyncGroup forever; a leader that times out is dropped as leader.

On a rebalance the un-landed records of revoked partitions are dropped (not landed, not committed), so
their new owner reads them from the last commit (this consumer, if it gets them back, seeks back to
them): no loss and no duplicate landing. A commit refused because the group moved on after the files
were written only means a replay, which readers dedupe.

Metrics (logged every `metrics_every_s` and written to landing/_metrics/<group>.json): events/s,
lag = fetch high-watermark - position per partition (tansu's LATEST offset query can be stale after
pipelined produce, so `end_offsets` is not used), dead-letter count. The last stdout line is a JSON
summary.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from pydantic import ValidationError

from ingest import endpoints, landing
from ingest.config import parse_config
from ingest.events import _EVENT, MAX_EVENT_BYTES, WIRE, EventError, parse_event

log = logging.getLogger("ingest.consume")
_MAX_REASON = 1000  # bytes of the error header: a reason quoting a hostile record stays small


@dataclass
class Config:
    """Landing consumer.

    Kafka: bootstrap (empty = endpoints.kafka_bootstrap()), group_id, topics (keys of endpoints.topics()),
      session_timeout_ms / heartbeat_interval_ms (tansu delays a join by ~session_timeout/2, so 6 s / 2 s;
      a member that stops hands its partitions over when its session times out, see the module docstring).
    Batching: batch_max_records, batch_max_seconds (flush + commit whichever comes first), poll_timeout_ms.
    Stopping: until_idle (batch runs: stop after idle_seconds without records; while holding only part
      of the partitions, idle counts from session_timeout after the last assignment), max_seconds (0 = no limit).
    Output: landing_dir (empty = <var>/landing), metrics_every_s.
    Dead letters: dead_letter_max_bytes -- larger raw values are kept in landing/dead-letter/ and the
      dead-letter record points at them (kafka-python's producer refuses requests over 1 MB).
    """

    bootstrap: str = ""
    group_id: str = "flywheel-landing"
    topics: list[str] = field(default_factory=lambda: ["responses", "feedback"])
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    batch_max_records: int = 5000
    batch_max_seconds: float = 2.0
    poll_timeout_ms: int = 500
    until_idle: bool = False
    idle_seconds: float = 10.0
    max_seconds: float = 0.0
    landing_dir: str = ""
    metrics_every_s: float = 10.0
    dead_letter_max_bytes: int = 512 * 1024


def decode(raw: bytes):  # noqa: ANN201 - ResponseEvent | FeedbackEvent
    """Validate one record. Fast path: pydantic's JSON parser; on any failure re-run the contract's own
    `parse_event`, whose error message is the one we dead-letter (same rules, only slower)."""
    if raw is not None and len(raw) <= MAX_EVENT_BYTES:
        try:
            return _EVENT.validate_json(raw, strict=True, context=WIRE)
        except (ValidationError, ValueError):
            pass
    if raw is None:
        raise EventError("empty record (null value)")
    return parse_event(raw)


def land_records(records: list, root: Path) -> tuple[int, list[tuple[object, str]]]:
    """Decode, validate, convert and land Kafka records (anything with topic, partition, offset, value),
    each record on its own: returns (rows landed, [(record, reason)] for the dead-letter topic).

    A record failing any stage is set aside with the reason and the rest land; only the filesystem
    (OSError from the durable write) raises."""
    rows, sources, dead = [], [], []
    for rec in records:
        try:
            ev = decode(rec.value)
            row = landing.to_row(ev, rec.topic, rec.partition, rec.offset)
        except EventError as e:
            dead.append((rec, e.reason))
            continue
        except Exception as e:  # noqa: BLE001 - a record must never stop the consumer
            dead.append((rec, f"conversion: {type(e).__name__}: {str(e)[:300]}"))
            continue
        rows.append(row)
        sources.append(rec)
    _, refused = landing.land_batch(rows, root)
    dead.extend((sources[i], reason) for i, reason in refused)
    return len(rows) - len(refused), dead


@contextlib.contextmanager
def _batch_friendly_gc(gen0_threshold: int = 50_000):  # noqa: ANN202
    """Fewer cyclic-GC passes while landing. A batch allocates ~20 objects per event that refcounting
    frees on its own; at the default threshold (700) the collector ran every few dozen events and
    re-walked everything alive: decode + land of 5,000-event synthetic batches took 18-28 us per event
    with it and ~17 us without. What was loaded before the loop is frozen out of the collector's
    reach. Restored on exit."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


class LandingConsumer:
    """The consume -> land -> dead-letter -> commit loop; `run()` returns the summary."""

    def __init__(self, cfg: Config):
        from kafka import KafkaConsumer, KafkaProducer

        self.cfg = cfg
        bootstrap = cfg.bootstrap or endpoints.kafka_bootstrap()
        all_topics = endpoints.topics()
        unknown = [t for t in cfg.topics if t not in all_topics]
        if unknown:
            raise ValueError(f"topics {unknown} are not platform topics; use keys of {sorted(all_topics)}")
        self.topic_names = [all_topics[t].name for t in cfg.topics]
        self.dead_letter = all_topics["dead_letter"].name
        self.root = Path(cfg.landing_dir) if cfg.landing_dir else landing.landing_dir()
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=cfg.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_records=cfg.batch_max_records,
            client_id=f"{cfg.group_id}-landing",
        )
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.batch: list = []  # ConsumerRecords not yet landed
        self.stop = False
        self.landed = 0
        self.dead_lettered = 0
        self.batches = 0
        self.commit_failures = 0
        self.kept_in_files = 0
        self.assigned_at = 0.0  # monotonic time of the last partition assignment
        self.rebalancing = False  # partitions revoked, the new assignment not in yet
        self.rewind: dict[tuple[str, int], int] = {}  # (topic, partition) -> first un-landed offset dropped
        self.started = time.monotonic()
        self._last_metrics = self.started

    # --- the sink, then the commit -------------------------------------------------------------
    def flush(self) -> None:
        """Land the batch, flush the dead letters, then commit the offsets (in that order).

        Every record is isolated: decoding, validation and conversion to storage are each tried per
        record, and a record failing any of them becomes a dead letter -- the rest of the batch lands.
        What can raise out of here is infrastructure (filesystem, broker), never a record."""
        if not self.batch:
            return
        landed, dead = land_records(self.batch, self.root)
        futures = [(rec, reason, self._send_dead_letter(rec, reason)) for rec, reason in dead]
        self.producer.flush()
        for rec, reason, fut in futures:
            self._confirm_dead_letter(rec, reason, fut)
        try:
            self.consumer.commit()
        except CommitFailedError as e:
            # The group rebalanced under us: the files are landed but the offsets are not ours to
            # commit any more; the new owner re-reads them and readers dedupe by event_id.
            log.warning("commit refused after landing (%s); the batch will be replayed and deduped", e)
            self.commit_failures += 1
        self.landed += landed
        self.dead_lettered += len(dead)
        self.batches += 1
        self.batch = []

    def _send_dead_letter(self, rec, reason: str, keep: bool = False):  # noqa: ANN001, ANN202 - Future
        """Send one dead letter: value = the raw bytes, or -- when they are over dead_letter_max_bytes or
        the topic refused them -- a JSON pointer to a durable copy in landing/dead-letter/."""
        value = rec.value if rec.value is not None else b""
        headers = [("error", reason[:_MAX_REASON].encode("utf-8", "replace")),
                   ("source_topic", rec.topic.encode()), ("source_partition", str(rec.partition).encode()),
                   ("source_offset", str(rec.offset).encode())]
        if rec.value is None:
            headers.append(("null_value", b"true"))
        if keep or len(value) > self.cfg.dead_letter_max_bytes:
            path = landing.keep_dead_letter(value, rec.topic, rec.partition, rec.offset, reason, self.root)
            pointer = {"payload_path": str(path.relative_to(self.root)), "bytes": len(value),
                       "sha256": hashlib.sha256(value).hexdigest()}
            headers.append(("payload_path", pointer["payload_path"].encode()))
            value = json.dumps(pointer).encode()
            self.kept_in_files += 1
        key = f"{rec.topic}/{rec.partition}/{rec.offset}".encode()
        try:
            return self.producer.send(self.dead_letter, key=key, value=value, headers=headers)
        except MessageSizeTooLargeError:
            if keep:
                raise
            return self._send_dead_letter(rec, reason, keep=True)

    def _confirm_dead_letter(self, rec, reason: str, fut) -> None:  # noqa: ANN001
        """Wait for the broker's ack; a refusal for size is the record's fault (keep it in a file and send
        the pointer), anything else is the broker's (raise: then the batch is not committed)."""
        try:
            fut.get(timeout=30)
        except MessageSizeTooLargeError:
            self._send_dead_letter(rec, reason, keep=True).get(timeout=30)

    def _holds_every_partition(self) -> bool:
        total = sum(len(self.consumer.partitions_for_topic(t) or ()) for t in self.topic_names)
        return len(self.consumer.assignment()) >= total

    # --- metrics -------------------------------------------------------------------------------
    def lag(self) -> int | None:
        total, known = 0, False
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)  # from the last fetch response, not a LATEST query
            if hw is None:
                continue
            total += max(0, hw - self.consumer.position(tp))
            known = True
        return total if known else None

    def metrics(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        processed = self.landed + self.dead_lettered
        return {"group_id": self.cfg.group_id, "landed": self.landed, "dead_lettered": self.dead_lettered,
                "batches": self.batches, "commit_failures": self.commit_failures,
                "dead_letters_in_files": self.kept_in_files, "elapsed_s": round(elapsed, 3),
                "events_per_s": round(processed / elapsed, 1), "lag": self.lag()}

    def _report(self, force: bool = False) -> dict | None:
        now = time.monotonic()
        if not force and now - self._last_metrics < self.cfg.metrics_every_s:
            return None
        self._last_metrics = now
        m = self.metrics()
        log.info("landed=%d dead_lettered=%d events/s=%.0f lag=%s", m["landed"], m["dead_lettered"],
                 m["events_per_s"], m["lag"])
        path = self.root / "_metrics" / f"{self.cfg.group_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m) + "\n")
        return m

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from kafka import ConsumerRebalanceListener

        owner = self

        class DropOnRevoke(ConsumerRebalanceListener):
            # kafka-python 3 runs listeners on its IO thread, where a blocking commit is refused, so
            # we cannot land + commit here. Records of revoked partitions that are not yet landed are
            # not committed either: dropping them lets the new owner read them again from the last
            # commit -- nothing lost, nothing landed twice. If the new owner is this consumer again,
            # kafka-python keeps the partition's position (past the dropped records), so we seek back
            # to the first dropped offset: without that a rebalance that hands a member its own
            # partitions back skipped those records, and the next commit went past them.
            def on_partitions_revoked(self, revoked):  # noqa: ANN001, ANN202
                gone = {(tp.topic, tp.partition) for tp in revoked}
                kept = []
                for r in owner.batch:
                    if (r.topic, r.partition) not in gone:
                        kept.append(r)
                    elif r.offset < owner.rewind.get((r.topic, r.partition), r.offset + 1):
                        owner.rewind[(r.topic, r.partition)] = r.offset
                if len(kept) != len(owner.batch):
                    log.info("rebalance: %d un-landed records of revoked partitions left to their new owner",
                             len(owner.batch) - len(kept))
                owner.batch = kept
                owner.rebalancing = True

            def on_partitions_assigned(self, assigned):  # noqa: ANN001, ANN202
                for tp in assigned:
                    offset = owner.rewind.get((tp.topic, tp.partition))
                    if offset is not None:
                        owner.consumer.seek(tp, offset)
                        log.info("rebalance: %s[%d] is ours again: back to offset %d", tp.topic, tp.partition,
                                 offset)
                owner.rewind.clear()  # the others' new owners read them from the last commit
                owner.assigned_at = time.monotonic()
                owner.rebalancing = False
                log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

        self.consumer.subscribe(self.topic_names, listener=DropOnRevoke())
        with _batch_friendly_gc():
            return self._loop()

    def _loop(self) -> dict:
        batch_started = last_record = time.monotonic()
        try:
            while not self.stop:
                polled = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms,
                                            max_records=self.cfg.batch_max_records - len(self.batch))
                now = time.monotonic()
                for records in polled.values():
                    if records:
                        if not self.batch:
                            batch_started = now
                        self.batch.extend(records)
                        last_record = now
                if self.batch and (len(self.batch) >= self.cfg.batch_max_records
                                   or now - batch_started >= self.cfg.batch_max_seconds or not polled):
                    self.flush()
                self._report()
                if self.rebalancing or not self.consumer.assignment():
                    # Still joining the group, or rebalancing: kafka-python keeps reporting the old
                    # assignment until the new one is in, so without the flag a batch run could stop
                    # with its JoinGroup in flight, just before being handed a dead member's share.
                    last_record = now
                elif (not self._holds_every_partition()
                      and now - self.assigned_at < self.cfg.session_timeout_ms / 1000):
                    # Other partitions belong to another member, maybe one that died (SIGKILL) and
                    # holds them until its session times out; idle counts only after that, so a
                    # batch run does not stop before the group hands us the dead member's share.
                    last_record = now
                if self.cfg.until_idle and not self.batch and now - last_record >= self.cfg.idle_seconds:
                    log.info("idle for %.1f s: stopping", now - last_record)
                    break
                if self.cfg.max_seconds and now - self.started >= self.cfg.max_seconds:
                    break
            self.flush()  # SIGTERM or idle: finish the batch in hand and commit it
        finally:
            # lag reads the consumer's assignment and positions: measure before closing it
            summary = self._report(force=True)
            # Leave by session timeout, not LeaveGroup (see the module docstring: a leader's LeaveGroup
            # while the group re-forms wedges it in tansu). reset_generation() makes close() skip it.
            self.consumer._coordinator.reset_generation()  # noqa: SLF001 - kafka-python has no option for it
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=10)
        return summary


def main(cfg: Config) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        consumer = LandingConsumer(cfg)
    except KafkaError as e:
        raise InfrastructureError(f"cannot reach the broker at {cfg.bootstrap or endpoints.kafka_bootstrap()} "
                                  f"({type(e).__name__}: {e}); is the stack up (`python -m infra.stack up`)?") from e

    def _stop(signum, _frame):  # noqa: ANN001
        log.info("signal %d: finishing the batch, committing, leaving the group", signum)
        consumer.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        summary = consumer.run()
    except (KafkaError, OSError) as e:
        # Only infrastructure gets here (records are dead-lettered inside flush): the batch in hand is
        # not committed, so a restart re-reads it once the broker / disk is back.
        raise InfrastructureError(f"stopping on an infrastructure failure: {type(e).__name__}: {e}; nothing "
                                  f"after the last committed batch is lost -- restart when it is fixed") from e
    print(json.dumps(summary), flush=True)
    return summary


class InfrastructureError(RuntimeError):
    """The broker or the landing filesystem failed; the consumer stops (records never stop it)."""


def cli_args(argv: list[str]) -> list[str]:
    """Accept `--until-idle` as a synonym of `until_idle=true` (what the DAG and the issue call it)."""
    return ["until_idle=true" if a == "--until-idle" else a for a in argv]


if __name__ == "__main__":
    try:
        main(parse_config(Config, cli_args(sys.argv[1:])))
    except InfrastructureError as e:
        sys.exit(f"ingest.consume: {e}")
