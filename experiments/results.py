"""
The headline experiment's runs and its results tables.

    python experiments/results.py run --router grad --seed 0   # train.py + eval.py (defaults) -> experiments/results/
    python experiments/results.py table          # rebuild the tables from experiments/results/*/eval.json
    python experiments/results.py all --jobs 2   # every run of the plan, from scratch, 2 at a time (make results)
    python experiments/results.py all --jobs 2 --resume  # only the runs not in experiments/results yet
    python experiments/results.py rescore        # eval.json summaries again from the kept completions
    python experiments/results.py coherence      # the tables of the retain fine-tuning curves (RESULTS.md)
    python experiments/results.py ksweep --router grad --seed 0  # that run after 1,2,4,8 retain steps -> results/ksweep
    python experiments/results.py run --router placebo --top experiments/results/controls  # a run kept elsewhere
    python experiments/results.py compare [--top DIR]  # paired differences against none and placebo (compare.py)

`table` writes the headline table (one row per router) into the top-level README.md and the full
tables (every model of every router, and the earlier sets results/v1..v3) into experiments/RESULTS.md;
the tables themselves are rendered by experiments/tables.py. This file launches the runs.
train.py and eval.py run from the repo root, as `python train.py ...` and `python eval.py ...`. Each run
trains in runs/results/<router>-s<seed> under the repo root and evaluates there; its eval.json, eval.md,
the graded eval completions (eval_*.jsonl), metrics.jsonl, the exact commands and their wall times are
copied to experiments/results/<router>-s<seed>/ as soon as it finishes, so the table built from them is
true however few runs are in it. `rescore` recomputes each eval.json's per-model rates from its kept
completions with today's report.summarize (a new metric, no new sampling).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# the repo root: train, eval are top-level modules, and experiments/ a package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.tables import (COHERENCE, HEADLINE, OLD, PLAN, README, RESULTS, ROOT,  # noqa: E402
                                coherence_table, headline, load, table, write_table)

RUNS = os.path.join(ROOT, "runs", "results")
EVAL_ROWS = {m: f"eval_{m}.jsonl" for m in ("base", "trained", "deployed", "coherent")}  # eval.py's graded completions
# a run's files copied to experiments/results/ (and the eval_<model>.jsonl of its eval.json's models)
KEEP = ("eval.json", "eval.md", "metrics.jsonl", "warmup.jsonl", "curves.png", "before_after.png")
KSWEEP, KSTEPS = "ksweep", "1,2,4,8"  # results/ksweep: the same runs evaluated after each of KSTEPS retain steps


def run_one(router, seed, fresh=False, coherence=COHERENCE, top=None):
    """train.py (--resume when runs/results holds its checkpoint) then eval.py --coherence-steps coherence;
    the run's files go to top/<router>-s<seed> (default experiments/results/). ksweep reuses the main run's
    checkpoint so."""
    name = f"{router}-s{seed}"
    out, dst = os.path.join(RUNS, name), os.path.join(top or RESULTS, name)
    rel = os.path.relpath(out, ROOT)  # the commands run in ROOT and name it relative: eval.json keeps no machine path
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    how = ["--router", "none", "--steps", "0"] if router == "warmup" else ["--router", router]  # the warm-up only
    cmds = [["python", "train.py", "--config", "recipes/laptop.json", *how, "--seed", str(seed), "--out", rel],
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
    models = json.load(open(os.path.join(out, "eval.json")))["models"]
    graded = tuple(f"eval_{m}.jsonl" for m in models)  # this eval's
    for f in KEEP + graded:
        if os.path.exists(os.path.join(out, f)):
            shutil.copy(os.path.join(out, f), dst)
    meta = {"router": router, "seed": seed, "train": " ".join(cmds[0]), "eval": " ".join(cmds[1]),
            "train_s": walls[0], "eval_s": walls[1], "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "code": head}
    if "--resume" in cmds[0]:  # train_s is the resumed part only; the killed part's wall is in no file
        meta["resumed"] = True
    json.dump(meta, open(os.path.join(dst, "run.json"), "w"), indent=1)
    print(f"{name}: train {walls[0]:.0f} s, eval {walls[1]:.0f} s -> {dst}")


def run_all(plan, jobs, resume=False, call=subprocess.call):
    """Every run of plan from scratch, `jobs` at a time, each a `results.py run --fresh` process with
    cores/jobs threads (on 2 cores two runs at 1 thread each finish sooner than one after the other).
    resume: leave out the runs already in experiments/results (their run.json), and continue a killed
    one from its checkpoint in runs/results instead of starting it again."""
    from concurrent.futures import ThreadPoolExecutor
    env = job_env(jobs)
    if resume:
        plan = [(r, s) for r, s in plan if not os.path.exists(os.path.join(RESULTS, f"{r}-s{s}", "run.json"))]

    def cmd(rs):
        return [sys.executable, os.path.abspath(__file__), "run", "--router", rs[0], "--seed", str(rs[1])] + \
            ([] if resume else ["--fresh"])

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda rs: call(cmd(rs), cwd=ROOT, env=env), plan))
    failed = [f"{r}-s{s}" for (r, s), code in zip(plan, codes) if code]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed (their logs are above)")


def job_env(jobs):
    """The environment of one of `jobs` processes sharing the machine: cores/jobs threads each."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def stale(argv, out):
    """Exit if the run in out was started with other arguments than argv gives now (e.g. older defaults):
    resuming it would put an old run under today's command."""
    import ckpt  # torch: only when a run is resumed
    import config
    now, saved = vars(config.get_args(argv)), ckpt.saved_args(out)
    if saved is None:
        sys.exit(f"error: {out} has a checkpoint without its args.json; rerun with --fresh")
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in sorted(now)
            if k not in ("out", "resume", "stop_after") and saved.get(k) != now[k]]
    if diff:
        sys.exit(f"error: {out} was started with other arguments ({', '.join(diff)}); rerun with --fresh")


def rescore(top=RESULTS):
    """Every results dir (probes too) with its eval_*.jsonl: eval.json's model summaries recomputed."""
    import report  # env, sandbox: only here
    for d, _, files in sorted(os.walk(top)):
        if "eval.json" in files and all(EVAL_ROWS[m] in files for m in ("base", "trained", "deployed")):
            res = json.load(open(os.path.join(d, "eval.json")))
            for model, f in [(f[5:-6], f) for f in files if f.startswith("eval_") and f.endswith(".jsonl")]:
                rows = [json.loads(ln) for ln in open(os.path.join(d, f))]
                res["models"][model] = report.summarize(rows, tuple(res["seen"]))
            json.dump(res, open(os.path.join(d, "eval.json"), "w"), indent=1)
            print("rescored", os.path.relpath(d, ROOT))


def commit():
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return git.stdout.strip()
    except OSError:
        return "?"


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return f"{os.cpu_count()} cores, {cpu}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "table", "all", "rescore", "coherence", "ksweep", "compare"])
    p.add_argument("--router", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in runs/results first")
    p.add_argument("--resume", action="store_true", help="all: only the runs not in experiments/results yet")
    p.add_argument("--jobs", type=int, default=1, help="all: runs at a time, each with cores/jobs threads")
    p.add_argument("--top", default=None, help="run, compare: the results folder (default experiments/results)")
    p.add_argument("--model", default="deployed", help="compare: which evaluated model")
    a = p.parse_args(argv)
    if a.jobs < 1:
        sys.exit(f"error: --jobs must be at least 1, got {a.jobs}")
    if a.what == "run":
        run_one(a.router, a.seed, a.fresh, top=a.top and os.path.abspath(a.top))
    elif a.what == "compare":
        from experiments.compare import compare
        return print(compare(os.path.abspath(a.top or RESULTS), a.model))
    elif a.what == "ksweep":
        run_one(a.router, a.seed, a.fresh, KSTEPS, os.path.join(RESULTS, KSWEEP))
    elif a.what == "rescore":
        rescore()
    elif a.what == "all":
        t = time.time()
        run_all(PLAN, a.jobs, a.resume)
        print(f"all {len(PLAN)} runs{' (resumed)' if a.resume else ''}, {a.jobs} at a time: "
              f"{(time.time() - t) / 3600:.2f} h")
    olds = [v for v in OLD if os.path.isdir(os.path.join(RESULTS, v))]
    if a.what in ("coherence", "ksweep"):
        text = coherence_table()
        write_table(text, "coherence")
        if os.path.isdir(os.path.join(RESULTS, KSWEEP)):
            sweep = coherence_table(os.path.join(RESULTS, KSWEEP))
            write_table(sweep, "coherence-ksweep")
            text = sweep if a.what == "ksweep" else text  # print the table the command just added to
        for v in (v for v in olds if v != "v1"):  # v1 predates --coherence-steps
            write_table(coherence_table(os.path.join(RESULTS, v)), f"coherence-{v}")
        return print(text)
    rows = load()
    text = table(rows)
    write_table(text)
    write_table(headline(rows), "headline", README)
    from experiments.compare import compare, diffs, verdict  # numpy: only here
    write_table(diffs(RESULTS, HEADLINE), "headline-diffs", README)
    write_table(verdict(RESULTS), "verdict", README)
    write_table("\n\n".join(compare(RESULTS, m) for m in ("coherent", "deployed")), "diffs")
    for v in olds:
        write_table(table(load(os.path.join(RESULTS, v)), os.path.join(RESULTS, v)), f"results-{v}")
    print(text)


if __name__ == "__main__":
    main()
