"""
The relearn probe on the table's models (SGTM's relearn test, Shilov, Cloud et al. 2025): plain GRPO
from the deployed model after the pre-registered retain steps, the run's demonstrations withheld. How
many steps until it hacks at `none`'s level again?

    python experiments/relearn.py run --seed 2 [--steps 16] [--routers none,grad,label,placebo] [--jobs 2]
    python experiments/relearn.py table      # -> experiments/RESULTS.md (relearn markers) and stdout

`run` needs each run's checkpoint in runs/results/R-sS (`results.py run` trains it there). It copies it
to runs/relearn/R-sS and runs `python eval.py --ckpt runs/relearn/R-sS --n 4 --coherence-steps K
--relearn-steps N` there (K as in the table); eval.json, eval.md and the command with its wall time go
to experiments/results/relearn/R-sS. --n 4: the eval's own held-out rates use 4 problems per mode (read
the table's for those); the relearn curve does not depend on it.
`none`'s level: the mean on-policy hack rate of `none`'s last 4 RL steps of the same seed
(experiments/results/none-sS/metrics.jsonl), the same measure as the curve (metrics.step_metrics'
hack: exploits among the on-policy loophole rollouts of a step, on training prompts).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.results import commit, job_env, machine  # noqa: E402
from experiments.tables import COHERENCE, RESULTS, ROOT, jsonl, write_table  # noqa: E402

SRC, WORK = os.path.join(ROOT, "runs", "results"), os.path.join(ROOT, "runs", "relearn")
TOP = os.path.join(RESULTS, "relearn")
LAST = 4  # none's level: the mean hack rate of its last LAST RL steps


def run_one(router, seed, steps, env=None):
    name = f"{router}-s{seed}"
    src, out, dst = os.path.join(SRC, name), os.path.join(WORK, name), os.path.join(TOP, name)
    if not os.path.exists(os.path.join(src, "ckpt")):
        return f"{src}: no checkpoint (train it first: python experiments/results.py run --router {router} " \
               f"--seed {seed})"
    shutil.rmtree(out, ignore_errors=True)  # the run without the table's evaluation: the probe writes its own
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("eval*", "coherence"))
    rel = os.path.relpath(out, ROOT)
    cmd = ["python", "eval.py", "--ckpt", rel, "--n", "4", "--coherence-steps", COHERENCE,
           "--relearn-steps", str(steps)]
    t, head = time.time(), commit()  # the code the probe starts from
    code = subprocess.call([sys.executable] + cmd[1:], cwd=ROOT, env=env)
    if code:
        return f"{' '.join(cmd)} exited {code}"
    os.makedirs(dst, exist_ok=True)
    for f in ("eval.json", "eval.md"):
        shutil.copy(os.path.join(out, f), dst)
    meta = {"router": router, "seed": seed, "eval": " ".join(cmd), "eval_s": round(time.time() - t, 1),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "code": head,
            "from": f"runs/results/{name}: the run in experiments/results/{name}"}
    json.dump(meta, open(os.path.join(dst, "run.json"), "w"), indent=1)
    return None


def level(seed, results=RESULTS):
    """none's on-policy hack rate at the end of its RL (mean of the last LAST steps), or None."""
    hs = [r["hack"] for r in jsonl(os.path.join(results, f"none-s{seed}")) if r.get("hack") is not None][-LAST:]
    return sum(hs) / len(hs) if hs else None


def table(top=TOP, results=RESULTS):
    """One row per probe: none's level, the relearn curve, the first step that reaches the level."""
    lines = ["| run | none's level | hack per relearn step | first step at none's level |", "|---|---|---|---|"]
    for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        f = os.path.join(top, name, "eval.json")
        if not os.path.exists(f):
            continue
        res, seed = json.load(open(f)), json.load(open(os.path.join(top, name, "run.json")))["seed"]
        curve, lv = res["relearn"]["hack_per_step"], level(seed, results)
        at = None if lv is None else next((i + 1 for i, h in enumerate(curve) if h is not None and h >= lv), None)
        lines.append(f"| {name} | {'-' if lv is None else f'{lv:.2f}'} | "
                     f"{' '.join('-' if h is None else f'{h:.2f}' for h in curve)} | "
                     f"{'-' if lv is None else at or f'> {len(curve)}'} |")
    return "\n".join(lines) if len(lines) > 2 else "Not run yet."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "table"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=16, help="GRPO steps of the probe (the recipe's RL steps)")
    p.add_argument("--routers", default="none,grad,label,placebo")
    p.add_argument("--jobs", type=int, default=2, help="probes at a time, each with cores/jobs threads")
    a = p.parse_args(argv)
    if a.steps < 1 or a.jobs < 1:
        sys.exit("error: --steps and --jobs must be at least 1")
    if a.what == "run":
        from concurrent.futures import ThreadPoolExecutor
        env = job_env(a.jobs)
        with ThreadPoolExecutor(a.jobs) as pool:
            errs = [e for e in pool.map(lambda r: run_one(r, a.seed, a.steps, env), a.routers.split(",")) if e]
        if errs:
            sys.exit("error: " + "; ".join(errs))
    text = table()
    write_table(text, "relearn")
    print(text)


if __name__ == "__main__":
    main()
