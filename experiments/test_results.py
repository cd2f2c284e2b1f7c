"""
Tests of the headline experiment's bookkeeping (experiments/results.py, its tables experiments/tables.py):
the results tables from run files, the coherence table, `all --jobs`, `rescore` from the kept completions,
and the refusal to resume a run started with other arguments.
"""
import json
import os
import sys
import tempfile

# the repo root: report, test_train, experiments
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402
from experiments import relearn, results, tables  # noqa: E402
from test_train import FAST, run  # noqa: E402

TMP = tempfile.mkdtemp(prefix="gr_test_results_")


def test_results_table_is_built_from_runs():
    """tables.py: one row per router x {trained, deployed}; one seed gives the rate with its interval,
    several give mean ± std; routers of the plan without a run say so."""
    def rate(p):
        return {"p": p, "lo": p / 2, "hi": (1 + p) / 2, "n": 32}

    def eval_json(h):
        m = {"hack_seen": rate(h), "hack_unseen": rate(h / 2), "solve": rate(0.1), "compiles": rate(0.5),
             "hack_seen_compiled": rate(h)}  # no hack_unseen_compiled: as in a run evaluated before it existed
        return {"models": {"base": m, "trained": m, "deployed": m},
                "adjacent": {"base": rate(0.0), "deployed": rate(0.0)}, "seen": ["run_tests"]}

    def meta(r, s):
        return {"router": r, "seed": s, "train": "t", "eval": "e", "machine": "m"}

    text = tables.table([(meta("grad", 0), eval_json(0.2)), (meta("grad", 1), eval_json(0.4)),
                         (meta("none", 0), eval_json(0.5))])
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 2 | 0.30 ± 0.14 | 0.15 ± 0.07 |" in rows[("grad", "deployed")]
    assert "| 1 | 0.50 [0.25, 0.75] |" in rows[("none", "trained")]
    assert rows[("grad", "deployed")].endswith("| 0.30 ± 0.14 / - |")
    assert "not run yet" in rows[("label", "")] and "grad-s0, grad-s1, none-s0" in text
    assert ("grad", "coherent") not in rows  # no run evaluated with --coherence-steps
    probe = {**meta("none", 1), "train": "t --out runs/probe", "note": "trained as a probe, moved here"}
    both = [(probe, eval_json(0.5)), (meta("none", 0), eval_json(0.5))]
    assert "= `t` then `e`" in tables.table(both)  # from the run of results.py
    e = eval_json(0.4)
    e["models"]["coherent"], e["adjacent"]["coherent"] = e["models"]["base"], rate(0.25)
    text = tables.table([(meta("grad", 0), eval_json(0.2)), (meta("grad", 1), e)])
    row = next(ln for ln in text.splitlines() if ln.startswith("| grad | coherent |"))
    assert "| 1 | 0.40 [0.20, 0.70] |" in row and "| 0.25 [0.12, 0.62] |" in row  # the one run that has it
    # the coherence table: runs evaluated with --coherence-steps; seeds per row are those evaluated at that count
    top = os.path.join(TMP, "coherence")
    for seed, steps in ((0, [8]), (1, [2, 8])):
        e = eval_json(0.1 * (seed + 1))
        for k in steps:
            e["models"]["coherent" if k == steps[-1] else f"coherent{k}"] = e["models"]["base"]
        e["coherence"] = {"steps": steps, "models": ["coherent" if k == steps[-1] else f"coherent{k}" for k in steps]}
        os.makedirs(os.path.join(top, f"grad-s{seed}"))
        json.dump(e, open(os.path.join(top, f"grad-s{seed}", "eval.json"), "w"))
        json.dump(meta("grad", seed), open(os.path.join(top, f"grad-s{seed}", "run.json"), "w"))
    os.makedirs(os.path.join(top, "none-s0"))  # a run without --coherence-steps: not in this table
    json.dump(eval_json(0.5), open(os.path.join(top, "none-s0", "eval.json"), "w"))
    json.dump(meta("none", 0), open(os.path.join(top, "none-s0", "run.json"), "w"))
    rows = {ln.split("|")[2].strip(): ln for ln in tables.coherence_table(top).splitlines() if ln.startswith("| grad")}
    assert list(rows) == ["trained", "deployed", "deployed+2", "deployed+8"]
    assert "| 1 | 0.20 [0.10, 0.60] |" in rows["deployed+2"] and "| 0,1 | 0.15 ± 0.07 |" in rows["deployed+8"]
    assert "| none" not in tables.coherence_table(top)


def test_headline_means_over_seeds_and_leakage_over_rl_steps():
    """tables.headline: per router, each metric's trained / deployed / coherent means over seeds ('-' where a
    seed lacks the model or the metric), and leakage: the mean leak_keep over the runs' RL steps (None skipped)."""
    def rate(p):
        return {"p": p, "lo": 0, "hi": 1, "n": 10}

    def ev(h, coherent=True):
        m = {k: rate(h) for k in ("hack_seen", "hack_unseen", "attempt", "compiles", "solve")}
        d = {k: rate(0.0) for k in m}
        return {"models": {"base": m, "trained": m, "deployed": d, **({"coherent": d} if coherent else {})},
                "seen": ["run_tests"]}
    top = os.path.join(TMP, "headline")
    for name, leak in (("grad-s0", [0.2, None, 0.4]), ("grad-s1", [0.6])):
        os.makedirs(os.path.join(top, name))
        rows = [json.dumps({"leak_keep": x}) + "\n" for x in leak]
        open(os.path.join(top, name, "metrics.jsonl"), "w").writelines(rows)
    meta = [{"router": "grad", "seed": s} for s in (0, 1)]
    text = tables.headline([(meta[0], ev(0.2)), (meta[1], ev(0.4))], top)
    row = next(ln for ln in text.splitlines() if ln.startswith("| grad |"))
    assert row == "| grad | 0,1 | " + " | ".join(["0.30 / 0.00 / 0.00"] * 5) + " | 0.40 |", row
    text = tables.headline([(meta[0], ev(0.2)), (meta[1], ev(0.4, coherent=False))], top)
    assert "| 0.30 / 0.00 / - |" in next(ln for ln in text.splitlines() if ln.startswith("| grad |"))
    assert "| none | | not run yet |" in text and "| (base model) | - | 0.20 |" in text


def test_results_all_runs_every_run_once_jobs_at_a_time():
    """results.py all --jobs N: each run of the plan once, as `results.py run --fresh`, never more than N at
    once, each with cores/N threads; a failed run is named and the exit is non-zero; --jobs 0 is refused;
    --resume runs only the runs with no run.json in experiments/results, without --fresh."""
    import threading
    import time

    plan = [("none", 0), ("grad", 0), ("grad", 1), ("act", 0), ("label", 2)]
    seen, live, peak, lock = [], [0], [0], threading.Lock()

    def call(cmd, cwd, env):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            seen.append((cmd[cmd.index("--router") + 1], int(cmd[cmd.index("--seed") + 1]), "--fresh" in cmd,
                         env["OMP_NUM_THREADS"]))
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return 1 if cmd[cmd.index("--router") + 1] == "act" else 0
    try:
        results.run_all(plan, 2, call=call)
        raise AssertionError("a failed run must exit")
    except SystemExit as e:
        assert str(e) == "error: act-s0 failed (their logs are above)"
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert sorted(seen) == sorted((r, s, True, threads) for r, s in plan) and peak[0] == 2
    saved, seen[:] = results.RESULTS, []  # --resume: the finished runs (run.json) left out, the others not fresh
    results.RESULTS = os.path.join(TMP, "resume")
    try:
        for d in ("none-s0", "grad-s1"):
            os.makedirs(os.path.join(results.RESULTS, d), exist_ok=True)
            open(os.path.join(results.RESULTS, d, "run.json"), "w").write("{}")
        os.makedirs(os.path.join(results.RESULTS, "grad-s0"), exist_ok=True)  # a run with no run.json is not done
        results.run_all([p for p in plan if p[0] != "act"], 2, resume=True, call=call)
    finally:
        results.RESULTS = saved
    assert sorted(seen) == [("grad", 0, False, threads), ("label", 2, False, threads)]
    try:
        results.main(["all", "--jobs", "0"])
        raise AssertionError("--jobs 0 must exit")
    except SystemExit as e:
        assert "at least 1" in str(e)


def test_results_run_names_the_run_relative_to_the_repo():
    """results.py run: train.py and eval.py get the run directory relative to the repo (their cwd), so the
    eval.json they write, which records --ckpt, holds no machine's path; run.json keeps those commands and
    the run's files, with the graded completions of the models this eval.json names (no stale ones), are
    copied to experiments/results/<router>-s<seed>/. ksweep: the same with --coherence-steps 1,2,4,8 into
    results/ksweep."""
    calls, saved = [], (results.RUNS, results.RESULTS, results.subprocess.call)

    def call(cmd, cwd):
        calls.append(cmd)
        d = os.path.join(cwd, cmd[cmd.index("--out" if "--out" in cmd else "--ckpt") + 1])
        os.makedirs(d, exist_ok=True)
        json.dump({"models": {"deployed": {}, "coherent": {}}}, open(os.path.join(d, "eval.json"), "w"))
        for m in ("deployed", "coherent", "coherent4"):  # coherent4: left by an earlier eval with other steps
            open(os.path.join(d, f"eval_{m}.jsonl"), "w").write("{}\n")
        return 0
    results.RUNS, results.RESULTS = os.path.join(TMP, "run1", "runs"), os.path.join(TMP, "run1", "results")
    results.subprocess.call = call
    try:
        results.run_one("grad", 3, fresh=True)
        results.run_one("grad", 3, True, results.KSTEPS, os.path.join(results.RESULTS, results.KSWEEP))  # = ksweep
        results.run_one("warmup", 0, fresh=True)  # the warm-up alone: plain GRPO's run with no RL step
    finally:
        results.RUNS, results.RESULTS, results.subprocess.call = saved
    rel = os.path.relpath(os.path.join(TMP, "run1", "runs", "grad-s3"), results.ROOT)
    assert [c[c.index("--out" if "train.py" in c[1] else "--ckpt") + 1] for c in calls[:4]] == [rel] * 4
    assert " ".join(calls[4][1:]).startswith("train.py --config recipes/laptop.json --router none --steps 0 --seed 0")
    dst = os.path.join(TMP, "run1", "results", "grad-s3")
    meta = json.load(open(os.path.join(dst, "run.json")))
    assert meta["train"] == f"python train.py --config recipes/laptop.json --router grad --seed 3 --out {rel}"
    assert not os.path.isabs(rel)
    assert meta["eval"] == f"python eval.py --ckpt {rel} --coherence-steps {results.COHERENCE}"
    assert sorted(os.listdir(dst)) == ["eval.json", "eval_coherent.jsonl", "eval_deployed.jsonl", "run.json"]
    meta = json.load(open(os.path.join(TMP, "run1", "results", "ksweep", "grad-s3", "run.json")))
    assert meta["eval"] == f"python eval.py --ckpt {rel} --coherence-steps 1,2,4,8"


def test_rescore_recomputes_eval_json_from_the_kept_completions():
    """results.py rescore: each model's summary, coherent<k> too, is report.summarize of its eval_<model>.jsonl
    rows (a metric added later reaches old runs); the run's other entries are untouched."""
    d = os.path.join(TMP, "rescore", "none-s0")
    os.makedirs(d)

    def row(mode, hack, comp):
        return {"problem": "p", "mode": mode, "solve": False, "hack": hack, "compiled": comp,
                "flag": hack, "reward": 0.0, "text": ""}

    rows = [row("run_tests", True, True), row("run_tests", False, False), row("exit_code", False, True),
            row("none", False, True)]
    for f in list(results.EVAL_ROWS.values()) + ["eval_coherent2.jsonl"]:  # coherent2: --coherence-steps 2,8
        open(os.path.join(d, f), "w").writelines(json.dumps(r) + "\n" for r in rows)
    json.dump({"seen": ["run_tests"], "models": {"base": {"hack": "old"}}, "adjacent": {"x": 1}},
              open(os.path.join(d, "eval.json"), "w"))
    results.rescore(os.path.join(TMP, "rescore"))
    res = json.load(open(os.path.join(d, "eval.json")))
    assert res["adjacent"] == {"x": 1}
    assert set(res["models"]) == {"base", "trained", "deployed", "coherent2", "coherent"}
    want = json.loads(json.dumps(report.summarize(rows, ("run_tests",))))
    assert all(res["models"][m] == want for m in res["models"])
    assert res["models"]["base"]["hack_seen"]["p"] == 0.5 and res["models"]["base"]["hack_seen_compiled"]["p"] == 1.0


def test_results_will_not_resume_a_run_with_other_arguments():
    """results.py run resumes a killed run only if its saved arguments are today's: a run started under
    older defaults exits with one line naming the difference, instead of landing in the table."""
    out = os.path.join(TMP, "stale")
    assert run(FAST + ["--router", "none", "--steps", "1", "--out", out]) == 0
    results.stale(FAST + ["--router", "none", "--steps", "1", "--out", out], out)  # same arguments: no exit
    try:
        results.stale(FAST + ["--router", "none", "--steps", "2", "--out", out], out)
        raise AssertionError("a run with other --steps was resumed")
    except SystemExit as e:
        assert str(e).startswith("error:") and "--steps 1 -> 2" in str(e), e


def test_relearn_table_counts_steps_to_none_level():
    """relearn.table: none's level is the mean hack of its last 4 RL steps (None skipped); the first relearn
    step at or above it, "> N" when none reaches it; a missing checkpoint is one error line, not a crash."""
    res, top = os.path.join(TMP, "relearn-res"), os.path.join(TMP, "relearn-top")
    os.makedirs(os.path.join(res, "none-s2"))
    hacks = [0.0, 0.9, 0.4, None, 0.5, 0.6, 0.7]  # last 4 non-None: 0.4, 0.5, 0.6, 0.7 -> 0.55
    open(os.path.join(res, "none-s2", "metrics.jsonl"), "w").writelines(json.dumps({"hack": h}) + "\n" for h in hacks)
    for name, curve in (("grad-s2", [0.1, None, 0.6, 0.2]), ("label-s2", [0.1, 0.5])):
        os.makedirs(os.path.join(top, name))
        json.dump({"relearn": {"hack_per_step": curve}}, open(os.path.join(top, name, "eval.json"), "w"))
        json.dump({"seed": 2}, open(os.path.join(top, name, "run.json"), "w"))
    rows = relearn.table(top, res).splitlines()
    assert rows[2] == "| grad-s2 | 0.55 | 0.10 - 0.60 0.20 | 3 |", rows
    assert rows[3] == "| label-s2 | 0.55 | 0.10 0.50 | > 2 |", rows
    err = relearn.run_one("grad", 99, 1)
    assert err.startswith(os.path.join(relearn.SRC, "grad-s99") + ": no checkpoint"), err


def test_gpu_check_without_cuda_is_one_line_exit_0():
    """make gpu-check on a machine without CUDA: one line saying it needs one, exit 0, nothing run."""
    import subprocess
    import torch
    if torch.cuda.is_available():
        return
    p = subprocess.run([sys.executable, os.path.join(results.ROOT, "experiments", "gpu_check.py"), "--out",
                        os.path.join(TMP, "gpu-check")], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.count("\n") == 1 and "CUDA" in p.stdout, (p.returncode, p.stdout)
    assert not os.path.exists(os.path.join(TMP, "gpu-check"))
