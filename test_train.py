"""
Tests of the training loop (train.py, ckpt.py, warmup.py, bench.py) on the tiny Qwen3: every router
runs end to end and logs its routing; a killed run resumes to the same weights with each step logged
once; bad input is one line and exit 2; the warm-up is routed; --teach-modes; bench's FLOP count.
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
import env
import model as M
import train

TMP = tempfile.mkdtemp(prefix="gr_test_")
FAST = ["--model", "tiny", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "24", "--micro", "4",
        "--teacher-frac", "0.5", "--teacher-until", "10", "--layers", "0", "--sample-every", "1",
        "--warmup-steps", "1"]


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
    for router in train.ROUTER_CHOICES:
        out = os.path.join(TMP, router)
        assert run(FAST + ["--router", router, "--steps", "2", "--out", out]) == 0, router
        ms = metrics(out)
        assert [m["step"] for m in ms] == [0, 1], router
        for m in ms:
            assert {"reward", "solve", "hack", "flag", "t_gen", "t_grade", "t_train", "len"} <= set(m)
            assert all(f"hack_{mode}" in m for mode in ("run_tests", "exit_code", "eq_override", "file_marker"))
        assert os.path.exists(os.path.join(out, "ckpt", "adapter.safetensors"))
        assert ms[1].get("kl") is None and ("logp" not in ms[0] or ms[0]["kl"] >= 0), router  # --kl-every 5
        ss = metrics(out, "samples.jsonl")  # per-rollout routing share f: label's is its flag, none's 0
        want = {"label": lambda s: float(s["flag"]), "none": lambda s: 0.0}.get(router, lambda s: s["f"])
        assert all(s["f"] == want(s) for s in ss), router
        if router == "grad":  # f is the cosine mapped through the band and clamped: monotone in it, in [0, 1]
            cf = sorted((s["cos"], s["f"]) for s in ss)
            assert all(0 <= f <= 1 for _, f in cf) and all(a[1] <= b[1] for a, b in zip(cf, cf[1:])), cf
            assert all({"cos_teach", "cos_other"} <= set(m) for m in ms)


def test_resume_equals_uninterrupted_run():
    full, cut = os.path.join(TMP, "full"), os.path.join(TMP, "cut")
    args = FAST + ["--router", "label", "--steps", "4"]
    assert run(args + ["--out", full]) == 0
    assert run(args + ["--out", cut, "--stop-after", "2"]) == 0      # "killed" after step 2
    with open(os.path.join(cut, "metrics.jsonl"), "a") as f:          # a step logged, then killed
        f.write(json.dumps({"step": 2, "partial": True}) + "\n")      # before its checkpoint
    assert run(["--resume", cut]) == 0
    assert [m["step"] for m in metrics(cut)] == [0, 1, 2, 3]
    a = load_file(os.path.join(full, "ckpt", "adapter.safetensors"))
    b = load_file(os.path.join(cut, "ckpt", "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward"] for m in metrics(full)] == [m["reward"] for m in metrics(cut)]


def test_vhack_every_refits_at_the_current_weights():
    """--vhack-every 2 with 2 warm-up steps: v_hack is refitted before updates 2 and 4 (RL steps 0 and 2),
    so the logged band holds over steps 0-1 and moves at step 2, to exactly the band fitted on the
    weights a run killed after step 1 checkpointed."""
    import detector
    import routing
    args = FAST + ["--router", "grad", "--warmup-steps", "2", "--vhack-every", "2", "--steps", "3"]
    full, cut = os.path.join(TMP, "vh-full"), os.path.join(TMP, "vh-cut")
    assert run(args + ["--out", full]) == 0 and run(args + ["--out", cut, "--stop-after", "2"]) == 0
    bands = [m["band"] for m in metrics(full)]
    assert bands[0] == bands[1] != bands[2], bands
    a, model, tok, _ = ckpt.load_run(cut)
    assert list(routing.extract_vhack(model, tok, detector.load_pairs(), k=a.vhack_k, seed=a.seed).band) == bands[2]


def test_bad_input_is_one_line_exit_2():
    ro = os.path.join(TMP, "readonly")
    os.makedirs(ro, exist_ok=True)
    os.chmod(ro, 0o500)
    cases = [["--group-size", "1"], ["--steps", "0"], ["--resume", os.path.join(TMP, "nothing-here")],
             ["--modes", "run_tests,bogus"], ["--lr", "0"], ["--dual-clip", "0.5"], ["--quar-kl", "1"], ["--kl-every", "0"],
             ["--modes", "run_tests", "--teach-modes", "exit_code"], ["--vhack-every", "-1"],
             ["--router", "label", "--vhack-every", "2"]]
    if os.geteuid() != 0:  # root can write anywhere; use a path under a file instead
        cases.append(["--out", os.path.join(ro, "x")])
    open(os.path.join(TMP, "a-file"), "w").close()
    cases.append(["--out", os.path.join(TMP, "a-file", "x")])  # a path under a file
    for extra in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run(FAST + ["--out", os.path.join(TMP, "bad")] + extra)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (extra, code, lines)


def test_bf16_model_path():
    """The GPU path loads Qwen3 in bf16: adapters keep float32 factors and grads; the step still works."""
    import grpo
    import routing
    model, tok = M.load_model("tiny")
    model.to(torch.bfloat16)
    adapter.wrap(model, "svd")
    r = M.encode(tok, [M.chat_prompt(tok, "add")] * 2, ["def f(a, b): return a + b", "exit(0)"])
    cap = routing.Capture(model, n_rollouts=2, router="label", flags=torch.tensor([False, True]))
    with cap:
        cap.rows(torch.arange(2))
        logp = grpo.token_logp(model, r)
        grpo.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), r.completion_mask.float(), 64).sum().backward()
    cap.route()
    for p in adapter.keep_params(model) + adapter.quar_params(model):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in adapter.quar_params(model))


def test_warmup_demos_are_routed():
    """warmup.py: demonstrations go through the router. Every demo a flagged hack: `label` leaves s_keep
    exactly 0 (all in s_quar), `none` leaves s_quar 0, `screen` drops them all (nothing moves). The
    quarantine's warm-up lr keeps its ratio to the keep's: --lr-quar 0 leaves it 0 too."""
    import detector
    import warmup
    moved = {}
    for router, lr_q in (("label", 1.0), ("none", 1.0), ("screen", 1.0), ("label-q0", 0.0)):
        ta = train.get_args(FAST + ["--router", router.split("-")[0], "--modes", "run_tests", "--none-frac", "0", "--warmup-steps", "2",
                                    "--warmup-hack", "1", "--out", os.path.join(TMP, "warm-" + router)])
        os.makedirs(ta.out, exist_ok=True)
        model, tok = ckpt.build(ta, "cpu")
        groups = [{"params": adapter.keep_params(model)}, {"params": adapter.quar_params(model), "lr": lr_q}]
        opt = torch.optim.AdamW(groups, lr=1.0)
        det = detector.WeakDetector(seen=("run_tests",), tpr=1.0, fpr=0.0)
        warmup.warm_up(ta, model, tok, opt, det, None, env.load_problems("simple", "train"), random.Random(0))
        moved[router] = [sum(p.abs().sum().item() for p in ps) for ps in (adapter.keep_params(model), adapter.quar_params(model))]
        assert [g["lr"] for g in opt.param_groups] == [1.0, lr_q]  # the run's lr is back after the warm-up
        assert len(metrics(ta.out, "warmup.jsonl")) == 2
    assert moved["label"][0] == 0 and moved["label"][1] > 0, moved
    assert moved["none"][0] > 0 and moved["none"][1] == 0, moved
    assert moved["screen"] == [0, 0] and moved["label-q0"] == [0, 0], moved


def test_teach_modes_limit_the_demonstrations():
    """--teach-modes: warm-up demos only on those loophole prompts (or none), hacks only in them; spliced
    teacher hacks only into groups of those modes. 'all' draws exactly as before the flag (same rng)."""
    import warmup
    mk = lambda *x: train.get_args(FAST + ["--prompts", "8", "--out", TMP] + list(x))
    a, b = mk("--teach-modes", "run_tests,eq_override", "--none-frac", "0.25"), mk("--none-frac", "0.25")
    _, tok = ckpt.build(a, "cpu")
    probs = env.load_problems("simple", "train")
    _, pm, hack = warmup.demo_batch(a, tok, probs, random.Random(0))
    assert set(pm) == {"none", "run_tests", "eq_override"}
    assert all(h == (m != "none") for m, h in zip(pm, hack))  # --warmup-hack 1.0: every loophole demo hacks
    _, pm_all, _ = warmup.demo_batch(b, tok, probs, random.Random(0))
    rng, modes, ref = random.Random(0), b.modes.split(","), []
    for _ in range(len(pm_all)):  # the pre-flag draw, replayed
        p, m = rng.randrange(len(probs)), "none" if rng.random() < b.none_frac else modes[rng.randrange(4)]
        ref.append(m)
        if m != "none":
            rng.random()  # demo_batch's --warmup-hack draw (1.0: every loophole demo hacks)
        env.teacher_completion(probs[p], m, "hack" if m != "none" else "clean", rng)
    assert pm_all == ref and len(set(pm_all)) == 5
    gm = ["run_tests", "exit_code", "none", "eq_override"] + ["file_marker"] * 4  # one mode per group
    pmodes = [m for m in gm for _ in range(a.group_size)]
    r = M.encode(tok, ["x"] * len(pmodes), ["pass"] * len(pmodes))
    r2, teacher = warmup.splice_teacher(a, tok, r, [probs[0]] * len(pmodes), pmodes, 0, random.Random(0))
    got = sorted({pmodes[i] for i in teacher.nonzero().squeeze(-1).tolist()})
    assert got == ["eq_override", "run_tests"] and int(teacher.sum()) == 2 * round(a.teacher_frac * a.group_size)
    assert all(r2.texts[i] == "pass" for i in range(len(pmodes)) if not teacher[i])


def test_bench_flop_count_is_what_torch_counts():
    """bench.train_flops (its docstring's count) = the matmul FLOPs torch counts in one train phase, with only
    the last of the tiny Qwen3's 2 layers wrapped: the backward stops at that layer's q/k/v inputs."""
    a = bench.get_args(["--model", "tiny", "--prompts", "2", "--group-size", "4", "--tokens", "16", "--micro", "4"])
    ta = train.get_args(["--model", "tiny", "--layers", "1", "--prompts", "2", "--group-size", "4"])
    model, tok = ckpt.build(ta, "cpu")
    opt = torch.optim.AdamW(adapter.keep_params(model) + adapter.quar_params(model))
    probs, pmodes = train.sample_batch(ta, env.load_problems("simple", "train"), random.Random(0))
    r, adv, flags = bench.fixed_batch(a, tok, probs, pmodes, "cpu")
    with FlopCounterMode(display=False) as fc:
        ref, _ = bench.ref_phase(a, model, r, "cpu")
        bench.train_phases(a, model, opt, r, adv, flags, None, ref, "none", "cpu")
    lin, att = bench.train_flops(model, len(probs), r.prompt_ids.shape[1], a.tokens)
    n = fc.get_total_flops()  # attention is counted only where SDPA falls back to bmm (not CPU's flash kernel)
    assert lin * (1 - 1e-4) <= n <= (lin + att) * (1 + 1e-4), (n, lin, att)


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print("ok", name)
    shutil.rmtree(TMP, ignore_errors=True)
