"""Start a live canary: the offline gate passed, so the users may now try the candidate.

    python -m training.canary --version 7 --reason "offline gate passed in preference_retrain run R" [share=0.2]

Sets the `challenger` alias to the version and records the experiment on the registered model's tags
(`canary.version`, `canary.share`, `canary.started_at`, `canary.run_id`). Every serving replica reads
those at its next registry poll and answers `share` of the users (sticky by user id) with the
challenger; nothing restarts. `python -m training.rollout` then compares the two arms on the users'
own feedback and promotes the challenger to `champion` or rolls it back.

Only a version whose gate passed (`gate.passed=true`) starts a canary unless force=true (recorded, as the
sabotage demo does to prove that live data alone rolls a bad adapter back). A canary already running for
another version is superseded (recorded); re-running for the same version, for the champion, or for a
version the users already rolled back changes nothing. The last
stdout line is JSON: {"action", "version", "share", "started_at", "changed"}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from training import registry
from training.gate import job_argv
from training.promote import actor_name, append_history, now


@dataclass
class Config:
    """Start (or supersede) the live canary of a registered adapter version.

    What:  version (required), share (of users answered by the challenger, 0 < share < 1), model_name
    Why:   reason (required; recorded), actor ("" = $FLYWHEEL_ACTOR or the OS user)
    Guard: force (start one whose gate did not pass; recorded), experiment (MLflow, for the rollout's run)
    """

    version: str = ""
    share: float = 0.2
    model_name: str = registry.DEFAULT_MODEL_NAME
    reason: str = ""
    actor: str = ""
    force: bool = False
    experiment: str = "flywheel-rollout"


def check(cfg: Config) -> registry.AdapterRef:
    if not cfg.version:
        raise SystemExit("version is required (--version V): the registered adapter version to try on users")
    if not 0 < cfg.share < 1:
        raise SystemExit(f"share={cfg.share} must lie strictly between 0 and 1 (a canary needs both arms)")
    if not cfg.reason.strip():
        raise SystemExit("a canary needs a reason (--reason ...): it is recorded in the registry")
    ref = registry.resolve(f"models:/{cfg.model_name}/{cfg.version}")
    if ref is None:
        raise SystemExit(f"{cfg.model_name} has no version {cfg.version}")
    if ref.tags.get("gate.passed") != "true" and not cfg.force:
        raise SystemExit(f"{ref.label} has gate.passed={ref.tags.get('gate.passed')!r}; run the offline gate "
                         f"(python -m training.gate --candidate {ref.uri}) or pass force=true (recorded)")
    return ref


def open_run(cfg: Config, ref: registry.AdapterRef, started_at: str, champion: str | None) -> str:
    """The MLflow run that the rollout fills with both arms' live metrics over time."""
    import mlflow

    registry.client()  # sets the tracking URI
    mlflow.set_experiment(cfg.experiment)
    tags = {"flywheel.kind": "canary", "flywheel.challenger": ref.label, "flywheel.started_at": started_at,
            "flywheel.champion": f"{cfg.model_name}/{champion}" if champion else "base"}
    with mlflow.start_run(run_name=f"canary {ref.label} ({cfg.share:.0%})", tags=tags) as run:
        mlflow.log_params({"share": cfg.share, "version": ref.version, "reason": cfg.reason[:500]})
        return run.info.run_id


def main(cfg: Config) -> dict[str, Any]:
    ref = check(cfg)
    live = registry.canary(cfg.model_name)
    champion = registry.aliases(cfg.model_name).get("champion")
    result: dict[str, Any] = {"action": "canary_start", "version": ref.version, "share": cfg.share, "changed": False}
    if champion == ref.version:
        print(json.dumps({**result, "note": f"{ref.label} is already the champion"}), flush=True)
        return result
    if ref.tags.get("rollout.rolled_back_at") and not cfg.force:  # the users already turned it down
        print(json.dumps({**result, "note": f"{ref.label} was rolled back by the users at "
                                            f"{ref.tags['rollout.rolled_back_at']}; not tried again"}), flush=True)
        return result
    if live is not None and live.version == ref.version:  # a re-run: the running experiment stays as it is
        print(json.dumps({**result, "started_at": live.started_at}), flush=True)
        return result
    actor = actor_name(cfg.actor)
    if live is not None:
        append_history(cfg.model_name, {"action": "canary_superseded", "challenger": live.version, "at": now(),
                                        "by": actor, "reason": f"version {ref.version} starts a new canary"})
    started_at = now()
    run_id = open_run(cfg, ref, started_at, champion)
    registry.clear_canary(cfg.model_name)  # the superseded experiment's tags (its last window) must not carry over
    registry.set_alias("challenger", ref.version, cfg.model_name)
    reason = cfg.reason + (" [forced past the gate]" if cfg.force and ref.tags.get("gate.passed") != "true" else "")
    registry.set_canary_tags({"canary.version": ref.version, "canary.share": f"{cfg.share:g}",
                              "canary.started_at": started_at, "canary.run_id": run_id,
                              "canary.reason": reason[:4900]}, cfg.model_name)
    append_history(cfg.model_name, {"action": "canary_start", "challenger": ref.version, "champion": champion,
                                    "share": cfg.share, "at": started_at, "by": actor, "reason": reason[:500]})
    result.update(changed=True, started_at=started_at, run_id=run_id, champion=champion)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from ingest.config import parse_config

    main(parse_config(Config, job_argv(sys.argv[1:], {"--version": "version", "--reason": "reason",
                                                        "--share": "share", "--actor": "actor"}, None)))
