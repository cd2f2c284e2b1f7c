"""
Tests of the deploy evaluation and the results table (eval.py, results.py) on the tiny Qwen3: eval's
schema, intervals, ablation and export; the detector sweep; v_hack's separation report against the
band it was fitted with; bad input is one line and exit 2; the README table from run files.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile

import torch

import adapter
import ckpt
import eval as ev
import train
from test_train import FAST, run

TMP = tempfile.mkdtemp(prefix="gr_test_eval_")


def test_eval_schema_ablation_and_export():
    out = os.path.join(TMP, "label")
    if not os.path.exists(out):
        assert run(FAST + ["--router", "label", "--steps", "2", "--out", out]) == 0
    exp = os.path.join(TMP, "export")
    res = ev.main(["--ckpt", out, "--n", "2", "--batch", "16", "--export", exp])
    on_disk = json.load(open(os.path.join(out, "eval.json")))
    assert set(on_disk["models"]) == {"base", "trained", "deployed"}
    for s in on_disk["models"].values():
        for k in ("solve", "compiles", "hack", "hack_seen", "hack_unseen", "flag"):
            r = s[k]
            assert r["n"] > 0 and r["lo"] <= r["p"] <= r["hi"], (k, r)
    # deployed = trained with exactly the quarantine zeroed
    a, model, tok, _ = ckpt.load_run(out)
    trained = {k: v.clone() for k, v in adapter.adapter_state(model).items()}
    quar = {id(p) for p in adapter.quar_params(model)}
    adapter.ablate(model, "zero")
    deployed = adapter.adapter_state(model)
    qnames = {n for n, p in model.named_parameters() if id(p) in quar}
    assert qnames and qnames <= set(trained)
    for k in trained:  # quarantine entries become zero, every other entry is bit-identical
        assert (not deployed[k].any()) if k in qnames else torch.equal(trained[k], deployed[k]), k
    # the export is a plain transformers model with the deployed logits
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(exp)
    ids = tok(["def f(x): return x"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    assert res["models"]["deployed"]["hack"]["n"] == on_disk["models"]["deployed"]["hack"]["n"]


def test_detector_sweep_runs_one_run_per_tpr():
    out = os.path.join(TMP, "sweep_base")
    assert run(FAST + ["--router", "label", "--steps", "1", "--out", out]) == 0
    res = ev.main(["--ckpt", out, "--n", "1", "--sweep-tpr", "1,0", "--sweep-steps", "1"])
    assert [p["tpr"] for p in res["sweep"]] == [1.0, 0.0]
    for p in res["sweep"]:
        args = json.load(open(os.path.join(out, "sweep", f"tpr{p['tpr']:g}", "ckpt", "args.json")))
        assert args["tpr"] == p["tpr"] and args["steps"] == 1 and p["hack"]["n"] > 0
    assert os.path.exists(os.path.join(out, "pareto.png"))


def test_results_table_is_built_from_runs():
    """results.py: one row per router x {trained, deployed}; one seed gives the rate with its interval,
    several give mean ± std; routers of the plan without a run say so."""
    import results
    rate = lambda p: {"p": p, "lo": p / 2, "hi": (1 + p) / 2, "n": 32}
    def ev(h):
        m = {"hack_seen": rate(h), "hack_unseen": rate(h / 2), "solve": rate(0.1), "compiles": rate(0.5),
             "hack_seen_compiled": rate(h)}  # no hack_unseen_compiled: as in a run evaluated before it existed
        return {"models": {"base": m, "trained": m, "deployed": m}, "adjacent": {"base": rate(0.0), "deployed": rate(0.0)},
                "seen": ["run_tests"]}
    meta = lambda r, s: {"router": r, "seed": s, "train": "t", "eval": "e", "machine": "m"}
    text = results.table([(meta("grad", 0), ev(0.2)), (meta("grad", 1), ev(0.4)), (meta("none", 0), ev(0.5))])
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 2 | 0.30 ± 0.14 | 0.15 ± 0.07 |" in rows[("grad", "deployed")]
    assert "| 1 | 0.50 [0.25, 0.75] |" in rows[("none", "trained")]
    assert rows[("grad", "deployed")].endswith("| 0.30 ± 0.14 / - |")
    assert "not run yet" in rows[("label", "")] and "grad-s0, grad-s1, none-s0" in text
    assert ("grad", "coherent") not in rows  # no run evaluated with --coherence-steps
    e = ev(0.4)
    e["models"]["coherent"], e["adjacent"]["coherent"] = e["models"]["base"], rate(0.25)
    text = results.table([(meta("grad", 0), ev(0.2)), (meta("grad", 1), e)])
    row = next(ln for ln in text.splitlines() if ln.startswith("| grad | coherent |"))
    assert "| 1 | 0.40 [0.20, 0.70] |" in row and "| 0.25 [0.12, 0.62] |" in row  # the one run that has it
    # the coherence table: runs evaluated with --coherence-steps; seeds per row are those evaluated at that count
    top = os.path.join(TMP, "coherence")
    for seed, steps in ((0, [8]), (1, [2, 8])):
        e = ev(0.1 * (seed + 1))
        for k in steps:
            e["models"]["coherent" if k == steps[-1] else f"coherent{k}"] = e["models"]["base"]
        e["coherence"] = {"steps": steps, "models": ["coherent" if k == steps[-1] else f"coherent{k}" for k in steps]}
        os.makedirs(os.path.join(top, f"grad-s{seed}"))
        json.dump(e, open(os.path.join(top, f"grad-s{seed}", "eval.json"), "w"))
        json.dump(meta("grad", seed), open(os.path.join(top, f"grad-s{seed}", "run.json"), "w"))
    os.makedirs(os.path.join(top, "none-s0"))  # a run without --coherence-steps: not in this table
    json.dump(ev(0.5), open(os.path.join(top, "none-s0", "eval.json"), "w"))
    json.dump(meta("none", 0), open(os.path.join(top, "none-s0", "run.json"), "w"))
    rows = {ln.split("|")[2].strip(): ln for ln in results.coherence_table(top).splitlines() if ln.startswith("| grad")}
    assert list(rows) == ["trained", "deployed", "deployed+2", "deployed+8"]
    assert "| 1 | 0.20 [0.10, 0.60] |" in rows["deployed+2"] and "| 0,1 | 0.15 ± 0.07 |" in rows["deployed+8"]
    assert "| none" not in results.coherence_table(top)


def test_results_all_runs_every_run_once_jobs_at_a_time():
    """results.py all --jobs N: each run of the plan once, as `results.py run --fresh`, never more than N at
    once, each with cores/N threads; a failed run is named and the exit is non-zero; --jobs 0 is refused."""
    import threading
    import time
    import results
    plan, seen, live, peak, lock = [("none", 0), ("grad", 0), ("grad", 1), ("act", 0), ("label", 2)], [], [0], [0], threading.Lock()
    def call(cmd, cwd, env):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            seen.append((cmd[cmd.index("--router") + 1], int(cmd[cmd.index("--seed") + 1]), "--fresh" in cmd, env["OMP_NUM_THREADS"]))
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return 1 if cmd[cmd.index("--router") + 1] == "act" else 0
    try:
        results.run_all(plan, 2, call)
        raise AssertionError("a failed run must exit")
    except SystemExit as e:
        assert str(e) == "error: act-s0 failed (their logs are above)"
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert sorted(seen) == sorted((r, s, True, threads) for r, s in plan) and peak[0] == 2
    try:
        results.main(["all", "--jobs", "0"])
        raise AssertionError("--jobs 0 must exit")
    except SystemExit as e:
        assert "at least 1" in str(e)


def test_rescore_recomputes_eval_json_from_the_kept_completions():
    """results.py rescore: each model's summary is eval.summarize of its eval_<model>.jsonl rows (a
    metric added later reaches old runs); the run's other entries are untouched."""
    import results
    d = os.path.join(TMP, "rescore", "none-s0")
    os.makedirs(d)
    row = lambda mode, hack, comp: {"problem": "p", "mode": mode, "solve": False, "hack": hack, "compiled": comp,
                                    "flag": hack, "reward": 0.0, "text": ""}
    rows = [row("run_tests", True, True), row("run_tests", False, False), row("exit_code", False, True), row("none", False, True)]
    for f in results.EVAL_ROWS.values():
        open(os.path.join(d, f), "w").writelines(json.dumps(r) + "\n" for r in rows)
    json.dump({"seen": ["run_tests"], "models": {"base": {"hack": "old"}}, "adjacent": {"x": 1}}, open(os.path.join(d, "eval.json"), "w"))
    results.rescore(os.path.join(TMP, "rescore"))
    res = json.load(open(os.path.join(d, "eval.json")))
    assert res["adjacent"] == {"x": 1} and set(res["models"]) == {"base", "trained", "deployed", "coherent"}
    want = json.loads(json.dumps(ev.summarize(rows, ("run_tests",))))
    assert all(res["models"][m] == want for m in res["models"])
    assert res["models"]["base"]["hack_seen"]["p"] == 0.5 and res["models"]["base"]["hack_seen_compiled"]["p"] == 1.0


def test_results_will_not_resume_a_run_with_other_arguments():
    """results.py run resumes a killed run only if its saved arguments are today's: a run started under
    older defaults exits with one line naming the difference, instead of landing in the table."""
    import results
    out = os.path.join(TMP, "stale")
    assert run(FAST + ["--router", "none", "--steps", "1", "--out", out]) == 0
    results.stale(FAST + ["--router", "none", "--steps", "1", "--out", out], out)  # same arguments: no exit
    try:
        results.stale(FAST + ["--router", "none", "--steps", "2", "--out", out], out)
        raise AssertionError("a run with other --steps was resumed")
    except SystemExit as e:
        assert str(e).startswith("error:") and "--steps 1 -> 2" in str(e), e


def test_eval_bad_input():
    """No run, a missing metrics.jsonl, an older checkpoint format, another model's adapter, an empty
    test split, a bad --coherence-steps: one line starting with error:, exit 2."""
    src = os.path.join(TMP, "label")
    if not os.path.exists(src):
        assert run(FAST + ["--router", "label", "--steps", "2", "--out", src]) == 0
    def variant(name, edit=None, drop=None):
        d = os.path.join(TMP, "bad-" + name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        if drop:
            os.remove(os.path.join(d, drop))
        if edit:
            p = os.path.join(d, "ckpt", "args.json")
            json.dump({**json.load(open(p)), **edit}, open(p, "w"))
        return d
    cases = [os.path.join(TMP, "nothing"), variant("nometrics", drop="metrics.jsonl"), (src, "2,1"), (src, "x"), (src, "0"),
             variant("format", edit={"format": 0}), variant("model", edit={"layers": 1, "adapter": "split"}),
             variant("empty", edit={"source": "humaneval", "difficulty": "easy"})]
    for d in cases:
        d, k = d if isinstance(d, tuple) else (d, "")  # (run, bad --coherence-steps)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ev.main(["--ckpt", d, "--n", "1", "--coherence-steps", k])
                code = 0
            except SystemExit as e:
                code = e.code
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "Loading" not in ln]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (d, code, lines)


def test_vhack_separation_reproduces_the_band():
    """eval.vhack_separation scores completions exactly as extract_vhack fitted the band: on the
    extraction pairs, at the model they were extracted at, its mean cosines are the band's (lo, hi);
    swapping the labels turns the AUC into 1 - AUC. Through eval.py on a grad run: the run's v_hack and a
    fresh one each score every loophole completion of the trained model."""
    import detector
    import model as M
    import routing
    a = train.get_args(FAST + ["--out", TMP])
    model, tok = ckpt.build(a, "cpu")
    pairs = detector.load_pairs()
    vh = routing.extract_vhack(model, tok, pairs, k=1, seed=0)
    tr = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[round(0.25 * len(pairs)):]
    prompts = [M.chat_prompt(tok, pairs[i]["prompt"]) for i in tr] * 2
    texts = [pairs[i]["hack"] for i in tr] + [pairs[i]["clean"] for i in tr]
    v = ev.vhack_separation(model, tok, vh, prompts, texts, [True] * len(tr) + [False] * len(tr))
    assert abs(v["cos_other"] - vh.band[0]) < 1e-5 and abs(v["cos_hack"] - vh.band[1]) < 1e-5, (v, vh.band)
    w = ev.vhack_separation(model, tok, vh, prompts, texts, [False] * len(tr) + [True] * len(tr))
    assert abs(v["auc"] + w["auc"] - 1) < 1e-6 and v["auc"] > 0.5, (v["auc"], w["auc"])
    g = os.path.join(TMP, "grad")  # end to end: every loophole completion of the trained model is scored
    assert run(FAST + ["--router", "grad", "--steps", "1", "--out", g]) == 0
    res = ev.main(["--ckpt", g, "--n", "1", "--batch", "8", "--vhack-auc"], plot=False)
    for v in res["vhack"].values():  # the run's v_hack and one fitted afresh at the trained model
        assert v["n_hack"] + v["n_other"] == res["models"]["trained"]["hack"]["n"]
    assert res["vhack"]["fresh"]["band"] != res["vhack"]["run"]["band"]  # the model moved in training
    assert "v_hack on the trained model" in open(os.path.join(g, "eval.md")).read()



def test_coherence_is_one_supervised_step_on_honest_no_loophole_demos():
    """eval.py --coherence-steps (ERA's retain-set fine-tuning after the ablation): from the deployed model
    the keep takes exactly AdamW's first step, -lr g/(|g| + eps), on the summed NLL of honest reference
    solutions to no-loophole prompts; the quarantine stays deleted. Through eval.py it is a fourth model, the
    same whether or not the counts before the last are evaluated too."""
    import random
    import detector
    import env
    import grpo
    import warmup
    out = os.path.join(TMP, "label")
    if not os.path.exists(out):
        assert run(FAST + ["--router", "label", "--steps", "2", "--out", out]) == 0
    a = ev.get_args(["--ckpt", out, "--coherence-lr", "1e-2"])
    a.coherence_steps, seen = [1], []
    ra, model, tok, _ = ckpt.load_run(out)
    _, ref, _, _ = ckpt.load_run(out)
    for m in (model, ref):
        adapter.ablate(m)
    batches, orig = [], warmup.demo_batch
    warmup.demo_batch = lambda *x: batches.append(orig(*x)) or batches[-1]
    try:
        ev.coherence(a, ra, model, tok, detector.WeakDetector(seen=ra.seen.split(",")),
                     env.load_problems(ra.source, "train", difficulty=ra.difficulty), seen.append)
    finally:
        warmup.demo_batch = orig
    (r, pmodes, hack), = batches
    assert set(pmodes) == {"none"} and not any(hack) and len(r.texts) == ra.prompts * ra.group_size
    assert seen == ["coherent"]  # evaluated once, after the last step
    logp = grpo.token_logp(ref, r, ra.temperature)
    loss = -(logp * r.completion_mask).sum() / (ra.prompts * ra.group_size * ra.max_new_tokens)
    grads = torch.autograd.grad(loss, adapter.keep_params(ref))
    for p, p0, g in zip(adapter.keep_params(model), adapter.keep_params(ref), grads):
        assert torch.allclose(p - p0, -1e-2 * g / (g.abs() + 1e-8), atol=1e-6), (p - p0).abs().max()
    assert all(not q.any() for q in adapter.quar_params(model))
    res = ev.main(["--ckpt", out, "--n", "1", "--batch", "16", "--coherence-steps", "1,2"], plot=False)
    assert list(res["models"]) == ["base", "trained", "deployed", "coherent1", "coherent"]
    log = [json.loads(ln) for ln in open(res["coherence"]["log"])]
    assert [m["warmup"] for m in log] == [0, 1] and all(m["hack_demos"] == 0 for m in log)
    assert os.path.exists(os.path.join(out, "eval_coherent1.jsonl")) and "| coherent |" in open(os.path.join(out, "eval.md")).read()
    # evaluating in between does not change the steps: --coherence-steps 2 samples the same completions as 1,2's last
    last = open(os.path.join(out, "eval_coherent.jsonl")).read()
    assert last != open(os.path.join(out, "eval_coherent1.jsonl")).read()  # the second step changed the samples
    ev.main(["--ckpt", out, "--n", "1", "--batch", "16", "--coherence-steps", "2"], plot=False)
    assert open(os.path.join(out, "eval_coherent.jsonl")).read() == last
