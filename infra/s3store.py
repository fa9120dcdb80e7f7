"""The stack's S3 store: moto's S3 server with a write-ahead journal on disk.

    python -m infra.s3store --port 19000 --dir var/s3 [--no-fsync]

tansu keeps its offsets and watermarks with S3 conditional writes (If-None-Match / If-Match), and
moto honours them, but moto keeps objects in memory only. This wraps moto's own WSGI app: every
mutating request (PUT / POST / DELETE) that succeeds is appended to `<dir>/journal` -- and, unless
--no-fsync, fsynced -- *before* its response is sent. A response the broker saw is therefore on
disk, and acks=all means the broker saw it: an acknowledged record survives `down`/`up`, a SIGKILL
of every process, and (with fsync) a power cut.

On start the journal is replayed into a fresh moto in this process (conditions dropped: each entry
already succeeded once, in this order), then compacted to one PUT per live object (bytes, content
type, user metadata; not versions, ACLs or tags, which tansu does not use) and swapped in by an
atomic rename. A torn last entry (a crash inside a write) fails its CRC and is cut off: its request
was never answered.

Mutations are applied and journaled under one lock, so the journal's order is the order moto applied
them in (and two conditional writes to one key cannot both pass moto's check-then-store). Reads take
no lock.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

MAGIC = b"FWS3"
_HEAD = struct.Struct(">4sIQ")  # magic, header length, body length
_CRC = struct.Struct(">I")
MUTATING = frozenset({"PUT", "POST", "DELETE"})
# Conditions were checked when the request first ran; on replay they would compare against ETags
# that the replay itself is still rebuilding, so they are left out.
_DROPPED = frozenset({"CONTENT_LENGTH", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE",
                      "HTTP_IF_UNMODIFIED_SINCE", "HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_LENGTH"})
_KEPT = frozenset({"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "RAW_URI", "REQUEST_URI",
                   "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "CONTENT_TYPE"})
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# moto checks no signatures, but treats an unsigned request as anonymous (403 on private objects).
_SIGNED = ("AWS4-HMAC-SHA256 Credential=s3store/20260101/us-east-1/s3/aws4_request, "
           "SignedHeaders=host, Signature=0")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def encode_entry(environ: dict[str, Any], body: bytes) -> bytes:
    """One journal entry: the request's routing environ (str values) and its body, CRC-sealed."""
    kept = {k: v for k, v in environ.items()
            if isinstance(v, str) and k not in _DROPPED and (k in _KEPT or k.startswith("HTTP_"))}
    names = environ.get("moto.preserved_header_names")  # header spellings with underscores (moto)
    if isinstance(names, dict):
        kept["moto.preserved_header_names"] = names
    head = json.dumps(kept, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, len(head), len(body)) + head + body + _CRC.pack(zlib.crc32(body, zlib.crc32(head)))


def read_entries(path: Path) -> Iterator[tuple[dict[str, Any], bytes, int]]:
    """Whole entries of a journal, each with the offset where it ends; stops at a torn or corrupt tail."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        end = 0
        while len(raw := f.read(_HEAD.size)) == _HEAD.size:
            magic, hlen, blen = _HEAD.unpack(raw)
            if magic != MAGIC:
                return
            head, body, crc = f.read(hlen), f.read(blen), f.read(_CRC.size)
            if len(crc) != _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(body, zlib.crc32(head)):
                return
            end += _HEAD.size + hlen + blen + _CRC.size
            yield json.loads(head), body, end


def call(app: WSGIApp, environ: dict[str, Any], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Run one request through a WSGI app in this process."""
    env = {"wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
           "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "SCRIPT_NAME": "",
           "QUERY_STRING": "", **environ, "wsgi.input": BytesIO(body), "CONTENT_LENGTH": str(len(body))}
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        got["status"], got["headers"] = int(status.split()[0]), headers

    out = app(env, start_response)
    try:
        data = b"".join(out)
    finally:
        getattr(out, "close", lambda: None)()
    return got["status"], got["headers"], data


def _request(method: str, path: str, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    env = {"REQUEST_METHOD": method, "PATH_INFO": path.encode().decode("latin-1"), "QUERY_STRING": query,
           "RAW_URI": quote(path) + (f"?{query}" if query else ""), "HTTP_HOST": "127.0.0.1",
           "HTTP_AUTHORIZATION": _SIGNED}
    env["REQUEST_URI"] = env["RAW_URI"]
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        env[key if key == "CONTENT_TYPE" else f"HTTP_{key}"] = value
    return env


def live_objects(app: WSGIApp) -> Iterator[tuple[dict[str, Any], bytes]]:
    """PUT requests that rebuild the store's current state: each bucket, then each object in it."""
    status, _, xml = call(app, _request("GET", "/"), b"")
    if status != 200:
        raise RuntimeError(f"ListBuckets answered {status} during compaction: {xml[:200]!r}")
    for bucket in ElementTree.fromstring(xml).iter(f"{S3_NS}Bucket"):
        name = bucket.findtext(f"{S3_NS}Name")
        yield _request("PUT", f"/{name}"), b""
        token = ""
        while True:
            query = "list-type=2" + (f"&continuation-token={quote(token, safe='')}" if token else "")
            status, _, xml = call(app, _request("GET", f"/{name}", query), b"")
            if status != 200:
                raise RuntimeError(f"ListObjectsV2 {name} answered {status} during compaction: {xml[:200]!r}")
            listing = ElementTree.fromstring(xml)
            for item in listing.iter(f"{S3_NS}Contents"):
                key = item.findtext(f"{S3_NS}Key") or ""
                status, headers, body = call(app, _request("GET", f"/{name}/{key}"), b"")
                if status != 200:
                    raise RuntimeError(f"GetObject {name}/{key} answered {status} during compaction")
                keep = {h: v for h, v in headers if h.lower() == "content-type" or h.lower().startswith("x-amz-meta-")}
                yield _request("PUT", f"/{name}/{key}", headers=keep), body
            token = listing.findtext(f"{S3_NS}NextContinuationToken") or ""
            if listing.findtext(f"{S3_NS}IsTruncated") != "true" or not token:
                break


class Journal:
    """WSGI middleware: mutations that succeed are journaled before their response leaves."""

    def __init__(self, app: WSGIApp, path: Path, fsync: bool = True):
        self.app, self.path, self.fsync = app, path, fsync
        self.lock = threading.Lock()
        self.fd = -1

    def recover(self) -> dict[str, float]:
        """Replay the journal into the app, then replace it with its compacted form."""
        t0 = time.monotonic()
        replayed = good = 0
        for environ, body, end in read_entries(self.path):
            replayed, good = replayed + 1, end
            status, _, data = call(self.app, environ, body)
            if not 200 <= status < 300:  # the same request succeeded before: the store diverged
                raise RuntimeError(f"journal replay: {environ.get('REQUEST_METHOD')} {environ.get('RAW_URI')} "
                                   f"answered {status} ({data[:200]!r}); {self.path} does not replay cleanly")
        torn = (self.path.stat().st_size - good) if self.path.exists() else 0
        tmp = self.path.with_name(self.path.name + ".compact")
        n = 0
        with open(tmp, "wb") as f:
            for environ, body in live_objects(self.app):
                f.write(encode_entry(environ, body))
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return {"replayed": replayed, "compacted_to": n, "torn_bytes": torn,
                "seconds": round(time.monotonic() - t0, 3)}

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in MUTATING:
            return self.app(environ, start_response)
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        body = stream.read(int(length)) if length else stream.read()
        environ["wsgi.input"] = BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        got: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> None:
            got["args"] = (status, headers, exc_info)

        with self.lock:
            out = self.app(environ, capture)
            try:
                data = b"".join(out)
            finally:
                getattr(out, "close", lambda: None)()
            if 200 <= int(got["args"][0].split()[0]) < 300:
                entry = encode_entry(environ, body)
                written = os.write(self.fd, entry)
                while written < len(entry):
                    written += os.write(self.fd, entry[written:])
                if self.fsync:
                    os.fsync(self.fd)
        start_response(*got["args"])
        return [data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.s3store", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where the journal lives")
    parser.add_argument("--no-fsync", action="store_true",
                        help="skip fsync per mutation: survives a process kill, not a power cut")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    args.dir.mkdir(parents=True, exist_ok=True)
    # Two stores replaying and appending to one journal would interleave it; the lock dies with us.
    lock = open(args.dir / "lock", "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"s3store: {args.dir} is in use by another s3store; stop it first", file=sys.stderr)
        return 1
    journal = Journal(DomainDispatcherApplication(create_backend_app), args.dir / "journal",
                      fsync=not args.no_fsync)
    recovered = journal.recover()
    print(f"s3store: recovered {json.dumps(recovered)}", flush=True)
    if recovered["torn_bytes"]:
        # A crash inside a write leaves a partial last entry whose request was never answered; more
        # than that points at a damaged disk, and the entries after the damage are not in the store.
        print(f"s3store: WARNING: cut {recovered['torn_bytes']} bytes after the last whole journal entry",
              flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(args.host, args.port, journal, threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
