"""
How often do compare.py's intervals cover the true difference with 3 runs a side?  python coverage.py

Simulated experiments with no true difference: 3 runs against 3 on 73 problems, each run's values the
problem's base rate plus a run effect ~ N(0, 0.1) (seed-to-seed spread) plus per-problem noise ~ N(0, 0.05).
compare.boot_diff (problems and seeds resampled; 2000 draws here, 20000 in the tables) and compare.welch_diff
(each run one unit) are each asked for a 95% interval; the share of experiments whose interval holds 0.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", ".."))
from experiments.compare import boot_diff, welch_diff  # noqa: E402

rng, T, P = np.random.default_rng(0), 1000, 73
base = rng.uniform(0.1, 0.9, P)
hits = {"bootstrap": 0, "welch": 0}
for t in range(T):
    A, B = ([dict(enumerate(base + rng.normal(0, 0.1) + rng.normal(0, 0.05, P))) for _ in range(3)] for _ in "AB")
    _, lo, hi, _ = boot_diff(A, B, n=2000, seed=t)
    hits["bootstrap"] += lo <= 0 <= hi
    lo, hi = welch_diff(A, B)
    hits["welch"] += lo <= 0 <= hi
print(f"{T} simulated 3-vs-3 experiments, no true difference: a nominal 95% interval holds it in "
      + ", ".join(f"{k} {v / T:.3f}" for k, v in hits.items()))
