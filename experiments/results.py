"""
The headline experiment's runs and its results tables.

    python experiments/results.py run --router grad --seed 0   # train.py + eval.py with the defaults, kept in experiments/results/
    python experiments/results.py table          # rebuild the tables from experiments/results/*/eval.json
    python experiments/results.py all --jobs 2   # every run of the plan, from scratch, 2 at a time (make results)
    python experiments/results.py rescore        # eval.json summaries again from the kept completions
    python experiments/results.py coherence      # the tables of the retain fine-tuning curves (RESULTS.md)
    python experiments/results.py ksweep --router grad --seed 0  # that run after 1, 2, 4, 8 retain steps -> results/ksweep

`table` writes the headline table (one row per router) into the top-level README.md and the full
tables (every model of every router, and the earlier sets results/v1, v2) into experiments/RESULTS.md.
train.py and eval.py run from the repo root, as `python train.py ...` and `python eval.py ...`. Each run
trains in runs/results/<router>-s<seed> under the repo root and evaluates there; its eval.json, eval.md,
the graded eval completions (eval_*.jsonl), metrics.jsonl, the exact commands and their wall times are
copied to experiments/results/<router>-s<seed>/ as soon as it finishes, so the table built from them is
true however few runs are in it. `rescore` recomputes each eval.json's per-model rates from its kept
completions with today's eval.summarize (a new metric, no new sampling).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: train, eval are top-level modules

PLAN = [("none", s) for s in (0, 1, 2)] + [("label", s) for s in (0, 1, 2)] + [("grad", s) for s in (0, 1, 2)] \
    + [("act", 0), ("erase", 0), ("screen", 0), ("penalty", 0)]
HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/
ROOT = os.path.dirname(HERE)  # the repo root: train.py and eval.py run here
RESULTS, RUNS = os.path.join(HERE, "results"), os.path.join(ROOT, "runs", "results")
EVAL_ROWS = {m: f"eval_{m}.jsonl" for m in ("base", "trained", "deployed", "coherent")}  # eval.py's graded completions
KEEP = ("eval.json", "eval.md", "metrics.jsonl", "warmup.jsonl", "curves.png", "before_after.png")  # + eval_<model>.jsonl
COHERENCE = "8"  # eval.py --coherence-steps: the deployed model after ERA's retain fine-tuning too (RESULTS.md)
OLD = ("v1", "v2")  # results/v1, v2: the 13 runs under each set of earlier defaults (their tables: RESULTS.md)
README, NOTEBOOK = "README.md", os.path.join("experiments", "RESULTS.md")  # relative to ROOT
KSWEEP, KSTEPS = "ksweep", "1,2,4,8"  # results/ksweep: the same runs evaluated after each of KSTEPS retain steps (RESULTS.md)


def run_one(router, seed, fresh=False, coherence=COHERENCE, top=None):
    """train.py (--resume when runs/results holds its checkpoint) then eval.py --coherence-steps coherence; the
    run's files go to top/<router>-s<seed> (default experiments/results/). ksweep reuses the main run's checkpoint so."""
    name = f"{router}-s{seed}"
    out, dst = os.path.join(RUNS, name), os.path.join(top or RESULTS, name)
    rel = os.path.relpath(out, ROOT)  # the commands run in ROOT and name it relative: eval.json keeps no machine path
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    cmds = [["python", "train.py", "--router", router, "--seed", str(seed), "--out", rel],
            ["python", "eval.py", "--ckpt", rel, "--coherence-steps", coherence]]
    if not fresh and os.path.exists(os.path.join(out, "ckpt")):
        stale(cmds[0][2:], out)
        cmds[0] = ["python", "train.py", "--resume", rel]  # continue a killed run
    walls, head = [], commit()  # the code the run starts from
    for cmd in cmds:
        t = time.time()
        code = subprocess.call([sys.executable] + cmd[1:], cwd=ROOT)
        walls.append(round(time.time() - t, 1))
        if code:
            sys.exit(f"error: {' '.join(cmd)} exited {code}")
    os.makedirs(dst, exist_ok=True)
    graded = tuple(f"eval_{m}.jsonl" for m in json.load(open(os.path.join(out, "eval.json")))["models"])  # this eval's
    for f in KEEP + graded:
        if os.path.exists(os.path.join(out, f)):
            shutil.copy(os.path.join(out, f), dst)
    meta = {"router": router, "seed": seed, "train": " ".join(cmds[0]), "eval": " ".join(cmds[1]),
            "train_s": walls[0], "eval_s": walls[1], "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "code": head}
    json.dump(meta, open(os.path.join(dst, "run.json"), "w"), indent=1)
    print(f"{name}: train {walls[0]:.0f} s, eval {walls[1]:.0f} s -> {dst}")


def run_all(plan, jobs, call=subprocess.call):
    """Every run of plan from scratch, `jobs` at a time, each a `results.py run --fresh` process with
    cores/jobs threads (on 2 cores two runs at 1 thread each finish sooner than one after the other)."""
    from concurrent.futures import ThreadPoolExecutor
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    cmd = lambda rs: [sys.executable, os.path.abspath(__file__), "run", "--router", rs[0], "--seed", str(rs[1]), "--fresh"]
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda rs: call(cmd(rs), cwd=ROOT, env=env), plan))
    failed = [f"{r}-s{s}" for (r, s), code in zip(plan, codes) if code]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed (their logs are above)")


def stale(argv, out):
    """Exit if the run in out was started with other arguments than argv gives now (e.g. older defaults):
    resuming it would put an old run under today's command."""
    import train  # torch: only when a run is resumed
    a = train.get_args(argv)
    a.keep_forward = train.update.keep_forward(a)  # as train.check_args saves it
    now, saved = vars(a), train.ckpt.saved_args(out)
    if saved is None:
        sys.exit(f"error: {out} has a checkpoint without its args.json; rerun with --fresh")
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in sorted(now)
            if k not in ("out", "resume", "stop_after") and saved.get(k) != now[k]]
    if diff:
        sys.exit(f"error: {out} was started with other arguments ({', '.join(diff)}); rerun with --fresh")


def rescore(top=RESULTS):
    """Every results dir (probes too) with its eval_*.jsonl: eval.json's model summaries recomputed."""
    import eval as ev  # torch: only here
    for d, _, files in sorted(os.walk(top)):
        if "eval.json" in files and all(EVAL_ROWS[m] in files for m in ("base", "trained", "deployed")):
            res = json.load(open(os.path.join(d, "eval.json")))
            for model, f in [(f[5:-6], f) for f in files if f.startswith("eval_") and f.endswith(".jsonl")]:
                rows = [json.loads(ln) for ln in open(os.path.join(d, f))]
                res["models"][model] = ev.summarize(rows, tuple(res["seen"]))
            json.dump(res, open(os.path.join(d, "eval.json"), "w"), indent=1)
            print("rescored", os.path.relpath(d, ROOT))


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return f"{os.cpu_count()} cores, {cpu}"


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
        lines.insert(2, f"| (start) | base | - | {rates([base])} | {cell([rows[0][1]['adjacent']['base']])} | {comp([base])} |")
    metas = [m for m, _ in rows]
    if not metas:
        return "\n".join(lines + ["", "No run has finished yet."])
    names = ", ".join(sorted(f"{m['router']}-s{m['seed']}" for m in metas))
    ex = next((m for m in metas if "note" not in m), metas[0])  # a run made by `results.py run`, if any
    foot = [f"Runs: {names}. "
            f"Each row: `python experiments/results.py run --router R --seed S` = `{ex['train']}` then "
            f"`{ex['eval']}` (`{os.path.relpath(top, ROOT)}/R-sS/run.json`). Machines: "
            f"{'; '.join(sorted({m['machine'] for m in metas}))}. Seen modes: {', '.join(rows[0][1]['seen'])}.",
            "Cells: a single run's rate with its 95% Wilson interval, or mean ± std over seeds."]
    return "\n".join(lines + [""] + foot)


def coherence_table(top=RESULTS):
    """The runs evaluated with eval.py --coherence-steps (results/<router>-s<seed>/): per router and model,
    the table's cells over seeds. deployed+k = after k steps of the retain fine-tuning."""
    # each run's row label -> its model in eval.json; eval.py names the coherent models in coherence.models
    named = lambda ev: {"trained": "trained", "deployed": "deployed",
                        **{f"deployed+{k}": m for k, m in zip(ev["coherence"]["steps"], ev["coherence"]["models"])}}
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
            lines.append(f"| {router} | {label} | {','.join(str(seed) for seed, _ in has)} | {rates(ms)} | {comp(ms)} |")
    return "\n".join(lines)


def headline(rows):
    """The README's table: one row per router of the plan (and the base model), its trained, deployed and
    coherent (deployed + the retain steps) rates as in table(), and the command that made the row."""
    order = [r for r, _ in dict.fromkeys((r, None) for r, _ in PLAN)]
    by = {}
    for meta, ev in rows:
        by.setdefault(meta["router"], []).append((meta, ev))
    hc = lambda ms: f"{cell([m['hack_seen'] for m in ms])} / {cell([m['hack_unseen'] for m in ms])}"
    lines = ["| router | seeds | trained: hack seen / unseen | deployed: hack seen / unseen | deployed: compiles "
             f"| +{COHERENCE} retain steps: hack seen / unseen | +{COHERENCE}: compiles | command |",
             "|---|---|---|---|---|---|---|---|"]
    if rows:
        b = [rows[0][1]["models"]["base"]]
        lines.append(f"| (base model) | - | {hc(b)} | | {cell([b[0]['compiles']])} | | | `python eval.py` (every run's) |")
    for router in order + sorted(set(by) - set(order)):
        runs = by.get(router)
        if not runs:
            lines.append(f"| {router} | 0 | not run yet | | | | | |")
            continue
        ms = {m: [ev["models"][m] for _, ev in runs if m in ev["models"]] for m in ("trained", "deployed", "coherent")}
        seeds = sorted(meta["seed"] for meta, _ in runs)
        coh = ms["coherent"] if len(ms["coherent"]) == len(runs) else None  # every seed, or none shown
        lines.append(f"| {router} | {','.join(map(str, seeds))} | {hc(ms['trained'])} | {hc(ms['deployed'])} "
                     f"| {cell([m['compiles'] for m in ms['deployed']])} | {hc(coh) if coh else '-'} "
                     f"| {cell([m['compiles'] for m in coh]) if coh else '-'} "
                     f"| {made_by(m for m, _ in runs)} |")
    if not rows:
        return "\n".join(lines + ["", "No run has finished yet."])
    ex = next((m for m, _ in rows if "note" not in m), rows[0][0])
    rel = os.path.relpath(RESULTS, ROOT)
    foot = [f"Every run: `python train.py --router R --seed S --out runs/results/R-sS`, then `python eval.py --ckpt "
            f"runs/results/R-sS --coherence-steps {COHERENCE}` (`python experiments/results.py run --router R --seed S`; "
            f"as run: `{rel}/R-sS/run.json`, e.g. `{ex['train']}`). Seen modes (flagged by the detector): "
            f"{', '.join(rows[0][1]['seen'])}; the others are unseen. Held-out hard problems, 16 per mode, 1 sample each.",
            "Cells: a single run's rate with its 95% Wilson interval, or mean ± std over seeds. Every model of every "
            f"run: `{NOTEBOOK}`."]
    return "\n".join(lines + [""] + foot)


def made_by(metas):
    """The train commands in the runs' run.json, with the seed as S and the run directory left out."""
    cmds = dict.fromkeys(re.sub(r" --out \S+", "", re.sub(r"--seed \d+", "--seed S", m["train"])) for m in metas)
    return ", ".join(f"`{c}`" for c in cmds)


def write_table(text, tag="results", doc=NOTEBOOK):
    path = os.path.join(ROOT, doc)
    s = open(path).read()
    new = re.sub(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", lambda m: m[1] + text + "\n" + m[2], s, flags=re.S)
    if new == s and f"<!-- {tag}:start -->" not in s:
        sys.exit(f"error: {doc} has no <!-- {tag}:start --> ... <!-- {tag}:end --> markers")
    open(path, "w").write(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "table", "all", "rescore", "coherence", "ksweep"])
    p.add_argument("--router", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in runs/results first")
    p.add_argument("--jobs", type=int, default=1, help="all: runs at a time, each with cores/jobs threads")
    a = p.parse_args(argv)
    if a.jobs < 1:
        sys.exit(f"error: --jobs must be at least 1, got {a.jobs}")
    if a.what == "run":
        run_one(a.router, a.seed, a.fresh)
    elif a.what == "ksweep":
        run_one(a.router, a.seed, a.fresh, KSTEPS, os.path.join(RESULTS, KSWEEP))
    elif a.what == "rescore":
        rescore()
    elif a.what == "all":
        t = time.time()
        run_all(PLAN, a.jobs)
        print(f"all {len(PLAN)} runs, {a.jobs} at a time: {(time.time() - t) / 3600:.2f} h")
    olds = [v for v in OLD if os.path.isdir(os.path.join(RESULTS, v))]
    if a.what in ("coherence", "ksweep"):
        text = coherence_table()
        write_table(text, "coherence")
        if os.path.isdir(os.path.join(RESULTS, KSWEEP)):
            sweep = coherence_table(os.path.join(RESULTS, KSWEEP))
            write_table(sweep, "coherence-ksweep")
            text = sweep if a.what == "ksweep" else text  # print the table the command just added to
        if "v2" in olds:  # v1 predates --coherence-steps
            write_table(coherence_table(os.path.join(RESULTS, "v2")), "coherence-v2")
        return print(text)
    rows = load()
    text = table(rows)
    write_table(text)
    write_table(headline(rows), "headline", README)
    for v in olds:
        write_table(table(load(os.path.join(RESULTS, v)), os.path.join(RESULTS, v)), f"results-{v}")
    print(text)


if __name__ == "__main__":
    main()
