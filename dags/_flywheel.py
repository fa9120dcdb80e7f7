"""Shared by the DAG files: how a task runs a Flywheel job, and how it reads a job's answer.

Every task is a process of the project's own environment (`.venv/bin/python -m <job>`), exactly as
a KubernetesPodOperator would run the job's image in production. Jobs print their result as one
JSON object on the last stdout line; BashOperator pushes that line to XCom. Nothing here imports
torch, Spark or MLflow: the DAG processor only parses these files.
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import timedelta
from pathlib import Path

REPO = Path(os.environ.get("FLYWHEEL_REPO", Path(__file__).resolve().parent.parent))
PYTHON = os.environ.get("FLYWHEEL_PYTHON", str(REPO / ".venv" / "bin" / "python"))

DEFAULT_ARGS = {
    "owner": "flywheel",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
}


def job(module: str, *args: str) -> str:
    """The bash command of one job; arguments are shell-quoted unless they hold a Jinja expression."""
    quoted = [a if "{{" in a else shlex.quote(a) for a in args]
    return f"set -euo pipefail; cd {shlex.quote(str(REPO))}; {shlex.quote(PYTHON)} -m {module} {' '.join(quoted)}"


def answer(xcom_line: str | None) -> dict:
    """Parse a job's last stdout line (its JSON answer); fail loudly when it is not JSON."""
    if not xcom_line:
        raise ValueError("the upstream job printed nothing; its last stdout line must be a JSON object")
    try:
        out = json.loads(xcom_line)
    except json.JSONDecodeError:
        raise ValueError(f"the upstream job's last stdout line is not JSON: {xcom_line[:200]!r}") from None
    if not isinstance(out, dict):
        raise ValueError(f"the upstream job's answer is not a JSON object: {xcom_line[:200]!r}")
    return out


def build_dataset_command(ctx: dict) -> str:
    """`ingest.build_dataset` for the run's window: params window_start/window_end, else the data interval."""
    p = ctx["params"]
    start = p.get("window_start") or ctx["data_interval_start"].isoformat()
    end = p.get("window_end") or ctx["data_interval_end"].isoformat()
    return job("ingest.build_dataset", f"start={start}", f"end={end}", *p.get("dataset_overrides", "").split())


def retrain_plan(built: dict, sft_first: bool = False, min_sft_rows: int = 16) -> dict:
    """What `preference_retrain` trains on a dataset version, from the builder's answer (counts, min_rows):

    - DPO when the train split has enough pairs, judged by a reward model trained on the same pairs;
    - else KTO when it has enough rated answers without a partner, judged by nothing offline (a reward
      model needs pairs; with too few its verdict is noise, so the gate reports "no offline evidence"
      and the canary's users decide);
    - else nothing (`trainer` None).
    `sft` says whether SFT on the edits and strong positives runs first (asked for, and enough rows).
    """
    counts, mins = built.get("counts", {}), built.get("min_rows", {})
    n = {kind: counts.get(kind, {}).get("train", 0) for kind in ("dpo", "kto", "sft")}
    if n["dpo"] >= mins.get("dpo_train", 16):
        trainer, reason = "dpo", f"{n['dpo']} train pairs"
    elif n["kto"] >= mins.get("kto_train", 32):
        trainer, reason = "kto", f"only {n['dpo']} train pairs but {n['kto']} unpaired rated answers"
    else:
        trainer, reason = None, f"{n['dpo']} pairs and {n['kto']} unpaired rated answers: too few to train on"
    sft = bool(trainer and sft_first and n["sft"] >= min_sft_rows)
    return {"trainer": trainer, "judge": "reward_model" if trainer == "dpo" else "none", "sft": sft,
            "reason": reason + (f"; SFT first on {n['sft']} rows" if sft else "")}

