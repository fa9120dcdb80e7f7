"""Multi-process training: `accelerate launch --num_processes 2 --cpu` (gloo) runs the DPO job on the
tiny model as data-parallel ranks. Rank 0 alone tracks and registers, so there is one MLflow run and
one model version, and the result matches one process on the same global batch (2 x 4 pairs vs 1 x 8).
On GPUs the same command runs with `--num_processes <GPUs>` and no `--cpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest import endpoints
from training import registry

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "dpo.yaml"
MODEL = "flywheel-test-ddp"
EXPERIMENT = "flywheel-test-ddp"
# Same pairs per optimiser step and the same data order; what differs is the order of float sums
# (gradients are all-reduced) and per-rank loss normalisation by the pairs' weights.
LOSS_TOLERANCE = 0.02
# `accelerate launch --cpu --num_processes 2` starts one process (accelerate 1.15 launches several CPU
# processes only through mpirun); its multi-process launcher is torch.distributed.run, which works on
# CPU as it does on GPUs: WORLD_SIZE/RANK in the environment, and the Trainer picks gloo on CPU.
LAUNCH_2 = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def ddp_dataset(stack) -> str:  # noqa: ANN001
    from training.synthetic import write_dataset

    write_dataset(endpoints.var_dir() / "datasets", "ds-test-ddp1", n_train=32, n_eval=8, seed=5, kinds=("dpo",))
    return "ds-test-ddp1"


def _job(launcher: list[str], version: str, out: Path, *overrides: str) -> dict:
    args = [*launcher, "-m", "training.dpo", "--config", str(CONFIG), f"dataset_version={version}",
            f"output_dir={out}", f"registry_model={MODEL}", f"experiment={EXPERIMENT}", "precision=fp32",
            "max_steps=4", "eval_before=false", "threads=1", *overrides]
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the contract the DAG reads: the last line


def test_two_process_dpo_is_one_run_one_version_and_matches_one_process(ddp_dataset: str, tiny_model: str,
                                                                        tmp_path: Path) -> None:
    single = _job([sys.executable], ddp_dataset, tmp_path / "one", "batch_size=8", "register=false")
    double = _job(LAUNCH_2, ddp_dataset, tmp_path / "two", "batch_size=4")

    assert double["metrics"]["train_steps"] == single["metrics"]["train_steps"] == 4
    for key in ("train_loss", "heldout_loss"):
        assert double["metrics"][key] == pytest.approx(single["metrics"][key], rel=LOSS_TOLERANCE), key
    versions = registry.find_versions({"dataset_version": ddp_dataset}, name=MODEL)
    assert [v.version for v in versions] == [double["model_version"]]
    runs = registry.client().search_runs(
        [registry.client().get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.dataset_version = '{ddp_dataset}'")
    assert sorted(r.info.run_id for r in runs) == sorted([single["run_id"], double["run_id"]])
    assert registry.client().get_run(double["run_id"]).data.params["n_devices"] == "2"
