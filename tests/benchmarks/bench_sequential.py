"""Report: the live canary's sequential test at scale, with error rates, power and samples to decision.

For each true difference (0, +5, +10, -10 points) at base rates 0.2 / 0.5 / 0.8 and canary shares
0.5 / 0.2, 10,000 simulated canaries with a look after every 10 rated answers of the challenger
(training.sequential.simulate: the primary rule of `decide`, default Policy: alpha 0.05, max_rated
4000, margin 5 points). Both methods run on the same simulated answers (same seeds): `exact` (the
default) and `normal` (the normal mixture, for reference). Plus the cells where a normal
approximation is weakest: no difference at 0.05 / 0.95 with a 0.1 share.

Reported per cell: promoted as better, promoted as non-inferior (at max_rated), rolled back as worse,
rolled back at max_rated; power (better for d > 0, worse for d < 0); the challenger's rated answers at
the decision (median, p90); and the baseline, a one-look two-sided z-test with the same split:
its n at 80% power and at the sequential test's own power (capped at 1 - 1/(2N)).
Targets checked: declared better, and worse, under no difference <= alpha in every cell for `exact`;
+10 points found in >= 95%; a -10-point challenger promoted <= alpha.
Results: var/bench/sequential.json and var/bench/sequential.png. Pure numpy: the thread count and dtype
do not apply (recorded as None).

    make bench PYTEST_ARGS="-k sequential"
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.benchmarks._machine import BENCH_DIR, save
from training import sequential as seq

N = 10_000
LOOK = 10
DIFFS = (0.0, 0.05, 0.10, -0.10)
BASES = (0.2, 0.5, 0.8)
SHARES = (0.5, 0.2)
EXTREMES = ((0.05, 0.1), (0.95, 0.1), (0.05, 0.2), (0.95, 0.2))  # (base, share) at no difference
METHODS = ("exact", "normal")


def cell(base: float, d: float, share: float, method: str, seed: int) -> dict:
    policy = seq.Policy(method=method)
    t0 = time.monotonic()
    r = seq.simulate(base, base + d, N, round(LOOK / share), share, policy, seed=seed)
    wall = time.monotonic() - t0
    n_b = r["rated_challenger"]
    right = r["as_better"] if d > 0 else r["worse"] if d < 0 else np.zeros(N, dtype=bool)
    power = float(right.mean()) if d else None
    ratio = (1 - share) / share
    fixed = {}
    if d:
        fixed = {"fixed_n_80pct": seq.fixed_horizon_n(base, base + d, power=0.8, ratio=ratio),
                 "fixed_n_same_power": seq.fixed_horizon_n(base, base + d, power=min(max(power, 0.5), 1 - 1 / (2 * N)),
                                                           ratio=ratio)}
    sel = n_b[right] if d else n_b
    return {"method": method, "share": share, "p_champion": base, "difference": d, "experiments": N,
            "promoted_as_better": float(r["as_better"].mean()),
            "promoted_noninferior": float(((r["action"] == 1) & ~r["as_better"]).mean()),
            "rolled_back_worse": float(r["worse"].mean()),
            "rolled_back_at_max": float(((r["action"] == -1) & ~r["worse"]).mean()),
            "power": power,
            "median_rated_challenger": float(np.median(sel)) if sel.size else None,
            "p90_rated_challenger": float(np.quantile(sel, 0.9)) if sel.size else None,
            "median_rated_champion": float(np.median(r["rated_champion"][right] if d else r["rated_champion"])),
            **fixed, "seconds": round(wall, 2)}


@pytest.mark.bench
def test_sequential_error_rates_power_and_samples():
    rows = []
    for share in SHARES:
        for base in BASES:
            for d in DIFFS:
                seed = int(1000 * share) * 10_000 + int(100 * base) * 100 + int(100 * d) + 50
                rows += [cell(base, d, share, m, seed) for m in METHODS]
    rows += [cell(base, 0.0, share, m, 7 + int(100 * base) + int(1000 * share)) for base, share in EXTREMES
             for m in METHODS]
    for r in rows:
        print(f"{r['method']:6s} share {r['share']:.1f} p {r['p_champion']:.2f} d {r['difference']:+.2f}: "
              f"better {r['promoted_as_better']:.4f} worse {r['rolled_back_worse']:.4f} "
              f"NI {r['promoted_noninferior']:.4f} max-rollback {r['rolled_back_at_max']:.4f} power {r['power']} "
              f"median n {r['median_rated_challenger']} p90 {r['p90_rated_challenger']} "
              f"fixed n 80% {r.get('fixed_n_80pct')} same power {r.get('fixed_n_same_power')} ({r['seconds']} s)")
    plot(rows)
    save("sequential.json", {"experiments_per_cell": N, "look_every_challenger_rated": LOOK,
                             "policy": vars(seq.Policy()), "rows": rows}, dtype=None, threads=1)
    alpha = seq.Policy().alpha
    for r in rows:
        if r["method"] != "exact":
            continue
        if r["difference"] == 0:
            assert r["promoted_as_better"] <= alpha and r["rolled_back_worse"] <= alpha, r
        if r["difference"] == 0.10:
            assert r["power"] >= 0.95, r
        if r["difference"] == -0.10:
            assert r["promoted_as_better"] + r["promoted_noninferior"] <= alpha, r


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {0.05: "#1f77b4", 0.10: "#2ca02c", -0.10: "#d62728"}
    for d, colour in colours.items():
        for share, marker in zip(SHARES, ("o", "s"), strict=True):
            for method, style in (("exact", "-"), ("normal", ":")):
                sel = [r for r in rows if r["share"] == share and r["difference"] == d and r["method"] == method]
                ax.plot([r["p_champion"] for r in sel], [r["median_rated_challenger"] for r in sel], style,
                        marker=marker, color=colour, label=f"{method}, {d:+.0%}, share {share}")
            sel = [r for r in rows if r["share"] == share and r["difference"] == d and r["method"] == "exact"]
            ax.plot([r["p_champion"] for r in sel], [r["fixed_n_same_power"] for r in sel], "--", marker=marker,
                    color=colour, alpha=0.4, label=f"one-look z-test, same power, {d:+.0%}, share {share}")
    ax.set_xlabel("champion's thumbs-up rate")
    ax.set_ylabel("challenger's rated answers at the decision (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=5, ncol=2)
    ax.set_title("samples to decision")
    nulls = [r for r in rows if r["difference"] == 0]
    labels = [f"{r['p_champion']:.2f}/{r['share']:.1f}" for r in nulls if r["method"] == "exact"]
    x = np.arange(len(labels))
    for i, (method, colour) in enumerate((("exact", "#2ca02c"), ("normal", "#ff7f0e"))):
        sel = [r for r in nulls if r["method"] == method]
        bx.bar(x + 0.2 * (2 * i - 1) - 0.1, [r["promoted_as_better"] for r in sel], 0.2, color=colour,
               label=f"{method}: declared better")
        bx.bar(x + 0.2 * (2 * i - 1) + 0.1, [r["rolled_back_worse"] for r in sel], 0.2, color=colour, alpha=0.5,
               label=f"{method}: declared worse")
    bx.axhline(seq.Policy().alpha, color="k", ls="--", lw=1, label="alpha")
    bx.set_xticks(x, labels, rotation=60, fontsize=7)
    bx.set_xlabel("base rate / canary share (no true difference)")
    bx.set_ylabel(f"share of {N:,} canaries")
    bx.legend(fontsize=7)
    bx.set_title("false claims under continuous monitoring")
    fig.tight_layout()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(BENCH_DIR / "sequential.png", dpi=110)
    plt.close(fig)
