"""MLflow model-registry helpers for LoRA adapters: register, resolve aliases, download, move aliases.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) plus a sidecar
`flywheel_adapter.json` (base model, dataset version, config hash, eval scores). It is logged as
the artifact `adapter/` of its training run and registered as a version of the registered model
(default name `flywheel-assistant`). Aliases say what is served:

  champion    what serving answers with
  candidate   the newest trained version (set at registration); not served
  challenger  the version under a live canary (set by `training.canary` when the offline gate passes):
              served to the share of users in the registered model's `canary.share` tag
  previous    the champion before the last promotion (rollback target)

Serving imports this module (docs/architecture.md allows it: it needs only mlflow, no training code).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ingest import endpoints

DEFAULT_MODEL_NAME = os.environ.get("FLYWHEEL_MODEL_NAME", "flywheel-assistant")
SIDECAR = "flywheel_adapter.json"
ALIASES = ("champion", "challenger", "candidate", "previous")


def client() -> MlflowClient:
    mlflow.set_tracking_uri(endpoints.mlflow_tracking_uri())
    return MlflowClient(tracking_uri=endpoints.mlflow_tracking_uri())


@dataclass(frozen=True)
class AdapterRef:
    """One registered adapter version."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        """Stable, unique label, e.g. `flywheel-assistant/3`; used as PEFT adapter name and in events."""
        return f"{self.name}/{self.version}"


def _ref(mv) -> AdapterRef:  # noqa: ANN001 - mlflow ModelVersion
    return AdapterRef(name=mv.name, version=str(mv.version), source=mv.source, run_id=mv.run_id,
                      tags=dict(mv.tags or {}))


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@alias` -> (NAME, None, alias); `models:/NAME/3` -> (NAME, "3", None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/NAME@alias or models:/NAME/VERSION)")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise ValueError(f"registry URI {uri!r} names no version or alias")


def resolve(uri_or_alias: str, name: str = DEFAULT_MODEL_NAME) -> AdapterRef | None:
    """The version behind `models:/NAME@alias`, `models:/NAME/V` or a bare alias; None if the alias is unset."""
    if uri_or_alias.startswith("models:/"):
        name, version, alias = parse_model_uri(uri_or_alias)
    else:
        version, alias = (uri_or_alias, None) if uri_or_alias.isdigit() else (None, uri_or_alias)
    c = client()
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise
    return _ref(mv)


def download(ref: AdapterRef, dst: str | Path) -> Path:
    """Download an adapter folder (idempotent: an existing complete folder is reused)."""
    dst = Path(dst) / ref.name / ref.version
    if (dst / "adapter_config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(tmp),
                                                tracking_uri=endpoints.mlflow_tracking_uri())
    Path(local).rename(dst) if Path(local) != tmp else tmp.rename(dst)
    if tmp.exists():
        tmp.rmdir()
    if not (dst / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{ref.uri} ({ref.source}) holds no adapter_config.json")
    return dst


def read_sidecar(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}


def register_adapter(adapter_dir: str | Path, run_id: str, name: str = DEFAULT_MODEL_NAME,
                     alias: str | None = "candidate", tags: dict[str, str] | None = None,
                     artifact_path: str = "adapter") -> AdapterRef:
    """Log `adapter_dir` as artifact `adapter/` of `run_id` and register it as a new version.

    mlflow.register_model needs a logged model, so the version is created from the artifact folder
    directly: create_model_version with the run's artifact URI.
    """
    c = client()
    c.log_artifacts(run_id, str(adapter_dir), artifact_path=artifact_path)
    try:
        c.create_registered_model(name, description="LoRA adapters trained from user feedback by Flywheel")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    run = c.get_run(run_id)
    all_tags = {**(tags or {}), **{k: str(v) for k, v in read_sidecar(adapter_dir).items()
                                   if isinstance(v, str | int | float)}}
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                tags=all_tags)
    for _ in range(50):  # wait until READY (immediate for file stores, but be safe)
        mv = c.get_model_version(name, mv.version)
        if mv.status == "READY":
            break
        time.sleep(0.1)
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    return _ref(mv)


def set_alias(alias: str, version: str, name: str = DEFAULT_MODEL_NAME) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def delete_alias(alias: str, name: str = DEFAULT_MODEL_NAME) -> None:
    with contextlib.suppress(MlflowException):
        client().delete_registered_model_alias(name, alias)


def aliases(name: str = DEFAULT_MODEL_NAME) -> dict[str, str]:
    """alias -> version for the registered model ({} when it does not exist yet)."""
    try:
        rm = client().get_registered_model(name)
    except MlflowException:
        return {}
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


CANARY_TAGS = ("canary.version", "canary.share", "canary.started_at", "canary.run_id", "canary.reason",
               "canary.last_window_end")


@dataclass(frozen=True)
class Canary:
    """A live experiment: `version` (the challenger) answers `share` of the users since `started_at`."""

    version: str
    share: float
    started_at: str
    run_id: str = ""
    last_window_end: str = ""


def canary(name: str = DEFAULT_MODEL_NAME) -> Canary | None:
    """The canary recorded on the registered model's tags, if one is live (None otherwise).

    The tags live on the registered model, not in serving's config, so that every replica follows a
    canary that starts, changes share or ends without a restart.
    """
    try:
        tags = client().get_registered_model(name).tags or {}
    except MlflowException:
        return None
    if not tags.get("canary.version"):
        return None
    return Canary(version=tags["canary.version"], share=float(tags.get("canary.share", "0") or 0),
                  started_at=tags.get("canary.started_at", ""), run_id=tags.get("canary.run_id", ""),
                  last_window_end=tags.get("canary.last_window_end", ""))


def set_canary_tags(tags: dict[str, str], name: str = DEFAULT_MODEL_NAME) -> None:
    c = client()
    for k, v in tags.items():
        c.set_registered_model_tag(name, k, str(v))


def clear_canary(name: str = DEFAULT_MODEL_NAME) -> None:
    """End the live experiment: the challenger alias and every canary tag go; the champion stays."""
    c = client()
    delete_alias("challenger", name)
    for k in CANARY_TAGS:
        with contextlib.suppress(MlflowException):
            c.delete_registered_model_tag(name, k)


def find_versions(tags: dict[str, str], name: str = DEFAULT_MODEL_NAME) -> list[AdapterRef]:
    """Registered versions whose tags include all of `tags`, newest first (idempotent re-runs use this).

    The server filters (one query, however many versions the model has); the exact comparison here
    only guards against a server whose filter is looser than equality."""
    def quoted(v: str) -> str:
        return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"

    query = " and ".join([f"name = {quoted(name)}", *(f"tags.`{k}` = {quoted(v)}" for k, v in tags.items())])
    c = client()
    try:
        found = c.search_model_versions(query)
    except MlflowException:
        return []
    refs = [_ref(mv) for mv in found if all((mv.tags or {}).get(k) == v for k, v in tags.items())]
    return sorted(refs, key=lambda r: int(r.version), reverse=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.registry aliases|find|resolve`: inspect the registry; last line is JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.registry", description=main.__doc__)
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="registered model name")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("aliases", help="alias -> version")
    p_find = sub.add_parser("find", help="newest version whose tags match every --tag KEY=VALUE")
    p_find.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    p_res = sub.add_parser("resolve", help="version behind models:/NAME@alias or an alias")
    p_res.add_argument("uri")
    args = parser.parse_args(argv)
    if args.cmd == "aliases":
        print(json.dumps(aliases(args.name)))
    elif args.cmd == "find":
        tags = dict(t.split("=", 1) for t in args.tag)
        refs = find_versions(tags, args.name)
        print(json.dumps({"model_version": refs[0].version if refs else None,
                          "all": [r.version for r in refs]}))
    elif args.cmd == "resolve":
        ref = resolve(args.uri, args.name)
        print(json.dumps({"model_version": ref.version if ref else None, "source": ref.source if ref else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
