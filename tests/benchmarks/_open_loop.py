"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever the server does.

    python -m tests.benchmarks._open_loop --url http://127.0.0.1:8000 --path /v1/feedback \
        --bodies bodies.jsonl --rate 1000 --seconds 10

Closed-loop clients (send the next request when the answer arrives) slow down with the server and hide
its queueing ("coordinated omission"). Here request i is due at t0 + i / rate; its latency is counted
from that due time, not from when it was sent, so a stall shows as the latency of every request that
should have left during it (including waits for a free connection when all `--max-connections` are
busy). Requests go over a pool of keep-alive HTTP/1.1 connections on raw asyncio streams (an HTTP
client library cost ~1 ms of Python per request: at 1,000/s the client, not the server, saturated a
core). `send_lag_ms` (when the generator got to a request, minus its due time) says whether the
generator kept its schedule: when its p99 is large, the figures describe the client (`--realtime` runs
it under SCHED_FIFO where allowed). Prints one JSON object.

The schedule is kept by a Linux timerfd armed at each due time, not by `asyncio.sleep`: event-loop
timers have millisecond granularity (libuv's clock, epoll's timeout), so a request due 0.4 ms from now
left anywhere from 0.4 ms early to 0.6 ms late, and that lateness was counted as the server's latency.
Where there is no timerfd the loop's timers are used and the JSON says so (`clock`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvloop


def _request(method: str, host: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Reads one response (Content-Length framed); returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


class _LoopClock:
    """The event loop's own timers (millisecond granularity): where there is no timerfd."""

    name = "event loop"

    async def until(self, t: float) -> None:
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    def close(self) -> None:
        pass


class _TimerFd:
    """Waits until an absolute `time.perf_counter()` instant with nanosecond resolution, never early: a
    timerfd (CLOCK_MONOTONIC, the clock perf_counter reads on Linux) that the event loop watches like a
    socket. ctypes because `os.timerfd_create` arrives only in Python 3.13."""

    name = "timerfd"

    class _Itimerspec(ctypes.Structure):  # struct itimerspec: two struct timespec {tv_sec, tv_nsec}
        _fields_ = [("it_interval", ctypes.c_long * 2), ("it_value", ctypes.c_long * 2)]

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
            raise OSError("perf_counter does not read CLOCK_MONOTONIC here")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        loop.add_reader(self._fd, self._fired)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # re-armed after it fired: the old expiry is void
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, t: float) -> None:
        if t <= time.perf_counter():
            return
        ns = int(t * 1e9)
        spec = self._Itimerspec((0, 0), (ns // 1_000_000_000, ns % 1_000_000_000))
        self._waiter = self._loop.create_future()
        if self._libc.timerfd_settime(self._fd, 1, ctypes.byref(spec), None) != 0:  # 1: TFD_TIMER_ABSTIME
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        await self._waiter

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


def _clock(loop: asyncio.AbstractEventLoop) -> _TimerFd | _LoopClock:
    try:
        return _TimerFd(loop)
    except (OSError, AttributeError):  # AttributeError: a libc without timerfd_create (not Linux)
        return _LoopClock()


async def run(url: str, path: str, bodies: list[bytes], rate: float, seconds: float, max_connections: int) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    method = "POST" if bodies else "GET"
    requests = [_request(method, f"{host}:{port}", path, b) for b in (bodies or [b""])]
    idle: asyncio.Queue = asyncio.Queue()
    opened = 0
    latencies: list[float] = []
    lags: list[float] = []
    statuses: dict[int, int] = {}
    tasks: set[asyncio.Task] = set()

    async def connection():  # noqa: ANN202
        nonlocal opened
        if not idle.empty() or opened >= max_connections:
            return await idle.get()
        opened += 1
        return await asyncio.open_connection(host, port)

    async def one(i: int, due: float) -> None:
        lags.append((time.perf_counter() - due) * 1000)  # the generator's own delay, before any wait on the server
        conn = await connection()
        reader, writer = conn
        writer.write(requests[i % len(requests)])
        status = await _read_response(reader)
        latencies.append((time.perf_counter() - due) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        idle.put_nowait(conn)

    clock = _clock(asyncio.get_running_loop())
    n = int(rate * seconds)
    t0 = time.perf_counter() + 0.05
    try:
        for i in range(n):
            due = t0 + i / rate
            await clock.until(due)
            task = asyncio.create_task(one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))
    finally:
        clock.close()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    lags.sort()

    def pct(xs: list[float], p: float) -> float:
        return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 3)

    return {"path": path, "rate_target": rate, "requests": n, "achieved_rps": round(n / elapsed, 1),
            "p50_ms": pct(latencies, 50), "p90_ms": pct(latencies, 90), "p99_ms": pct(latencies, 99),
            "max_ms": round(latencies[-1], 3), "send_lag_p50_ms": pct(lags, 50), "send_lag_p99_ms": pct(lags, 99),
            "connections": opened, "clock": clock.name, "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--bodies", default="", help="JSONL file: one request body per line, used in turn (none: GET)")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-connections", type=int, default=64)
    ap.add_argument("--realtime", action="store_true",
                    help="run under SCHED_FIFO when allowed, so the server under test cannot delay the schedule")
    args = ap.parse_args()
    lines = Path(args.bodies).read_text().splitlines() if args.bodies else []
    bodies = [line.encode() for line in lines if line]
    realtime = args.realtime and _realtime()
    # uvloop: the generator's own per-request cost is what limits how steady its schedule is on 2 cores.
    out = uvloop.run(run(args.url, args.path, bodies, args.rate, args.seconds, args.max_connections))
    print(json.dumps({**out, "realtime": realtime}))


def _realtime() -> bool:
    """SCHED_FIFO for this process, if the OS allows it (root or CAP_SYS_NICE). On a machine with few
    cores the server under load otherwise takes the CPU the generator needs to send on time, and its
    lateness counts as the server's latency. The generator sleeps between requests (a few % of a core),
    and the kernel's real-time throttling bounds it regardless."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        return False
    return True


if __name__ == "__main__":
    main()
