"""The typed job config loader, and every committed config file loads into its job's Config."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from ingest.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Lora:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclasses.dataclass
class Job:
    """A job.

    Data: name, steps.  Model: lora.
    """

    name: str = "x"
    steps: int = 10
    lr: float = 1e-4
    bf16: bool | None = None
    out: Path = Path("var/out")
    lora: Lora = dataclasses.field(default_factory=Lora)


def test_defaults_yaml_and_overrides(tmp_path: Path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("name: from-file\nsteps: 20\nlora:\n  r: 16\n")
    cfg = load_config(Job, cfg_file, ["steps=30", "lr=3e-4", "bf16=true", "lora.targets=[a, b]"])
    assert cfg == Job(name="from-file", steps=30, lr=3e-4, bf16=True, out=Path("var/out"),
                      lora=Lora(r=16, alpha=16.0, targets=["a", "b"]))
    assert load_config(Job, None, ["bf16=null"]).bf16 is None


def test_a_sentence_with_a_colon_stays_a_string():
    """`name=judge: none, evidence: better` is text (YAML would read it as a mapping); a value written
    as a mapping or list still parses as one, and then fails a str field."""
    assert load_config(Job, None, ["name=judge: none, evidence: better"]).name == "judge: none, evidence: better"
    assert load_config(Job, None, ["name=- item"]).name == "- item"
    with pytest.raises(ConfigError, match="name: expected a string"):
        load_config(Job, None, ["name={a: 1}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stepz=3"], "unknown config key(s) stepz"),
        (["lora.rank=3"], "unknown config key(s) lora.rank"),
        (["steps=many"], "steps: expected int"),
        (["steps=1.5"], "steps: expected an integer"),
        (["bf16=maybe"], "bf16"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_config_is_an_error(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(Job, None, overrides)


def test_missing_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")


def test_cli_help_lists_keys(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        parse_config(Job, ["--help"])
    out = capsys.readouterr().out
    assert "steps = 10" in out and "lora = " in out


def _config_files() -> list[Path]:
    return sorted(p for pkg in ("ingest", "training", "serving", "infra")
                  for p in (REPO / pkg / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads(path: Path):
    """`<pkg>/configs/<job>[.<variant>].yaml` must load into `<pkg>.<job>.Config` (no rotten keys)."""
    pkg = path.relative_to(REPO).parts[0]
    job = path.name.split(".")[0]
    module = importlib.import_module(f"{pkg}.{job}")
    cfg = load_config(module.Config, path)
    assert dataclasses.is_dataclass(cfg)
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path} should start with a comment giving the command that runs it"
