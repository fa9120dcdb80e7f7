"""What each cycle of a multi-cycle demo left behind, in one record per cycle, an MLflow parent run and a plot.

A cycle is one interval of the flywheel: traffic on the serving champion (and canary) -> ingest ->
retrain from the champion -> offline gate -> live canary -> measure. `summarise` reads what the cycle
left in the registry, the evaluation run and the dataset manifest; `log_parent_run` puts every cycle
into one MLflow run (metrics with step = cycle number) with `cycles.json` and `cycles.png`.

The champion's figures after a cycle (KL from the base, mean answer length, regression exact match)
come from that cycle's evaluation: the candidate's side when the users promoted it, the baseline's
(the champion that stayed) otherwise. The held-out thumbs-up rate is the simulated users' hidden
preference and only measures; nothing here decides anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ingest import endpoints, reader

EXPERIMENT = "flywheel-demo"
# (report key, label, candidate metric, baseline metric) of the champion's figures from the eval run
CHAMPION_FIGURES = [("kl_from_base", "KL from base (nats/token)", "kl_per_token", "kl_per_token_baseline"),
                    ("mean_length", "mean answer length (words)", "length_candidate", "length_baseline"),
                    ("regression_exact_match", "regression exact match", "regression_em_candidate",
                     "regression_em_baseline")]


def heldout(rate: float, n: int) -> dict[str, Any]:
    """A held-out thumbs-up rate with its 95% Wilson interval."""
    from training.evaluate import wilson_interval

    lo, hi = wilson_interval(rate * n, n)
    return {"rate": rate, "ci": [round(lo, 4), round(hi, 4)], "answers": n}


def champion_figures(eval_run_id: str | None, promoted: bool) -> dict[str, Any]:
    """KL from base, mean length and regression exact match of whoever is champion after the cycle, and
    under `candidate` the same figures of the cycle's candidate (promoted or not: why it was rejected)."""
    from training import registry

    if not eval_run_id:
        return {key: None for key, *_ in CHAMPION_FIGURES} | {"candidate": {}}
    m = registry.client().get_run(eval_run_id).data.metrics
    return ({key: m.get(cand if promoted else base) for key, _, cand, base in CHAMPION_FIGURES}
            | {"candidate": {key: m.get(cand) for key, _, cand, _ in CHAMPION_FIGURES}})


def dataset_writers(version: str | None) -> dict[str, float]:
    """Share of the version's DPO rows by the adapter versions that wrote their answers."""
    if not version:
        return {}
    counts = reader.manifest(version).get("behaviour_policies", {}).get("dpo", {})
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.items()} if total else {}


def summarise(number: int, cycle: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The record of cycle `number` (1-based) from what the cycle's stages put in `cycle`."""
    promoted = (cycle.get("canary") or {}).get("decision") == "promote"
    return {
        "cycle": number,
        "thumbs_up_rate_before": cycle["thumbs_up_rate_before"],
        "thumbs_up_rate_after": cycle["thumbs_up_rate_after"],
        "heldout_after": heldout(cycle["thumbs_up_rate_after"], cycle["answers_measured"]),
        **champion_figures(cycle.get("eval_run_id"), promoted),
        "dataset_version": cycle.get("dataset_version"),
        "dataset_rows_by_writer": dataset_writers(cycle.get("dataset_version")),
        "model_version": cycle.get("model_version"),
        "gate_passed": (cycle.get("gate") or {}).get("passed"),
        "canary_decision": (cycle.get("canary") or {}).get("decision"),
        "champion_version": cycle.get("champion_version"),
        "seconds": round(seconds, 1),
    }


def log_parent_run(cycles: list[dict[str, Any]], before: dict[str, Any], params: dict[str, Any],
                   out_dir: Path) -> str:
    """One MLflow run for the whole demo: per-cycle metrics (step = cycle; step 0 = before the first),
    the records as cycles.json and the plot as cycles.png. Returns the run's URL."""
    import mlflow

    mlflow.set_tracking_uri(endpoints.mlflow_tracking_uri())
    exp = mlflow.set_experiment(EXPERIMENT)
    plot = plot_cycles(cycles, before, out_dir / "cycles.png")
    (out_dir / "cycles.json").write_text(json.dumps(cycles, indent=2) + "\n")
    with mlflow.start_run(run_name=f"demo-{len(cycles)}-cycles") as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"heldout_thumbs_up_rate": before["rate"], "heldout_ci_low": before["ci"][0],
                            "heldout_ci_high": before["ci"][1]}, step=0)
        for c in cycles:
            h = c["heldout_after"]
            figures = {key: c[key] for key, *_ in CHAMPION_FIGURES if c.get(key) is not None}
            mlflow.log_metrics({"heldout_thumbs_up_rate": h["rate"], "heldout_ci_low": h["ci"][0],
                                "heldout_ci_high": h["ci"][1], "cycle_seconds": c["seconds"],
                                "promoted": float(c["canary_decision"] == "promote"), **figures}, step=c["cycle"])
            mlflow.set_tag(f"cycle{c['cycle']}.dataset_version", c["dataset_version"] or "")
            mlflow.set_tag(f"cycle{c['cycle']}.dataset_rows_by_writer", json.dumps(c["dataset_rows_by_writer"]))
            mlflow.set_tag(f"cycle{c['cycle']}.champion_version", c["champion_version"] or "base")
        mlflow.log_artifact(str(out_dir / "cycles.json"))
        if plot:
            mlflow.log_artifact(str(plot))
    return f"{endpoints.mlflow_tracking_uri()}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"


def plot_cycles(cycles: list[dict[str, Any]], before: dict[str, Any], path: Path) -> Path | None:
    """Four panels across cycles: held-out rate (with its interval), KL from base, length, regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cycles:
        return None
    xs = [0] + [c["cycle"] for c in cycles]
    rates = [before] + [c["heldout_after"] for c in cycles]
    fig, axes = plt.subplots(1, 1 + len(CHAMPION_FIGURES), figsize=(16, 3.4))
    ax = axes[0]
    ax.errorbar(xs, [r["rate"] for r in rates], yerr=[[r["rate"] - r["ci"][0] for r in rates],
                                                      [r["ci"][1] - r["rate"] for r in rates]],
                marker="o", capsize=3)
    ax.set_title("held-out thumbs-up rate (95% CI)")
    for ax, (key, label, *_) in zip(axes[1:], CHAMPION_FIGURES, strict=True):
        pts = [(c["cycle"], c[key]) for c in cycles if c.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="champion after the cycle")
        cand = [(c["cycle"], c["candidate"][key], c["canary_decision"] == "promote") for c in cycles
                if (c.get("candidate") or {}).get(key) is not None]
        for promoted in (True, False):
            xs_c = [x for x, _, p in cand if p == promoted]
            ys_c = [y for _, y, p in cand if p == promoted]
            if xs_c:
                ax.scatter(xs_c, ys_c, marker="x" if not promoted else "+", s=60, color="C3" if not promoted else "C2",
                           label="candidate, not promoted" if not promoted else "candidate, promoted", zorder=3)
        ax.set_title(label)
    axes[1].legend(fontsize=7)
    for c in cycles:  # mark the cycles whose candidate the users promoted
        if c["canary_decision"] == "promote":
            axes[0].annotate("promoted", (c["cycle"], c["heldout_after"]["rate"]), textcoords="offset points",
                             xytext=(0, 6), ha="center", fontsize=7)
    for ax in axes:
        ax.set_xlabel("cycle (0 = before the first)")
        ax.set_xticks(xs)
    fig.suptitle("Flywheel: the champion after each cycle")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
