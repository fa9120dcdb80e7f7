"""KTO: class balancing by hand, and a job on the tiny model with imbalanced unpaired rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ingest import endpoints
from ingest.config import load_config
from training import registry
from training.kto import balanced_weights

REPO = Path(__file__).resolve().parent.parent


def test_balanced_weights_by_hand() -> None:
    """30 desirable / 10 undesirable -> undesirable x3 (30 * 1 == 10 * 3); 5 / 20 -> desirable x4; one class -> 1, 1."""
    assert balanced_weights(30, 10) == (1.0, 3.0)
    assert balanced_weights(5, 20) == (4.0, 1.0)
    assert balanced_weights(7, 0) == (1.0, 1.0)


def test_kto_job_on_imbalanced_rows(stack, tiny_model: str, tmp_path: Path) -> None:  # noqa: ANN001
    from training import kto
    from training.synthetic import TOPICS, preference_rows, write_dataset, write_rows

    root = endpoints.var_dir() / "datasets"
    version = "ds-test-kto1"
    write_dataset(root, version, n_train=24, n_eval=8, seed=2, kinds=("kto",))
    # Keep every desirable row but only a third of the undesirable ones, plus one weight-0 row (dropped).
    rows = preference_rows(24, TOPICS[:20], 2, "train")["kto"]
    desirable = [r for r in rows if r["label"]]
    undesirable = [r for r in rows if not r["label"]][:8]
    write_rows(root, version, "kto", "train", [*desirable, *undesirable, {**undesirable[0], "prompt_id": "z0",
                                                                           "weight": 0.0}])
    manifest_path = root / "manifests" / f"{version}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["kto"]["train"] = 24 + 8 + 1
    manifest_path.write_text(json.dumps(manifest))

    cfg = load_config(kto.Config, REPO / "training" / "configs" / "kto.yaml",
                      [f"dataset_version={version}", f"output_dir={tmp_path / 'kto'}", "registry_model=flywheel-test-kto",
                       "precision=fp32", "max_steps=8"])
    result = kto.main(cfg)
    m = result["metrics"]
    assert (m["desirable_weight"], m["undesirable_weight"]) == (1.0, 3.0)  # 24 vs 8 after dropping weight 0
    assert m["heldout_rewards_margins"] > 0
    lora = load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())
    assert registry.read_sidecar(result["adapter_dir"])["trainer"] == "kto"
    assert registry.aliases("flywheel-test-kto")["candidate"] == result["model_version"]
    run = registry.client().get_run(result["run_id"])
    assert run.data.params["undesirable_weight"] == "3.0"
    assert run.data.metrics["train_steps"] == pytest.approx(8)


def test_kto_configs_load() -> None:
    from training.kto import Config

    for path in sorted((REPO / "training" / "configs").glob("kto*.yaml")):
        assert path.read_text().startswith("# python -m training.kto"), path
        load_config(Config, path)
