"""Report: the live canary's sequential test at scale — error rates, power and samples to decision.

For each true difference (0, +5, +10, -10 points) at base rates 0.2 / 0.5 / 0.8 and canary shares
0.5 / 0.2, 10,000 simulated canaries with a look after every 50 rated answers (training.sequential
.simulate, the primary rule of `decide`). Reported: the share promoted as better, promoted in all
(incl. non-inferiority at the maximum sample), rolled back, and the median / p90 rated answers of the
challenger arm at the decision, next to the one-look z-test's n per arm at 80% power (the baseline:
what a fixed-horizon experiment of the same effect needs, if one only looked once). Targets checked:
declared-better under no difference <= alpha everywhere; +10 points found in >= 95% of canaries.
Results: var/bench/sequential.json and sequential.png.

    make bench PYTEST_ARGS="-k sequential"
"""

from __future__ import annotations

import numpy as np

from tests.benchmarks._machine import BENCH_DIR, save
from training import sequential as seq

N = 10_000
DIFFS = (0.0, 0.05, 0.10, -0.10)
BASES = (0.2, 0.5, 0.8)
SHARES = (0.5, 0.2)


def test_sequential_error_rates_power_and_samples():
    policy = seq.Policy()
    rows = []
    for share in SHARES:
        for base in BASES:
            for d in DIFFS:
                r = seq.simulate(base, base + d, N, 50, share, policy, seed=hash((share, base, d)) % 2**32)
                decided = r["action"] != 0
                n_b = r["rated_challenger"][decided]
                rows.append({
                    "share": share, "p_champion": base, "difference": d,
                    "promoted_as_better": float(r["as_better"].mean()),
                    "promoted": float((r["action"] == 1).mean()), "rolled_back": float((r["action"] == -1).mean()),
                    "median_rated_challenger": float(np.median(n_b)) if n_b.size else None,
                    "p90_rated_challenger": float(np.quantile(n_b, 0.9)) if n_b.size else None,
                    "fixed_horizon_n_per_arm_80pct": seq.fixed_horizon_n(base, base + d) if d else None,
                })
    for row in rows:
        print(f"share {row['share']:.1f}  p {row['p_champion']:.1f}  d {row['difference']:+.2f}: "
              f"better {row['promoted_as_better']:.4f}  promoted {row['promoted']:.4f}  "
              f"rolled back {row['rolled_back']:.4f}  median n {row['median_rated_challenger']}  "
              f"fixed-horizon n {row['fixed_horizon_n_per_arm_80pct']}")
    plot(rows)
    save("sequential.json", {"experiments_per_cell": N, "look_every_rated": 50, "policy": vars(policy),
                             "rows": rows}, dtype=None)
    for row in rows:
        if row["difference"] == 0:
            assert row["promoted_as_better"] <= policy.alpha, row
        if row["difference"] == 0.10:
            assert row["promoted"] >= 0.95, row
        if row["difference"] == -0.10:
            assert row["promoted"] <= policy.alpha, row


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for share, marker in zip(SHARES, ("o", "s"), strict=True):
        for d, colour in ((0.05, "#1f77b4"), (0.10, "#2ca02c")):
            sel = [r for r in rows if r["share"] == share and r["difference"] == d]
            ax.plot([r["p_champion"] for r in sel], [r["median_rated_challenger"] for r in sel], marker=marker,
                    color=colour, label=f"sequential, +{d:.0%}, share {share}")
            if share == SHARES[0]:
                ax.plot([r["p_champion"] for r in sel], [r["fixed_horizon_n_per_arm_80pct"] for r in sel], "--",
                        color=colour, label=f"fixed horizon (one look, 80% power), +{d:.0%}")
    ax.set_xlabel("champion's thumbs-up rate")
    ax.set_ylabel("rated answers of the challenger at decision (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("samples to decision: anytime-valid canary vs a one-look test")
    fig.tight_layout()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(BENCH_DIR / "sequential.png", dpi=110)
    plt.close(fig)
