"""The users decide: compare the live canary's challenger with the champion and act on it.

    python -m training.rollout [window_end=ISO] [policy.alpha=0.05 ...]

Reads the landed events of the answers given since the canary began (`canary.started_at`, registry
tags written by `training.canary`) up to `window_end`, and counts per arm (ingest.live_metrics):

  primary     thumbs-up rate among rated answers
  guardrails  regenerate, edit and abandon rates among all answers (higher is worse)

Then an anytime-valid sequential test (training.sequential) decides, and this job acts:

  promote   challenger better with confidence 1 - alpha, or non-inferior within the margin once the
            maximum sample is reached -> `champion` moves to it (training.promote; the old one is `previous`)
  rollback  challenger worse, or a guardrail tripped -> `challenger` and the canary tags are cleared,
            the champion stays, the reason is recorded
  wait      undecided -> says how many more rated answers the smaller arm needs

Every call logs both arms' figures to the canary's MLflow run (step = rated answers so far) and
redraws `rollout.png` (both rates with their intervals over time); decisions go to registry tags and
`champion_history`. Nothing here knows what the users like: only their own signals count.

Idempotent: a window that ends at or before the last one looked at changes nothing, and after a
decision there is no canary left to decide on. The last stdout line is JSON:
{"action", "reason", "challenger", "champion", "arms", "more_needed", ...}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest import endpoints, live_metrics
from ingest.config import parse_config
from training import registry, sequential
from training.promote import actor_name, append_history, move_champion, now


@dataclass
class Config:
    """Decide the live canary of a registered model.

    What:      model_name; window_end (ISO; "" = now): events of answers given before it count
    Statistics: policy (see training.sequential.Policy: alpha, margins, min/max samples, guardrails)
    Output:    dry_run (decide and log, move nothing), actor, experiment (MLflow, if the canary has no run)
    """

    model_name: str = registry.DEFAULT_MODEL_NAME
    window_end: str = ""
    policy: sequential.Policy = field(default_factory=sequential.Policy)
    dry_run: bool = False
    actor: str = ""
    experiment: str = "flywheel-rollout"


def arm_stats(stats: list[live_metrics.VersionStats], label: str, arms: tuple[str, ...]) -> live_metrics.VersionStats:
    """The summed figures of one adapter label answered in any of `arms` (zeros when it answered nothing)."""
    rows = [s for s in stats if s.adapter_version == label and s.arm in arms]
    keys = ("answers", "rated", "thumbs_up", *live_metrics.GUARDRAILS)
    return live_metrics.VersionStats(adapter_version=label, arm="+".join(arms),
                                     **{k: sum(getattr(r, k) for r in rows) for k in keys})


def to_arm(s: live_metrics.VersionStats) -> sequential.Arm:
    return sequential.Arm(rated=s.rated, thumbs_up=s.thumbs_up, answers=s.answers,
                          signals={g: getattr(s, g) for g in live_metrics.GUARDRAILS})


def read_arms(live: registry.Canary, name: str, end: datetime
              ) -> tuple[live_metrics.VersionStats, live_metrics.VersionStats, str | None]:
    """(champion arm, challenger arm, champion version) of the answers given since the canary began."""
    champion = registry.aliases(name).get("champion")
    stats = live_metrics.version_stats(live_metrics.parse_time(live.started_at), end)
    control_label = f"{name}/{champion}" if champion else live_metrics.BASE_LABEL
    control = arm_stats(stats, control_label, ("champion", "base"))
    challenger = arm_stats(stats, f"{name}/{live.version}", ("challenger",))
    return control, challenger, champion


def log_progress(live: registry.Canary, cfg: Config, control: live_metrics.VersionStats,
                 challenger: live_metrics.VersionStats, decision: sequential.Decision, end: datetime) -> str:
    """Both arms' figures at this look, into the canary's MLflow run; the plot is redrawn from its history."""
    import mlflow

    c = registry.client()
    run_id = live.run_id
    if not run_id:
        mlflow.set_experiment(cfg.experiment)
        run_id = c.create_run(mlflow.get_experiment_by_name(cfg.experiment).experiment_id).info.run_id
    step = control.rated + challenger.rated
    ts = int(end.timestamp() * 1000)
    metrics = {}
    for arm, s in (("champion", control), ("challenger", challenger)):
        metrics.update({f"{arm}.{k}": float(v) for k, v in s.to_dict().items()
                        if isinstance(v, int | float) and v == v})
    lo, hi = decision.interval
    metrics.update({"diff_ci_low": lo, "diff_ci_high": hi})
    for k, v in metrics.items():
        if v == v and abs(v) != float("inf"):
            c.log_metric(run_id, k, v, timestamp=ts, step=step)
    looks = _history(c, run_id)
    folder = endpoints.var_dir() / "rollout" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    plot_looks(looks, folder / "rollout.png", f"canary {challenger.adapter_version} vs {control.adapter_version}",
               cfg.policy)
    c.log_artifact(run_id, str(folder / "rollout.png"))
    c.set_tag(run_id, "rollout.last_action", decision.action)
    c.set_tag(run_id, "rollout.last_reason", decision.reason[:4900])
    return run_id


def _history(c, run_id: str) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN001
    keys = ("champion.thumbs_up_rate", "challenger.thumbs_up_rate", "champion.rated", "challenger.rated")
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def plot_looks(looks: dict[str, list[tuple[int, float]]], path: Path, title: str, policy: sequential.Policy) -> None:
    """Each arm's thumbs-up rate at every look, with the same anytime-valid interval the decision uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for arm, colour in (("champion", "#555"), ("challenger", "#d62728")):
        rates, counts = dict(looks[f"{arm}.thumbs_up_rate"]), dict(looks[f"{arm}.rated"])
        steps = [s for s in sorted(rates) if s in counts and counts[s] > 0]
        if not steps:
            continue
        r = [rates[s] for s in steps]
        ci = [sequential.rate_interval(round(rates[s] * counts[s]), int(counts[s]), policy.alpha, policy.mixture_sd,
                                       policy.method) for s in steps]
        ax.plot(steps, r, marker="o", color=colour, label=f"{arm} thumbs-up rate")
        ax.fill_between(steps, [c[0] for c in ci], [c[1] for c in ci], color=colour, alpha=0.15)
    ax.set_xlabel("rated answers so far (both arms)")
    ax.set_ylabel("thumbs-up rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def act(live: registry.Canary, cfg: Config, decision: sequential.Decision, champion: str | None,
        end: datetime) -> dict[str, Any]:
    """Move the aliases the decision calls for and record why."""
    name, actor = cfg.model_name, actor_name(cfg.actor)
    if decision.action == "promote":
        moved = move_champion(name, live.version, "promote", f"live canary: {decision.reason}", actor)
        registry.clear_canary(name)
        return {"changed": moved["changed"], "previous": moved["previous"]}
    if decision.action == "rollback":
        registry.clear_canary(name)
        c = registry.client()
        c.set_model_version_tag(name, live.version, "rollout.rolled_back_at", now())
        c.set_model_version_tag(name, live.version, "rollout.reason", decision.reason[:4900])
        append_history(name, {"action": "canary_rollback", "challenger": live.version, "champion": champion,
                              "at": now(), "by": actor, "reason": decision.reason[:500]})
        return {"changed": True}
    registry.set_canary_tags({"canary.last_window_end": end.isoformat()}, name)
    return {"changed": False}


def main(cfg: Config) -> dict[str, Any]:
    live = registry.canary(cfg.model_name)
    if live is None:
        result: dict[str, Any] = {"action": "none", "reason": "no live canary", "changed": False}
        print(json.dumps(result), flush=True)
        return result
    end = live_metrics.parse_time(cfg.window_end) or datetime.now(UTC)
    last = live_metrics.parse_time(live.last_window_end)
    if last is not None and end <= last:
        result = {"action": "none", "reason": f"window up to {end.isoformat()} was looked at already "
                                              f"(last {live.last_window_end})", "changed": False}
        print(json.dumps(result), flush=True)
        return result
    control, challenger, champion = read_arms(live, cfg.model_name, end)
    decision = sequential.decide(to_arm(control), to_arm(challenger), cfg.policy)
    print(f"rollout: {decision.action}: {decision.reason}", file=sys.stderr, flush=True)
    run_id = log_progress(live, cfg, control, challenger, decision, end)
    result = {"action": decision.action, "reason": decision.reason, "challenger": live.version,
              "champion": champion, "window_end": end.isoformat(), "run_id": run_id,
              "more_needed": decision.more_needed, "interval": list(decision.interval),
              "arms": {"champion": control.to_dict(), "challenger": challenger.to_dict()},
              "changed": False, "dry_run": cfg.dry_run}
    if not cfg.dry_run:
        result.update(act(live, cfg, decision, champion, end))
    print(json.dumps(result, default=str), flush=True)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
