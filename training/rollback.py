"""Roll back: move `champion` back to the `previous` version (or a named one) in one command.

    python -m training.rollback --reason "thumbs-down rate doubled after v7" [--to-version 5]

The rolled-back champion becomes `previous`, so running rollback twice undoes the rollback. The move
is recorded like a promotion (version tags rolled_back_to_at/by/reason, an entry in the registered
model's `champion_history`). Serving follows the alias within its poll interval. No gate check:
getting back to a version that was already serving must never be blocked. Last stdout line is JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from training import registry
from training.gate import job_argv
from training.promote import actor_name, move_champion


@dataclass
class Config:
    """Move `champion` back.

    What: to_version ("" = the version behind the `previous` alias), model_name
    Why:  reason (required; recorded), actor ("" = $FLYWHEEL_ACTOR or the OS user)
    """

    to_version: str = ""
    model_name: str = registry.DEFAULT_MODEL_NAME
    reason: str = ""
    actor: str = ""


def main(cfg: Config) -> dict[str, Any]:
    current = registry.aliases(cfg.model_name)
    target = cfg.to_version or current.get("previous")
    if not target:
        raise SystemExit(f"{cfg.model_name} has no `previous` alias (nothing was promoted over an older champion); "
                         f"pass --to-version V to name the version to serve")
    if registry.resolve(f"models:/{cfg.model_name}/{target}") is None:
        raise SystemExit(f"{cfg.model_name} has no version {target}")
    result = move_champion(cfg.model_name, str(target), "rollback", cfg.reason, actor_name(cfg.actor))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from ingest.config import parse_config

    main(parse_config(Config, job_argv(sys.argv[1:], {"--to-version": "to_version", "--reason": "reason",
                                                        "--actor": "actor"}, None)))
