"""One contract: storage schemas derived from the models hold every contract-valid event, and every
contract-invalid record is set aside with a reason.

The strategies below are built from the models' own field types and bounds (not from a list of
cases), so a field added to or re-bounded in ingest/events.py is generated, landed and checked here
without editing this file.
"""

from __future__ import annotations

import json
import math
import tempfile
import typing
from collections import namedtuple
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import annotated_types as at
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ingest import contract, events, landing, pairing
from ingest.consume import land_records
from ingest.events import FeedbackEvent, ResponseEvent

Record = namedtuple("Record", "topic partition offset value")
EXAMPLES = 120

# --- strategies from the models ---------------------------------------------------------------------


def _meta(field_info) -> list:  # noqa: ANN001
    return list(field_info.metadata)


def _constraint(meta: list, kind: type):  # noqa: ANN202
    return next((m for m in meta if isinstance(m, kind)), None)


def _unwrap(tp, meta: list):  # noqa: ANN001, ANN202
    while typing.get_origin(tp) is typing.Annotated:
        base, *extra = typing.get_args(tp)
        for m in extra:
            meta = meta + list(getattr(m, "metadata", [m]))
        tp = base
    return tp, meta


def _optional(tp):  # noqa: ANN001, ANN202
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


ZONES = st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-23 * 60 - 59, 23 * 60 + 59))


def value_strategy(tp, meta: list) -> st.SearchStrategy:  # noqa: ANN001
    """Wire (JSON) values that satisfy a field's type and bounds."""
    tp, meta = _unwrap(tp, meta)
    tp, nullable = _optional(tp)
    tp, meta = _unwrap(tp, meta)
    base = _strategy(tp, meta)
    return st.none() | base if nullable else base


def _strategy(tp, meta: list) -> st.SearchStrategy:  # noqa: ANN001
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_strategy(tp)
    if origin is list:
        lo = _constraint(meta, at.MinLen)
        hi = _constraint(meta, at.MaxLen)
        item, item_meta = _unwrap(typing.get_args(tp)[0], [])
        return st.lists(value_strategy(item, item_meta), min_size=lo.min_length if lo else 0,
                        max_size=min(hi.max_length if hi else 4, 4))
    if tp is int:
        lo, hi = contract.int_bounds(meta)
        edges = st.sampled_from([lo, hi])  # the ends of the range are where storage breaks first
        return edges | st.integers(lo, hi)
    if tp is float:
        ge, gt, le, lt = (_constraint(meta, k) for k in (at.Ge, at.Gt, at.Le, at.Lt))
        lo = ge.ge if ge else (gt.gt if gt else None)
        hi = le.le if le else (lt.lt if lt else None)
        return st.floats(lo, hi, exclude_min=gt is not None, exclude_max=lt is not None,
                         allow_nan=False, allow_infinity=False)
    if tp is datetime:
        # any instant whose UTC value exists, in any offset; microseconds are what storage keeps
        return st.builds(lambda d, z: d.replace(tzinfo=UTC).astimezone(z).isoformat(),
                         st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), ZONES)
    if tp is str:
        pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)
        lo = _constraint(meta, at.MinLen)
        hi = _constraint(meta, at.MaxLen)
        lo_n, hi_n = (lo.min_length if lo else 0), (hi.max_length if hi else 64)
        if pattern:
            return st.from_regex(pattern, fullmatch=True).filter(lambda s: lo_n <= len(s) <= hi_n)
        # any Unicode text (no lone surrogates: they are no valid JSON text), sometimes at the limit
        short = st.text(min_size=lo_n, max_size=max(lo_n, min(hi_n, 40)))
        return st.integers(0, 9).flatmap(lambda k: st.just("é" * hi_n) if k == 0 else short)  # 1 in 10 at the limit
    raise AssertionError(f"no strategy for {tp}")


def model_strategy(model: type[BaseModel]) -> st.SearchStrategy[dict]:
    """Wire dicts of `model`; FeedbackEvent's payload field follows its kind (events.PAYLOAD_FIELDS)."""
    fields = {n: value_strategy(f.annotation, _meta(f)) for n, f in model.model_fields.items()}
    if model is FeedbackEvent:
        @st.composite
        def feedback(draw):  # noqa: ANN001, ANN202
            out = {n: draw(s) for n, s in fields.items() if n not in events.PAYLOAD_FIELDS.values()}
            field = events.PAYLOAD_FIELDS.get(out["kind"])
            for f in events.PAYLOAD_FIELDS.values():
                out[f] = None
            if field:
                f_info = model.model_fields[field]
                tp, _ = _optional(_unwrap(f_info.annotation, [])[0])
                out[field] = draw(_strategy(*_unwrap(tp, _meta(f_info))).filter(
                    lambda v: not isinstance(v, str) or v.strip()))
            return out

        return feedback()
    return st.fixed_dictionaries(fields)


def wire(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# The whole record has a byte limit too: the per-field limits alone allow a ~4 MB response event.
EVENTS = st.one_of(model_strategy(ResponseEvent), model_strategy(FeedbackEvent)).filter(
    lambda o: len(wire(o)) <= events.MAX_EVENT_BYTES)


# --- derived schemas -----------------------------------------------------------------------------------


def test_every_model_field_has_a_column_that_holds_its_bounds():
    """Nothing is dropped between the models and storage, and every int column holds its field's range."""
    ranges = {"int32": contract.INT32, "int64": contract.INT64}
    for model in (ResponseEvent, FeedbackEvent, *contract.DATASET_ROWS.values()):
        cols = {c.path: c for c in contract.columns(model)}
        for name, f in model.model_fields.items():
            tp, meta = _unwrap(f.annotation, _meta(f))
            tp, _ = _optional(tp)
            tp, meta = _unwrap(tp, meta)
            if typing.get_origin(tp) is typing.Literal and len(typing.get_args(tp)) == 1:
                continue
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                assert {p for p in cols if p[0] == name} == {(name, n) for n in tp.model_fields}
                continue
            col = cols[(name,)]
            if tp is int:
                lo, hi = contract.int_bounds(meta)
                a, b = ranges[col.type]
                assert a <= lo and hi <= b, f"{model.__name__}.{name} [{lo}, {hi}] does not fit {col.type}"
        for nested in ("sampling",):
            if nested in model.model_fields:
                sub = model.model_fields[nested].annotation
                for n, f in sub.model_fields.items():
                    if f.annotation in (int, int | None):
                        a, b = ranges[cols[(nested, n)].type]
                        lo, hi = contract.int_bounds(_meta(f))
                        assert a <= lo and hi <= b
    # Arrow and Spark agree column by column, in order
    for model in (ResponseEvent, FeedbackEvent, pairing.Row, *contract.DATASET_ROWS.values()):
        ddl = [tuple(part.split(" ")) for part in contract.spark_ddl(model, True).split(", ")]
        arrow = contract.arrow_schema(model, True)
        assert [n for n, _ in ddl] == arrow.names
        spark_of = {pa.string(): "string", pa.int32(): "int", pa.int64(): "bigint", pa.float64(): "double",
                    pa.bool_(): "boolean", pa.timestamp("us", tz="UTC"): "timestamp",
                    pa.list_(pa.string()): "array<string>"}
        assert [t for _, t in ddl] == [spark_of[f.type] for f in arrow]


@given(lo=st.integers(-(2**70), 2**70), width=st.integers(0, 2**70))
def test_int_columns_are_the_narrowest_that_hold_the_bounds(lo: int, width: int):
    hi = lo + width
    model = type("M", (BaseModel,), {"__annotations__": {"x": int},
                                     "x": __import__("pydantic").Field(ge=lo, le=hi)})
    fits = [n for n, (a, b) in (("int32", contract.INT32), ("int64", contract.INT64)) if a <= lo and hi <= b]
    if not fits:
        with pytest.raises(contract.ContractError, match="exceed int64"):
            contract.columns(model)
    else:
        assert contract.columns(model)[0].type == fits[0]


def test_an_unbounded_int_is_refused_when_the_schema_is_derived():
    model = type("Unbounded", (BaseModel,), {"__annotations__": {"n": int}})
    with pytest.raises(contract.ContractError, match="needs both bounds"):
        contract.columns(model)


def test_dataset_path_is_the_one_layout():
    assert contract.dataset_path("/d", "dpo", "ds-1", "eval") == Path("/d/dpo/version=ds-1/split=eval")
    with pytest.raises(ValueError, match="split"):
        contract.dataset_path("/d", "dpo", "ds-1", "test")


# --- land -> read back ---------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
@given(batch=st.lists(EVENTS, min_size=1, max_size=8))
def test_contract_valid_events_land_and_read_back_unchanged(batch: list[dict]):
    """Generated from the models' bounds -> wire -> consumer's landing path -> Parquet -> same event."""
    recs = [Record("t.responses" if o["type"] == "response" else "t.feedback", 0, i, wire(o))
            for i, o in enumerate(batch)]
    expected = {r.offset: events.parse_event(r.value) for r in recs}
    with tempfile.TemporaryDirectory() as tmp:
        landed, dead = land_records(recs, Path(tmp))
        assert dead == [] and landed == len(recs)
        got = {}
        for etype in landing.EVENT_TYPES:
            for row in landing.read_table(etype, Path(tmp), dedupe=False).to_pylist():
                got[row["_offset"]] = contract.from_row(landing.MODELS[etype], row)
    assert got == expected
    for o, ev in expected.items():  # the values are the generated ones, not coerced ones
        generated = batch[o]
        for k, v in generated.items():
            if isinstance(v, (int, float, str)) and k != "created_at":
                assert getattr(ev, k) == v


def _leaves(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, object, list, bool]]:
    out = []
    for n, f in model.model_fields.items():
        tp, meta = _unwrap(f.annotation, _meta(f))
        tp, nullable = _optional(tp)
        tp, meta = _unwrap(tp, meta)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out += _leaves(tp, (*prefix, n))
        out.append(((*prefix, n), tp, meta, f.is_required()))
    return out


def _violations(tp, meta: list, required: bool) -> list[tuple[str, object]]:  # noqa: ANN001
    """Values that break a field's declared type or bounds (derived from them)."""
    out: list[tuple[str, object]] = [("wrong type", [1])]
    if required:
        out.append(("missing", KeyError))
    if tp is int:
        lo, hi = contract.int_bounds(meta)
        out += [("below range", lo - 1), ("above range", hi + 1), ("past int64", 2**64),
                ("past int32", 2**31 if hi < 2**31 else -(2**63) - 1), ("fraction", 1.5), ("numeric string", "1"),
                ("integral float", 1.0)]
    if tp is float:
        out += [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf), ("numeric string", "0.5")]
    if tp is datetime:
        out.append(("epoch number", 1_700_000_000))
        le, lt, ge, gt = (_constraint(meta, k) for k in (at.Le, at.Lt, at.Ge, at.Gt))
        if le or lt:
            out.append(("above range", (le.le if le else lt.lt) + 1.0))
        if ge or gt:
            out.append(("below range", (ge.ge if ge else gt.gt) - 1.0))
    if tp is str:
        hi = _constraint(meta, at.MaxLen)
        if hi:
            out.append(("too long", "x" * (hi.max_length + 1)))
    if typing.get_origin(tp) is typing.Literal:
        out.append(("not a member", "\u0000not-a-member"))
    if typing.get_origin(tp) is list:
        hi = _constraint(meta, at.MaxLen)
        if hi:
            out.append(("too many", [{"role": "user", "content": "x"}] * (hi.max_length + 1)))
    return out


CASES = [(m, path, name, bad) for m in (ResponseEvent, FeedbackEvent) for path, tp, meta, req in _leaves(m)
         for name, bad in _violations(tp, meta, req)]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
@given(data=st.data(), case=st.sampled_from(CASES))
def test_contract_invalid_events_are_set_aside_with_a_reason(data, case):  # noqa: ANN001
    """One field of a valid event broken by a violation derived from its bounds: the record is dead-
    lettered with a reason (naming the field where the JSON parses), and the valid records beside it land."""
    model, path, name, bad = case
    obj = data.draw(model_strategy(model))
    node = obj
    for p in path[:-1]:
        node = node[p]
    if bad is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = bad
    before, after = data.draw(EVENTS), data.draw(EVENTS)
    raw = json.dumps(obj, ensure_ascii=False).encode()  # NaN/Infinity are written as bare literals
    recs = [Record("t", 0, 0, wire(before)), Record("t", 0, 1, raw), Record("t", 0, 2, wire(after))]
    with tempfile.TemporaryDirectory() as tmp:
        landed, dead = land_records(recs, Path(tmp))
        offsets = sorted(r["_offset"] for e in landing.EVENT_TYPES
                         for r in landing.read_table(e, Path(tmp), dedupe=False).to_pylist())
    assert [(r.offset, bool(reason)) for r, reason in dead] == [(1, True)], (name, path, dead)
    assert landed == 2 and offsets == [0, 2]
    reason = dead[0][1]
    if len(raw) > events.MAX_EVENT_BYTES:  # the size is checked first, and is then the reason given
        assert reason.startswith("oversized"), (len(raw), reason)
    elif name not in ("NaN", "Infinity", "-Infinity") and path[-1] not in ("type", "schema_version"):
        assert path[-1] in reason, (path, name, reason)
