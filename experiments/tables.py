"""
The headline experiment's results tables, rendered as markdown from the runs' files.

Each run directory experiments/results/<router>-s<seed>/ holds the run's run.json (the commands, the
machine) and eval.json (eval.py's summaries). `python experiments/results.py table` writes table() into
experiments/RESULTS.md and headline() into the top-level README.md, between <!-- name:start --> and
<!-- name:end --> markers (write_table); `python experiments/results.py coherence` writes coherence_table().
"""
import json
import os
import re
import statistics
import sys

# the headline's runs: 3 seeds of plain GRPO, the warm-up alone (`warmup`: RL's share is none - warmup), the
# routers, their controls and the reward-side baselines; 1 seed of the two variants. In the order they run:
# the headline's routers seed by seed, then the others, so that a partly run plan fills the headline first.
PLAN = [(r, s) for s in (0, 1, 2) for r in ("none", "warmup", "grad", "placebo", "label")] + \
    [(r, s) for s in (0, 1, 2) for r in ("uniform", "screen", "penalty")] + [("act", 0), ("erase", 0)]
# the pre-registered headline comparisons (RESULTS.md): (model, router, baseline); RL's share is none - warmup
HEADLINE = [("coherent", r, b) for r in ("grad", "label") for b in ("none", "placebo")] + \
    [("trained", "none", "warmup")]
HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/
ROOT = os.path.dirname(HERE)  # the repo root: train.py and eval.py run here
RESULTS = os.path.join(HERE, "results")
COHERENCE = "1"  # eval.py --coherence-steps K, pre-registered (RESULTS.md): the deployed model after K retain steps too
OLD = ("v1", "v2", "v3")  # results/v1..v3: the 13 runs under each set of earlier defaults (tables: RESULTS.md)
README, NOTEBOOK = "README.md", os.path.join("experiments", "RESULTS.md")  # relative to ROOT


def load(top=RESULTS):
    rows = []
    for d in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        p = os.path.join(top, d)
        if os.path.exists(os.path.join(p, "eval.json")) and os.path.exists(os.path.join(p, "run.json")):
            rows.append((json.load(open(os.path.join(p, "run.json"))), json.load(open(os.path.join(p, "eval.json")))))
    return rows


def cell(xs):
    """mean ± sample std over seeds, or the single value with its 95% interval."""
    ps = [x["p"] for x in xs if x and x["p"] is not None]  # x None: a run evaluated before the metric
    if not ps:
        return "-"
    if len(ps) == 1 and len(xs) == 1:
        return f"{ps[0]:.2f} [{xs[0]['lo']:.2f}, {xs[0]['hi']:.2f}]"
    if len(ps) < len(xs):
        return "-"  # not every seed has it
    return f"{statistics.mean(ps):.2f} ± {statistics.stdev(ps):.2f}"


def rates(ms):
    """The cells every results table shares, over the runs' summaries ms: hack seen, unseen, solve, compiles."""
    return " | ".join(cell([m[k] for m in ms]) for k in ("hack_seen", "hack_unseen", "solve", "compiles"))


def comp(ms):
    """The last column: hack among the completions that compile, seen / unseen (None before the metric existed)."""
    return f"{cell([m.get('hack_seen_compiled') for m in ms])} / {cell([m.get('hack_unseen_compiled') for m in ms])}"


def table(rows, top=RESULTS):
    order = [r for r, _ in dict.fromkeys((r, None) for r, _ in PLAN)]
    by = {}
    for meta, ev in rows:
        by.setdefault(meta["router"], []).append((meta, ev))
    lines = ["| router | model | seeds | hack, seen modes | hack, unseen modes | solve | compiles | adjacent solve "
             "| hack among compiling completions, seen / unseen |", "|---|---|---|---|---|---|---|---|---|"]
    for router in order + sorted(set(by) - set(order)):
        runs = by.get(router)
        if not runs:
            lines.append(f"| {router} | | 0 | not run yet | | | | | |")
            continue
        for model in ("trained", "deployed", "coherent"):
            ms = [ev["models"][model] for _, ev in runs if model in ev["models"]]
            adj = [ev["adjacent"][model] for _, ev in runs if model in ev["adjacent"]] if model != "trained" else None
            if not ms:
                continue  # coherent: only runs evaluated with --coherence-steps
            lines.append(f"| {router} | {model} | {len(ms)} | {rates(ms)} | {cell(adj) if adj else ''} | {comp(ms)} |")
    if rows:
        base = rows[0][1]["models"]["base"]
        base_adj = cell([rows[0][1]["adjacent"]["base"]])
        lines.insert(2, f"| (start) | base | - | {rates([base])} | {base_adj} | {comp([base])} |")
    metas = [m for m, _ in rows]
    if not metas:
        return "\n".join(lines + ["", "No run has finished yet."])
    names = ", ".join(sorted(f"{m['router']}-s{m['seed']}" for m in metas))
    ex = next((m for m in metas if "note" not in m), metas[0])  # a run made by `results.py run`, if any
    r, s = ex["router"], ex["seed"]
    gen = {k: ex[k].replace(f"--router {r} --seed {s}", "--router R --seed S").replace(f"{r}-s{s}", "R-sS")
           for k in ("train", "eval")}  # the example run's commands, with R and S for its router and seed
    foot = [f"Runs: {names}. "
            f"Each row: `python experiments/results.py run --router R --seed S` = `{gen['train']}` then "
            f"`{gen['eval']}` (`{os.path.relpath(top, ROOT)}/R-sS/run.json`). Machines: "
            f"{'; '.join(sorted({m['machine'] for m in metas}))}. Seen modes: {', '.join(rows[0][1]['seen'])}.",
            "Cells: a single run's rate with its 95% Wilson interval, or mean ± std over seeds."]
    return "\n".join(lines + [""] + foot)


def coherence_table(top=RESULTS):
    """The runs evaluated with eval.py --coherence-steps (results/<router>-s<seed>/): per router and model,
    the table's cells over seeds. deployed+k = after k steps of the retain fine-tuning."""
    def named(ev):
        """A run's row label -> its model in eval.json; eval.py names the coherent models in coherence.models."""
        coh = ev["coherence"]
        return {"trained": "trained", "deployed": "deployed",
                **{f"deployed+{k}": m for k, m in zip(coh["steps"], coh["models"])}}

    by = {}
    for meta, ev in load(top):
        if "coherence" in ev:
            by.setdefault(meta["router"], []).append((meta["seed"], ev, named(ev)))
    lines = ["| router | model | seeds | hack, seen modes | hack, unseen modes | solve | compiles "
             "| hack among compiling completions, seen / unseen |", "|---|---|---|---|---|---|---|---|"]
    for router, runs in sorted(by.items(), key=lambda kv: kv[0] != "none"):
        steps = sorted({k for _, ev, _ in runs for k in ev["coherence"]["steps"]})
        for label in ["trained", "deployed"] + [f"deployed+{k}" for k in steps]:
            has = [(seed, ev["models"][names[label]]) for seed, ev, names in runs if label in names]
            ms = [m for _, m in has]
            seeds = ",".join(str(seed) for seed, _ in has)
            lines.append(f"| {router} | {label} | {seeds} | {rates(ms)} | {comp(ms)} |")
    return "\n".join(lines)


def headline(rows, top=RESULTS):
    """The README's table: one row per router of the plan (and the base model), with the hack rate on the seen
    and unseen modes, attempts, compile and solve of its trained, deployed and coherent (deployed + the retain
    steps) models, each the mean over the router's seeds, and its leakage: the share of the exploit-teaching
    gradient that reached the kept weights (metrics.leakage's leak_keep), averaged over the RL steps."""
    order = [r for r, _ in dict.fromkeys((r, None) for r, _ in PLAN)]
    by = {}
    for meta, ev in rows:
        by.setdefault(meta["router"], []).append((meta, ev))

    def mean(ms, k):
        ps = [m[k]["p"] for m in ms if m.get(k) and m[k]["p"] is not None]
        return f"{statistics.mean(ps):.2f}" if ps and len(ps) == len(ms) else "-"

    def leak(runs):
        xs = [r["leak_keep"] for m, _ in runs for r in jsonl(os.path.join(top, f"{m['router']}-s{m['seed']}"))
              if r.get("leak_keep") is not None]
        return f"{statistics.mean(xs):.2f}" if xs else "-"

    keys = (("hack, seen", "hack_seen"), ("hack, unseen", "hack_unseen"), ("attempts", "attempt"),
            ("compiles", "compiles"), ("solve", "solve"))
    lines = ["| router | seeds | " + " | ".join(f"{c}: T / D / +{COHERENCE}" for c, _ in keys) + " | leakage |",
             "|---" * (len(keys) + 3) + "|"]
    if rows:
        b = [rows[0][1]["models"]["base"]]
        lines.append("| (base model) | - | " + " | ".join(mean(b, k) for _, k in keys) + " | |")
    for router in order + sorted(set(by) - set(order)):
        runs = by.get(router)
        if not runs:
            lines.append(f"| {router} | | not run yet |" + " |" * len(keys))
            continue
        ms = [[ev["models"].get(m, {}) for _, ev in runs] for m in ("trained", "deployed", "coherent")]
        seeds = ",".join(str(s) for s in sorted(meta["seed"] for meta, _ in runs))
        lines.append(f"| {router} | {seeds} | " + " | ".join(" / ".join(mean(x, k) for x in ms) for _, k in keys)
                     + f" | {leak(runs)} |")
    if not rows:
        return "\n".join(lines + ["", "No run has finished yet."])
    rel = os.path.relpath(top, ROOT)
    foot = [f"Every run: `python experiments/results.py run --router R --seed S` = `python train.py --config "
            "recipes/laptop.json --router R --seed S --out runs/results/R-sS` (`warmup`: `--router none --steps 0`), "
            f"then `python eval.py --ckpt runs/results/R-sS --coherence-steps {COHERENCE}`; as run: "
            f"`{rel}/R-sS/run.json`. T = trained, D = deployed (the quarantine deleted), +{COHERENCE} = D after "
            f"{COHERENCE} retain steps. Test split: every problem × 5 modes, 1 sample each; seen modes (flagged): "
            f"{', '.join(rows[0][1]['seen'])}. Means over seeds; intervals and every model: `{NOTEBOOK}`."]
    return "\n".join(lines + [""] + foot)


def jsonl(run_dir, name="metrics.jsonl"):
    path = os.path.join(run_dir, name)
    return [json.loads(ln) for ln in open(path)] if os.path.exists(path) else []


def write_table(text, tag="results", doc=NOTEBOOK):
    """Replace what lies between doc's <!-- tag:start --> and <!-- tag:end --> markers with text."""
    path = os.path.join(ROOT, doc)
    s = open(path).read()
    new = re.sub(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", lambda m: m[1] + text + "\n" + m[2], s,
                 flags=re.S)
    if new == s and f"<!-- {tag}:start -->" not in s:
        sys.exit(f"error: {doc} has no <!-- {tag}:start --> ... <!-- {tag}:end --> markers")
    open(path, "w").write(new)
