"""SFT: a LoRA job on the tiny model's SFT rows (edits and strong positives), tracked and registered like
the others; the held-out loss falls, the LoRA weights move and the base does not; a killed run resumes
to the same result as an unkilled one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ingest import endpoints
from ingest.config import load_config
from tests.conftest import run_killed_at_step
from training import registry

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "sft.yaml"
MODEL = "flywheel-test-sft"


@pytest.fixture(scope="module")
def sft_dataset(stack) -> str:  # noqa: ANN001
    from training.synthetic import write_dataset

    version = "ds-test-sft1"
    write_dataset(endpoints.var_dir() / "datasets", version, n_train=32, n_eval=12, seed=3, kinds=("sft",))
    return version


def _run(version: str, out: Path, *overrides: str) -> dict:
    from training import sft

    cfg = load_config(sft.Config, CONFIG, [f"dataset_version={version}", f"output_dir={out}",
                                           f"registry_model={MODEL}", "precision=fp32", *overrides])
    return sft.main(cfg)


def test_sft_job_learns_the_answers_registers_and_leaves_the_base_alone(sft_dataset: str, tiny_model: str,
                                                                        tmp_path: Path, monkeypatch) -> None:
    from trl import SFTTrainer

    held: dict[str, dict[str, torch.Tensor]] = {}

    class Recording(SFTTrainer):
        """TRL's own trainer, recording every parameter it holds around train()."""

        def train(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            held["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            out = super().train(*args, **kwargs)
            held["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            return out

    monkeypatch.setattr("trl.SFTTrainer", Recording)  # training.sft imports it inside main()
    result = _run(sft_dataset, tmp_path / "first", "max_steps=12")
    monkeypatch.undo()
    assert held, "the job did not train with TRL's SFTTrainer"
    m = result["metrics"]
    assert m["heldout_loss"] < 0.9 * m["heldout_before_loss"], m  # the answers of unseen prompts got likelier
    before, after = held["before"], held["after"]
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and len(base) > 10
    assert all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in base)
    saved = load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))
    trained = {n.replace(".default.", "."): t for n, t in after.items() if "lora_" in n}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    sidecar = json.loads((Path(result["adapter_dir"]) / registry.SIDECAR).read_text())
    assert sidecar["trainer"] == "sft" and sidecar["dataset_version"] == sft_dataset
    assert registry.aliases(MODEL)["candidate"] == result["model_version"]
    run = registry.client().get_run(result["run_id"])
    assert run.data.tags["trainer"] == "sft" and run.data.metrics["train_steps"] == pytest.approx(12)
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == [f"sft/eval@{sft_dataset}",
                                                                          f"sft/train@{sft_dataset}"]
    # A DAG retry of the finished job changes nothing.
    assert _run(sft_dataset, tmp_path / "first", "max_steps=12")["model_version"] == result["model_version"]


def test_killed_sft_run_resumes_to_the_same_adapter(sft_dataset: str, tiny_model: str, tmp_path: Path) -> None:
    """kill -9 after step 5 (checkpoint at 4), re-run -> resumes at 4, ends equal to an unkilled run."""
    args = ["max_steps=6", "save_steps=4", "register=false", "eval_before=false", "init_from=base"]
    unkilled = _run(sft_dataset, tmp_path / "unkilled", *args)
    killed = tmp_path / "killed"
    proc = run_killed_at_step("training.sft", 5, "--config", str(CONFIG), f"dataset_version={sft_dataset}",
                              f"output_dir={killed}", f"registry_model={MODEL}", "precision=fp32", *args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoints" / "checkpoint-4").is_dir() and not (killed / "result.json").exists()
    resumed = _run(sft_dataset, killed, *args)
    for key in ("train_loss", "final_step_loss", "heldout_loss", "train_steps"):
        assert resumed["metrics"][key] == pytest.approx(unkilled["metrics"][key], rel=1e-5, abs=1e-6), key
    a = load_file(str(Path(unkilled["adapter_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["adapter_dir"]) / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
