"""Benchmark: the Spark dataset build on 1M events (warm session) vs the same transform in polars, and the
Spark job at 1M and 4M events (near-linear?).

The polars reference does the same steps on the same landing files: window filter, dedupe by event_id,
PII scrub with the same rules (counted), prompt normalisation, feedback aggregation, the same pure
pairing function per prompt, the poisoning statistics, exact + near dedupe, per-user caps, the prompt
hash split, Parquet out. (Prompt normalisation works on the JSON text with regexes instead of parsing
it; everything else is step for step.) Targets: spark / polars <= 3x; 4M / 1M time ~ 4x.
Writes var/bench/ingest_build.json.  BENCH_BUILD_EVENTS="1000000,4000000" sets the sizes.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from ingest import pii, synthetic
from ingest.build_dataset import Config, build, flag_poisoners, spark_session, user_cap
from ingest.pairing import Answer, PairingConfig, rows_for_prompt
from tests.benchmarks._machine import Target, save

SIZES = [int(x) for x in os.environ.get("BENCH_BUILD_EVENTS", "1000000,4000000").split(",")]
EVENTS_PER_CONV = 2.45  # measured mean of synthetic.generate


def _land(root: Path, n_events: int) -> int:
    """Land ~n_events synthetic events in 50k-conversation chunks (bounded memory); returns the count."""
    n_conv = int(n_events / EVENTS_PER_CONV)
    total, chunk = 0, 50_000
    for i, start in enumerate(range(0, n_conv, chunk)):
        r, f = synthetic.generate(min(chunk, n_conv - start), n_users=2000, n_prompts=max(1000, n_conv // 20),
                                  seed=1000 + i, adversaries=("u0007",))
        synthetic.land_rows(r, f, root)
        total += len(r) + len(f)
    return total


def polars_build(land: Path, out: Path, cfg: Config) -> dict:
    import polars as pl

    start = synthetic.BASE_TIME
    end = start + timedelta(hours=1)
    resp = (pl.scan_parquet(str(land / "responses" / "*" / "*" / "*.parquet"), hive_partitioning=False)
            .filter(pl.col("created_at") < end).unique("event_id"))
    fb = (pl.scan_parquet(str(land / "feedback" / "*" / "*" / "*.parquet"), hive_partitioning=False)
          .filter((pl.col("created_at") >= start) & (pl.col("created_at") < end)).unique("event_id"))
    pii_counts = {}
    for col, frame in (("prompt_json", "resp"), ("completion", "resp"), ("edited_text", "fb")):
        for name, pattern, repl in pii.RULES:
            df = resp if frame == "resp" else fb
            pii_counts[f"{col}.{name}"] = df.select(pl.col(col).str.count_matches(pattern).sum())
            df = df.with_columns(pl.col(col).str.replace_all(pattern, pii.rust_replacement(repl)))
            if frame == "resp":
                resp = df
            else:
                fb = df
    resp = resp.with_columns(
        pl.when(pl.col("prompt_json").str.contains(r'"role": ?"user", ?"content": ?"(?:[^"\\]|\\.)*"\}\]$'))
        .then(pl.col("prompt_json").str.replace_all(r"[ \t]+", " ")).alias("prompt_key"))
    resp = resp.filter(pl.col("prompt_key").is_not_null() & (pl.col("finish_reason") != "length")).collect()
    fb = fb.collect()
    pl.collect_all(list(pii_counts.values()))

    last_thumb = (fb.filter(pl.col("kind").is_in(["thumbs_up", "thumbs_down"])).sort("created_at", "event_id")
                  .group_by("response_id", "user_id").agg(pl.col("kind").last()))
    thumbs = last_thumb.group_by("response_id").agg(
        pl.col("user_id").filter(pl.col("kind") == "thumbs_up").sort().alias("ups"),
        pl.col("user_id").filter(pl.col("kind") == "thumbs_down").sort().alias("downs"))
    edits = fb.filter(pl.col("kind") == "edit").sort("created_at", "event_id").group_by("response_id").agg(
        pl.col("edited_text").last().alias("edit_text"), pl.col("user_id").last().alias("editor"))
    signals = fb.group_by("response_id").agg(
        (pl.col("kind") == "copy").any().alias("copied"), pl.col("dwell_seconds").max().alias("dwell_s"),
        (pl.col("kind") == "abandon").any().alias("abandoned"), (pl.col("kind") == "regenerate").any().alias("regen_fb"))
    answers = (resp.unique("response_id").join(signals, "response_id", "left").join(thumbs, "response_id", "left")
               .join(edits, "response_id", "left"))
    rows = []
    for group in answers.partition_by("prompt_key"):
        rows.extend(rows_for_prompt([Answer(response_id=r["response_id"], conversation_id=r["conversation_id"],
                                            user_id=r["user_id"], prompt_json=r["prompt_key"],
                                            completion=r["completion"], regenerates=r["regenerates"],
                                            ups=tuple(r["ups"] or ()), downs=tuple(r["downs"] or ()),
                                            edit_text=r["edit_text"], editor=r["editor"], copied=bool(r["copied"]),
                                            dwell_s=r["dwell_s"], abandoned=bool(r["abandoned"]),
                                            regenerate_feedback=bool(r["regen_fb"]))
                                     for r in group.iter_rows(named=True)], cfg.pairing))
    rows_df = pl.DataFrame([{"kind": r.kind, "prompt_id": r.prompt_id, "prompt_json": r.prompt_json,
                             "source": r.source, "weight": r.weight, "owner": r.owner, "users": list(r.users),
                             "chosen": r.chosen, "rejected": r.rejected, "completion": r.completion,
                             "label": r.label} for r in rows])

    # poisoning statistics (leave-one-out consensus per answer)
    near = lambda c: pl.col(c).fill_null("").str.to_lowercase().str.replace_all("[^0-9a-z]+", " ").str.strip_chars()  # noqa: E731
    labels = (last_thumb.join(resp.select("response_id", (pl.col("prompt_key") + "\x01" + near("completion"))
                                          .alias("answer_key")), "response_id")
              .select("user_id", "answer_key", (pl.col("kind") == "thumbs_up").alias("up")).unique())
    per = labels.group_by("answer_key").agg(pl.col("up").sum().alias("n_up"), (~pl.col("up")).sum().alias("n_down"))
    cmp = labels.join(per, "answer_key").with_columns(
        (pl.col("n_up") - pl.col("up").cast(pl.Int64)).alias("o_up"),
        (pl.col("n_down") - (~pl.col("up")).cast(pl.Int64)).alias("o_down"))
    cmp = cmp.filter((pl.col("o_up") + pl.col("o_down") >= cfg.poison_min_other_raters) & (pl.col("o_up") != pl.col("o_down")))
    per_user = cmp.group_by("user_id").agg(pl.len().alias("n"), (pl.col("up") != (pl.col("o_up") > pl.col("o_down"))).sum().alias("d"))
    flagged = flag_poisoners({r["user_id"]: (r["n"], r["d"]) for r in per_user.iter_rows(named=True)}, cfg)
    rows_df = rows_df.filter(~pl.col("users").list.eval(pl.element().is_in(list(flagged))).list.any())

    # exact then near duplicates, caps, split, write
    rows_df = rows_df.sort(["weight", "source", "owner"], descending=[True, False, False])
    rows_df = rows_df.unique(["kind", "prompt_id", "chosen", "rejected", "completion", "label"], keep="first",
                             maintain_order=True)
    rows_df = rows_df.with_columns(near("chosen").alias("_nc"), near("rejected").alias("_nr"), near("completion").alias("_np"))
    rows_df = rows_df.unique(["kind", "prompt_id", "_nc", "_nr", "_np", "label"], keep="first", maintain_order=True)
    counts = rows_df.group_by("kind", "owner").len()
    caps = {k: user_cap(counts.filter(pl.col("kind") == k)["len"].to_list(), cfg.max_user_share) for k in ("dpo", "kto", "sft")}
    rows_df = rows_df.with_columns(pl.int_range(pl.len()).over("kind", "owner").alias("_rn"))
    rows_df = rows_df.filter(pl.col("_rn") < pl.col("kind").replace_strict(caps, return_dtype=pl.Int64))
    rows_df = rows_df.with_columns(pl.when(pl.col("prompt_id").hash() % 10_000 < 1000).then(pl.lit("eval"))
                                   .otherwise(pl.lit("train")).alias("split"))
    out.mkdir(parents=True, exist_ok=True)
    for (kind, split), part in rows_df.group_by("kind", "split"):
        part.drop("_nc", "_nr", "_np", "_rn", "users", "owner").sort("prompt_id").write_parquet(out / f"{kind}-{split}.parquet")
    return {"rows": rows_df.height, "flagged": sorted(flagged)}


@pytest.mark.bench
@pytest.mark.timeout(5400)  # 4M events on 2 cores take tens of minutes
def test_bench_build_spark_vs_polars(tmp_path):
    results: dict = {"sizes": {}}
    spark = spark_session()
    try:
        for size in SIZES:
            land = tmp_path / f"landing-{size}"
            t = time.perf_counter()
            n = _land(land, size)
            gen_s = time.perf_counter() - t
            cfg = Config(start="2026-11-23T10:00:00Z", end="2026-11-23T11:00:00Z", landing_dir=str(land),
                         datasets_dir=str(tmp_path / f"ds-{size}"), mlflow_log=False, pairing=PairingConfig())
            build(Config(**(cfg.__dict__ | {"datasets_dir": str(tmp_path / "warmup"), "end": "2026-11-23T10:05:00Z"})),
                  spark)  # warm the session (JIT, Python workers) on a slice
            t = time.perf_counter()
            summary = build(cfg, spark)
            spark_s = time.perf_counter() - t
            entry = {"events": n, "landing_s": round(gen_s, 1), "spark_s": round(spark_s, 2),
                     "spark_steps_s": summary["step_s"], "spark_rows": summary["counts"],
                     "spark_flagged": summary["flagged_users"]}
            if size == SIZES[0]:
                t = time.perf_counter()
                ref = polars_build(land, tmp_path / "polars", cfg)
                entry["polars_s"] = round(time.perf_counter() - t, 2)
                entry["polars_rows"] = ref["rows"]
                entry["spark_over_polars"] = round(spark_s / entry["polars_s"], 2)
            results["sizes"][str(size)] = entry
            print(f"\nBENCH ingest_build {size}: {json.dumps(entry)}", flush=True)
            save("ingest_build.json", results, dtype=None)  # after each size: a run cut short keeps its figures
    finally:
        spark.stop()
    if len(SIZES) > 1:
        a, b = results["sizes"][str(SIZES[0])], results["sizes"][str(SIZES[-1])]
        results["scaling"] = {"events_ratio": round(b["events"] / a["events"], 2),
                              "time_ratio": round(b["spark_s"] / a["spark_s"], 2)}
    print("\nBENCH ingest_build", json.dumps(results), flush=True)
    first = results["sizes"][str(SIZES[0])]
    targets = [Target("spark_over_polars", first["spark_over_polars"], "<=", 3.0)]
    if "scaling" in results:  # near-linear: the time may grow at most 1.25x as fast as the events
        sc = results["scaling"]
        targets.append(Target("time_ratio_over_events_ratio", round(sc["time_ratio"] / sc["events_ratio"], 2), "<=", 1.25))
    save("ingest_build.json", results, dtype=None, targets=targets)  # no tensors: dtype None
