"""Dataset builder (PySpark): landed events of one window -> a versioned DPO / KTO / SFT dataset.

    python -m ingest.build_dataset --config ingest/configs/build_dataset.yaml --start 2026-11-23T10:00Z --end 2026-11-23T11:00Z
    (or start=... end=... ; ISO timestamps or dates, UTC when no zone is given; the window is [start, end))

Steps (counts of each filter go to the manifest):
 1. read the landing folders the window overlaps (feedback in [start, end), or from
    start - replay.hours with replay on; responses back to response_lookback_hours before that, so late
    feedback still finds its answer); dedupe by event_id;
 2. scrub PII (ingest/pii.py) from prompts, answers and edits, counting matches per kind;
 3. normalise the prompt (conversation before the answer) and drop truncated answers (finish=length);
 4. aggregate feedback per response (each user's last thumb, last edit, copy/dwell/abandon/regenerate)
    and apply the pairing rules (ingest/pairing.py) to each prompt's answers; every row gets the
    behaviour policy (adapter version) and log-probability (complete answers) of each model-written answer, and
    replayed rows (answered before `start`) their decayed weight;
 5. poisoning defence: flag users whose thumbs disagree with the other raters of the same answer far
    beyond chance (rule below) and drop (or down-weight) every row using their signals;
 6. exact then near-duplicate removal; per-user caps (no owner above max_user_share of a kind);
 7. split train/eval by a hash of prompt_id (a prompt is never in both);
 8. write `datasets/<kind>/version=<V>/split=<s>/part-<bucket>.parquet` (by the executors, rows bucketed
    by prompt) + `datasets/manifests/<V>.json`.
    V derives from the content (sha256 of the files) and the window's event ids, so the same window
    built twice gives the same V and the second build touches nothing; then log it to MLflow.
The last stdout line is JSON: {"version", "manifest", "counts", "trainable", "reused", ...}. When the
window has too few rows the job still exits 0 with "trainable": false, so the DAG can skip training.

Poisoning rule: for each thumbs label of user u on answer a (same prompt, same near-duplicate text),
when at least `poison_min_other_raters` other users rated a and their majority is strict, u disagrees
iff u's label differs from it. With n_u comparisons and d_u disagreements, and p0 = the disagreement
rate of everyone else (pooled, leave-u-out, clamped to [0.01, 0.49]), u is flagged when
n_u >= poison_min_comparisons, d_u / n_u > 0.5 and P[Binomial(n_u, p0) >= d_u] < poison_alpha.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from ingest import contract, endpoints, landing, pii, reader
from ingest.config import parse_config, to_dict
from ingest.events import FeedbackEvent, ResponseEvent
from ingest.live_metrics import BASE_LABEL
from ingest.pairing import PairingConfig, Row

KINDS = contract.DATASET_KINDS
SPLITS = contract.DATASET_SPLITS
FORMAT_VERSION = 3  # bump when the meaning of the files changes: it is part of the version id
# {kind: [(column, Spark type)]}, derived from the dataset row models (the manifest's "schema")
COLUMNS: dict[str, list[tuple[str, str]]] = {k: list(contract.spark_types(m).items())
                                             for k, m in contract.DATASET_ROWS.items()}


@dataclass
class Replay:
    """Older feedback kept in a new version (off by default).

      hours: feedback from this many hours before `start` is used too (0 = the window only)
      half_life_hours: a row whose newest answer is h hours older than `start` weighs 0.5 ** (h / half_life)
        of its rule's weight (0 = no decay)

    Off by default because each cycle continues from the champion, which has already learnt from the
    older windows; replaying them weighs those signals again.
    """

    hours: float = 0.0
    half_life_hours: float = 0.0


@dataclass
class Config:
    """Build one dataset version from the landed events of a window.

    Window: start, end (ISO timestamp or date; UTC if no zone), response_lookback_hours.
    Paths: landing_dir, datasets_dir (empty = <var>/landing, <var>/datasets).
    Spark: spark_master (empty = endpoints.spark_master()), shuffle_partitions (the initial number; adaptive
      execution coalesces), driver_memory, files_per_split (Parquet files per kind and split, written by
      the executors: part of the version's identity).
    Quality: drop_truncated, max_user_share, eval_fraction, min_dpo_train_rows / min_kto_train_rows (trainable).
    Poisoning: poison_action (drop | downweight), poison_weight, poison_alpha, poison_min_comparisons,
      poison_min_other_raters.
    Tracking: mlflow_log, mlflow_experiment.  Pairing rules and implicit weights: pairing.*
    Older windows: replay.hours, replay.half_life_hours (see Replay).
    """

    start: str = ""
    end: str = ""
    response_lookback_hours: float = 24.0
    landing_dir: str = ""
    datasets_dir: str = ""
    spark_master: str = ""
    shuffle_partitions: int = 4
    driver_memory: str = "4g"
    files_per_split: int = 4
    drop_truncated: bool = True
    max_user_share: float = 0.25
    eval_fraction: float = 0.1
    min_dpo_train_rows: int = 16
    min_kto_train_rows: int = 32
    poison_action: Literal["drop", "downweight"] = "drop"
    poison_weight: float = 0.1
    poison_alpha: float = 1e-4
    poison_min_comparisons: int = 8
    poison_min_other_raters: int = 2
    mlflow_log: bool = True
    mlflow_experiment: str = "flywheel-datasets"
    pairing: PairingConfig = field(default_factory=PairingConfig)
    replay: Replay = field(default_factory=Replay)


def parse_time(value: str, what: str) -> datetime:
    if not value:
        raise ValueError(f"{what} is required: pass {what}=2026-11-23T10:00:00Z (or a date) or --{what} ...")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}={value!r} is not an ISO timestamp or date (e.g. 2026-11-23T10:00:00Z)") from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# --- Spark --------------------------------------------------------------------------------------

def spark_session(master: str = "", shuffle_partitions: int = 4, driver_memory: str = "4g"):  # noqa: ANN201
    """A SparkSession bound to loopback, UTC, few shuffle partitions (200 costs ~30% at 1M rows)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Python workers must import `ingest` (the pairing rules run in them).
    root = str(endpoints.REPO_ROOT)
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master or endpoints.spark_master()).appName("flywheel-build-dataset")
            .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
            .config("spark.sql.adaptive.enabled", "true")
            .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.driver.memory", driver_memory)
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
            .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# Derived from the event models and pairing.Row (ingest/contract.py), never written out here.
_RESP_DDL = contract.spark_ddl(ResponseEvent, with_kafka=True)
_FB_DDL = contract.spark_ddl(FeedbackEvent, with_kafka=True)
_ROWS_SCHEMA = contract.spark_ddl(Row)


def _hour_folders(root: Path, etype: str, lo: datetime, hi: datetime) -> list[str]:
    """Landing hour folders overlapping [lo, hi) (explicit paths: no partition discovery over all history)."""
    out = []
    for d in sorted((root / etype).glob("date=*/hour=*")):
        try:
            start = datetime.strptime(f"{d.parent.name[5:]} {d.name[5:]}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        except ValueError:
            continue
        if start < hi and start + timedelta(hours=1) > lo and any(d.glob("b-*.parquet")):
            out.append(str(d))
    return out


def _read(spark, root: Path, etype: str, lo: datetime, hi: datetime):  # noqa: ANN001, ANN202
    ddl = _RESP_DDL if etype == "responses" else _FB_DDL
    files = [str(p) for f in _hour_folders(root, etype, lo, hi) for p in sorted(Path(f).glob("b-*.parquet"))]
    if not files:
        return spark.createDataFrame([], ddl), 0
    return spark.read.schema(ddl).parquet(*files), len(files)


def _scrub(col, counts: list):  # noqa: ANN001, ANN202
    """Spark column with every PII rule applied in order; appends a match-count column per rule."""
    from pyspark.sql import functions as F

    def occurrences(c, token: str):  # noqa: ANN001, ANN202 - literal count, no regex
        return F.coalesce((F.length(c) - F.length(F.replace(c, F.lit(token), F.lit("")))) / len(token), F.lit(0))

    for name, pattern, repl in pii.RULES:
        token = repl.replace("{1}", "")
        before = col
        col = F.regexp_replace(col, pattern, pii.java_replacement(repl))
        # matches = placeholders added by this rule: one regex pass per rule instead of two
        counts.append((name, (occurrences(col, token) - occurrences(before, token)).cast("long")))
    return col


def _near(col):  # noqa: ANN001, ANN202
    from pyspark.sql import functions as F

    return F.trim(F.regexp_replace(F.lower(F.coalesce(col, F.lit(""))), "[^0-9a-z]+", " "))


def _pair_partitions(pcfg: PairingConfig):  # noqa: ANN202
    """The function Spark runs per partition (mapInArrow) over answers clustered by prompt_key and sorted:
    one Arrow stream per partition, a group ends where prompt_key changes. (applyInArrow pays an Arrow
    round trip per prompt group: ~2x slower at 1M events with ~20k prompts.)"""

    def run(batches):  # noqa: ANN001, ANN202
        import pyarrow as pa

        from ingest.pairing import Answer, rows_for_prompt

        schema = _arrow_rows_schema()
        out: list = []

        def flush():  # noqa: ANN202
            cols = {k: [getattr(r, k) for r in out] for k in schema.names}
            cols["users"] = [list(u) for u in cols["users"]]
            cols["response_ids"] = [list(u) for u in cols["response_ids"]]
            out.clear()
            return pa.RecordBatch.from_pydict(cols, schema=schema)

        key, group = None, []
        for batch in batches:
            for r in batch.to_pylist():
                if r["prompt_key"] != key:
                    out.extend(rows_for_prompt(group, pcfg))
                    key, group = r["prompt_key"], []
                    if len(out) >= 10_000:
                        yield flush()
                group.append(Answer(
                    response_id=r["response_id"], conversation_id=r["conversation_id"], user_id=r["user_id"],
                    prompt_json=r["prompt_key"], completion=r["completion"], regenerates=r["regenerates"],
                    ups=tuple(r["ups"] or ()), downs=tuple(r["downs"] or ()), edit_text=r["edit_text"],
                    editor=r["editor"], copied=bool(r["copied"]), dwell_s=r["dwell_s"],
                    abandoned=bool(r["abandoned"]), regenerate_feedback=bool(r["regen_fb"])))
        out.extend(rows_for_prompt(group, pcfg))
        if out:
            yield flush()

    return run


def _arrow_rows_schema():  # noqa: ANN202
    return contract.arrow_schema(Row)


class _Laps:
    """Seconds per step: `lap(name)` closes step `name` (Spark is lazy: a step costs the actions it runs)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._t, 2)
        self._t = now


def binom_sf(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p), summed in log space (n is at most a few thousand here)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def flag_poisoners(stats: dict[str, tuple[int, int]], cfg: Config) -> dict[str, dict]:
    """users -> evidence, for users whose disagreement with consensus is far beyond chance (rule above)."""
    total_n = sum(n for n, _ in stats.values())
    total_d = sum(d for _, d in stats.values())
    flagged = {}
    for user, (n, d) in sorted(stats.items()):
        if n < cfg.poison_min_comparisons or d * 2 <= n:
            continue
        others_n = total_n - n
        p0 = (total_d - d) / others_n if others_n else 0.25
        p0 = min(max(p0, 0.01), 0.49)
        p_value = binom_sf(d, n, p0)
        if p_value < cfg.poison_alpha:
            flagged[user] = {"comparisons": n, "disagreements": d, "baseline_rate": round(p0, 4),
                             "p_value": float(f"{p_value:.3g}")}
    return flagged


def user_cap(counts: list[int], share: float) -> int:
    """The largest c with c <= share * sum(min(n, c)): then no user holds more than `share` of the rows left."""
    if not counts:
        return 0
    lo, hi = 0, max(counts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= share * sum(min(n, mid) for n in counts):
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- the job --------------------------------------------------------------------------------------

@dataclass
class _Facts:
    """What the steps learn about the window, for the manifest: counts before and after each filter."""

    start: datetime
    end: datetime
    lookback: datetime
    replay_start: datetime  # start, or earlier with replay on: the feedback read begins here
    filters: dict[str, int] = field(default_factory=dict)
    landing_files: int = 0
    events: dict[str, int] = field(default_factory=dict)
    events_fp: str = ""
    pii: dict[str, int] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    users_compared: int = 0
    caps: dict[str, int] = field(default_factory=dict)
    policies: dict[str, int] = field(default_factory=dict)
    replayed_rows: int = 0


def build(cfg: Config, spark=None) -> dict:  # noqa: ANN001
    """Build (or find) the dataset version of cfg's window; returns the summary printed as the last line."""
    t0 = time.monotonic()
    start, end = parse_time(cfg.start, "start"), parse_time(cfg.end, "end")
    if end <= start:
        raise ValueError(f"end {end.isoformat()} must be after start {start.isoformat()}")
    if not 0 < cfg.max_user_share <= 1:
        raise ValueError(f"max_user_share={cfg.max_user_share} must be in (0, 1]")
    if cfg.replay.hours < 0 or cfg.replay.half_life_hours < 0:
        raise ValueError(f"replay.hours and replay.half_life_hours must be >= 0, got {cfg.replay}")
    spark = spark or spark_session(cfg.spark_master, cfg.shuffle_partitions, cfg.driver_memory)
    land_root = Path(cfg.landing_dir) if cfg.landing_dir else landing.landing_dir()
    ds_root = Path(cfg.datasets_dir) if cfg.datasets_dir else endpoints.var_dir() / "datasets"
    replay_start = start - timedelta(hours=cfg.replay.hours)
    facts = _Facts(start, end, replay_start - timedelta(hours=cfg.response_lookback_hours), replay_start)
    timings = _Laps()
    resp, fb = read_events(spark, land_root, facts)
    timings.lap("1. read")  # lazy: the reads run in the actions below
    resp, fb = scrub_and_normalise(resp, fb, cfg, facts)
    timings.lap("2-3. scrub + normalise")
    last_thumb = last_thumbs(fb)
    rows = pair(resp, fb, last_thumb, cfg, facts)
    rows = attach_behaviour(rows, resp, cfg, facts)
    timings.lap("4. pairing")
    rows = defend_poisoning(rows, resp, last_thumb, cfg, facts)
    timings.lap("5. poisoning")
    rows = mark_duplicates(rows, cfg)
    timings.lap("6. dedupe")
    rows = cap_users(rows, cfg, facts)
    timings.lap("6. user caps")
    rows, counts = split_and_count(rows, cfg, facts)
    timings.lap("7. split + counts")
    try:
        manifest_path, reused = commit(rows, counts, ds_root, land_root, cfg, facts, timings)
    finally:
        spark.catalog.clearCache()
    manifest = json.loads(manifest_path.read_text())
    summary = {"version": manifest["version"], "manifest": str(manifest_path), "counts": manifest["counts"],
               "trainable": manifest["trainable"], "min_rows": manifest["min_rows"], "reused": reused,
               "flagged_users": sorted(manifest["poisoning"]["flagged_users"]),
               "behaviour_policies": manifest["behaviour_policies"],
               "elapsed_s": round(time.monotonic() - t0, 2), "step_s": timings.laps}
    if cfg.mlflow_log:
        summary["mlflow_run_id"] = log_to_mlflow(manifest, ds_root, cfg.mlflow_experiment)
    return summary


def read_events(spark, land_root: Path, facts: _Facts):  # noqa: ANN001, ANN201 -> (responses, feedback)
    """1. The window's landed responses (from `lookback` on: feedback may rate older answers) and
    feedback, deduplicated by event_id (the landing is at-least-once)."""
    from pyspark.sql import functions as F

    resp_raw, n_resp_files = _read(spark, land_root, "responses", facts.lookback, facts.end)
    fb_raw, n_fb_files = _read(spark, land_root, "feedback", facts.replay_start, facts.end)
    facts.landing_files = n_resp_files + n_fb_files
    resp = (resp_raw.where((F.col("created_at") >= F.lit(facts.lookback)) & (F.col("created_at") < F.lit(facts.end)))
            .dropDuplicates(["event_id"]))
    fb = (fb_raw.where((F.col("created_at") >= F.lit(facts.replay_start)) & (F.col("created_at") < F.lit(facts.end)))
          .dropDuplicates(["event_id"]))
    return resp, fb


def scrub_and_normalise(resp, fb, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201 -> (responses, feedback)
    """2. PII scrubbing (matches counted on the text each rule sees, before it replaces them) and 3. the
    normalised prompt; one projection each, materialised once (localCheckpoint) because everything
    below reads them several times. Counts the window's events and fingerprints their ids."""
    from pyspark.sql import functions as F

    resp_cnt: list = []
    fb_cnt: list = []
    prompt_clean = _scrub(F.col("prompt_json"), resp_cnt)
    completion_clean = _scrub(F.col("completion"), resp_cnt)
    edit_clean = _scrub(F.col("edited_text"), fb_cnt)
    msgs = F.from_json(prompt_clean, "array<struct<role:string,content:string>>")
    norm = F.transform(msgs, lambda m: F.struct(
        m["role"].alias("role"),
        F.trim(F.regexp_replace(F.regexp_replace(m["content"], "[ \\t\\r\\f\\x0B]+", " "), " ?\\n ?", "\n"))
        .alias("content")))
    norm = F.filter(norm, lambda m: ~((m["role"] == "system") & (m["content"] == "")))
    last_role = F.try_element_at(norm, F.lit(-1))["role"]  # ANSI mode: element_at would throw on []
    resp = resp.select(
        "event_id", "created_at", "user_id", "conversation_id", "response_id", "finish_reason", "regenerates",
        "adapter_version", "completion_logprob",
        completion_clean.alias("completion"), F.when(last_role == "user", F.to_json(norm)).alias("prompt_key"),
        *[c.alias(f"_pii{i}") for i, (_, c) in enumerate(resp_cnt)]).localCheckpoint()
    fb = fb.select("event_id", "created_at", "user_id", "response_id", "kind", "dwell_seconds",
                   edit_clean.alias("edited_text"),
                   *[c.alias(f"_pii{i}") for i, (_, c) in enumerate(fb_cnt)]).localCheckpoint()
    in_win = F.col("created_at") >= F.lit(facts.replay_start)
    r = resp.agg(F.sum(in_win.cast("int")).alias("n"),
                 F.bit_xor(F.when(in_win, F.xxhash64("event_id"))).alias("x"),
                 F.sum(F.col("prompt_key").isNull().cast("int")).alias("bad_prompt"),
                 F.sum((F.col("prompt_key").isNotNull() & (F.col("finish_reason") == "length")).cast("int"))
                 .alias("truncated"),
                 *[F.sum(f"_pii{i}").alias(f"_pii{i}") for i in range(len(resp_cnt))]).first()
    f = fb.agg(F.count("*").alias("n"), F.bit_xor(F.xxhash64("event_id")).alias("x"),
               *[F.sum(f"_pii{i}").alias(f"_pii{i}") for i in range(len(fb_cnt))]).first()
    n_resp_window, n_fb = int(r["n"] or 0), int(f["n"] or 0)
    facts.events = {"responses": n_resp_window, "feedback": n_fb}
    facts.events_fp = f"{n_resp_window + n_fb}:{(r['x'] or 0) ^ (f['x'] or 0)}"
    facts.pii = dict.fromkeys(pii.KINDS, 0)
    for row, cnt in ((r, resp_cnt), (f, fb_cnt)):
        for i, (name, _) in enumerate(cnt):
            facts.pii[name] += int(row[f"_pii{i}"] or 0)
    facts.filters["prompt_not_ending_with_user"] = int(r["bad_prompt"] or 0)
    resp = resp.where(F.col("prompt_key").isNotNull())
    if cfg.drop_truncated:
        facts.filters["truncated_answers"] = int(r["truncated"] or 0)
        resp = resp.where(F.col("finish_reason") != "length")
    return resp, fb


def last_thumbs(fb):  # noqa: ANN001, ANN201
    """Each user's last thumb per response (a changed mind counts once, as it ended)."""
    from pyspark.sql import functions as F

    return (fb.where(F.col("kind").isin("thumbs_up", "thumbs_down"))
            .groupBy("response_id", "user_id").agg(F.max_by("kind", F.struct("created_at", "event_id")).alias("kind")))


def pair(resp, fb, last_thumb, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201
    """4. Feedback per response, then the pairing rules per prompt (ingest/pairing.py, in the executors)."""
    from pyspark.sql import functions as F

    order = F.struct("created_at", "event_id")
    thumbs = last_thumb.groupBy("response_id").agg(
        F.sort_array(F.collect_list(F.when(F.col("kind") == "thumbs_up", F.col("user_id")))).alias("ups"),
        F.sort_array(F.collect_list(F.when(F.col("kind") == "thumbs_down", F.col("user_id")))).alias("downs"))
    is_edit = F.col("kind") == "edit"
    signals = fb.groupBy("response_id").agg(
        F.max_by(F.when(is_edit, F.col("edited_text")), F.when(is_edit, order)).alias("edit_text"),
        F.max_by(F.when(is_edit, F.col("user_id")), F.when(is_edit, order)).alias("editor"),
        F.max(F.col("kind") == "copy").alias("copied"),
        F.max("dwell_seconds").alias("dwell_s"),
        F.max(F.col("kind") == "abandon").alias("abandoned"),
        F.max(F.col("kind") == "regenerate").alias("regen_fb"))
    fb_per_resp = signals.join(thumbs, "response_id", "left")
    in_window = resp.where(F.col("created_at") >= F.lit(facts.replay_start))
    regen_targets = in_window.where(F.col("regenerates").isNotNull()).select(
        F.col("regenerates").alias("response_id"))
    wanted = (in_window.select("response_id").unionByName(fb_per_resp.select("response_id"))
              .unionByName(regen_targets).distinct())
    answers = (resp.dropDuplicates(["response_id"])  # a retried response event under a new event_id
               .join(wanted, "response_id", "left_semi").join(fb_per_resp, "response_id", "left")
               .select("response_id", "conversation_id", "user_id", "prompt_key", "completion", "regenerates",
                       "ups", "downs", "edit_text", "editor", "copied", "dwell_s", "abandoned", "regen_fb"))
    return (answers.repartition(cfg.shuffle_partitions, "prompt_key").sortWithinPartitions("prompt_key", "response_id")
            .mapInArrow(_pair_partitions(cfg.pairing), _ROWS_SCHEMA).localCheckpoint())


def attach_behaviour(rows, resp, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201
    """4b. Who wrote each answer of a row: its behaviour policy (adapter version, 'base' for none) and
    log-probability under it, for off-policy corrections and the manifest's share per version (a user's
    edit has neither). With replay half-life on, a row whose newest answer predates `start` is decayed."""
    from pyspark.sql import functions as F

    # A cut-off answer's logged log-prob has no end-of-turn token, which training scores: not comparable,
    # so it is left out (null) rather than biasing the answer's off-policy weight.
    beh = resp.dropDuplicates(["response_id"]).select(
        "response_id", F.coalesce("adapter_version", F.lit(BASE_LABEL)).alias("policy"),
        F.when(F.col("finish_reason") == "stop", F.col("completion_logprob")).alias("logprob"), "created_at")

    def side(tag: str):  # noqa: ANN202
        return beh.select(*[F.col(c).alias(f"_{tag}_{c}") for c in beh.columns])

    is_dpo, is_kto = F.col("kind") == "dpo", F.col("kind") == "kto"
    rows = (rows.withColumn("_a_response_id", F.try_element_at("response_ids", F.lit(1)))
            .withColumn("_b_response_id", F.when(is_dpo, F.try_element_at("response_ids", F.lit(2))))
            .join(side("a"), "_a_response_id", "left").join(side("b"), "_b_response_id", "left"))
    rows = rows.select(
        *[c for c in rows.columns if not c.startswith(("_a_", "_b_"))],
        F.when(is_dpo, F.col("_a_policy")).alias("chosen_policy"),
        F.when(is_dpo, F.col("_a_logprob")).alias("chosen_logprob"),
        F.col("_b_policy").alias("rejected_policy"), F.col("_b_logprob").alias("rejected_logprob"),
        F.when(is_kto, F.col("_a_policy")).alias("policy"), F.when(is_kto, F.col("_a_logprob")).alias("logprob"),
        F.greatest("_a_created_at", "_b_created_at").alias("_answered_at"))
    if cfg.replay.hours > 0 and cfg.replay.half_life_hours > 0:
        age_h = F.greatest(F.lit(0.0), (F.lit(facts.start).cast("double") - F.col("_answered_at").cast("double")) / 3600)
        rows = rows.withColumn("weight", F.round(F.col("weight") * F.pow(F.lit(0.5), age_h / cfg.replay.half_life_hours), 6))
    return rows


def defend_poisoning(rows, resp, last_thumb, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201
    """5. Flag users whose thumbs disagree with the other raters of the same answer far beyond chance
    (flag_poisoners) and mark the rows using their signals (`_poisoned`; down-weighted if so configured)."""
    from pyspark.sql import functions as F

    ak = F.sha2(F.concat_ws("\u0001", "prompt_key", _near(F.col("completion"))), 256)
    labels = (last_thumb.join(resp.select("response_id", ak.alias("answer_key")), "response_id")
              .select("user_id", "answer_key", (F.col("kind") == "thumbs_up").alias("up")).dropDuplicates())
    per_answer = labels.groupBy("answer_key").agg(F.sum(F.col("up").cast("int")).alias("n_up"),
                                                  F.sum((~F.col("up")).cast("int")).alias("n_down"))
    cmp = labels.join(per_answer, "answer_key").select(
        "user_id", "up", (F.col("n_up") - F.col("up").cast("int")).alias("o_up"),
        (F.col("n_down") - (~F.col("up")).cast("int")).alias("o_down"))
    cmp = cmp.where((F.col("o_up") + F.col("o_down") >= cfg.poison_min_other_raters)
                    & (F.col("o_up") != F.col("o_down")))
    per_user = cmp.groupBy("user_id").agg(
        F.count("*").alias("n"), F.sum((F.col("up") != (F.col("o_up") > F.col("o_down"))).cast("int")).alias("d"))
    stats = {r["user_id"]: (int(r["n"]), int(r["d"])) for r in per_user.collect()}
    facts.flagged, facts.users_compared = flag_poisoners(stats, cfg), len(stats)
    bad = F.arrays_overlap("users", F.array(*[F.lit(u) for u in sorted(facts.flagged)])) if facts.flagged else F.lit(False)
    rows = rows.withColumn("_poisoned", bad)
    if cfg.poison_action == "downweight":
        rows = rows.withColumn("weight", F.when(bad, F.col("weight") * cfg.poison_weight).otherwise(F.col("weight")))
    return rows


def _dropped_poison(cfg: Config):  # noqa: ANN202 - a Column
    from pyspark.sql import functions as F

    return F.col("_poisoned") & F.lit(cfg.poison_action == "drop")


def mark_duplicates(rows, cfg: Config):  # noqa: ANN001, ANN201
    """6. Exact, then near duplicates: keep the heaviest (ties broken by content). Rows ranked out by an
    earlier filter sort last in the next window, so `rank > 1` among survivors means "a survivor with the
    same key came first": both filters in one pass, each with its own count (`_exact`, `_near`)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dropped_poison = _dropped_poison(cfg)
    label_s = F.coalesce(F.col("label").cast("string"), F.lit(""))
    exact_key = [F.col("kind"), F.col("prompt_id"), F.coalesce("chosen", F.lit("")), F.coalesce("rejected", F.lit("")),
                 F.coalesce("completion", F.lit("")), label_s]
    near_key = [F.col("kind"), F.col("prompt_id"), _near(F.col("chosen")), _near(F.col("rejected")),
                _near(F.col("completion")), label_s]
    tiebreak = [F.desc("weight"), F.asc("source"), F.asc("owner"), F.asc(F.concat_ws(",", "response_ids"))]
    rows = rows.withColumn("_exact", ~dropped_poison & (F.row_number().over(
        Window.partitionBy(*exact_key).orderBy(dropped_poison.asc(), *tiebreak)) > 1))
    gone = dropped_poison | F.col("_exact")
    return rows.withColumn("_near", ~gone & (F.row_number().over(
        Window.partitionBy(*near_key).orderBy(gone.asc(), *tiebreak)) > 1)).localCheckpoint()


def _alive(cfg: Config):  # noqa: ANN202 - a Column: not dropped by the poisoning or duplicate filters
    from pyspark.sql import functions as F

    return ~(_dropped_poison(cfg) | F.col("_exact") | F.col("_near"))


def cap_users(rows, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201
    """Per-user caps over what is left: no owner above max_user_share of a kind (`_capped`)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    alive = _alive(cfg)
    owner_counts = rows.where(alive).groupBy("kind", "owner").count().collect()
    for kind in KINDS:
        counts_k = [int(r["count"]) for r in owner_counts if r["kind"] == kind]
        facts.caps[kind] = user_cap(counts_k, cfg.max_user_share) if cfg.max_user_share < 1 else max(counts_k or [0])
    row_hash = F.sha2(F.concat_ws("\u0001", "kind", "prompt_id", F.coalesce("chosen", F.lit("")),
                                  F.coalesce("rejected", F.lit("")), F.coalesce("completion", F.lit(""))), 256)
    cap_col = F.create_map(*[x for k in KINDS for x in (F.lit(k), F.lit(facts.caps[k]))])[F.col("kind")]
    return rows.withColumn("_capped", alive & (F.row_number().over(
        Window.partitionBy("kind", "owner").orderBy((~alive).asc(), row_hash)) > cap_col))


def split_and_count(rows, cfg: Config, facts: _Facts):  # noqa: ANN001, ANN201 -> (rows, counts)
    """7. Train/eval by a hash of prompt_id (a prompt is never in both); tally every filter; keep the
    survivors and count them per kind and split."""
    from pyspark.sql import functions as F

    bucket = F.pmod(F.xxhash64("prompt_id"), F.lit(10_000))
    rows = rows.withColumn("split", F.when(bucket < int(round(cfg.eval_fraction * 10_000)), "eval").otherwise("train"))
    rows = rows.localCheckpoint()
    tally = rows.agg(F.count("*").alias("rows_paired"), F.sum(F.col("_poisoned").cast("int")).alias("poisoned_rows"),
                     F.sum(F.col("_exact").cast("int")).alias("exact_duplicates"),
                     F.sum(F.col("_near").cast("int")).alias("near_duplicates"),
                     F.sum(F.col("_capped").cast("int")).alias("user_cap")).first()
    facts.filters.update({k: int(v or 0) for k, v in tally.asDict().items()})
    rows = rows.where(_alive(cfg) & ~F.col("_capped"))
    counts = {k: dict.fromkeys(SPLITS, 0) for k in KINDS}
    # Per kind, the behaviour policies of a row's model-written answers ("v1", or "v1+v2" for a pair of two)
    writers = F.array_join(F.array_sort(F.array_distinct(F.array_compact(
        F.array("chosen_policy", "rejected_policy", "policy")))), "+")
    replayed = (F.col("_answered_at") < F.lit(facts.start)).cast("int")
    for r in rows.groupBy("kind", "split", writers.alias("writers")).agg(
            F.count("*").alias("n"), F.sum(replayed).alias("replayed")).collect():
        counts[r["kind"]][r["split"]] += int(r["n"])
        facts.replayed_rows += int(r["replayed"] or 0)
        if r["writers"]:
            by_kind = facts.policies.setdefault(r["kind"], {})
            by_kind[r["writers"]] = by_kind.get(r["writers"], 0) + int(r["n"])
    return rows, counts


def commit(rows, counts: dict, ds_root: Path, land_root: Path, cfg: Config, facts: _Facts,  # noqa: ANN001
           timings: _Laps) -> tuple[Path, bool]:
    """8. Write to a temporary folder, hash, then move into place under the content-derived version, and
    write the manifest last (the commit point); a version that exists already is left as it is.
    Returns (manifest path, reused)."""
    tmp = ds_root / f".tmp-build-{os.getpid()}-{time.time_ns()}"
    try:
        files = _write(rows, tmp, cfg.files_per_split)
        timings.lap("8. write")
        content = hashlib.sha256("".join(f"{p}\n{h}\n" for p, h in sorted(files.items())).encode()).hexdigest()
        version = "ds-" + hashlib.sha256(f"{FORMAT_VERSION}|{content}|{facts.events_fp}".encode()).hexdigest()[:16]
        manifest_path = ds_root / "manifests" / f"{version}.json"
        if manifest_path.is_file():
            return manifest_path, True
        for rel in sorted(files):
            kind, split, name = rel.split("/")
            dst = contract.dataset_path(ds_root, kind, version, split) / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
        manifest = _manifest(version, content, files, counts, land_root, cfg, facts)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        part = manifest_path.with_name(f".tmp-{manifest_path.name}")
        part.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(part, manifest_path)  # the manifest is the commit point of a version
        return manifest_path, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(version: str, content: str, files: dict[str, str], counts: dict, land_root: Path, cfg: Config,
              facts: _Facts) -> dict:
    trainable = counts["dpo"]["train"] >= cfg.min_dpo_train_rows or counts["kto"]["train"] >= cfg.min_kto_train_rows
    return {
        "version": version, "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_window": {"start": facts.start.isoformat(), "end": facts.end.isoformat(),
                          "response_lookback_hours": cfg.response_lookback_hours,
                          "feedback_from": facts.replay_start.isoformat(),
                          "landing_dir": str(land_root), "landing_files": facts.landing_files,
                          "events": facts.events, "events_fingerprint": facts.events_fp},
        "counts": counts, "rows": sum(sum(v.values()) for v in counts.values()),
        "filters": facts.filters, "pii": facts.pii,
        # rows per kind by the adapter versions that wrote their answers (a mixed pair: "v1+v2")
        "behaviour_policies": {k: dict(sorted(v.items())) for k, v in sorted(facts.policies.items())},
        "replay": {**to_dict(cfg.replay), "replayed_rows": facts.replayed_rows},
        "poisoning": {"rule": "binomial test of disagreement with leave-one-out consensus (see build_dataset)",
                      "action": cfg.poison_action, "flagged_users": facts.flagged,
                      "users_compared": facts.users_compared},
        "user_caps": {"max_user_share": cfg.max_user_share, "cap_per_owner": facts.caps},
        "sha256": content, "files": {_final_rel(rel, version): h for rel, h in sorted(files.items())},
        "schema": {k: dict(v) for k, v in COLUMNS.items()},
        "trainable": trainable,
        "min_rows": {"dpo_train": cfg.min_dpo_train_rows, "kto_train": cfg.min_kto_train_rows},
        "config": to_dict(cfg),
        "config_hash": hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16],
    }


def _final_rel(rel: str, version: str) -> str:
    kind, split, name = rel.split("/")
    return (contract.dataset_path("", kind, version, split) / name).as_posix()


def _write(rows, tmp: Path, n_files: int) -> dict[str, str]:  # noqa: ANN001
    """Executors write the files; the driver gets back only their names and hashes, never the rows.

    A row goes to bucket pmod(xxhash64(prompt_id), n_files) of its kind and split, so the file it lands
    in is a function of the row alone, not of the cluster or its partitioning; each bucket is sorted and
    written by pyarrow (`_write_buckets`), whose bytes are a function of the rows (parquet-mr lists
    column encodings in JVM hash order, so Spark's own writer differs between runs of the same data).
    Hence the same version, byte for byte, on local[*] and on a cluster. A kind/split without rows
    gets an empty file, so readers always find the schema. Returns {kind/split/file: sha256}.
    `tmp` must be storage every executor can write (the same disk locally, a shared file system on a
    cluster).
    """
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    used = sorted({c for cols in COLUMNS.values() for c, _ in cols})
    keyed = rows.select("kind", "split", F.pmod(F.xxhash64("prompt_id"), F.lit(n_files)).alias("_bucket"), *used)
    written = (keyed.repartition("kind", "split", "_bucket")
               .mapInArrow(_write_buckets(str(tmp)), "file string, sha256 string, rows long").collect())
    files = {r["file"]: r["sha256"] for r in written}
    for kind in KINDS:
        for split in SPLITS:
            if not any(f.startswith(f"{kind}/{split}/") for f in files):
                dst = tmp / kind / split / "part-00000.parquet"
                dst.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(contract.arrow_schema(contract.DATASET_ROWS[kind]).empty_table(), dst,
                               compression="zstd")
                files[f"{kind}/{split}/part-00000.parquet"] = hashlib.sha256(dst.read_bytes()).hexdigest()
    return files


def _write_buckets(tmp: str):  # noqa: ANN202 - a mapInArrow function, run on the executors
    """Per Spark partition: every (kind, split, bucket) group in it, sorted by all its columns, as one
    Parquet file tmp/<kind>/<split>/part-<bucket>.parquet; yields (file, sha256, rows) per file."""

    def write(batches):  # noqa: ANN001, ANN202
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        batches = list(batches)
        table = pa.Table.from_batches(batches) if batches else None
        out: dict[str, list] = {"file": [], "sha256": [], "rows": []}
        groups = table.group_by(["kind", "split", "_bucket"]).aggregate([]).to_pylist() if table else []
        for g in sorted(groups, key=lambda g: (g["kind"], g["split"], g["_bucket"])):
            mask = pc.and_(pc.and_(pc.equal(table["kind"], g["kind"]), pc.equal(table["split"], g["split"])),
                           pc.equal(table["_bucket"], g["_bucket"]))
            cols = [c for c, _ in COLUMNS[g["kind"]]]
            part = (table.filter(mask).select(cols).sort_by([(c, "ascending") for c in cols])
                    .cast(contract.arrow_schema(contract.DATASET_ROWS[g["kind"]])))
            rel = f"{g['kind']}/{g['split']}/part-{g['_bucket']:05d}.parquet"
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, dst, compression="zstd")
            out["file"].append(rel)
            out["sha256"].append(hashlib.sha256(dst.read_bytes()).hexdigest())
            out["rows"].append(part.num_rows)
        yield pa.RecordBatch.from_pydict(out, schema=pa.schema([("file", pa.string()), ("sha256", pa.string()),
                                                                 ("rows", pa.int64())]))

    return write


def log_to_mlflow(manifest: dict, ds_root: Path, experiment: str) -> str | None:
    """Log the version once (tag dataset_version): mlflow.data inputs per kind/split + the manifest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.set_tracking_uri(endpoints.mlflow_tracking_uri())
    version = manifest["version"]
    exp = mlflow.set_experiment(experiment)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.dataset_version = '{version}'",
                               output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=f"dataset-{version}", tags={"dataset_version": version}) as run:
        window = manifest["source_window"]
        mlflow.log_params({"start": window["start"], "end": window["end"], "trainable": manifest["trainable"],
                           "rows": manifest["rows"]})
        for kind, splits in manifest["counts"].items():
            for split, n in splits.items():
                mlflow.log_metric(f"rows.{kind}.{split}", n)
                ident = reader.identity(version, kind, split, ds_root)  # the same identity the trainers log
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(ident["source"])
                ds = MetaDataset(source, name=ident["name"], digest=ident["digest"])
                mlflow.log_input(ds, context="training" if split == "train" else "evaluation")
        mlflow.log_dict(manifest, f"manifests/{version}.json")
        return run.info.run_id


def cli_args(argv: list[str]) -> list[str]:
    """Accept `--start X --end Y` (what the DAG passes) as well as start=X end=Y."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--start", "--end") and i + 1 < len(argv):
            out.append(f"{a[2:]}={argv[i + 1]}")
            i += 2
            continue
        if a.startswith(("--start=", "--end=")):
            out.append(a[2:])
        else:
            out.append(a)
        i += 1
    return out


def main(cfg: Config) -> dict:
    summary = build(cfg)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(parse_config(Config, cli_args(sys.argv[1:])))
