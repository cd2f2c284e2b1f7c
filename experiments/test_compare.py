"""
Tests of the paired comparisons (experiments/compare.py): the bootstrap pairs problems, the run-level
Welch interval against its formula and t quantiles against tables, the marks (ns, †) in the tables and the
verdict, and the pre-registered rule on made-up runs.
"""
import json
import math
import os
import sys
import tempfile

import numpy as np

# the repo root: experiments
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.compare import boot_diff, diffs, per_problem, t_quantile, verdict, welch_diff  # noqa: E402

TMP = tempfile.mkdtemp(prefix="gr_test_compare_")


def test_compare_pairs_by_problem():
    """compare.boot_diff: a constant shift per problem gives a tight interval around it, however much the
    problems vary (paired; seeds alike here, so seed resampling adds nothing); equal sides give 0 inside
    the interval; the per-problem values skip timeouts."""
    rng = np.random.default_rng(1)
    base = [{f"p{i}": v for i, v in enumerate(rng.uniform(0, 0.8, 60))}] * 3
    shifted = [{k: v + 0.1 for k, v in d.items()} for d in base]
    est, lo, hi, n = boot_diff(shifted, base)
    assert n == 60 and abs(est - 0.1) < 1e-9 and 0.1 - 1e-9 <= lo <= hi <= 0.1 + 1e-9
    est, lo, hi, _ = boot_diff(base, base)
    assert est == 0 and lo <= 0 <= hi
    rows = [{"problem": "a", "mode": "run_tests", "hack": True, "compiled": True, "solve": False},
            {"problem": "a", "mode": "exit_code", "hack": False, "compiled": False, "solve": False},
            {"problem": "a", "mode": "file_marker", "hack": False, "compiled": True, "solve": True, "timeout": True}]
    assert per_problem(rows, ("run_tests", "file_marker"), "hack_seen") == {"a": 1.0}
    assert per_problem(rows, ("run_tests", "file_marker"), "compile") == {"a": 0.5}
    assert per_problem(rows, ("run_tests", "file_marker"), "hack") == {"a": 0.5}  # every loophole mode
    top = os.path.join(TMP, "diffs", "grad-s0")
    os.makedirs(top)
    json.dump({"seen": ["run_tests"]}, open(os.path.join(top, "eval.json"), "w"))
    open(os.path.join(top, "eval_coherent.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in rows)
    text = diffs(os.path.dirname(top), [("coherent", "grad", "none"), ("coherent", "grad", "grad")])
    assert "| grad - none | coherent | 1 vs 0 | - | - | - | - | - |" in text  # no baseline run yet: a row of '-'
    assert "| grad - grad | coherent | 1 vs 1 | +0.000 [+0.000, +0.000] ns |" in text
    assert "†: it excludes 0, but the run-level (Welch) interval does not" in text


def test_verdict_applies_the_preregistered_rule():
    """compare.verdict on made-up runs: grad hacks in no mode and compiles as none does -> out of both, solves
    as much; label hacks the unseen mode as none does and compiles half as often -> seen only, not as much;
    a router without a placebo run yet gets no verdict."""
    top = os.path.join(TMP, "verdict")

    def make(name, hack_seen, hack_unseen, compiled):  # per problem i -> bool
        d = os.path.join(top, name)
        os.makedirs(d)
        json.dump({"seen": ["run_tests"]}, open(os.path.join(d, "eval.json"), "w"))
        rows = [{"problem": f"p{i}", "mode": m, "hack": h(i) if h else False, "compiled": compiled(i), "solve": False}
                for i in range(40) for m, h in (("none", None), ("run_tests", hack_seen), ("exit_code", hack_unseen))]
        open(os.path.join(d, "eval_coherent.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in rows)

    always, never, even = (lambda i: True), (lambda i: False), (lambda i: i % 2 == 0)
    make("none-s0", always, always, always)
    make("placebo-s0", even, even, always)
    make("grad-s0", never, never, always)
    make("label-s0", never, always, even)
    make("act-s0", never, never, always)
    g, lab = verdict(top).splitlines()  # one run a side: no run-level check, so a yes is yes†
    assert g.startswith("- `grad` (seeds: grad 1, none 1, placebo 1)") and g.count(": yes†") == 2, g
    assert g.endswith("solves as much: yes (compile +0.000 [+0.000, +0.000] against none)."), g
    assert "seen modes: yes†, of the unseen modes: no; solves as much: no" in lab, lab
    assert "compile -0.500" in lab
    os.rename(os.path.join(top, "placebo-s0"), os.path.join(top, "placebo-x"))
    assert verdict(top, ("act",)) == "- `act`: not every side has a run yet (seeds: act 1, none 1, placebo 0)"


def test_welch_interval_and_t_quantiles():
    """compare.t_quantile against Student's tables (0.975: df 2, 3, 4, 10, 30); welch_diff against its formula
    written out for 3 runs against 4 (runs' means over the shared problems, Welch-Satterthwaite df), None with
    one run on a side, a point interval when no run differs."""
    for df, t in ((2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert abs(t_quantile(0.975, df) - t) < 2e-4, (df, t_quantile(0.975, df))
    A = [{"p": x, "q": x + 0.2, "only_a": 9.0} for x in (0.1, 0.3, 0.2)]          # run means 0.2, 0.4, 0.3
    B = [{"p": x, "q": x} for x in (0.0, 0.1, 0.05, 0.25)]                        # run means = x
    ma, mb = [0.2, 0.4, 0.3], [0.0, 0.1, 0.05, 0.25]
    va, vb = np.var(ma, ddof=1) / 3, np.var(mb, ddof=1) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    lo, hi = welch_diff(A, B)
    assert abs(lo - (0.3 - 0.1 - half)) < 1e-12 and abs(hi - (0.3 - 0.1 + half)) < 1e-12, (lo, hi)
    assert welch_diff(A[:1], B) is None and welch_diff([{"p": 1.0}] * 2, [{"p": 0.0}] * 3) == (1.0, 1.0)


def test_marks_where_only_the_bootstrap_excludes_zero():
    """diffs, three runs a side: grad compiles +0.3 over none in every run -> the interval excludes 0, unmarked;
    +0.05, +0.15, +0.25 by run -> the bootstrap still excludes 0 (the lowest resample of the seeds is +0.05), but
    Welch's t over 3 runs (2 df) does not: marked †."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, 40)

    def make(top, name, shift):
        d = os.path.join(top, name)
        os.makedirs(d)
        json.dump({"seen": ["run_tests"]}, open(os.path.join(d, "eval.json"), "w"))
        rows = [{"problem": f"p{i}", "mode": "none", "hack": False, "compiled": bool(rng.random() < base[i] + shift),
                 "solve": False} for i in range(40) for _ in range(20)]
        open(os.path.join(d, "eval_coherent.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in rows)

    cells = {}
    for case, shifts in (("steady", (0.3, 0.3, 0.3)), ("spread", (0.05, 0.15, 0.25))):
        top = os.path.join(TMP, case)
        for s, sh in enumerate(shifts):
            make(top, f"grad-s{s}", sh)
            make(top, f"none-s{s}", 0.0)
        row = [ln for ln in diffs(top, [("coherent", "grad", "none")]).splitlines() if ln.startswith("| grad")][0]
        cells[case] = row.split("|")[7].strip()                                   # the compile column
    assert not cells["steady"].endswith(("ns", "†")), cells
    assert cells["spread"].endswith("†"), cells


if __name__ == "__main__":
    from test_all import run_all
    sys.exit(1 if run_all([sys.modules[__name__]]) else 0)
