"""Off-policy correction, measured: one dataset, one seed, DPO with and without, each adapter judged by
the simulated users on the held-out prompts.

    python -m infra.off_policy [dataset_version=<V>] ["arms=off_policy=none,off_policy=clipped_is"] [key=value ...]

A flywheel's dataset mixes answers of several adapter versions (the champion's, the canary's, older
ones'). `off_policy=clipped_is` in training.dpo re-weighs each pair by how likely the policy being
improved finds its answers compared with the policy that wrote them (weighted_dpo.importance_weights).
This trains one adapter per arm from the current champion on the same rows with the same seed, serves
each by explicit version, and measures its held-out thumbs-up rate with the same simulated users and
seeds, so the arms differ only in the correction. An arm is any set of training.dpo overrides
(`reference=base` compares DPO's reference choice the same way); with `evaluate=true` each arm also
gets the eval suite against the champion (judge none: KL from base, length, regression, safety). The
hidden preference measures here, as in the demo; which arm becomes the default is decided by a person
reading this report, never by this job.

Needs the stack and a chat server on the registry (the demo leaves them up with keep_running=true) and
a dataset version with mixed writers (by default the newest whose DPO rows come from more than one
adapter version). The report lands in var/demo/off_policy.json.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from infra import cycles, simulate
from ingest import endpoints, reader
from ingest.config import parse_config


@dataclass
class Config:
    """Train each arm on one dataset version and measure it.

    Data: dataset_version ("" = the newest with DPO rows from more than one adapter version).
    Training: dpo_config, dpo_overrides (space-separated key=value for training.dpo, every arm), arms
      (comma-separated arms, each a space-separated set of training.dpo overrides), seed.
    Drift: evaluate (the eval suite per arm, judge none), eval_overrides.
    Measurement: n_users, measure_answers_per_prompt, max_tokens, preference (the simulated users' hidden
      preference: it measures, it decides nothing).
    """

    dataset_version: str = ""
    dpo_config: str = "training/configs/dpo.smollm2.yaml"
    dpo_overrides: str = ""
    arms: str = "off_policy=none,off_policy=clipped_is"
    seed: int = 0
    evaluate: bool = False
    eval_overrides: str = ""
    n_users: int = 30
    measure_answers_per_prompt: int = 3
    max_tokens: int = 80
    preference: str = "uses_list"


def mixed_dataset() -> str:
    """The newest dataset version whose DPO rows were written by more than one adapter version."""
    for version in sorted(reader.versions(), key=lambda v: reader.manifest(v).get("created_at", ""), reverse=True):
        writers = {w for key in reader.manifest(version).get("behaviour_policies", {}).get("dpo", {})
                   for w in key.split("+")}
        if len(writers) > 1:
            return version
    raise SystemExit("no dataset version mixes adapter versions yet; run `make demo DEMO_ARGS=cycles=2` first")


def _slug(arm: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", arm.lower()).strip("-")


def train_arm(cfg: Config, version: str, arm: str) -> dict[str, Any]:
    """training.dpo from the champion with the arm's overrides; registered under alias arm-<slug>."""
    from infra.demo import run_job

    out = endpoints.var_dir() / "runs" / "dpo-arms" / f"{version}-{_slug(arm)}-seed{cfg.seed}"
    return run_job("training.dpo", "--config", cfg.dpo_config, f"dataset_version={version}", f"seed={cfg.seed}",
                   f"output_dir={out}", f"registry_alias=arm-{_slug(arm)}", *cfg.dpo_overrides.split(), *arm.split())


DRIFT = ("kl_per_token", "length_drift", "regression_em_delta", "sycophancy_delta", "over_refusal_delta",
         "harmful_compliance_delta")


def evaluate_arm(cfg: Config, label: str) -> dict[str, float]:
    """The eval suite, candidate vs champion, no judge: the drift and safety figures the gate reads."""
    from infra.demo import run_job
    from training import registry

    out = run_job("training.evaluate", "--candidate", f"models:/{label}",
                  "--baseline", f"models:/{registry.DEFAULT_MODEL_NAME}@champion", "--judge", "none",
                  *cfg.eval_overrides.split())
    metrics = registry.client().get_run(out["run_id"]).data.metrics
    return {k: round(metrics[k], 4) for k in DRIFT if k in metrics}


def measure(cfg: Config, adapter: str) -> dict[str, Any]:
    """The held-out thumbs-up rate of one adapter (same users, prompts and seeds for every arm)."""
    out = simulate.main(simulate.Config(
        mode="measure", prompts="heldout", answers_per_prompt=cfg.measure_answers_per_prompt, n_users=cfg.n_users,
        seed=cfg.seed + 100, preference=cfg.preference, max_tokens=cfg.max_tokens, adapter=adapter,
        report=str(endpoints.var_dir() / "demo" / f"off-policy-measure-{adapter.replace('/', '_')}.json")))
    return cycles.heldout(out["thumbs_up_rate"], out["answers_judged"])


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """b - a with a normal-approximation 95% interval (two independent proportions)."""
    pa, pb = a["rate"], b["rate"]
    se = math.sqrt(pa * (1 - pa) / max(a["answers"], 1) + pb * (1 - pb) / max(b["answers"], 1))
    return {"diff": round(pb - pa, 4), "ci": [round(pb - pa - 1.96 * se, 4), round(pb - pa + 1.96 * se, 4)]}


def main(cfg: Config) -> dict[str, Any]:
    from training import registry

    t0 = time.monotonic()
    version = cfg.dataset_version or mixed_dataset()
    champion = registry.aliases().get("champion")
    report: dict[str, Any] = {
        "dataset_version": version, "seed": cfg.seed, "start": f"{registry.DEFAULT_MODEL_NAME}/{champion}" if champion
        else "base", "dpo_rows_by_writer": reader.manifest(version).get("behaviour_policies", {}).get("dpo", {}),
        "arms": {}}
    report["start_heldout"] = measure(cfg, report["start"])
    for arm in cfg.arms.split(","):
        trained = train_arm(cfg, version, arm)
        label = f"{registry.DEFAULT_MODEL_NAME}/{trained['model_version']}"
        weights = [m.value for m in registry.client().get_metric_history(trained["run_id"], "is_weight")]
        report["arms"][arm] = {"model_version": label, "heldout": measure(cfg, label),
                               "mean_is_weight": round(sum(weights) / len(weights), 4) if weights else None,
                               "mlflow_run_id": trained["run_id"]}
        if cfg.evaluate:
            report["arms"][arm]["vs_champion"] = evaluate_arm(cfg, label)
        report["arms"][arm]["gain"] = difference(report["start_heldout"], report["arms"][arm]["heldout"])
    arms = list(report["arms"])
    if len(arms) == 2:
        report["second_minus_first"] = difference(report["arms"][arms[0]]["heldout"], report["arms"][arms[1]]["heldout"])
    report["seconds"] = round(time.monotonic() - t0, 1)
    path = endpoints.var_dir() / "demo" / "off_policy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(parse_config(Config))
