"""Promote / rollback against a real MLflow registry: aliases, history, guards, and serving following.

The registered "adapters" here are minimal folders (adapter_config.json + sidecar): alias moves never
read the weights, and the serving check uses a recording backend instead of a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODEL = "promote-test-assistant"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def versions(stack, tmp_path_factory) -> list[str]:
    """Three registered versions; 1 and 2 passed the gate, 3 failed it."""
    import mlflow

    from training import registry

    mlflow.set_tracking_uri(stack.mlflow)
    mlflow.set_experiment("promote-test")
    out = []
    for i, passed in enumerate(("true", "true", "false"), start=1):
        folder = tmp_path_factory.mktemp(f"adapter{i}")
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        (folder / registry.SIDECAR).write_text(json.dumps({"base_model": "tiny", "trainer": "dpo"}))
        with mlflow.start_run(run_name=f"adapter{i}") as run:
            ref = registry.register_adapter(folder, run.info.run_id, name=MODEL, alias="challenger",
                                            tags={"gate.passed": passed})
        out.append(ref.version)
    return out


def promote(**kw):  # noqa: ANN201
    from training import promote as p

    return p.main(p.Config(model_name=MODEL, actor="pytest", **kw))


def rollback(**kw):  # noqa: ANN201
    from training import rollback as r

    return r.main(r.Config(model_name=MODEL, actor="pytest", **kw))


def test_promote_rollback_promote_round_trip(versions):
    from training import promote as p
    from training import registry

    v1, v2, _ = versions
    # No champion yet: the first promotion sets champion and no previous.
    r = promote(version=v1, reason="first release")
    assert r["changed"] and r["previous"] is None
    assert registry.aliases(MODEL) == {"champion": v1, "challenger": versions[-1]}

    # Promoting the challenger-less default uses @challenger, which is v3 (gate failed): refused.
    with pytest.raises(SystemExit, match="gate.passed='false'"):
        promote(reason="should be refused")

    promote(version=v2, reason="gate passed")
    assert registry.aliases(MODEL)["champion"] == v2 and registry.aliases(MODEL)["previous"] == v1
    again = promote(version=v2, reason="re-run of the same DAG task")  # idempotent: previous stays v1
    assert not again["changed"] and registry.aliases(MODEL)["previous"] == v1

    rollback(reason="thumbs-down doubled")
    assert registry.aliases(MODEL)["champion"] == v1 and registry.aliases(MODEL)["previous"] == v2

    promote(version=v2, reason="fixed the serving bug, v2 was fine")
    al = registry.aliases(MODEL)
    assert al["champion"] == v2 and al["previous"] == v1

    hist = p.history(MODEL)
    assert [(e["action"], e["champion"], e["from"]) for e in hist] == [
        ("promote", v1, None), ("promote", v2, v1), ("rollback", v1, v2), ("promote", v2, v1)]
    assert all(e["by"] == "pytest" and e["reason"] and e["at"].endswith("Z") for e in hist)
    tags = registry.resolve(f"models:/{MODEL}/{v1}").tags
    assert tags["rolled_back_to_reason"] == "thumbs-down doubled" and tags["promoted_by"] == "pytest"


def test_guards(versions):
    v1, v2, v3 = versions
    with pytest.raises(SystemExit, match="needs a reason"):
        promote(version=v1, reason="  ")
    with pytest.raises(SystemExit, match="no version 999"):
        promote(version="999", reason="x")
    forced = promote(version=v3, reason="incident override", force=True)
    from training import registry

    assert forced["changed"] and registry.aliases(MODEL)["champion"] == v3
    assert "forced past the gate" in registry.resolve(f"models:/{MODEL}/{v3}").tags["promoted_reason"]
    rollback(to_version=v2, reason="undo the override")
    assert registry.aliases(MODEL)["champion"] == v2


def test_cli_prints_json_and_exits_zero(versions, stack):
    import os

    v1 = versions[0]
    env = {**os.environ, "FLYWHEEL_MODEL_NAME": MODEL}
    out = subprocess.run([sys.executable, "-m", "training.rollback", "--reason", "cli check", f"model_name={MODEL}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["action"] == "rollback" and res["changed"]
    # promote's flags map onto its config the same way (checked in-process: a second interpreter costs ~12 s).
    from ingest.config import parse_config
    from training import gate, promote

    cfg = parse_config(promote.Config, gate.job_argv(["--version", v1, "--reason", "cli", f"model_name={MODEL}"],
                                                     {"--version": "version", "--reason": "reason"}, None))
    assert (cfg.version, cfg.reason, cfg.model_name) == (v1, "cli", MODEL)
    assert promote.main(cfg)["champion"] == v1


def test_serving_follows_the_alias(versions, tmp_path):
    """The serving router picks the new champion up within its poll interval."""
    from serving import adapters

    class RecordingBackend:
        def __init__(self) -> None:
            self.loaded: list[str] = []

        def load_adapter(self, name: str, folder: str | Path) -> None:
            self.loaded.append(name)

        def unload_adapter(self, name: str) -> None:
            pass

    v1, v2, _ = versions
    promote(version=v1, reason="serving check start")
    router = adapters.AdapterRouter(RecordingBackend(), base_model="tiny", model_name=MODEL, adapters_dir=tmp_path)
    poll = 0.5
    router.start(poll_interval_s=poll)
    try:
        assert router.state()["champion"] == f"{MODEL}/{v1}"
        promote(version=v2, reason="serving check")
        deadline = time.monotonic() + 10 * poll + 5  # poll interval plus a registry round trip under load
        while router.state()["champion"] != f"{MODEL}/{v2}" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert router.state()["champion"] == f"{MODEL}/{v2}"
        rollback(reason="serving check rollback")
        deadline = time.monotonic() + 10 * poll + 5
        while router.state()["champion"] != f"{MODEL}/{v1}" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert router.state()["champion"] == f"{MODEL}/{v1}"
    finally:
        router.stop()
