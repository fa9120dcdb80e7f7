"""Shared training helpers: hardware/precision choice, config hashes, checkpoint discovery."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ingest.config import load_config
from training import common
from training.dpo import Config


def test_detect_hardware_on_this_machine() -> None:
    hw = common.detect_hardware("fp32")
    assert (hw.device, hw.precision, hw.n_devices) == ("cpu" if not torch.cuda.is_available() else "cuda", "fp32", 1)
    auto = common.detect_hardware("auto")
    if auto.device == "cpu":
        assert auto.precision == ("bf16" if common.cpu_has_bf16() else "fp32")
        with pytest.raises(ValueError, match="needs a GPU"):
            common.detect_hardware("fp16")
        assert common.trainer_device_kwargs(auto) == {"use_cpu": True, "bf16": auto.precision == "bf16",
                                                      "fp16": False}
    with pytest.raises(ValueError, match="precision"):
        common.detect_hardware("fp8")


def test_config_hash_ignores_paths_but_not_settings() -> None:
    a = load_config(Config, None, ["output_dir=/tmp/a"])
    b = load_config(Config, None, ["output_dir=/tmp/b", "run_name=x"])
    c = load_config(Config, None, ["beta=0.2"])
    d = load_config(Config, None, ["lora.r=4"])
    assert common.config_hash(a) == common.config_hash(b)
    assert len({common.config_hash(a), common.config_hash(c), common.config_hash(d)}) == 3


def test_last_checkpoint_takes_the_newest_complete_one(tmp_path: Path) -> None:
    assert common.last_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (20, True), (100, False)):  # 100: killed while writing
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert common.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")


def test_resolve_start_base_needs_no_registry(tmp_path: Path) -> None:
    start = common.resolve_start("base", "flywheel-assistant", "tiny", tmp_path)
    assert start.adapter_dir is None and start.label == "base"


def test_start_mlflow_run_reopens_only_what_exists_and_lets_real_errors_through(tmp_path: Path, monkeypatch) -> None:
    """The recorded run is re-opened; a deleted run or one the server does not know gets a fresh run;
    any other tracking error propagates instead of silently starting a second run."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = tmp_path / "state"

    def start() -> str:
        with common.start_mlflow_run("exp-reopen", "r", state, {}) as run:
            return run.info.run_id

    first = start()
    assert (state / "mlflow_run_id").read_text() == first
    assert start() == first  # after a kill: the same run
    MlflowClient().delete_run(first)
    second = start()
    assert second != first and (state / "mlflow_run_id").read_text() == second
    (state / "mlflow_run_id").write_text("0" * 32)  # an id from another server
    third = start()
    assert third not in (first, second)

    def unavailable(self, run_id):  # noqa: ANN001, ANN202 - what a tracking server answering 503 raises
        raise MlflowException("API request failed with error code 503", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_run", unavailable)
    with pytest.raises(MlflowException, match="503"):
        start()
    assert (state / "mlflow_run_id").read_text() == third  # nothing was started over it
    assert mlflow.active_run() is None
