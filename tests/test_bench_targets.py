"""Benchmarks check their targets: `save` records each target's outcome, then fails on a miss."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import _machine
from tests.benchmarks._machine import Target


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_machine, "BENCH_DIR", tmp_path)
    return tmp_path


def test_met_targets_are_recorded(bench_dir):
    _machine.save("ok.json", {"x": 1}, dtype=None,
                  targets=[Target("ratio", 3.0, ">=", 2.5), Target("p99_ms", 4.9, "<=", 5.0)])
    record = json.loads((bench_dir / "ok.json").read_text())
    assert record["targets"]["ratio"] == {"value": 3.0, "op": ">=", "target": 2.5, "checked": True, "met": True}
    assert record["targets"]["p99_ms"]["met"] is True
    assert record["machine"]["cpu_capability"]


def test_a_missed_target_fails_after_the_figures_are_written(bench_dir):
    with pytest.raises(AssertionError, match=r"p99_ms: 5.2 \(target <= 5.0\)"):
        _machine.save("miss.json", {"x": 1}, dtype=None,
                      targets=[Target("ratio", 3.0, ">=", 2.5), Target("p99_ms", 5.2, "<=", 5.0)])
    record = json.loads((bench_dir / "miss.json").read_text())
    assert record["targets"]["p99_ms"]["met"] is False and record["targets"]["ratio"]["met"] is True


def test_a_target_that_does_not_apply_is_reported_not_checked(bench_dir):
    _machine.save("na.json", {}, dtype="fp32",
                  targets=[Target("bf16_speedup", 1.1, ">=", 2.5, not_applicable="trained in fp32 here")])
    t = json.loads((bench_dir / "na.json").read_text())["targets"]["bf16_speedup"]
    assert t["checked"] is False and t["met"] is None and t["not_applicable"] == "trained in fp32 here"


def test_an_unknown_comparison_is_an_error():
    with pytest.raises(ValueError, match="op must be"):
        _ = Target("x", 1.0, ">", 0.5).met
