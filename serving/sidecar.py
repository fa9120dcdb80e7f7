"""The event publisher in its own process (`events.process: sidecar`), so Kafka's client work does not
share the serving process's GIL with the event loop.

    python -m serving.sidecar --bootstrap HOST:PORT --spool-dir DIR [--queue-size N ...]

The child runs the same `EventPublisher` (direct sends, spool, in-doubt checks, ordered replay). The
serving process writes each record as one JSON line (`Record.line`) into the child's stdin with one
non-blocking `os.write` from the caller (no thread hand-off on the request path); only when the pipe is
full, or the child is gone, does a writer thread take over, in order. The child runs at a higher nice
value (`--nice`, `events.sidecar_nice`), so under CPU contention the serving process runs first; it
reports its `state()` as a JSON line on stdout every `STATE_INTERVAL_S`.

The child reads the pipe in batches: it takes what is there, publishes it, then naps until
`--read-interval-ms` (`events.sidecar_read_interval_ms`) has passed since that read. Woken by every
line, it ran its Python once per record with caches the other processes had just used; taking the
records a few milliseconds' worth at a time halves its CPU per record. Records wait in the pipe meanwhile (the kernel's buffer, 1 MiB here), which
the producer's own `linger_ms` wait dwarfs.

What it keeps and what it does not:
- A record is written to the pipe or, when the child is gone (it died, or did not start) or the queue is
  full, written as a complete spool segment into `<spool_dir>/from-server/`; every child, when it
  starts, moves those segments into its own spool and replays them in order. So a dead child loses only
  what it held in memory (its queue, unacknowledged sends, the lines waiting in the pipe), as a crashed
  serving process does with the in-process publisher; records spilled while a child runs wait for the next child's start. A dead
  child is replaced when the next record finds it gone, at most once per `restart_interval_s`.
- When the serving process dies, the child reads the end of its stdin and drains: what it still held
  is sent or spooled, not lost.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from serving.publisher import EventPublisher, Record, Spool, wait_for

log = logging.getLogger("serving.sidecar")
STATE_INTERVAL_S = 0.2
FROM_SERVER = "from-server"  # segments the serving process wrote while no child could take them


def adopt_server_segments(spool_dir: Path) -> int:
    """Move the serving process's complete segments into the spool (same names: time order is kept)."""
    moved = 0
    spool_dir.mkdir(parents=True, exist_ok=True)
    for seg in sorted((spool_dir / FROM_SERVER).glob("seg-*.jsonl")):
        seg.rename(spool_dir / seg.name)
        moved += 1
    return moved


class SidecarPublisher:
    """`EventPublisher`'s interface (publish, state, counts, wait_idle, close) over a child process."""

    def __init__(self, bootstrap: str, spool_dir: str | Path, queue_size: int = 10_000, compression: str = "gzip",
                 delivery_timeout_ms: int = 10_000, retry_interval_s: float = 1.0, fsync: bool = False,
                 restart_interval_s: float = 1.0, nice: int = 10, linger_ms: int = 50, read_interval_ms: int = 10):
        self.spool_dir = Path(spool_dir)
        self._cmd = [sys.executable, "-m", "serving.sidecar", "--bootstrap", bootstrap, "--spool-dir",
                     str(self.spool_dir), "--queue-size", str(queue_size), "--compression", compression or "none",
                     "--delivery-timeout-ms", str(delivery_timeout_ms), "--retry-interval-s", str(retry_interval_s),
                     "--nice", str(nice), "--linger-ms", str(linger_ms), "--read-interval-ms", str(read_interval_ms),
                     *(["--fsync"] if fsync else [])]
        self._from_server = Spool(self.spool_dir / FROM_SERVER, fsync=fsync)
        # Records not yet in the pipe, oldest first, each with its encoded line; the first may be partly
        # written (`_head_sent` bytes). Every write to the pipe happens under `_cond`'s lock, and a caller
        # writes directly only while this is empty, so lines never interleave or overtake each other.
        self._backlog: collections.deque[tuple[Record, bytes]] = collections.deque()
        self._head_sent = 0
        self._queue_size = queue_size
        self._restart_interval_s = restart_interval_s
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._child: subprocess.Popen | None = None
        self._fd = -1  # the child's stdin, non-blocking; -1 while there is no live child
        self._child_state: dict = {}
        self._written = 0  # records written whole to the current child's stdin
        self.restarts = 0
        self.local = {"published": 0, "spooled_here": 0}
        self._start_child()
        self._writer = threading.Thread(target=self._write_loop, name="serving-sidecar-writer", daemon=True)
        self._writer.start()

    # --- the request side ---------------------------------------------------------------------

    def publish(self, topic: str, key: str, value: bytes) -> None:
        """Write one record's line into the pipe now (one non-blocking `os.write`, no thread hand-off),
        or, when the pipe is full, earlier records still wait or the child is gone, leave it to the
        writer thread; never blocks. Past `queue_size` waiting records it goes to the spool."""
        rec = Record(topic, key, value)
        data = rec.line().encode("utf-8")
        with self._cond:
            self.local["published"] += 1
            if not self._backlog and self._fd >= 0:
                sent = self._write(data)
                if sent == len(data):
                    self._written += 1
                    return
                self._head_sent = max(sent, 0)  # the rest, if the child is still there, from the writer
            elif len(self._backlog) >= self._queue_size:
                data = b""
            if data:
                self._backlog.append((rec, data))
                self._cond.notify()
                return
        self._to_spool([rec])

    def _write(self, data: bytes | memoryview) -> int:
        """Bytes the pipe took (0 when full); -1, and the child marked gone, when it is closed. Lock held."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: the child has exited
            self._fd = -1
            return -1

    @property
    def counts(self) -> dict:
        c = self._child_state.get("counts", {})
        return {"published": self.local["published"], "sent": c.get("sent", 0),
                "spooled": c.get("spooled", 0) + self.local["spooled_here"], "replayed": c.get("replayed", 0),
                "overflow": c.get("overflow", 0), "already_landed": c.get("already_landed", 0)}

    def state(self) -> dict:
        s = self._child_state
        return {"mode": s.get("mode", "starting"), "queue": len(self._backlog) + s.get("queue", 0),
                "in_flight": s.get("in_flight", 0), "spool_pending": s.get("spool_pending", 0),
                "spool_dir": str(self.spool_dir), "last_error": s.get("last_error"), **self.counts,
                "process": "sidecar", "sidecar_pid": self._child.pid if self._child else None,
                "sidecar_restarts": self.restarts}

    def idle(self) -> bool:
        s = self._child_state
        return (not self._backlog and s.get("idle", False) and s.get("received", -1) == self._written
                and s.get("mode") == "direct")

    def wait_idle(self, timeout: float) -> bool:
        return wait_for(self.idle, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what waits, then close the child's stdin: it drains (sends or spools) and exits."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._writer.join(timeout=timeout)
        with self._cond:
            child, self._fd = self._child, -1  # no write after this: the descriptor's number may be reused
        if child is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
            try:
                child.wait(timeout=timeout + 5)
            except subprocess.TimeoutExpired:
                child.kill()

    # --- the writer thread --------------------------------------------------------------------

    def _start_child(self) -> None:
        """Starts a child and makes its stdin the pipe that records go to. Not under the lock: a fork of a
        large serving process takes a while, and publish() meanwhile leaves records to the writer."""
        try:
            child = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as e:
            log.warning("could not start the publisher sidecar: %s", e)
            return
        os.set_blocking(child.stdin.fileno(), False)
        with contextlib.suppress(AttributeError, OSError):  # Linux: room for ~2 s of records at 1,000/s
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        with self._cond:
            self._child, self._fd, self._written, self._child_state = child, child.stdin.fileno(), 0, {}
        threading.Thread(target=self._read_loop, args=(child,), name="serving-sidecar-reader", daemon=True).start()

    def _read_loop(self, child: subprocess.Popen) -> None:
        for line in child.stdout:
            with contextlib.suppress(ValueError):
                if child is self._child:
                    self._child_state = json.loads(line)

    def _to_spool(self, records: list[Record]) -> None:
        self._from_server.add_segment(records)  # whole segments: a starting child may be adopting them
        with self._cond:
            self.local["spooled_here"] += len(records)

    def _write_loop(self) -> None:
        """Moves the backlog into the pipe as the child reads; when the child is gone, puts the backlog on
        disk and starts a new child, at most once per `restart_interval_s`."""
        last_start = time.monotonic()
        while True:
            orphans: list[Record] = []
            restart = False
            with self._cond:
                while not self._backlog and not self._closing:
                    self._cond.wait()
                if not self._backlog:
                    return  # closing, and everything is in the pipe
                if self._fd >= 0 and self._child is not None and self._child.poll() is not None:
                    self._fd = -1
                while self._backlog and self._fd >= 0:
                    rec, data = self._backlog[0]
                    sent = self._write(memoryview(data)[self._head_sent :])
                    if sent <= 0:
                        break
                    self._head_sent += sent
                    if self._head_sent == len(data):
                        self._backlog.popleft()
                        self._head_sent = 0
                        self._written += 1
                fd = self._fd
                if fd < 0:
                    # The child is gone: its backlog goes to disk whole (a line it got only part of is
                    # skipped as unreadable by whoever reads it).
                    orphans = [rec for rec, _ in self._backlog]
                    self._backlog.clear()
                    self._head_sent = 0
                    restart = not self._closing and time.monotonic() - last_start > self._restart_interval_s
            if orphans:
                self._to_spool(orphans)
            if restart:
                last_start = time.monotonic()
                child = self._child
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    if child is not None:
                        child.stdin.close()  # its descriptor: one per restart would otherwise stay open
                        child.wait(timeout=1)
                self.restarts += 1
                log.warning("publisher sidecar exited (code %s); restarting it", child and child.returncode)
                self._start_child()
            elif fd >= 0:
                with contextlib.suppress(OSError, ValueError):  # closed by close() meanwhile
                    select.select([], [fd], [], 0.1)  # the pipe is full: wait until the child reads


def read_lines(fd: int, interval_s: float) -> Iterator[list[bytes]]:
    """The lines arriving on `fd`, as the lists each read found complete; after a read that found any,
    waits until `interval_s` has passed since it. The last item, at end of file, holds what followed the
    last newline (a line the writer did not finish), if anything did."""
    tail = b""
    while True:
        chunk = os.read(fd, 1 << 20)
        start = time.monotonic()  # after the read: an idle wait for the first record is not a nap
        if not chunk:
            if tail:
                yield [tail]
            return
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        if lines:
            yield lines
        time.sleep(max(0.0, start + interval_s - time.monotonic()))


def main() -> None:
    ap = argparse.ArgumentParser(description="The serving publisher in its own process: records on stdin "
                                             "(one Record JSON line each), its state on stdout.")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--spool-dir", required=True)
    ap.add_argument("--queue-size", type=int, default=10_000)
    ap.add_argument("--compression", default="gzip")
    ap.add_argument("--delivery-timeout-ms", type=int, default=10_000)
    ap.add_argument("--retry-interval-s", type=float, default=1.0)
    ap.add_argument("--fsync", action="store_true")
    ap.add_argument("--linger-ms", type=int, default=50)
    ap.add_argument("--read-interval-ms", type=int, default=10,
                    help="read the pipe at most this often, taking all it holds (0: as each record arrives)")
    ap.add_argument("--nice", type=int, default=10,
                    help="added to this process's nice value: under CPU contention the serving process, whose "
                         "answers wait on it, runs first; sending is batched and can wait")
    args = ap.parse_args()
    os.nice(args.nice)
    # The serving process shares our process group: a Ctrl-C or a group SIGTERM meant for it must not
    # stop us before it has closed our stdin, which is what makes us drain and exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    adopt_server_segments(Path(args.spool_dir))
    pub = EventPublisher(args.bootstrap, args.spool_dir, queue_size=args.queue_size, compression=args.compression,
                         delivery_timeout_ms=args.delivery_timeout_ms, retry_interval_s=args.retry_interval_s,
                         fsync=args.fsync, linger_ms=args.linger_ms)
    received = 0
    done = threading.Event()

    def report() -> None:
        while not done.wait(STATE_INTERVAL_S):
            line = json.dumps({**pub.state(), "counts": dict(pub.counts), "idle": pub.idle(), "received": received})
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                return

    threading.Thread(target=report, name="sidecar-state", daemon=True).start()
    for lines in read_lines(sys.stdin.fileno(), args.read_interval_ms / 1000):
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = Record.from_line(line.decode("utf-8"))
            except (ValueError, KeyError):  # the server writes whole lines; never let one stop the publisher
                log.error("publisher sidecar: unreadable record line of %d bytes skipped", len(line))
                continue
            pub.publish(rec.topic, rec.key, rec.value)
            received += 1
    pub.close()
    done.set()


if __name__ == "__main__":
    main()
