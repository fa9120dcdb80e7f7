"""One contract: storage schemas derived from the pydantic models, never written out by hand.

The event models (ingest/events.py) and the dataset row models (below) are the only place a schema is
written. This module maps them to what storage needs:

- `columns(model)` -> the flat column list: name, storage type, nullability. Rules for events:
  a field whose type is a one-value Literal (`schema_version`, the `type` discriminator) is a constant
  and is not stored (the table says the type); a nested model (`sampling`) is flattened into its
  fields; a list of models (`prompt`) is stored as JSON text in `<name>_json` (Spark reads it flat).
- `arrow_schema(model)` / `spark_schema(model)` / `spark_ddl(model)` from those columns.
- `to_row(event)` / `from_row(model, row)`: the landing row of an event and back (a test proves the
  round trip for generated events).
- `dataset_path(root, kind, version, split)`: the one place the `kind/version=V/split=S` layout is built.

Storage types come from the fields' bounds: an int field must say its range (ge/gt and le/lt), and
gets the narrowest of int32/int64 that holds it -- an unbounded int is refused when the schema is
derived, because the value 2**64 fits a JSON number and no Parquet column. Floats are float64 (the
models refuse NaN/Infinity), datetimes timestamp[us, UTC], strings and Literals string, bools bool,
lists/tuples of str list<string>. Every column is nullable, as the files written so far are: Parquet
stores nullability in the file, and dataset version ids hash the file bytes.

Light imports: pyarrow and pyspark are imported inside the functions that need them (DAG files import
ingest.reader, which imports this).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

StorageType = Literal["string", "int32", "int64", "float64", "bool", "timestamp", "list<string>"]
_SPARK_NAMES = {"string": "string", "int32": "int", "int64": "bigint", "float64": "double", "bool": "boolean",
                "timestamp": "timestamp", "list<string>": "array<string>"}


class ContractError(TypeError):
    """A model field that storage cannot hold as declared (say how to bound it)."""


@dataclass(frozen=True)
class Column:
    name: str
    type: StorageType
    path: tuple[str, ...]  # attribute path in the model (sampling.seed -> ("sampling", "seed"))
    encoding: Literal["plain", "json", "utc"] = "plain"


# Where a landed record came from in Kafka: Kafka's own types (partition int32, offset int64).
KAFKA_COLUMNS = (Column("_topic", "string", ()), Column("_partition", "int32", ()), Column("_offset", "int64", ()))


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        raise ContractError(f"union {tp} has no single storage type")
    return tp, False


def _unwrap(tp: Any, metadata: list) -> tuple[Any, list]:
    """Peel Annotated[...] layers, collecting their constraint metadata."""
    while typing.get_origin(tp) is typing.Annotated:
        base, *extra = typing.get_args(tp)
        for m in extra:
            metadata = metadata + list(getattr(m, "metadata", [m]))
        tp = base
    return tp, metadata


def int_bounds(metadata: list) -> tuple[int | None, int | None]:
    lo = hi = None
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo = m.gt + 1
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi = m.lt - 1
        elif isinstance(m, at.Interval):
            lo = m.ge if m.ge is not None else (m.gt + 1 if m.gt is not None else lo)
            hi = m.le if m.le is not None else (m.lt - 1 if m.lt is not None else hi)
    return lo, hi


def _int_type(metadata: list, where: str) -> StorageType:
    lo, hi = int_bounds(metadata)
    if lo is None or hi is None:
        raise ContractError(f"{where}: an int field needs both bounds (Field(ge=..., le=...)) so storage can "
                            f"pick int32 or int64; got ge={lo} le={hi}")
    for name, (a, b) in (("int32", INT32), ("int64", INT64)):
        if a <= lo and hi <= b:
            return name  # type: ignore[return-value]
    raise ContractError(f"{where}: bounds [{lo}, {hi}] exceed int64; narrow them")


def scalar_type(tp: Any, metadata: list, where: str) -> StorageType:
    tp, metadata = _unwrap(tp, metadata)
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool"
    if tp is int:
        return _int_type(metadata, where)
    if tp is float:
        return "float64"
    if tp is str or origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp)):
        return "string"
    if tp is datetime:
        return "timestamp"
    if origin in (list, tuple):
        (item, *_) = typing.get_args(tp)
        item, _ = _unwrap(item, [])
        if item is str:
            return "list<string>"
    raise ContractError(f"{where}: type {tp} has no storage mapping in ingest/contract.py")


def _fields(model: type) -> list[tuple[str, Any, list]]:
    """(name, annotation, constraint metadata) of a pydantic model or a dataclass, in declaration order."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [(n, f.annotation, list(f.metadata)) for n, f in model.model_fields.items()]
    import dataclasses

    hints = typing.get_type_hints(model, include_extras=True)
    return [(f.name, hints[f.name], []) for f in dataclasses.fields(model)]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


@cache
def columns(model: type, with_kafka: bool = False) -> tuple[Column, ...]:
    """The flat storage columns of a model (rules in the module docstring)."""
    out: list[Column] = []

    def walk(m: type, prefix: tuple[str, ...]) -> None:
        for name, ann, meta in _fields(m):
            where = f"{model.__name__}.{'.'.join((*prefix, name))}"
            tp, meta = _unwrap(ann, meta)
            tp, _ = _strip_optional(tp)
            tp, meta = _unwrap(tp, meta)
            if typing.get_origin(tp) is Literal and len(typing.get_args(tp)) == 1:
                continue  # a constant: the table it lands in says it
            if _is_model(tp):
                walk(tp, (*prefix, name))
                continue
            if typing.get_origin(tp) is list and _is_model(_unwrap(typing.get_args(tp)[0], [])[0]):
                out.append(Column(f"{name}_json", "string", (*prefix, name), "json"))
                continue
            kind = scalar_type(tp, meta, where)
            out.append(Column(name, kind, (*prefix, name), "utc" if kind == "timestamp" else "plain"))

    walk(model, ())
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ContractError(f"{model.__name__}: flattening gives duplicate columns {dup}; rename the fields")
    return tuple(out) + (KAFKA_COLUMNS if with_kafka else ())


def arrow_schema(model: type, with_kafka: bool = False):  # noqa: ANN201 - pa.Schema (lazy import)
    import pyarrow as pa

    types_ = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
              "bool": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC"), "list<string>": pa.list_(pa.string())}
    return pa.schema([(c.name, types_[c.type]) for c in columns(model, with_kafka)])


def spark_ddl(model: type, with_kafka: bool = False) -> str:
    """Spark's DDL string of the model's columns ("event_id string, created_at timestamp, ...")."""
    return ", ".join(f"{c.name} {_SPARK_NAMES[c.type]}" for c in columns(model, with_kafka))


def spark_schema(model: type, with_kafka: bool = False):  # noqa: ANN201 - StructType (lazy import)
    from pyspark.sql import types as T

    types_ = {"string": T.StringType(), "int32": T.IntegerType(), "int64": T.LongType(),
              "float64": T.DoubleType(), "bool": T.BooleanType(), "timestamp": T.TimestampType(),
              "list<string>": T.ArrayType(T.StringType())}
    return T.StructType([T.StructField(c.name, types_[c.type]) for c in columns(model, with_kafka)])


def spark_types(model: type) -> dict[str, str]:
    """{column: Spark type name}, as manifests record a dataset's schema."""
    return {c.name: _SPARK_NAMES[c.type] for c in columns(model)}


# --- events <-> landing rows -----------------------------------------------------------------------

@cache
def _getters(model: type) -> tuple[tuple[str, Any], ...]:
    def getter(col: Column):  # noqa: ANN202
        *parents, leaf = col.path

        def get(ev):  # noqa: ANN001, ANN202
            obj = ev
            for p in parents:
                obj = getattr(obj, p)
                if obj is None:
                    return None
            value = getattr(obj, leaf)
            if value is None:
                return None
            if col.encoding == "utc":
                return value.astimezone(UTC)
            if col.encoding == "json":
                return json.dumps([m.model_dump(mode="json") for m in value], ensure_ascii=False)
            return value

        return get

    return tuple((c.name, getter(c)) for c in columns(model))


def to_row(ev: BaseModel) -> dict[str, Any]:
    """The flat storage row of a validated model instance (without Kafka coordinates)."""
    return {name: get(ev) for name, get in _getters(type(ev))}


def from_row(model: type[BaseModel], row: dict[str, Any]) -> BaseModel:
    """The model instance a storage row holds (inverse of `to_row`; constants from their defaults)."""
    data: dict[str, Any] = {}
    for c in columns(model):
        *parents, leaf = c.path
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        value = row[c.name]
        node[leaf] = json.loads(value) if c.encoding == "json" and value is not None else value
    return model.model_validate(data)


# --- dataset rows ------------------------------------------------------------------------------------

class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DpoRow(_Row):
    """One preference pair: chosen beats rejected for the prompt."""

    prompt_id: str
    prompt_json: str = Field(description="JSON list of {role, content}: the conversation before the answer")
    chosen: str
    rejected: str
    weight: float = Field(ge=0.0)
    source: str
    chosen_policy: str | None = Field(
        default=None, description="adapter version that wrote the chosen answer ('base' for none); null for a user's edit")
    chosen_logprob: float | None = Field(
        default=None, le=0.0, description="the chosen answer's summed token log-probability under chosen_policy (null when cut off)")
    rejected_policy: str | None = None
    rejected_logprob: float | None = Field(default=None, le=0.0)


class KtoRow(_Row):
    """One unpaired answer with a desirable/undesirable label."""

    prompt_id: str
    prompt_json: str
    completion: str
    label: bool
    weight: float = Field(ge=0.0)
    source: str
    policy: str | None = Field(default=None, description="adapter version that wrote the answer ('base' for none)")
    logprob: float | None = Field(default=None, le=0.0, description="its summed token log-probability under policy")


class SftRow(_Row):
    """One answer to imitate."""

    prompt_id: str
    prompt_json: str
    completion: str
    weight: float = Field(ge=0.0)
    source: str


DATASET_ROWS: dict[str, type[_Row]] = {"dpo": DpoRow, "kto": KtoRow, "sft": SftRow}
DATASET_KINDS = tuple(DATASET_ROWS)
DATASET_SPLITS = ("train", "eval")


def dataset_path(root: str | Path, kind: str, version: str, split: str | None = None) -> Path:
    """`root/<kind>/version=<V>[/split=<S>]`: the one place the dataset layout is spelled."""
    if kind not in DATASET_ROWS:
        raise ValueError(f"dataset kind {kind!r} is not one of {DATASET_KINDS}")
    folder = Path(root) / kind / f"version={version}"
    if split is None:
        return folder
    if split not in DATASET_SPLITS:
        raise ValueError(f"dataset split {split!r} is not one of {DATASET_SPLITS}")
    return folder / f"split={split}"
