"""Where a benchmark ran: the record every var/bench/*.json carries under "machine".

The same code is 4-28x faster or slower depending on the CPU's bf16 support (training.precision), so a
figure without the CPU model, torch's capability string, the thread count and the dtype it ran in
cannot be compared with another. Every bench_*.py writes its JSON through `save`, and checks its
targets with `Target`: the JSON records each target (met or not) before the test fails on a miss.

    from tests.benchmarks._machine import Target, save
    targets = [Target("tokens/s vs baseline", ratio, ">=", 2.5)]
    save("train_dpo.json", result, dtype="bf16", targets=targets)   # fails after writing if one is missed
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import precision

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "var" / "bench"


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """bf16 | fp16 | fp32 for any spelling or torch dtype; None for benchmarks that run no tensors."""
    return None if dtype is None else precision.normalise(str(dtype))


def machine(dtype: str | torch.dtype | None, threads: int | None = None) -> dict[str, Any]:
    """CPU model, torch's CPU capability, native bf16 flags, threads, the dtype the figures ran in, and
    what `auto` picks on this machine (so a pinned dtype that differs from it stands out)."""
    auto = precision.decide("auto", "cpu", probe=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": auto.cpu_model, "cpu_capability": auto.capability,
            "cpu_native_bf16": list(auto.native_bf16), "cores": cores,
            "threads": threads if threads is not None else torch.get_num_threads(),
            "dtype": dtype_name(dtype), "auto_dtype": auto.dtype, "auto_reason": auto.reason,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass(frozen=True)
class Target:
    """One figure a benchmark promises: `value` must be `op` (">=" or "<=") `target`.

    `not_applicable` names why the target does not hold on this machine (e.g. a bf16 speed-up on a CPU
    without native bf16): the figure is then recorded as a report and not checked."""

    name: str
    value: float
    op: str
    target: float
    not_applicable: str = ""

    @property
    def met(self) -> bool:
        if self.op not in (">=", "<="):
            raise ValueError(f"target {self.name!r}: op must be '>=' or '<=', not {self.op!r}")
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def record(self) -> dict[str, Any]:
        checked = not self.not_applicable
        return {"value": self.value, "op": self.op, "target": self.target, "checked": checked,
                "met": self.met if checked else None, **({"not_applicable": self.not_applicable} if not checked else {})}


def save(filename: str, data: dict[str, Any], dtype: str | torch.dtype | None, threads: int | None = None,
         targets: list[Target] | None = None) -> Path:
    """Write var/bench/<filename> with the machine record first (and each target's outcome), then fail
    if a checked target was missed; returns the path."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / filename
    record = {"machine": machine(dtype, threads), **data}
    if targets:
        record["targets"] = {t.name: t.record() for t in targets}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    missed = [f"{t.name}: {t.value} (target {t.op} {t.target})" for t in targets or [] if not t.not_applicable and not t.met]
    assert not missed, f"{filename}: missed " + "; ".join(missed) + f" (machine: {record['machine']})"
    return path
