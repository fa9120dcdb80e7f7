"""The Spark dataset builder end to end on a real local Spark (one session for the module):
hand-built pairs appear, PII canaries vanish, the planted adversary is flagged, train/eval never share
a prompt, the same window gives the same version and bytes, a new event gives a new version, an empty
window is not trainable, and the version is logged to a real MLflow server."""

from __future__ import annotations

import functools
import json
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest import reader, synthetic
from ingest.build_dataset import Config, build, log_to_mlflow, main, spark_session

T0 = synthetic.BASE_TIME
WINDOW = {"start": "2026-11-23T10:00:00Z", "end": "2026-11-23T11:00:00Z"}
ADVERSARY = "u0007"
CANARIES = ["canary.7731@example.org", "+1 415-555-0134", "4111 1111 1111 1111", "sk-CANARYabcdef0123456789",
            "Zelda Canaryfield"]


def _response(rid: str, user: str, conv: str, prompt: str, text: str, minute: int, regenerates: str | None = None,
              adapter: str | None = None, logprob: float = -3.0):
    return {"event_id": f"e-{rid}", "created_at": T0 + timedelta(minutes=minute), "user_id": user,
            "conversation_id": conv, "response_id": rid, "adapter_version": adapter,
            "prompt_json": json.dumps([{"role": "user", "content": prompt}]), "completion": text,
            "finish_reason": "stop", "base_model": "tiny", "ab_arm": "base", "temperature": 0.7, "top_p": 0.95,
            "max_tokens": 64, "seed": None, "completion_logprob": logprob, "prompt_tokens": 5, "completion_tokens": 9,
            "latency_ms": 12.0, "regenerates": regenerates}


def _feedback(eid: str, rid: str, user: str, kind: str, minute: int, **extra):
    row = {"event_id": eid, "created_at": T0 + timedelta(minutes=minute), "user_id": user, "conversation_id": "x",
           "response_id": rid, "adapter_version": None, "kind": kind, "edited_text": None, "dwell_seconds": None,
           "comment": None}
    return row | extra


HAND_PROMPT = "How should I pack for a hiking trip?"


def hand_built():
    """Expected (written out below): h2 > h1 (regenerate), h2 > h3 (thumbs), edit > h4 (+ SFT edit);
    h3 came from adapter version 2, the others from the base model."""
    responses = [
        _response("h1", "hA", "hc1", HAND_PROMPT, "Just bring whatever you like.", 1),
        _response("h2", "hA", "hc1", HAND_PROMPT, "- water\n- map\n- jacket", 2, regenerates="h1"),
        _response("h3", "hB", "hc2", HAND_PROMPT, "Pack light and go.", 3, adapter="flywheel-assistant/2",
                  logprob=-4.5),
        _response("h4", "hC", "hc3", HAND_PROMPT, "Bring a suitcase.", 4),
        # canaries: in a prompt, an answer and an edit
        _response("p1", "hD", "pc1", "Hi, my name is Zelda Canaryfield, mail canary.7731@example.org", "ok", 5),
        _response("p2", "hD", "pc1", "what is my card?", "Your card 4111 1111 1111 1111, key sk-CANARYabcdef0123456789", 6),
    ]
    feedback = [
        _feedback("hf1", "h2", "hA", "thumbs_up", 3),
        _feedback("hf2", "h3", "hB", "thumbs_down", 4),
        _feedback("hf3", "h4", "hC", "edit", 5, edited_text="- boots\n- water\n- map"),
        _feedback("pf1", "p1", "hD", "thumbs_up", 6),
        _feedback("pf2", "p2", "hD", "edit", 7, edited_text="call +1 415-555-0134"),
    ]
    return responses, feedback


def expected_hand_rows() -> set[tuple]:
    return {("dpo", "- water\n- map\n- jacket", "Just bring whatever you like.", "regenerate", 1.0),
            ("dpo", "- water\n- map\n- jacket", "Pack light and go.", "thumbs", 1.0),
            ("dpo", "- boots\n- water\n- map", "Bring a suitcase.", "edit", 1.0)}


@functools.cache
def traffic() -> tuple[list[dict], list[dict]]:
    return synthetic.generate(800, n_users=20, n_prompts=30, adversaries=(ADVERSARY,), seed=3)


@pytest.fixture(scope="module")
def spark():
    session = spark_session(shuffle_partitions=2)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    """Synthetic traffic (20 users, one adversary) + the hand-built sequence, some events landed twice."""
    root = tmp_path_factory.mktemp("ingest-build")
    r, f = traffic()
    hr, hf = hand_built()
    synthetic.land_rows(r + hr, f + hf, root / "landing")
    # at-least-once landing: a replayed batch lands the first 50 feedback events again, under other offsets
    synthetic.land_rows([], [x | {"_offset": 10_000 + i} for i, x in enumerate(f[:50])], root / "landing")
    return root


def _cfg(root: Path, **kw) -> Config:
    base = {"landing_dir": str(root / "landing"), "datasets_dir": str(root / "datasets"), "mlflow_log": False,
            "shuffle_partitions": 2}
    return Config(**(WINDOW | base | kw))


def _all_rows(root: Path, version: str) -> dict[str, list[dict]]:
    return {f"{k}/{s}": reader.load_rows(version, k, s, root / "datasets") for k in reader.KINDS for s in reader.SPLITS}


@pytest.fixture(scope="module")
def built(spark, landed):
    return build(_cfg(landed), spark)


def test_build_rows_filters_and_privacy(built, landed):
    m = reader.manifest(built["version"], landed / "datasets")
    assert built["trainable"] and m["trainable"]
    rows = _all_rows(landed, built["version"])
    dpo = {("dpo", r["chosen"], r["rejected"], r["source"], r["weight"]) for k in ("dpo/train", "dpo/eval")
           for r in rows[k]}
    assert expected_hand_rows() <= dpo
    sft = {r["completion"] for k in ("sft/train", "sft/eval") for r in rows[k]}
    assert "- boots\n- water\n- map" in sft

    # PII canaries never reach a dataset file (any column, any kind) and are counted
    text = json.dumps(rows)
    for canary in CANARIES:
        assert canary not in text
    for f in (landed / "datasets").rglob("*.parquet"):
        table = pq.read_table(f)
        assert not any(c in json.dumps(table.to_pylist()) for c in CANARIES), f
    assert all(m["pii"][k] >= 1 for k in ("email", "phone", "card", "secret", "name")), m["pii"]

    # the adversary is flagged and none of its signals survive
    assert built["flagged_users"] == [ADVERSARY] and ADVERSARY in m["poisoning"]["flagged_users"]
    assert m["filters"]["poisoned_rows"] > 0

    # dedupe by event_id: the replayed feedback does not count twice
    assert m["source_window"]["events"]["feedback"] == len(traffic()[1]) + len(hand_built()[1])
    # no prompt in both splits; counts match the files
    for kind in reader.KINDS:
        train = {r["prompt_id"] for r in rows[f"{kind}/train"]}
        evals = {r["prompt_id"] for r in rows[f"{kind}/eval"]}
        assert not train & evals
        assert m["counts"][kind] == {"train": len(rows[f"{kind}/train"]), "eval": len(rows[f"{kind}/eval"])}
    assert set(m["filters"]) >= {"exact_duplicates", "near_duplicates", "user_cap", "poisoned_rows"}

    ds = reader.load(built["version"], "dpo", "train", landed / "datasets")
    assert ds.column_names == ["prompt_id", "prompt", "weight", "chosen", "rejected"]
    assert ds[0]["prompt"][-1]["role"] == "user" and ds[0]["chosen"][0]["role"] == "assistant"


def test_rows_name_the_policy_that_wrote_each_answer(built, landed):
    """Every model-written answer carries its behaviour policy and log-probability (off-policy
    corrections need them); a user's edit carries neither; the manifest counts rows per writer."""
    rows = [r for k in ("dpo/train", "dpo/eval") for r in _all_rows(landed, built["version"])[k]]
    by_source = {r["source"]: r for r in rows if r["chosen"].startswith(("- water", "- boots"))}
    thumbs, edit, regen = by_source["thumbs"], by_source["edit"], by_source["regenerate"]
    assert (thumbs["chosen_policy"], thumbs["chosen_logprob"]) == ("base", -3.0)
    assert (thumbs["rejected_policy"], thumbs["rejected_logprob"]) == ("flywheel-assistant/2", -4.5)
    assert edit["chosen_policy"] is None and edit["chosen_logprob"] is None and edit["rejected_policy"] == "base"
    assert regen["chosen_policy"] == regen["rejected_policy"] == "base"
    m = reader.manifest(built["version"], landed / "datasets")
    writers = m["behaviour_policies"]["dpo"]
    assert writers["base+flywheel-assistant/2"] >= 1 and sum(writers.values()) == sum(m["counts"]["dpo"].values())
    assert all(r["policy"] == "base" for k in ("kto/train", "kto/eval") for r in _all_rows(landed, built["version"])[k])
    assert m["replay"]["replayed_rows"] == 0


def test_cut_off_answers_keep_their_writer_but_not_their_logprob(spark):
    """attach_behaviour on hand-made frames: a logged log-prob counts only for an answer that ended by
    itself (`stop`); a cut-off one (`length`) lacks the end-of-turn token training scores, so its
    log-prob is null while its writer is kept; no adapter = "base"."""
    from datetime import UTC, datetime

    from ingest.build_dataset import _Facts, attach_behaviour

    t = datetime(2026, 11, 23, 10, tzinfo=UTC)
    resp = spark.createDataFrame(
        [("r1", None, "stop", -3.0, t), ("r2", "flywheel-assistant/2", "length", -9.0, t),
         ("r3", "flywheel-assistant/2", "stop", -4.5, t)],
        "response_id string, adapter_version string, finish_reason string, completion_logprob double, "
        "created_at timestamp")
    rows = spark.createDataFrame([("dpo", ["r1", "r2"], 1.0), ("dpo", ["r3", "r1"], 1.0), ("kto", ["r2"], 1.0)],
                                 "kind string, response_ids array<string>, weight double")
    got = attach_behaviour(rows, resp, Config(), _Facts(t, t, t, t)).collect()
    dpo = {tuple(r["response_ids"]): r for r in got if r["kind"] == "dpo"}
    (kto,) = [r for r in got if r["kind"] == "kto"]
    assert (dpo["r1", "r2"]["chosen_policy"], dpo["r1", "r2"]["chosen_logprob"]) == ("base", -3.0)
    assert (dpo["r1", "r2"]["rejected_policy"], dpo["r1", "r2"]["rejected_logprob"]) == ("flywheel-assistant/2", None)
    assert (dpo["r3", "r1"]["chosen_logprob"], dpo["r3", "r1"]["rejected_logprob"]) == (-4.5, -3.0)
    assert (kto["policy"], kto["logprob"], kto["rejected_policy"]) == ("flywheel-assistant/2", None, None)


def test_replay_decays_rows_answered_before_the_window(spark, built, landed):
    """Half the hour as the window and the other half replayed: the same answers, and each row older
    than `start` weighs 0.5 ** (age / half-life) of what it weighs with the whole hour as the window."""
    half = _cfg(landed, start="2026-11-23T10:30:00Z", datasets_dir=str(landed / "replay"))
    half.replay.hours, half.replay.half_life_hours = 0.5, 0.5
    replayed = build(half, spark)
    m = reader.manifest(replayed["version"], landed / "replay")
    assert m["replay"]["hours"] == 0.5 and m["replay"]["replayed_rows"] > 0
    assert m["source_window"]["feedback_from"].startswith("2026-11-23T10:00:00")
    rows = [r for k in ("dpo/train", "dpo/eval") for r in reader.load_rows(replayed["version"], "dpo", k[4:],
                                                                            landed / "replay")]
    thumbs = next(r for r in rows if r["source"] == "thumbs" and r["chosen"].startswith("- water"))
    assert thumbs["weight"] == round(0.5 ** ((30 - 3) / 60 / 0.5), 6)  # newest answer (h3) at 10:03
    full = {(r["chosen"], r["rejected"], r["source"]): r["weight"]
            for k in ("dpo/train", "dpo/eval") for r in _all_rows(landed, built["version"])[k]}
    common = [(r["weight"], full[(r["chosen"], r["rejected"], r["source"])]) for r in rows
              if (r["chosen"], r["rejected"], r["source"]) in full]
    assert len(common) > 0.75 * len(full)  # not all: near-duplicates keep their heaviest, which decay can change
    assert all(0.5 * f - 1e-6 <= w <= f + 1e-6 for w, f in common) and any(w < f for w, f in common)


def test_same_window_same_version_new_event_new_version(spark, built, landed):
    files = sorted((landed / "datasets").rglob("*"))
    before = {f: (f.stat().st_mtime_ns, f.read_bytes() if f.is_file() else b"") for f in files}
    again = build(_cfg(landed), spark)
    assert again["version"] == built["version"] and again["reused"]
    after = sorted((landed / "datasets").rglob("*"))
    assert after == files and all((f.stat().st_mtime_ns, f.read_bytes() if f.is_file() else b"") == before[f]
                                  for f in files)  # touched nothing

    # The second build wrote its files to a temporary folder and hashed them before finding the
    # manifest: the version id is a sha256 of those bytes, so an equal id means byte-identical files.
    m = reader.manifest(built["version"], landed / "datasets")
    assert all(len(h) == 64 for h in m["files"].values())

    # one new event in the window -> a new version
    synthetic.land_rows([], [_feedback("new-1", "h1", "hZ", "thumbs_up", 30)], landed / "landing")
    newer = build(_cfg(landed), spark)
    assert newer["version"] != built["version"] and not newer["reused"]


def test_empty_window_not_trainable_and_logged_to_mlflow(spark, landed, stack, capsys):
    cfg = _cfg(landed, start="2026-11-20", end="2026-11-20T06:00:00Z", mlflow_log=True)
    import ingest.build_dataset as bd

    real = bd.build
    bd_build = lambda c: real(c, spark)  # noqa: E731 - reuse the module's warm session inside main()
    bd.build = bd_build
    try:
        main(cfg)
    finally:
        bd.build = real
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["trainable"] is False and all(v == {"train": 0, "eval": 0} for v in last["counts"].values())
    assert reader.load(last["version"], "kto", "eval", landed / "datasets").num_rows == 0

    import mlflow

    run = mlflow.get_run(last["mlflow_run_id"])
    assert run.data.tags["dataset_version"] == last["version"]
    assert len(run.inputs.dataset_inputs) == 6
    # the identity every trainer logs too (ingest.reader.identity), so MLflow finds both runs by it
    logged = {d.dataset.name: (d.dataset.digest, d.dataset.source) for d in run.inputs.dataset_inputs}
    for kind in reader.KINDS:
        for split in reader.SPLITS:
            ident = reader.identity(last["version"], kind, split, landed / "datasets")
            digest, source = logged[ident["name"]]
            assert digest == ident["digest"] and ident["source"] in source, (ident, logged)
    idents = [reader.identity(last["version"], "dpo", "train", landed / "datasets")]
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"dataset.digest = '{idents[0]['digest']}'")
    assert [r.info.run_id for r in found] == [last["mlflow_run_id"]]
    # logged once: logging the same version again finds the same run
    m = reader.manifest(last["version"], landed / "datasets")
    assert log_to_mlflow(m, landed / "datasets", cfg.mlflow_experiment) == last["mlflow_run_id"]
