"""Live metrics per adapter version, from the landing zone: what the users say about each version.

    python -m ingest.live_metrics [start=ISO] [end=ISO] [log_mlflow=true]

For every (adapter version, A/B arm) that answered in the window [start, end), counts the answers and
what the users did with them. An answer counts once per signal, whatever the number of events:

  rated        answers with a thumbs vote (the last vote of the answer wins: users change their mind)
  thumbs_up    rated answers whose last vote is up — `thumbs_up_rate` = thumbs_up / rated is the primary
  regenerate, edit, copy, abandon   answers that got at least one such event (guardrails; rates over answers)

The window selects answers by their response event's `created_at`; feedback on those answers counts
whenever it landed, so a slow user's vote is not lost at a window edge. The rollout job
(`training.rollout`) reads the same numbers to compare the champion with the challenger, and the
feedback_ingest DAG logs them to MLflow (experiment `flywheel-live`) at every interval, so the MLflow
UI charts the loop's health over time. The last stdout line is JSON: {"versions": [...]}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from ingest import landing
from ingest.config import parse_config

BASE_LABEL = "base"  # answers with no adapter (adapter_version null) are the base model's
GUARDRAILS = ("regenerate", "edit", "copy", "abandon")


@dataclass
class Config:
    """Live metrics of one window of landed events.

    Window: start, end (ISO 8601; empty = unbounded on that side).
    Output: log_mlflow (log one MLflow run per call in `experiment`), experiment, landing_dir ("" = default).
    """

    start: str = ""
    end: str = ""
    log_mlflow: bool = False
    experiment: str = "flywheel-live"
    landing_dir: str = ""


@dataclass(frozen=True)
class VersionStats:
    """What the users did with the answers of one adapter version in one A/B arm."""

    adapter_version: str
    arm: str
    answers: int
    rated: int
    thumbs_up: int
    regenerate: int
    edit: int
    copy: int
    abandon: int

    @property
    def thumbs_up_rate(self) -> float:
        return self.thumbs_up / self.rated if self.rated else float("nan")

    def rate(self, signal: str) -> float:
        return getattr(self, signal) / self.answers if self.answers else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "thumbs_up_rate": self.thumbs_up_rate,
                **{f"{g}_rate": self.rate(g) for g in GUARDRAILS}}


def parse_time(value: str, what: str = "time") -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime, as the dataset builder reads its window; "" -> None
    (an open end)."""
    from ingest.build_dataset import parse_time as builder_parse_time

    return builder_parse_time(value, what) if value else None


def version_stats(start: datetime | None = None, end: datetime | None = None,
                  root: Path | None = None) -> list[VersionStats]:
    """Per (adapter version, arm) counts of the answers created in [start, end), sorted by version."""
    import polars as pl

    responses = pl.from_arrow(landing.read_table("responses", root))
    feedback = pl.from_arrow(landing.read_table("feedback", root))
    if start is not None:
        responses = responses.filter(pl.col("created_at") >= start)
    if end is not None:
        responses = responses.filter(pl.col("created_at") < end)
    if responses.is_empty():
        return []
    answers = responses.select("response_id", pl.col("adapter_version").fill_null(BASE_LABEL),
                               pl.col("ab_arm").alias("arm")).unique("response_id", keep="first")
    fb = feedback.select("response_id", "kind", "created_at", "_topic", "_partition", "_offset")
    votes = (fb.filter(pl.col("kind").is_in(["thumbs_up", "thumbs_down"]))
             .sort(["created_at", "_topic", "_partition", "_offset"])
             .group_by("response_id").agg(pl.col("kind").last().alias("vote")))
    signals = (fb.filter(pl.col("kind").is_in(list(GUARDRAILS))).select("response_id", "kind").unique()
               .with_columns(pl.lit(1).alias("n"))
               .pivot(on="kind", index="response_id", values="n", aggregate_function="first"))
    for g in GUARDRAILS:
        if g not in signals.columns:
            signals = signals.with_columns(pl.lit(None, dtype=pl.Int32).alias(g))
    joined = answers.join(votes, on="response_id", how="left").join(signals, on="response_id", how="left")
    grouped = (joined.group_by("adapter_version", "arm")
               .agg(pl.len().alias("answers"), pl.col("vote").is_not_null().sum().alias("rated"),
                    (pl.col("vote") == "thumbs_up").sum().alias("thumbs_up"),
                    *[pl.col(g).is_not_null().sum().alias(g) for g in GUARDRAILS])
               .sort("adapter_version", "arm"))
    return [VersionStats(**{k: (int(v) if isinstance(v, int) else v) for k, v in row.items()})
            for row in grouped.to_dicts()]


def log_to_mlflow(stats: list[VersionStats], cfg: Config) -> str:
    """One MLflow run per window: each version's figures as metrics named `<version>/<metric>`."""
    import mlflow

    from ingest import endpoints

    mlflow.set_tracking_uri(endpoints.mlflow_tracking_uri())
    mlflow.set_experiment(cfg.experiment)
    name = f"live {cfg.start or '-'} .. {cfg.end or 'now'}"
    with mlflow.start_run(run_name=name, tags={"flywheel.kind": "live_metrics", "flywheel.window_start": cfg.start,
                                               "flywheel.window_end": cfg.end}) as run:
        for s in stats:
            key = f"{s.adapter_version.replace('/', '_v')}.{s.arm}"
            mlflow.log_metrics({f"{key}.{k}": float(v) for k, v in s.to_dict().items()
                                if isinstance(v, int | float) and v == v})
        mlflow.log_dict({"versions": [s.to_dict() for s in stats]}, "live_metrics.json")
        return run.info.run_id


def main(cfg: Config) -> dict:
    root = Path(cfg.landing_dir) if cfg.landing_dir else None
    stats = version_stats(parse_time(cfg.start, "start"), parse_time(cfg.end, "end"), root)
    for s in stats:
        print(f"{s.adapter_version:>28} {s.arm:<10} answers {s.answers:5d}  rated {s.rated:5d}  "
              f"thumbs-up {s.thumbs_up_rate:6.1%}  regenerate {s.rate('regenerate'):5.1%}  "
              f"edit {s.rate('edit'):5.1%}  abandon {s.rate('abandon'):5.1%}", file=sys.stderr)
    result: dict = {"versions": [s.to_dict() for s in stats]}
    if cfg.log_mlflow:
        result["run_id"] = log_to_mlflow(stats, cfg)
    print(json.dumps(result, default=str), flush=True)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
