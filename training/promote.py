"""Promote a candidate: move the registry alias `champion` to it, keeping the old champion as `previous`.

    python -m training.promote --version 7 --reason "gate passed: win rate 0.62 [0.55, 0.69]" [key=value ...]
    python -m training.promote --reason "..."            # promotes whatever @challenger points at

Serving follows the `champion` alias (it polls the registry), so this is the release. Only a version
whose gate passed (`gate.passed=true` tag, written by training.gate) is promoted unless force=true.
Every move is recorded: tags on the version (promoted_at/by/reason) and an entry in the registered
model's `champion_history` tag (JSON list, newest last). `python -m training.rollback` undoes it.
The last stdout line is JSON: {"action", "champion", "previous", "changed", ...}.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from training import registry
from training.gate import job_argv

HISTORY_TAG = "champion_history"
HISTORY_MAX_CHARS = 4900  # model-registry tag values are capped (5000 chars); keep the newest entries


@dataclass
class Config:
    """Move `champion` to a registered adapter version.

    What:  version ("" = the version behind from_alias), from_alias (default challenger), model_name
    Why:   reason (required; recorded), actor ("" = $FLYWHEEL_ACTOR or the OS user)
    Guard: require_gate (refuse a version whose gate did not pass), force (override the guard)
    """

    version: str = ""
    from_alias: str = "challenger"
    model_name: str = registry.DEFAULT_MODEL_NAME
    reason: str = ""
    actor: str = ""
    require_gate: bool = True
    force: bool = False


def actor_name(actor: str = "") -> str:
    if actor:
        return actor
    try:
        return os.environ.get("FLYWHEEL_ACTOR") or getpass.getuser()
    except OSError:
        return "unknown"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history(name: str) -> list[dict[str, Any]]:
    """Every recorded champion move of `name`, oldest first ([] when none)."""
    rm = registry.client().get_registered_model(name)
    raw = (rm.tags or {}).get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def append_history(name: str, event: dict[str, Any]) -> None:
    """Append an event (promote, rollback, canary_start, canary_rollback, ...) to `champion_history`."""
    events = history(name) + [event]
    text = json.dumps(events, separators=(",", ":"))
    while len(text) > HISTORY_MAX_CHARS and len(events) > 1:
        events = events[1:]
        text = json.dumps(events, separators=(",", ":"))
    registry.client().set_registered_model_tag(name, HISTORY_TAG, text)


def record_move(name: str, event: dict[str, Any]) -> None:
    """Append a move to the registered model's champion_history tag and tag the versions involved."""
    c = registry.client()
    append_history(name, event)
    prefix = "promoted" if event["action"] == "promote" else "rolled_back_to"
    for key in ("at", "by", "reason"):
        c.set_model_version_tag(name, event["champion"], f"{prefix}_{key}", str(event[key])[:4900])
    if event.get("from"):
        c.set_model_version_tag(name, event["from"], "replaced_at", event["at"])


def move_champion(name: str, version: str, action: str, reason: str, actor: str) -> dict[str, Any]:
    """champion -> version, previous -> the old champion; record the move. Idempotent when already champion."""
    if not reason.strip():
        raise SystemExit(f"{action} needs a reason (reason=... / --reason ...): it is recorded in the registry")
    current = registry.aliases(name).get("champion")
    result = {"action": action, "model": name, "champion": version, "previous": current, "changed": False}
    if current == version:
        return result  # re-running a promote must not push the champion into `previous`
    if current:
        registry.set_alias("previous", current, name)
    registry.set_alias("champion", version, name)
    event = {"action": action, "champion": version, "from": current, "at": now(), "by": actor, "reason": reason}
    record_move(name, event)
    return {**result, "changed": True, "at": event["at"], "by": actor}


def main(cfg: Config) -> dict[str, Any]:
    c = registry.client()
    version = cfg.version
    if not version:
        ref = registry.resolve(cfg.from_alias, cfg.model_name)
        if ref is None:
            raise SystemExit(f"no version given and {cfg.model_name}@{cfg.from_alias} is unset; pass --version V")
        version = ref.version
    ref = registry.resolve(f"models:/{cfg.model_name}/{version}")
    if ref is None:
        raise SystemExit(f"{cfg.model_name} has no version {version}; see `mlflow models` / the registry UI")
    gate_passed = ref.tags.get("gate.passed")
    if cfg.require_gate and gate_passed != "true" and not cfg.force:
        raise SystemExit(f"{ref.label} has gate.passed={gate_passed!r}; run `python -m training.gate --candidate "
                         f"{ref.uri}` first, or pass force=true (recorded) to promote anyway")
    reason = cfg.reason + (" [forced past the gate]" if cfg.force and gate_passed != "true" else "")
    result = move_champion(cfg.model_name, version, "promote", reason, actor_name(cfg.actor))
    # The promoted candidate is no longer a challenger; leaving the alias would A/B the champion against itself.
    if registry.aliases(cfg.model_name).get("challenger") == version:
        c.delete_registered_model_alias(cfg.model_name, "challenger")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from ingest.config import parse_config

    main(parse_config(Config, job_argv(sys.argv[1:], {"--version": "version", "--reason": "reason",
                                                        "--actor": "actor"}, None)))
