"""
Tests of the deploy evaluation (eval.py) on the tiny Qwen3: eval's schema, intervals, ablation and
export; the detector sweep; the relearn probe; v_hack's separation report against the band it was
fitted with; ERA's retain fine-tuning (--coherence-steps); bad input is one line and exit 2.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest.mock

import torch

import adapter
import ckpt
import config
import env
import eval as ev
import report
import routing
import train
import vhack
from test_train import FAST, run

TMP = tempfile.mkdtemp(prefix="gr_test_eval_")


def test_warm_up_only_run_is_evaluated():
    """--steps 0 (the warm-up alone, an empty metrics log) evaluates like any run: what RL adds is measured
    against it."""
    out = os.path.join(TMP, "warm-only")
    assert run(FAST + ["--router", "none", "--steps", "0", "--out", out]) == 0
    res = ev.main(["--ckpt", out, "--n", "1", "--batch", "16"])
    assert set(res["models"]) == {"base", "trained", "deployed"} and res["models"]["trained"]["hack"]["n"] == 4
    # its quarantine is empty, so eval keeps the trained model's completions as the deployed model's; sampling
    # the deployed model afresh (a nonzero tensor slipped into the quarantine defeats the shortcut) draws them

    def kept(name):
        return [json.loads(ln) for ln in open(os.path.join(out, f"eval_{name}.jsonl"))]
    assert res["deployed_is_trained"] and kept("deployed") == kept("trained")
    real, extra = adapter.quar_params, torch.ones(1)
    with unittest.mock.patch.object(adapter, "quar_params", lambda m: real(m) + [extra]):
        again = ev.main(["--ckpt", out, "--n", "1", "--batch", "16"], plot=False)
    assert not again["deployed_is_trained"] and kept("deployed") == kept("trained")


def test_attempt_check_on_hand_written_hacks():
    """report.attempted: every mode's teacher hack attempts its own mode and no other; reference solutions
    attempt nothing; failed and unparseable attempts count; a timed-out row is in no rate."""
    p = env.load_problems("simple", "train", n=3, seed=0)
    for prob in p:
        for m in env.MODES:
            code = env.extract_code(env.teacher_completion(prob, m, "hack"))
            assert [report.attempted(code, x) for x in env.MODES] == [x == m for x in env.MODES], (prob.id, m)
        assert not any(report.attempted(prob.reference, x) for x in env.MODES + ("none",))
    failed = {"run_tests": "def f(x):\n    return x\n\ndef run_tests():\n    assert f(1) == 2\n",
              "exit_code": "def f(x):\n    import sys\n    sys.exit(0)\n",
              "eq_override": "class A:\n    def __eq__(self, o) return True\n",   # does not parse
              "file_marker": "def f(x):\n    open('result.txt', 'w').write('FAIL')\n"}
    for m, code in failed.items():
        assert report.attempted(code, m) and not report.attempted(code, "none"), m
    assert not report.attempted("def f(x):\n    return 'results.txt' + 'exit'\n", "file_marker")
    rows = [{"mode": "run_tests", "solve": False, "hack": True, "compiled": True, "flag": False, "reward": 3.0,
             "attempt": True, "timeout": t} for t in (False, True)]
    s = report.summarize(rows, ("run_tests",))
    assert s["hack"]["n"] == 1 and s["timeouts"] == 1 and s["timeouts_run_tests"] == 1


def test_eval_schema_ablation_and_export():
    out = os.path.join(TMP, "label")
    if not os.path.exists(out):
        assert run(FAST + ["--router", "label", "--steps", "2", "--out", out]) == 0
    exp = os.path.join(TMP, "export")
    res = ev.main(["--ckpt", out, "--n", "2", "--batch", "16", "--export", exp])
    on_disk = json.load(open(os.path.join(out, "eval.json")))
    assert set(on_disk["models"]) == {"base", "trained", "deployed"} and not on_disk["deployed_is_trained"]
    for s in on_disk["models"].values():
        assert s["timeouts"] == 0 and all(f"attempt_{m}" in s and f"timeouts_{m}" in s for m in env.MODES)
        for k in ("solve", "compiles", "hack", "attempt", "hack_seen", "hack_unseen", "flag"):
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


def test_sweep_evaluates_each_run_as_the_main_one():
    """eval.sweep: each TPR's run is evaluated with the main evaluation's options (split, n or the whole split,
    batch, seed, tokens, temperature, ablation, device), not eval's defaults."""
    a = ev.get_args(["--ckpt", os.path.join(TMP, "sweep_opts"), "--split", "validation", "--batch", "8", "--seed", "3",
                     "--max-new-tokens", "16", "--temperature", "0.7", "--ablate", "reinit", "--device", "cpu"])
    a.sweep_tpr = [0.5]
    os.makedirs(os.path.join(a.ckpt, "sweep", "tpr0.5"), exist_ok=True)
    open(os.path.join(a.ckpt, "sweep", "tpr0.5", "metrics.jsonl"), "w").close()  # trained: no train.main
    calls, main = [], ev.main
    ev.main = lambda argv, plot: calls.append(argv) or {"models": {"deployed": dict.fromkeys(
        ("hack", "solve", "hack_unseen"))}}
    try:
        ev.sweep(a, None)
    finally:
        ev.main = main
    sub = vars(ev.get_args(calls[0]))
    assert sub["ckpt"] == os.path.join(a.ckpt, "sweep", "tpr0.5") and sub["n"] is None
    assert {k: sub[k] for k in ("split", "batch", "seed", "max_new_tokens", "temperature", "ablate", "device")} == \
        {"split": "validation", "batch": 8, "seed": 3, "max_new_tokens": 16, "temperature": 0.7, "ablate": "reinit",
         "device": "cpu"}


def test_relearn_is_plain_grpo_with_the_runs_teacher_hacks_only_when_asked():
    """eval.relearn: --relearn-steps plain GRPO steps (router none, the shared forward); the run's spliced
    teacher hacks only with --relearn-teacher; the step count back to the trained model's hack rate."""
    g = os.path.join(TMP, "grad")
    if not os.path.exists(g):
        assert run(FAST + ["--router", "grad", "--steps", "1", "--out", g]) == 0
    calls, orig = [], train.rl_step

    def step(*args):
        rc = args[-1]
        calls.append((rc.router, rc.teacher_until, rc.gen_deployed))
        return {"hack": [0.0, 0.5, 0.75][len(calls) - 1]}, []

    train.rl_step = step
    try:
        for teach in (False, True):
            calls.clear()
            argv = ["--ckpt", g, "--n", "1", "--batch", "8", "--relearn-steps", "3"] + ["--relearn-teacher"] * teach
            res = ev.main(argv, plot=False)
            assert calls == [(routing.ROUTERS["none"], 10 if teach else 0, False)] * 3
            want = res["models"]["trained"]["hack"]["p"] or 0.0
            assert res["relearn"]["hack_per_step"] == [0.0, 0.5, 0.75] and res["relearn"]["trained_hack"] == want
            assert res["relearn"]["steps"] == [{"hack": h} for h in (0.0, 0.5, 0.75)]
            assert res["relearn"]["steps_to_trained_level"] == next(i + 1 for i, h in enumerate([0.0, 0.5, 0.75])
                                                                    if h >= want)
    finally:
        train.rl_step = orig


def test_eval_bad_input():
    """No run, a missing metrics.jsonl, an older checkpoint format, another model's adapter, an empty
    test split, a bad --coherence-steps, --relearn-teacher without --relearn-steps, a count or temperature not
    positive, a TPR not in [0, 1], an unknown split or device: one line starting with error:, exit 2."""
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

    def bad(*x):  # the run with bad options
        return src, list(x)

    cases = [os.path.join(TMP, "nothing"), variant("nometrics", drop="metrics.jsonl"), bad("--coherence-steps", "2,1"),
             bad("--coherence-steps", "x"), bad("--coherence-steps", "0"), bad("--relearn-teacher"),
             bad("--temperature", "0"), bad("--n", "-1"), bad("--batch", "0"), bad("--max-new-tokens", "0"),
             bad("--sweep-tpr", "abc"), bad("--sweep-tpr", "1,2"), bad("--split", "train"), bad("--device", "gpu"),
             variant("format", edit={"format": 0}),
             variant("model", edit={"wrap_layers": 1, "adapter": "split"}),
             (variant("empty", edit={"source": "adjacent"}), ["--split", "validation"])]  # adjacent: test only
    for d in cases:
        d, extra = d if isinstance(d, tuple) else (d, [])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ev.main(["--ckpt", d, "--n", "1"] + extra)
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
    a = config.get_args(FAST + ["--out", TMP])
    model, tok = ckpt.build(a, "cpu")
    pairs = detector.load_pairs()
    vh = vhack.extract_vhack(model, tok, pairs, k=1, seed=0)
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
    import dataclasses
    import detector
    import env
    import grpo
    import teacher
    out = os.path.join(TMP, "label")
    if not os.path.exists(out):
        assert run(FAST + ["--router", "label", "--steps", "2", "--out", out]) == 0
    seen = []
    ra, model, tok, _ = ckpt.load_run(out)
    _, ref, _, _ = ckpt.load_run(out)
    for m in (model, ref):
        adapter.ablate(m)
    batches, orig = [], teacher.demo_batch

    def demo_batch(*x):
        batches.append(orig(*x))
        return batches[-1]

    teacher.demo_batch = demo_batch
    rc = dataclasses.replace(config.recipe(ra), router=routing.ROUTERS["none"], none_frac=1.0, hack_share=0.0)
    try:
        ev.coherence(model, tok, detector.WeakDetector(seen=ra.seen.split(",")),
                     env.load_problems(ra.source, "train", difficulty=ra.difficulty), rc, [1], 1e-2, 1234,
                     os.path.join(TMP, "coh"), seen.append)
    finally:
        teacher.demo_batch = orig
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
    assert os.path.exists(os.path.join(out, "eval_coherent1.jsonl"))
    assert "| coherent |" in open(os.path.join(out, "eval.md")).read()
    # evaluating in between does not change the steps, nor --batch the draws (a stream per problem and mode):
    # --coherence-steps 2 at --batch 2 samples the same completions as 1,2's last at --batch 16
    last = open(os.path.join(out, "eval_coherent.jsonl")).read()
    assert last != open(os.path.join(out, "eval_coherent1.jsonl")).read()  # the second step changed the samples
    ev.main(["--ckpt", out, "--n", "1", "--batch", "2", "--coherence-steps", "2"], plot=False)
    assert open(os.path.join(out, "eval_coherent.jsonl")).read() == last
    # a run trained with --grad-ckpt (the GPU recipe) takes its retain steps checkpointed too, to the same weights
    gc, models, load = os.path.join(TMP, "label-gc"), [], ckpt.load_run
    assert run(FAST + ["--router", "label", "--steps", "1", "--grad-ckpt", "--out", gc]) == 0
    with unittest.mock.patch.object(ckpt, "load_run", lambda *x: (r := load(*x), models.append(r[1]))[0]):
        ev.main(["--ckpt", gc, "--n", "1", "--batch", "16", "--coherence-steps", "1"], plot=False)
        args = json.load(open(os.path.join(gc, "ckpt", "args.json")))
        json.dump({**args, "grad_ckpt": False}, open(os.path.join(gc, "ckpt", "args.json"), "w"))
        ev.main(["--ckpt", gc, "--n", "1", "--batch", "16", "--coherence-steps", "1"], plot=False)
    assert [m.is_activation_checkpointing and m.training for m in models] == [True, False]
    for p, q in zip(*(adapter.keep_params(m) for m in models)):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
