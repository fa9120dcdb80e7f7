"""A multi-cycle demo's bookkeeping (infra/cycles.py) against a real MLflow: the champion's figures come
from the side of the evaluation that serves after the cycle, dataset shares from the manifest, and the
parent run holds one step per cycle plus the records and the plot."""

from __future__ import annotations

import json

import pytest

from infra import cycles
from ingest import endpoints

pytestmark = pytest.mark.stack


def _eval_run() -> str:
    import mlflow

    mlflow.set_experiment("test-cycles-eval")
    with mlflow.start_run() as run:
        mlflow.log_metrics({"kl_per_token": 0.31, "kl_per_token_baseline": 0.12, "length_candidate": 40.0,
                            "length_baseline": 52.0, "regression_em_candidate": 0.5, "regression_em_baseline": 0.625})
    return run.info.run_id


def _manifest(version: str, writers: dict[str, int]) -> None:
    folder = endpoints.var_dir() / "datasets" / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{version}.json").write_text(json.dumps({"version": version, "behaviour_policies": {"dpo": writers}}))


def _cycle(n: int, eval_run: str, decision: str, before: float, after: float) -> dict:
    return {"thumbs_up_rate_before": before, "thumbs_up_rate_after": after, "answers_measured": 150,
            "eval_run_id": eval_run, "dataset_version": f"ds-cycle{n}", "model_version": str(n),
            "gate": {"passed": True}, "canary": {"decision": decision}, "champion_version": "1"}


def test_records_parent_run_and_plot(stack, tmp_path):
    run_id = _eval_run()
    _manifest("ds-cycle1", {"base": 30, "base+flywheel-assistant/1": 10})
    _manifest("ds-cycle2", {"flywheel-assistant/1": 20})
    promoted = cycles.summarise(1, _cycle(1, run_id, "promote", 0.2, 0.5), 61.0)
    kept = cycles.summarise(2, _cycle(2, run_id, "rollback", 0.5, 0.48), 42.0)

    # promoted: the candidate's side of the eval serves now; rolled back: the baseline (the champion) still does
    assert (promoted["kl_from_base"], promoted["mean_length"], promoted["regression_exact_match"]) == (0.31, 40.0, 0.5)
    assert (kept["kl_from_base"], kept["mean_length"], kept["regression_exact_match"]) == (0.12, 52.0, 0.625)
    assert kept["candidate"] == {"kl_from_base": 0.31, "mean_length": 40.0, "regression_exact_match": 0.5}
    assert promoted["dataset_rows_by_writer"] == {"base": 0.75, "base+flywheel-assistant/1": 0.25}
    assert kept["dataset_rows_by_writer"] == {"flywheel-assistant/1": 1.0}
    lo, hi = promoted["heldout_after"]["ci"]
    assert lo < 0.5 < hi and 0.15 < hi - lo < 0.17  # Wilson, 150 answers
    for key in ("thumbs_up_rate_before", "thumbs_up_rate_after", "kl_from_base", "mean_length",
                "regression_exact_match", "dataset_version", "champion_version", "seconds"):
        assert key in promoted

    url = cycles.log_parent_run([promoted, kept], cycles.heldout(0.2, 150), {"cycles": 2}, tmp_path)
    from training import registry

    parent = registry.client().get_run(url.rsplit("/", 1)[-1])
    history = registry.client().get_metric_history(parent.info.run_id, "heldout_thumbs_up_rate")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.2), (1, 0.5), (2, 0.48)]
    assert json.loads(parent.data.tags["cycle1.dataset_rows_by_writer"]) == promoted["dataset_rows_by_writer"]
    assert {a.path for a in registry.client().list_artifacts(parent.info.run_id)} == {"cycles.json", "cycles.png"}
    assert (tmp_path / "cycles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
