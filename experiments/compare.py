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
problem) and, independently, each side's seeds, 20000 times, and takes the 2.5 and 97.5 percentiles
(a percentile bootstrap, Efron & Tibshirani 1993, ch. 13). A conclusion may cite a difference only
when its interval excludes 0.

With 3 seeds a side, resampling the seeds understates their spread (the bootstrap variance of a mean of
n is (n - 1) / n of the sample's): in simulated 3-vs-3 experiments with seed-to-seed spread such an interval
holds the true difference 81% of the time, not 95%, and Welch's 96% (probes/seed-bootstrap/coverage.py,
under experiments/results). So each difference is also
checked with each run as one unit: Welch's t interval (Welch 1947) on the runs' means over the same
problems. A difference whose bootstrap interval excludes 0 but whose run-level one does not is marked †:
it rests on the bootstrap's seed resampling alone (so does any side with one run).
"""
import json
import math
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


def boot_diff(A, B, n=20000, seed=0):
    """A, B: per-seed {problem: value}. -> (estimate, lo, hi, problems) of mean(A) - mean(B), paired by problem."""
    probs = sorted(set.intersection(*[set(d) for d in A + B]))
    if not probs:
        return None
    a = np.array([[d[p] for p in probs] for d in A])  # (seeds, problems)
    b = np.array([[d[p] for p in probs] for d in B])
    rng, P = np.random.default_rng(seed), len(probs)
    ip = rng.integers(0, P, (n, P))                                       # one problem draw per resample, both sides
    sa, sb = (x[rng.integers(0, len(x), (n, len(x)))].mean(1) for x in (a, b))  # (n, P): resampled seeds' means
    diffs = np.take_along_axis(sa, ip, 1).mean(1) - np.take_along_axis(sb, ip, 1).mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi), P


def t_quantile(q, df):
    """Student's t quantile for q > 0.5, its density integrated numerically (numpy alone, no scipy)."""
    x = np.linspace(0.0, 200.0, 200001)
    pdf = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))])
    return float(np.interp(q, cdf, x))


def welch_diff(A, B):
    """Each run one unit: Welch's 95% t interval for mean(A) - mean(B) from the runs' means over the problems
    both sides share -> (lo, hi), or None with fewer than 2 runs on a side."""
    probs = sorted(set.intersection(*[set(d) for d in A + B]))
    a, b = (np.array([np.mean([d[p] for p in probs]) for d in X]) for X in (A, B))
    if min(len(a), len(b)) < 2:
        return None
    va, vb, est = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b), a.mean() - b.mean()
    if va + vb == 0:
        return float(est), float(est)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    return float(est - half), float(est + half)


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
    """boot_diff of router - base on metric, from runs()'s {router: runs}, and whether welch_diff's interval
    excludes 0 too -> (estimate, lo, hi, problems, runs agree); None while a side has none."""
    if not (by.get(router) and by.get(base)):
        return None
    A, B = ([per_problem(rows, seen, metric) for seen, rows in by[r]] for r in (router, base))
    d = boot_diff(A, B)
    w = d and welch_diff(A, B)
    return d and d + (w is not None and (w[0] > 0 or w[1] < 0),)


def mark(d):
    """' ns' where the interval includes 0, '†' where only the bootstrap excludes it (module docstring)."""
    return " ns" if d[1] <= 0 <= d[2] else "" if d[4] else "†"


def yes(b, runs=True):
    return ("yes" if runs else "yes†") if b else "no"


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
            cells.append("-" if d is None else f"{fmt(d)}{mark(d)}")
        name = label(model, router, base) if label else f"{router} - {base}"
        lines.append(f"| {name} | {model} | {len(by.get(router, []))} vs {len(by.get(base, []))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nns: the 95% interval includes 0. †: it excludes 0, but the run-level (Welch) "
                               "interval does not (experiments/compare.py).")


def verdict(top, routers=("grad", "label"), model="coherent", margin=0.05):
    """The pre-registered rule (experiments/RESULTS.md), applied: a router keeps the hacks out of a set of
    modes when its hack rate there is below both `none`'s and `placebo`'s with both intervals below 0, and
    solves as much when its compile difference with `none` has its interval's lower end above -margin.
    A yes that the run-level intervals do not share is marked yes† (module docstring)."""
    by, lines = runs(top, model), []
    for r in routers:
        n = {x: len(by.get(x, [])) for x in (r, "none", "placebo")}
        seeds = "seeds: " + ", ".join(f"{x} {k}" for x, k in n.items())
        if min(n.values()) == 0:
            lines.append(f"- `{r}`: not every side has a run yet ({seeds})")
            continue
        ds = [[diff(by, r, b, m) for b in ("none", "placebo")] for m in ("hack_seen", "hack_unseen")]
        out = [yes(all(d[2] < 0 for d in x), all(d[4] for d in x)) for x in ds]
        c = diff(by, r, "none", "compile")
        lines.append(f"- `{r}` ({seeds}): keeps the hacks out of the seen modes: {out[0]}, of the unseen "
                     f"modes: {out[1]}; solves as much: {yes(c[1] > -margin)} (compile {fmt(c)} against none).")
    return "\n".join(lines)
