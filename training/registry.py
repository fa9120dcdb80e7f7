"""MLflow model-registry helpers for LoRA adapters: register, resolve aliases, download, move aliases.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) plus a sidecar
`flywheel_adapter.json` (base model, dataset version, config hash, eval scores). It is logged as an
MLflow logged model of its training run (pyfunc flavour, `training/adapter_model.py`, with a
signature; the folder is the model's artifact `adapter`) and registered as a version of the
registered model (default name `flywheel-assistant`). Aliases say what is served:

  champion    what serving answers with
  candidate   the newest trained version (set at registration); not served
  challenger  the version under a live canary (set by `training.canary` when the offline gate passes):
              served to the share of users in the registered model's `canary.share` tag
  previous    the champion before the last promotion (rollback target)

Serving imports this module (docs/architecture.md allows it: it needs only mlflow, no training code).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from ingest import endpoints

DEFAULT_MODEL_NAME = os.environ.get("FLYWHEEL_MODEL_NAME", "flywheel-assistant")
SIDECAR = "flywheel_adapter.json"
ALIASES = ("champion", "challenger", "candidate", "previous")
ADAPTER_MODEL_CODE = Path(__file__).with_name("adapter_model.py")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt")]),
    outputs=Schema([ColSpec(DataType.string, "answer")]),
    params=ParamSchema([ParamSpec("max_tokens", DataType.long, 128),
                        ParamSpec("temperature", DataType.double, 0.0)]),
)
# Named, not inferred: inference would load the model in a subprocess at every registration.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "pandas")


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


def _adapter_folder(local: Path) -> Path | None:
    """The adapter inside a downloaded version: the logged model's artifact `adapter` (where its MLmodel
    says), or the folder itself for a version registered from a bare run artifact folder."""
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        artifacts = mlflow.models.Model.load(str(mlmodel)).flavors.get("python_function", {}).get("artifacts", {})
        local = local / artifacts.get("adapter", {}).get("path", "artifacts/adapter")
    return local if (local / "adapter_config.json").is_file() else None


def download(ref: AdapterRef, dst: str | Path) -> Path:
    """Download a version's adapter folder to `dst/NAME/VERSION` (idempotent: an existing complete folder
    is reused). A logged model holds the folder as its artifact `adapter`; a version registered from a
    bare run artifact folder is that folder."""
    dst = Path(dst) / ref.name / ref.version
    if (dst / "adapter_config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(tmp),
                                                     tracking_uri=endpoints.mlflow_tracking_uri()))
    folder = _adapter_folder(local)
    if folder is None:
        found = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())[:20]
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{ref.uri} ({ref.source}) holds no adapter_config.json; it holds {found}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return dst


def read_sidecar(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}


def log_adapter_model(adapter_dir: str | Path, run_id: str, artifact_name: str = "adapter"):  # -> ModelInfo
    """Log `adapter_dir` as a logged model of `run_id` (pyfunc, `training/adapter_model.py`, SIGNATURE)."""
    import mlflow.pyfunc

    active = mlflow.active_run()
    in_run = (contextlib.nullcontext() if active is not None and active.info.run_id == run_id
              else mlflow.start_run(run_id=run_id))
    with in_run, warnings.catch_warnings():
        # No input example, on purpose: MLflow would load the base model and generate to check it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=artifact_name, python_model=str(ADAPTER_MODEL_CODE), artifacts={"adapter": str(adapter_dir)},
            signature=SIGNATURE, pip_requirements=[f"{p}=={importlib.metadata.version(p)}" for p in MODEL_REQUIREMENTS],
            tags={"flywheel.kind": "lora-adapter"})


def register_adapter(adapter_dir: str | Path, run_id: str, name: str = DEFAULT_MODEL_NAME,
                     alias: str | None = "candidate", tags: dict[str, str] | None = None,
                     artifact_path: str = "adapter") -> AdapterRef:
    """Log `adapter_dir` as a logged model of `run_id` and register it as a new version of `name`,
    tagged with `tags` and the sidecar's scalar fields; `alias` (if any) moves to it."""
    info = log_adapter_model(adapter_dir, run_id, artifact_path)
    return _new_version(name, info.model_uri, run_id, adapter_dir, alias, tags, model_id=info.model_id,
                        description="LoRA adapters trained from user feedback by Flywheel")


def register_folder(folder: str | Path, run_id: str, name: str, alias: str | None = "candidate",
                    tags: dict[str, str] | None = None, artifact_path: str = "model",
                    description: str = "") -> AdapterRef:
    """Log `folder` as the run artifact `artifact_path` and register that folder as a new version of
    `name` (a model that is not an adapter, e.g. a reward model: downloading the version gives the folder)."""
    c = client()
    c.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return _new_version(name, source, run_id, folder, alias, tags, description=description)


def _new_version(name: str, source: str, run_id: str, folder: str | Path, alias: str | None,
                 tags: dict[str, str] | None, model_id: str | None = None, description: str = "") -> AdapterRef:
    c = client()
    try:
        c.create_registered_model(name, description=description or None)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    all_tags = {**(tags or {}), **{k: str(v) for k, v in read_sidecar(folder).items()
                                   if isinstance(v, str | int | float)}}
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=all_tags, model_id=model_id)
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
