"""Read a dataset version (what training uses): Parquet of the shared contract -> `datasets.Dataset`.

    from ingest import reader
    v = reader.latest_version()                  # newest manifest, or None
    ds = reader.load(v, "dpo", "train")          # TRL conversational format
    reader.manifest(v)                           # counts, filters, sha256, window, schema, ...

Layout (written by ingest/build_dataset.py; root = `endpoints.var_dir()/"datasets"`):
    datasets/<dpo|kto|sft>/version=<V>/split=<train|eval>/*.parquet
    datasets/manifests/<V>.json

Columns returned: dpo -> prompt (list of messages), chosen / rejected ([assistant message]), weight,
prompt_id; kto -> prompt, completion ([assistant message]), label, weight, prompt_id; sft -> prompt,
completion, weight, prompt_id. Rows come sorted by (prompt_id, content), so a version always yields
the same order. Light imports only (pyarrow, and `datasets` inside `load`): DAG files import this.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ingest import endpoints
from ingest.contract import DATASET_KINDS as KINDS
from ingest.contract import DATASET_SPLITS as SPLITS
from ingest.contract import dataset_path


def datasets_dir(root: str | Path | None = None) -> Path:
    return Path(root) if root else endpoints.var_dir() / "datasets"


def manifest(version: str, root: str | Path | None = None) -> dict[str, Any]:
    """The manifest of a version; raises FileNotFoundError naming what exists when it is not there."""
    path = datasets_dir(root) / "manifests" / f"{version}.json"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))[-5:]
        raise FileNotFoundError(f"dataset version {version!r} has no manifest at {path}; build one with "
                                f"`python -m ingest.build_dataset start=... end=...` (recent: {known or 'none'})")
    return json.loads(path.read_text())


def identity(version: str, kind: str, split: str, root: str | Path | None = None) -> dict[str, str]:
    """The one MLflow identity of a split of a version, logged by the builder and by every trainer that
    reads it, so that MLflow ties the dataset to each run that built or used it: name
    `<kind>/<split>@<version>`, a digest of the manifest's content hash, and the split's folder as source."""
    content = manifest(version, root).get("sha256", version)
    return {"name": f"{kind}/{split}@{version}",
            "digest": hashlib.sha256(f"{content}/{kind}/{split}".encode()).hexdigest()[:32],
            "source": str(dataset_path(datasets_dir(root), kind, version, split))}


def versions(root: str | Path | None = None) -> list[str]:
    """All built versions, oldest first (by the manifest's created_at, then file time)."""
    entries = []
    for p in (datasets_dir(root) / "manifests").glob("ds-*.json"):
        try:
            created = json.loads(p.read_text()).get("created_at", "")
        except (OSError, json.JSONDecodeError):
            continue  # a manifest being written is renamed into place whole; skip anything unreadable
        entries.append((created, p.stat().st_mtime, p.stem))
    return [v for *_, v in sorted(entries)]


def latest_version(root: str | Path | None = None, trainable_only: bool = False) -> str | None:
    """The newest version (optionally the newest with "trainable": true), or None if none was built."""
    for v in reversed(versions(root)):
        if not trainable_only or manifest(v, root).get("trainable"):
            return v
    return None


def load_rows(version: str, kind: str, split: str, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The raw contract rows (prompt_json, chosen, ...) of one kind and split, in a stable order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"kind={kind!r} split={split!r}: kind must be one of {KINDS}, split one of {SPLITS}")
    manifest(version, root)  # a clear error for an unknown version
    folder = dataset_path(datasets_dir(root), kind, version, split)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no Parquet files although the manifest exists; the version "
                                f"is incomplete -- rebuild it (delete the manifest and run ingest.build_dataset)")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["prompt_id"], json.dumps(r, sort_keys=True, default=str)))
    return rows


def to_conversational(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """One contract row in TRL's conversational format."""
    out: dict[str, Any] = {"prompt_id": row["prompt_id"], "prompt": json.loads(row["prompt_json"]),
                           "weight": float(row["weight"])}
    if kind == "dpo":
        out["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        out["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
    else:
        out["completion"] = [{"role": "assistant", "content": row["completion"]}]
        if kind == "kto":
            out["label"] = bool(row["label"])
    return out


def load(version: str, kind: str = "dpo", split: str = "train", root: str | Path | None = None,  # noqa: ANN201
         behaviour: bool = False):
    """A `datasets.Dataset` of one kind and split of a version (possibly with 0 rows). With `behaviour`,
    DPO rows also carry `chosen_logprob` / `rejected_logprob`: each answer's log-probability under the
    policy that wrote it, None for a user's edit (off-policy corrections)."""
    from datasets import Dataset, Features, List, Value

    raw = load_rows(version, kind, split, root)
    rows = [to_conversational(kind, r) for r in raw]
    message = {"role": Value("string"), "content": Value("string")}
    features = {"prompt_id": Value("string"), "prompt": List(message), "weight": Value("float64")}
    if kind == "dpo" and behaviour:
        features |= {"chosen_logprob": Value("float64"), "rejected_logprob": Value("float64")}
        for out, r in zip(rows, raw, strict=True):
            out |= {"chosen_logprob": r.get("chosen_logprob"), "rejected_logprob": r.get("rejected_logprob")}
    if kind == "dpo":
        features |= {"chosen": List(message), "rejected": List(message)}
    else:
        features["completion"] = List(message)
        if kind == "kto":
            features["label"] = Value("bool")
    # from_dict (not from_list): an empty split must still carry its columns
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=Features(features))
