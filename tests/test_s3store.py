"""infra.s3store's journal, in process: conditional writes still hold through it, a replay rebuilds
exactly the acknowledged state, and a journal cut anywhere (a crash mid-write) rebuilds a prefix of it.

moto's backends are process-global, so "a fresh store" here is moto after its own /moto-api/reset.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto.moto_server import werkzeug_app as moto_app

from infra import s3store

BUCKET = "tansu"
KEYS = ["meta.json", "topics/t/0/watermark.json", "topics/t/0/00000000000000000000.batch", "a b/c%2Fd+e"]


def _req(method: str, key: str | None = None, headers: dict[str, str] | None = None) -> dict:
    return s3store._request(method, f"/{BUCKET}" + (f"/{key}" if key is not None else ""), headers=headers)


def _etag(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324 - S3's single-part ETag


def _state(app) -> dict[tuple[str, str], bytes]:  # noqa: ANN001
    """Every live object, read back through the S3 API."""
    out = {}
    for environ, body in s3store.live_objects(app):
        path = environ["PATH_INFO"].encode("latin-1").decode()
        if path.count("/") >= 2:
            _, bucket, key = path.split("/", 2)
            out[(bucket, key)] = body
    return out


def _reset(app) -> None:  # noqa: ANN001
    status, _, _ = s3store.call(app, s3store._request("POST", "/moto-api/reset"), b"")
    assert status == 200


@pytest.fixture
def app():  # noqa: ANN201
    app = moto_app.DomainDispatcherApplication(moto_app.create_backend_app)
    _reset(app)
    yield app
    _reset(app)


op = st.tuples(st.sampled_from(["put", "create", "update", "update_stale", "delete"]),
               st.sampled_from(KEYS), st.binary(max_size=300))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25), cut=st.floats(0, 1))
def test_replay_rebuilds_what_was_acknowledged_and_a_cut_journal_a_prefix(app, tmp_path_factory, ops, cut):  # noqa: ANN001
    """A model dict says what S3 must answer: If-None-Match: * fails on an existing key, If-Match
    fails unless the ETag is the current one. Through the journal the answers match the model, the
    replayed store equals the model, and a journal truncated at any byte replays to the state after
    some whole number of acknowledged writes."""
    _reset(app)
    path = tmp_path_factory.mktemp("s3") / "journal"
    journal = s3store.Journal(app, path, fsync=False)
    journal.recover()
    model: dict[str, bytes] = {}
    history = [{}]  # the model after each acknowledged mutation (before the bucket exists: also empty)

    def send(environ: dict, body: bytes = b"") -> int:
        return s3store.call(journal, environ, body)[0]

    assert send(_req("PUT")) == 200
    for kind, key, body in ops:
        if kind == "put":
            status, ok = send(_req("PUT", key), body), True
        elif kind == "create":
            status = send(_req("PUT", key, {"If-None-Match": "*"}), body)
            ok = key not in model
        elif kind in ("update", "update_stale"):
            current = model.get(key)
            etag = _etag(current) if current is not None and kind == "update" else _etag(body + b"x")
            status = send(_req("PUT", key, {"If-Match": etag}), body)
            ok = kind == "update" and current is not None
        else:
            status, ok = send(_req("DELETE", key)), True
        assert (200 <= status < 300) == ok, (kind, key, status)
        if ok:
            if kind == "delete":
                model.pop(key, None)
            else:
                model[key] = body
            history.append(dict(model))
    expected = {(BUCKET, k): v for k, v in model.items()}
    assert _state(app) == expected
    raw = path.read_bytes()  # the uncompacted journal: every acknowledged mutation, in order

    _reset(app)
    assert _state(app) == {}
    s3store.Journal(app, path, fsync=False).recover()
    assert _state(app) == expected

    path.write_bytes(raw[: int(len(raw) * cut)])
    _reset(app)
    s3store.Journal(app, path, fsync=False).recover()
    got = {k: v for (_, k), v in _state(app).items()}
    assert got in history


def test_a_success_is_on_disk_before_its_response_and_a_refusal_never(app, tmp_path: Path):  # noqa: ANN001
    path = tmp_path / "journal"
    journal = s3store.Journal(app, path, fsync=True)
    journal.recover()
    assert s3store.call(journal, _req("PUT"), b"")[0] == 200
    seen = []

    def start_response(status: str, headers: list, exc_info=None) -> None:  # noqa: ANN001
        seen.append(sum(1 for _ in s3store.read_entries(path)))

    environ = {"CONTENT_LENGTH": "2", "wsgi.url_scheme": "http",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.errors": None,
               **_req("PUT", "k", {"If-None-Match": "*"})}
    journal(dict(environ, **{"wsgi.input": io.BytesIO(b"v1")}), start_response)
    journal(dict(environ, **{"wsgi.input": io.BytesIO(b"v2")}), start_response)
    assert seen == [2, 2]  # the first write was journaled before it was answered; the 412 was not journaled
    _reset(app)
    s3store.Journal(app, path).recover()
    assert _state(app) == {(BUCKET, "k"): b"v1"}
