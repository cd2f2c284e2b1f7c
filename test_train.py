"""
Tests of the training loop (train.py, config.py, teacher.py, ckpt.py, bench.py, flops.py) on the tiny
Qwen3: every router runs end to end and logs its routing; a killed run resumes to the same weights with each step logged
once, and a finished run resumed with more --steps continues to them; bad input is one line and exit 2;
the warm-up is routed; --teach-modes; the v_hack-axes quarantine (--adapter vhack); bench's FLOP count.
The deploy evaluation and the results table are tested in test_eval.py.
"""
import contextlib
import io
import json
import os
import random
import shutil
import tempfile

import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import adapter
import bench
import ckpt
import config
import env
import model as M
import routing
import teacher
import train

TMP = tempfile.mkdtemp(prefix="gr_test_")
FAST = ["--config", config.LAPTOP, "--model", "tiny", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "24",
        "--micro", "4",
        "--teacher-frac", "0.5", "--teacher-until", "10", "--wrap-layers", "0", "--warmup-steps", "1"]


def run(argv):
    """train.main in this process (imports are paid once); returns the exit code."""
    try:
        train.main(argv)
        return 0
    except SystemExit as e:
        return e.code


def metrics(out, name="metrics.jsonl"):
    return [json.loads(ln) for ln in open(os.path.join(out, name))]


def test_every_router_runs_two_steps():
    for router in routing.ROUTERS:
        out = os.path.join(TMP, router)
        assert run(FAST + ["--router", router, "--steps", "2", "--out", out]) == 0, router
        ms = metrics(out)
        assert [m["step"] for m in ms] == [0, 1], router
        for m in ms:
            assert {"reward", "solve", "hack", "flag", "t_gen", "t_grade", "t_train", "len"} <= set(m)
            assert all(f"hack_{mode}" in m for mode in ("run_tests", "exit_code", "eq_override", "file_marker"))
        assert os.path.exists(os.path.join(out, "ckpt", "adapter.safetensors"))
        assert ms[1].get("kl") is None and ("logp" not in ms[0] or ms[0]["kl"] >= 0), router  # KL_EVERY 5
        ss = metrics(out, "samples.jsonl")  # per-rollout routing share f: label's is its flag, 0 without quarantine
        assert [s["step"] for s in ss] == [0] * len(ss) and ss, router  # SAMPLE_EVERY 5
        if router == "label":
            assert all(s["f"] == float(s["flag"]) for s in ss)
        if not routing.ROUTERS[router].quarantine:
            assert all(s["f"] == 0.0 for s in ss), router
            st = load_file(os.path.join(out, "ckpt", "adapter.safetensors"))
            assert all(not v.any() for k, v in st.items() if k.endswith("s_quar")), router
        for m in ms:  # leakage and quadrants: logged every step, consistent with the router's f
            assert {"leak_keep", "leak_unrouted", "routed_exploit", "routed_flag_pos", "routed_unflag_neg"} <= set(m)
            if not routing.ROUTERS[router].quarantine:
                assert m["leak_keep"] in (None, 1.0) and m["leak_unrouted"] in (None, 1.0), (router, m)
            if router == "label":
                assert {m[k] for k in ("routed_flag_pos", "routed_flag_neg") if m[k] is not None} <= {1.0}, m
                assert {m[k] for k in ("routed_unflag_pos", "routed_unflag_neg") if m[k] is not None} <= {0.0}, m
        assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 2
        if router in ("placebo", "uniform"):  # the controls route exactly the share, every step
            assert all(abs(m["routed"] - routing.OPTS["share"]) < 1e-4 for m in ms), (router, ms)
        if router == "grad":  # f is the cosine mapped through the band and clamped: monotone in it, in [0, 1]
            cf = sorted((s["cos"], s["f"]) for s in ss)
            assert all(0 <= f <= 1 for _, f in cf) and all(a[1] <= b[1] for a, b in zip(cf, cf[1:])), cf
            assert all({"cos_teach", "cos_other"} <= set(m) for m in ms)


def test_resume_equals_uninterrupted_run():
    full, cut = os.path.join(TMP, "full"), os.path.join(TMP, "cut")
    args = FAST + ["--router", "label", "--steps", "4", "--fpr", "0.3"]  # label trains on the detector's draws
    assert run(args + ["--out", full]) == 0
    assert run(args + ["--out", cut, "--stop-after", "2"]) == 0      # "killed" after step 2
    for name in ("metrics.jsonl", "samples.jsonl"):                  # a step logged, then killed before its
        open(os.path.join(cut, name), "a").write(json.dumps({"step": 2, "partial": True}) + "\n")  # checkpoint
    shutil.copytree(os.path.join(cut, "ckpt"), os.path.join(cut, "ckpt.old"))  # and one killed mid-save
    assert run(["--resume", cut]) == 0
    assert [m["step"] for m in metrics(cut)] == [0, 1, 2, 3] and not os.path.exists(os.path.join(cut, "ckpt.old"))
    assert metrics(cut, "samples.jsonl") == metrics(full, "samples.jsonl")
    a = load_file(os.path.join(full, "ckpt", "adapter.safetensors"))
    b = load_file(os.path.join(cut, "ckpt", "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward"] for m in metrics(full)] == [m["reward"] for m in metrics(cut)]
    # a finished run resumed with more --steps continues to them, as nanoGPT's resume to max_iters, and ends
    # where a run started with that many steps ends; nothing else may change on --resume
    short, long = os.path.join(TMP, "short"), os.path.join(TMP, "long")
    assert run(FAST + ["--router", "grad", "--steps", "2", "--out", short]) == 0
    assert run(FAST + ["--router", "grad", "--steps", "3", "--out", long]) == 0
    os.rename(os.path.join(short, "ckpt"), os.path.join(short, "ckpt.old"))  # killed between save's two renames
    assert run(["--resume", short, "--steps", "3"]) == 0
    assert [m["step"] for m in metrics(short)] == [0, 1, 2]
    a = load_file(os.path.join(long, "ckpt", "adapter.safetensors"))
    b = load_file(os.path.join(short, "ckpt", "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and ckpt.saved_args(short)["steps"] == 3
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run(["--resume", short, "--lr", "1"]) == 2
    assert err.getvalue().startswith("error: --resume") and len(err.getvalue().splitlines()) == 1


def test_vhack_axes_quarantine():
    """--adapter vhack: the quarantine is the v_hack axes of delta_S, s = s_keep + A c with
    A the (r, k) v_grad axes; routed gradient reaches c only along them; a resumed run rebuilds the axes."""
    out = os.path.join(TMP, "axes")
    assert run(FAST + ["--router", "label", "--adapter", "vhack", "--vhack-k", "2", "--steps", "2", "--out", out,
                       "--stop-after", "1"]) == 0
    assert run(["--resume", out]) == 0
    st = load_file(os.path.join(out, "ckpt", "adapter.safetensors"))
    axes = {k: v for k, v in st.items() if k.endswith("quar_axes")}
    assert axes and all(v.shape[1] == 2 and st[k.replace("quar_axes", "s_quar")].shape == (2,) for k, v in axes.items())
    assert any(st[k.replace("quar_axes", "s_quar")].any() for k in axes)  # flagged demonstrations moved c
    a, model, _, vh = ckpt.load_run(out)
    for name, m in adapter.adapter_modules(model, adapter.SVDDelta).items():
        assert torch.equal(m.quar_axes, vh.v_grad[name].T)


def test_steps_zero_trains_the_warm_up_only():
    """--steps 0: the warm-up's model, checkpointed, with an empty metrics log (what RL adds is measured
    against it)."""
    out = os.path.join(TMP, "warm-only")
    assert run(FAST + ["--router", "none", "--steps", "0", "--out", out]) == 0
    assert open(os.path.join(out, "metrics.jsonl")).read() == "" and metrics(out, "warmup.jsonl")
    st = load_file(os.path.join(out, "ckpt", "adapter.safetensors"))
    assert any(v.any() for k, v in st.items() if k.endswith("s_keep"))


def test_recipes_gpu_defaults_and_the_laptop_file():
    """The defaults are the GPU recipe; recipes/laptop.json gives the laptop run (the earlier defaults, with
    impossible problems and 16 RL steps); a flag beats the recipe; the recipe's path is saved with the run's arguments;
    --eval-every logs the trained and deployed models on validation problems (heldout.jsonl)."""
    gpu = vars(config.get_args([]))
    want = dict(model="Qwen/Qwen3-4B", steps=200, prompts=16, group_size=16, warmup_steps=0, teacher_frac=0.0,
                grad_ckpt=True, beta=1e-3, eval_every=20, source="newfacade/LeetCodeDataset",
                difficulty="medium,hard,impossible")
    assert {k: gpu[k] for k in want} == want
    laptop = vars(config.get_args(["--config", config.LAPTOP, "--steps", "3"]))
    old = dict(model="smollm2", grad_ckpt=False, source="simple", difficulty="medium,hard,impossible", warmup_steps=32,
               warmup_lr=5e-2, teacher_frac=0.25, teacher_until=8, steps=3, prompts=2, group_size=8,
               max_new_tokens=96, temperature=0.7, lr=5e-2, beta=0.0, micro=8, eval_every=0, none_frac=0.2,
               router="grad", adapter="svd", seen="run_tests,file_marker", tpr=1.0, fpr=0.0, vhack_k=1)
    assert {k: laptop[k] for k in old} == old
    out = os.path.join(TMP, "heldout")
    assert run(FAST + ["--router", "grad", "--steps", "2", "--eval-every", "2", "--eval-n", "1", "--out", out]) == 0
    assert json.load(open(os.path.join(out, "ckpt", "args.json")))["config"] == config.LAPTOP
    hs = metrics(out, "heldout.jsonl")
    assert [h["step"] for h in hs] == [0, 2] and all(set(h) == {"step", "trained", "deployed"} for h in hs)
    open(os.path.join(out, "heldout.jsonl"), "w").write(json.dumps(hs[0]) + "\n")  # killed before step 2's
    assert run(["--resume", out]) == 0  # evaluation: the resume makes it, and nothing else
    assert [h["step"] for h in metrics(out, "heldout.jsonl")] == [0, 2]
    assert run(["--resume", out]) == 0 and [h["step"] for h in metrics(out, "heldout.jsonl")] == [0, 2]
    assert all(0 <= h[m][k] <= 1 for h in hs for m in ("trained", "deployed") for k in ("hack", "solve", "attempt"))


def test_bad_input_is_one_line_exit_2():
    ro = os.path.join(TMP, "readonly")
    os.makedirs(ro, exist_ok=True)
    os.chmod(ro, 0o500)
    cases = [["--group-size", "1"], ["--steps", "0", "--warmup-steps", "0"], ["--steps", "-1"], ["--share", "0"],
             ["--temperature", "0"], ["--resume", os.path.join(TMP, "nothing-here")],
             ["--modes", "run_tests,bogus"], ["--lr", "0"], ["--micro", "0"], ["--router", "label", "--flagged-only"],
             ["--modes", "run_tests", "--teach-modes", "exit_code"], ["--tpr", "2"], ["--seed", "-1"], ["--modes", ","]]
    if os.geteuid() != 0:  # root can write anywhere; use a path under a file instead
        cases.append(["--out", os.path.join(ro, "x")])
    open(os.path.join(TMP, "a-file"), "w").close()
    cases.append(["--out", os.path.join(TMP, "a-file", "x")])  # a path under a file
    for name, text in (("bad.json", "{"), ("key.json", '{"warmup_step": 1}'), ("list.json", "[]"),
                       ("choice.json", '{"router": "bogus"}'), ("int.json", '{"steps": 2.5}'),
                       ("switch.json", '{"grad_ckpt": "no"}')):
        open(os.path.join(TMP, name), "w").write(text)
        cases.append(["--config", os.path.join(TMP, name)])
    cases += [["--config", os.path.join(TMP, "no-such.json")], ["--eval-every", "-1"]]
    for extra in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run(FAST + ["--out", os.path.join(TMP, "bad")] + extra)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (extra, code, lines)


def test_bf16_model_path():
    """The GPU path loads Qwen3 in bf16: adapters keep float32 factors and grads; the step still works."""
    import grpo
    model, tok = M.load_model("tiny")
    model.to(torch.bfloat16)
    adapter.wrap(model, "svd")
    r = M.encode(tok, [M.chat_prompt(tok, "add")] * 2, ["def f(a, b): return a + b", "exit(0)"])
    cap = routing.Capture(model, n_rollouts=2, router=routing.ROUTERS["label"], flags=torch.tensor([False, True]))
    with cap:
        cap.rows(torch.arange(2))
        logp = grpo.token_logp(model, r)
        grpo.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), r.completion_mask.float(), 64).sum().backward()
    cap.route()
    for p in adapter.keep_params(model) + adapter.quar_params(model):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in adapter.quar_params(model))


def test_warmup_demos_are_routed():
    """train.warm_up: demonstrations go through the router. Every demo a flagged hack: `label` leaves s_keep
    exactly 0 (all in s_quar), `none` leaves s_quar 0, `screen` drops them all (nothing moves). The
    quarantine's warm-up lr keeps its ratio to the keep's: --lr-quar 0 leaves it 0 too."""
    import detector
    moved = {}
    for router, lr_q in (("label", 1.0), ("none", 1.0), ("screen", 1.0), ("label-q0", 0.0)):
        ta = config.get_args(FAST + ["--router", router.split("-")[0], "--modes", "run_tests", "--none-frac", "0",
                                     "--out", os.path.join(TMP, "warm-" + router)])
        os.makedirs(ta.out, exist_ok=True)
        model, tok = ckpt.build(ta, "cpu")
        groups = [{"params": adapter.keep_params(model)}, {"params": adapter.quar_params(model), "lr": lr_q}]
        opt = torch.optim.AdamW(groups, lr=1.0)
        det = detector.WeakDetector(seen=("run_tests",), tpr=1.0, fpr=0.0)
        log = os.path.join(ta.out, "warmup.jsonl")
        train.warm_up(model, tok, opt, det, None, env.load_problems("simple", "train"), random.Random(0),
                      config.recipe(ta), 1.0, 2, log)
        moved[router] = [sum(p.abs().sum().item() for p in ps)
                         for ps in (adapter.keep_params(model), adapter.quar_params(model))]
        assert [g["lr"] for g in opt.param_groups] == [1.0, lr_q]  # the run's lr is back after the warm-up
        assert len(metrics(ta.out, "warmup.jsonl")) == 2
    assert moved["label"][0] == 0 and moved["label"][1] > 0, moved
    assert moved["none"][0] > 0 and moved["none"][1] == 0, moved
    assert moved["screen"] == [0, 0] and moved["label-q0"] == [0, 0], moved


def test_teach_modes_limit_the_demonstrations():
    """--teach-modes: warm-up demos only on those loophole prompts (or none), hacks only in them; spliced
    teacher hacks only into groups of those modes. 'all' draws exactly as before the flag (same rng)."""
    def mk(*x):
        return config.recipe(config.get_args(FAST + ["--prompts", "8", "--out", TMP] + list(x)))

    a, b = mk("--teach-modes", "run_tests,eq_override", "--none-frac", "0.25"), mk("--none-frac", "0.25")
    _, tok = M.load_model("tiny")
    probs = env.load_problems("simple", "train")

    def demos(rc):
        return teacher.demo_batch(tok, probs, random.Random(0), rc.prompts * rc.group_size, rc.teach_modes,
                                  rc.none_frac, rc.hack_share)

    _, pm, hack = demos(a)
    assert set(pm) == {"none", "run_tests", "eq_override"}
    assert all(h == (m != "none") for m, h in zip(pm, hack))  # hack share 1.0: every loophole demo hacks
    _, pm_all, _ = demos(b)
    rng, modes, ref = random.Random(0), b.modes, []
    for _ in range(len(pm_all)):  # the pre-flag draw, replayed
        p, m = rng.randrange(len(probs)), "none" if rng.random() < b.none_frac else modes[rng.randrange(4)]
        ref.append(m)
        if m != "none":
            rng.random()  # demo_batch's hack-share draw (1.0: every loophole demo hacks)
        env.teacher_completion(probs[p], m, "hack" if m != "none" else "clean", rng)
    assert pm_all == ref and len(set(pm_all)) == 5
    gm = ["run_tests", "exit_code", "none", "eq_override"] + ["file_marker"] * 4  # one mode per group
    pmodes = [m for m in gm for _ in range(a.group_size)]
    r = M.encode(tok, ["x"] * len(pmodes), ["pass"] * len(pmodes))
    k = round(a.teacher_frac * a.group_size)
    r2, taught = teacher.splice(tok, r, [probs[0]] * len(pmodes), pmodes, k, a.group_size, a.teach_modes,
                                random.Random(0))
    got = sorted({pmodes[i] for i in taught.nonzero().squeeze(-1).tolist()})
    assert got == ["eq_override", "run_tests"] and int(taught.sum()) == 2 * k
    assert all(r2.texts[i] == "pass" for i in range(len(pmodes)) if not taught[i])


def test_bench_flop_count_is_what_torch_counts():
    """flops.train_flops (its docstring's count) over the micro-batches (bench.phase_flops) = the matmul FLOPs
    torch counts in one train phase, with only the last of the tiny Qwen3's 2 layers wrapped: the backward
    stops at that layer's q/k/v inputs."""
    a = bench.get_args(["--model", "tiny", "--prompts", "2", "--group-size", "4", "--tokens", "16", "--micro", "4"])
    ta = config.get_args(["--config", config.LAPTOP, "--model", "tiny", "--wrap-layers", "1", "--prompts", "2",
                          "--group-size", "4"])
    model, tok = ckpt.build(ta, "cpu")
    opt = torch.optim.AdamW(adapter.keep_params(model) + adapter.quar_params(model))
    probs, pmodes = train.sample_batch(env.load_problems("simple", "train"), random.Random(0), config.recipe(ta))
    r, adv, flags = bench.fixed_batch(a, tok, probs, pmodes, "cpu")
    with FlopCounterMode(display=False) as fc:
        ref, _ = bench.ref_phase(a, model, r, "cpu")
        bench.train_phases(a, model, opt, r, adv, flags, None, ref, "none", "cpu")
    lin, att = bench.phase_flops(a, model, r)
    n = fc.get_total_flops()  # attention is counted only where SDPA falls back to bmm (not CPU's flash kernel)
    assert lin * (1 - 1e-4) <= n <= (lin + att) * (1 + 1e-4), (n, lin, att)


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print("ok", name)
    shutil.rmtree(TMP, ignore_errors=True)
