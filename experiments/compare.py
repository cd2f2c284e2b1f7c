"""
Paired differences between routers, with 95% bootstrap intervals over problems and seeds.

    python experiments/results.py compare [--top DIR] [--model deployed]

For each router against `none` and against `placebo` (where their runs exist): the difference in
hack rate on every loophole mode, on the seen modes and on the unseen modes, and in compile and solve
rate, of one evaluated model
(default: deployed) on the held-out problems. Each run's graded completions (eval_<model>.jsonl)
give a value per problem (the mean over that problem's rows: its loophole modes for hack, every
mode for compile and solve; `timeout` rows excluded). The estimate is mean(router) - mean(baseline) over
seeds and problems. The interval resamples problems (the same draw for both sides: paired by
problem) and, independently, each side's seeds, 2000 times, and takes the 2.5 and 97.5 percentiles
(a percentile bootstrap, Efron & Tibshirani 1993, ch. 13). A conclusion may cite a difference only
when its interval excludes 0.
"""
import json
import os

import numpy as np

METRICS = {"hack": ("hack", "loophole"), "hack_seen": ("hack", "seen"), "hack_unseen": ("hack", "unseen"),
           "compile": ("compiled", "all"), "solve": ("solve", "all")}


def per_problem(rows, seen, metric):
    """{problem: mean of the metric's field over its rows of the metric's modes}."""
    field, which = METRICS[metric]
    out = {}
    for r in rows:
        if r.get("timeout"):
            continue
        loophole = r["mode"] != "none"
        if which == "all" or (loophole and (which == "loophole" or (r["mode"] in seen) == (which == "seen"))):
            out.setdefault(r["problem"], []).append(float(bool(r[field])))
    return {p: float(np.mean(v)) for p, v in out.items()}


def boot_diff(A, B, n=2000, seed=0):
    """A, B: per-seed {problem: value}. -> (estimate, lo, hi, problems) of mean(A) - mean(B), paired by problem."""
    probs = sorted(set.intersection(*[set(d) for d in A + B]))
    if not probs:
        return None
    a = np.array([[d[p] for p in probs] for d in A])  # (seeds, problems)
    b = np.array([[d[p] for p in probs] for d in B])
    rng, P = np.random.default_rng(seed), len(probs)
    diffs = np.empty(n)
    for i in range(n):
        ip = rng.integers(0, P, P)
        diffs[i] = a[rng.integers(0, len(a), len(a))][:, ip].mean() - b[rng.integers(0, len(b), len(b))][:, ip].mean()
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi), P


def runs(top, model):
    """{router: [(seen modes, rows of eval_<model>.jsonl) per seed]} of the run dirs <router>-s<seed> under top."""
    out = {}
    for d in sorted(os.listdir(top)):
        path = os.path.join(top, d, f"eval_{model}.jsonl")
        if "-s" in d and os.path.exists(path) and os.path.exists(os.path.join(top, d, "eval.json")):
            seen = tuple(json.load(open(os.path.join(top, d, "eval.json")))["seen"])
            out.setdefault(d.rsplit("-s", 1)[0], []).append((seen, [json.loads(ln) for ln in open(path)]))
    return out


def diff(by, router, base, metric):
    """boot_diff of router - base on metric, from runs()'s {router: runs}; None while a side has none."""
    if not (by.get(router) and by.get(base)):
        return None
    return boot_diff([per_problem(rows, seen, metric) for seen, rows in by[router]],
                     [per_problem(rows, seen, metric) for seen, rows in by[base]])


def yes(b):
    return "yes" if b else "no"


def fmt(d):
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def compare(top, model="deployed", baselines=("none", "placebo")):
    """The markdown table of every router against each baseline present."""
    by = runs(top, model)
    return diffs(top, [(model, r, b) for b in baselines if b in by for r in by if r != b])


def diffs(top, pairs, label=None):
    """The markdown table of the differences (model, router, baseline) whose runs are under top; a row for
    each pair, '-' where a side has no runs yet. label(model, router, base) names a row."""
    loaded = {m: runs(top, m) for m in dict.fromkeys(m for m, _, _ in pairs)}
    lines = ["| router - baseline | model | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 3) + "|"]
    for model, router, base in pairs:
        by, cells = loaded[model], []
        for metric in METRICS:
            d = diff(by, router, base, metric)
            ns = "" if d is None or d[1] > 0 or d[2] < 0 else " ns"
            cells.append("-" if d is None else f"{fmt(d)}{ns}")
        name = label(model, router, base) if label else f"{router} - {base}"
        lines.append(f"| {name} | {model} | {len(by.get(router, []))} vs {len(by.get(base, []))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nns: the 95% interval includes 0."


def verdict(top, routers=("grad", "label"), model="coherent", margin=0.05):
    """The pre-registered rule (experiments/RESULTS.md), applied: a router keeps the hacks out of a set of
    modes when its hack rate there is below both `none`'s and `placebo`'s with both intervals below 0, and
    solves as much when its compile difference with `none` has its interval's lower end above -margin."""
    by, lines = runs(top, model), []
    for r in routers:
        n = {x: len(by.get(x, [])) for x in (r, "none", "placebo")}
        seeds = "seeds: " + ", ".join(f"{x} {k}" for x, k in n.items())
        if min(n.values()) == 0:
            lines.append(f"- `{r}`: not every side has a run yet ({seeds})")
            continue
        out = [all(diff(by, r, b, m)[2] < 0 for b in ("none", "placebo")) for m in ("hack_seen", "hack_unseen")]
        c = diff(by, r, "none", "compile")
        lines.append(f"- `{r}` ({seeds}): keeps the hacks out of the seen modes: {yes(out[0])}, of the unseen "
                     f"modes: {yes(out[1])}; solves as much: {yes(c[1] > -margin)} (compile {fmt(c)} against none).")
    return "\n".join(lines)
