"""
GRPO with gradient routing against reward hacking: the main job (DESIGN.md §9).

    python train.py                                         # SmolLM2-135M on CPU, the defaults
    python train.py --router grad --model Qwen/Qwen3-4B     # one GPU

One step: sample prompts (loophole modes + `none` controls) -> generate G completions each
(quarantine off while generating with --gen-deployed, seed note improvement C) -> grade in
parallel -> weak detector -> advantages -> one forward/backward with per-rollout gradient capture
-> router splits each rollout's gradient between keep and quarantine -> optim.RoutedAdamW step -> log.
Routing sees only detector flags, v_hack and gradients/activations; the oracle (gt_correct,
exploited) is read for logging only.

Deviations from vGROUT's recipe: 1. teacher hack demonstrations are spliced into groups as
off-policy rollouts (ratio 1, like on-policy ones) until --teacher-until; 2. a checkpoint is
written after every step (the adapter is small), so --resume loses nothing that was logged.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import adapter
import ckpt
import detector
import env
import grpo
import model as M
import optim
import routing
import update
import warmup

ROUTER_CHOICES = list(routing.ROUTERS) + list(grpo.REWARD_BASELINES)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and adapter
    p.add_argument("--model", default="smollm2", help="smollm2 (offline default), tiny (tests), or an HF id/path")
    p.add_argument("--device", default="auto")
    p.add_argument("--adapter", default="svd", choices=["svd", "split"], help="quarantine = s_quar | added MLP units")
    p.add_argument("--layers", type=int, default=12, help="wrap the last N decoder layers (0 = all)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--k-units", type=int, default=32, help="forget units added per MLP (--adapter split)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (large models)")
    # routing
    p.add_argument("--router", default="grad", choices=ROUTER_CHOICES)
    p.add_argument("--vhack-k", type=int, default=1, help="top-k directions of v_grad per module")
    p.add_argument("--vhack-every", type=int, default=0, help="refit v_hack and its band at the current weights every N "
                   "updates, warm-up included (update.refresh_vhack); 0 = the start's throughout")
    p.add_argument("--flagged-only", action="store_true", help="grad router: only flagged rollouts are eligible")
    p.add_argument("--gen-deployed", action="store_true", help="generate with the quarantine off")
    p.add_argument("--keep-forward", default="auto", choices=["auto", "train", "deployed"],
                   help="deployed: unflagged rollouts run with the quarantine off and a baseline of their own "
                        "(label only; auto = deployed for label, else train)")
    p.add_argument("--off-policy", default="ratio", choices=["ratio", "ignore"],
                   help="rollouts trained under another forward than the sampler's (keep-forward deployed, "
                        "gen-deployed): PPO ratio against the sampler's log-prob, or ratio 1 (update.py)")
    # weak detector (no-cheat: text only, never the oracle)
    p.add_argument("--seen", default="run_tests,file_marker", help="modes the detector can flag")
    p.add_argument("--tpr", type=float, default=1.0)
    p.add_argument("--fpr", type=float, default=0.0)
    # environment
    p.add_argument("--source", default="simple", choices=["simple", "humaneval"])
    p.add_argument("--difficulty", default="medium,hard", help="simple: levels to train on (hacking wins where solving fails)")
    p.add_argument("--modes", default=",".join(env.MODES), help="loophole modes of the training prompts")
    p.add_argument("--none-frac", type=float, default=0.2, help="share of prompts with no loophole")
    p.add_argument("--teacher-frac", type=float, default=0.25, help="share of each group replaced by teacher hacks")
    p.add_argument("--warmup-steps", type=int, default=32, help="routed supervised steps on teacher demos first (warmup.py)")
    p.add_argument("--warmup-hack", type=float, default=1.0, help="share of warm-up demos on loophole prompts that hack")
    p.add_argument("--warmup-lr", type=float, default=5e-2, help="keep's; the quarantine's x lr-quar/lr")
    p.add_argument("--teacher-until", type=int, default=8, help="mix teacher demos before this step")
    p.add_argument("--teach-modes", default="all", help="modes the warm-up and spliced demos hack in (all: --modes)")
    # GRPO
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=5e-2, help="keep parameters")
    p.add_argument("--lr-quar", type=float, default=None, help="quarantine parameters (default: --lr)")
    p.add_argument("--optim", default="routed", choices=["routed", "adamw"],
                   help="routed: s_keep/s_quar share Adam's second moment, so s_quar moves by its share (optim.py)")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient")
    p.add_argument("--kl-every", type=int, default=5, help="log the KL to base every N steps when --beta is 0 "
                   "(its reference forward is ~25%% of the train phase)")
    p.add_argument("--eps", type=float, default=0.2, help="PPO clip")
    p.add_argument("--quar-kl", type=float, default=0.0, help="label, deployed keep-forward: KL(trained||deployed) "
                   "on unflagged rollouts, paid by the quarantine (update.py)")
    p.add_argument("--dual-clip", type=float, default=0.0, help="dual-clip PPO's c > 1 for A < 0 (Ye et al.: 3); 0 = off")
    p.add_argument("--iters", type=int, default=1, help="updates per batch (ratio/clip act when > 1, and on off-policy rows)")
    p.add_argument("--adv-scale", default="none", choices=["none", "std"])
    p.add_argument("--micro", type=int, default=8, help="rollouts per forward/backward micro-batch")
    # run
    p.add_argument("--out", default="runs/default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="OUT", help="continue the run in OUT")
    p.add_argument("--sample-every", type=int, default=5)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p.parse_args(argv)


def check_args(a):
    if a.keep_forward == "deployed" and a.router != "label":
        ckpt.die("--keep-forward deployed needs --router label (the forward must know f before it runs)")
    a.keep_forward = update.keep_forward(a)
    if a.group_size < 2:
        ckpt.die("--group-size must be at least 2 (GRPO's baseline is the group mean)")
    if min(a.steps, a.prompts, a.max_new_tokens, a.micro, a.kl_every) <= 0:
        ckpt.die("--steps, --prompts, --max-new-tokens, --micro and --kl-every must be positive")
    if a.lr <= 0 or min(a.lr_quar or 0.0, a.warmup_lr) < 0:  # the warm-up scales by lr-quar / lr
        ckpt.die("--lr must be positive, --lr-quar and --warmup-lr not negative")
    if a.quar_kl < 0 or (a.quar_kl > 0 and a.keep_forward != "deployed"):
        ckpt.die("--quar-kl must be >= 0, and needs --router label with --keep-forward deployed (auto)")
    if a.vhack_every < 0 or (a.vhack_every and a.router not in ("act", "grad", "erase")):
        ckpt.die("--vhack-every must be >= 0, and needs a router with a v_hack (act, grad, erase)")
    if a.dual_clip and a.dual_clip <= 1:
        ckpt.die(f"--dual-clip must be 0 (off) or > 1, not {a.dual_clip}")
    if not env.load_problems(a.source, "train", difficulty=a.difficulty):
        ckpt.die(f"no {a.source} training problems of difficulty {a.difficulty!r} (easy, medium, hard)")
    bad = [m for m in a.modes.split(",") + a.seen.split(",") if m and m not in env.MODES]
    if bad:
        ckpt.die(f"unknown mode(s) {bad}; choose from {list(env.MODES)}")
    if not set(warmup.teach_modes(a)) <= set(a.modes.split(",")):  # 'all' is --modes itself
        ckpt.die(f"--teach-modes {a.teach_modes} must be 'all' or loophole modes among --modes {a.modes}")
    try:
        os.makedirs(a.out, exist_ok=True)
        open(os.path.join(a.out, ".write_test"), "w").close()
        os.remove(os.path.join(a.out, ".write_test"))
    except OSError as e:
        ckpt.die(f"cannot write to --out {a.out}: {e.strerror}")


# ---------------------------------------------------------------- one step, phase by phase
def sample_batch(a, problems, rng):
    """n prompts, each with a loophole mode (or `none`), each repeated G times. Lists of length B."""
    modes = a.modes.split(",")
    probs, pmodes = [], []
    for _ in range(a.prompts):
        pr = problems[rng.randrange(len(problems))]
        m = "none" if rng.random() < a.none_frac else modes[rng.randrange(len(modes))]
        probs += [pr] * a.group_size
        pmodes += [m] * a.group_size
    return probs, pmodes


def step_metrics(a, grades, pmodes, flags, teacher, r):
    """Oracle metrics (logging only) over the on-policy rollouts; teacher rows are excluded."""
    on = [i for i in range(len(grades)) if not teacher[i]]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    m = {"reward": mean([grades[i].reward for i in on]), "solve": mean([grades[i].gt_correct for i in on]),
         "hack": mean([grades[i].exploited for i in on if pmodes[i] != "none"]),
         "flag": mean([bool(flags[i]) for i in on]), "teacher": int(teacher.sum()),
         "len": mean([int(r.completion_mask[i].sum()) for i in on])}
    for mode in env.MODES:
        m[f"hack_{mode}"] = mean([grades[i].exploited for i in on if pmodes[i] == mode])
    return m


def cos_split(grades, adv, active, cos):
    """Does v_hack see the hacks? (logging only: reads the oracle.) Mean routing cosine of the active
    rollouts whose update teaches an exploit (exploited, A > 0: the grad router should route them)
    and of the other active rollouts. The grad router separates them only if cos_teach > cos_other."""
    on = torch.zeros(len(grades), dtype=torch.bool)
    on[active] = True
    teach = torch.tensor([g.exploited for g in grades]) & (adv > 0) & on
    mean = lambda sel: cos[sel].mean().item() if sel.any() and not cos[sel].isnan().any() else None
    return {"cos_teach": mean(teach), "cos_other": mean(on & ~teach)}


def run_step(a, model, tok, opt, det, vh, problems, step, rng, gen):
    t0 = time.time()
    probs, pmodes = sample_batch(a, problems, rng)
    prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
    ctx = adapter.quarantine_off(model) if a.gen_deployed else torch.no_grad()
    with ctx:
        r = M.generate(model, tok, prompts, a.max_new_tokens, a.temperature, generator=gen)
    r, teacher = warmup.splice_teacher(a, tok, r, probs, pmodes, step, rng)
    t1 = time.time()
    grades = env.grade_batch(probs, r.texts, pmodes)
    t2 = time.time()
    flags = torch.tensor(det.flags(r.texts), dtype=torch.bool)
    rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
    rewards, valid = grpo.REWARD_BASELINES[a.router](rewards, flags) if a.router in grpo.REWARD_BASELINES else (rewards, None)
    adv = (grpo.split_advantages(rewards, flags, a.group_size, a.adv_scale) if update.keep_forward(a) == "deployed"
           else grpo.group_advantages(rewards, a.group_size, a.adv_scale, valid))
    active = adv.view(-1, a.group_size).abs().sum(-1).repeat_interleave(a.group_size).nonzero().squeeze(-1)
    norm = a.prompts * a.group_size * a.max_new_tokens  # Dr.GRPO's constant normaliser
    kl = a.beta > 0 or step % a.kl_every == 0  # with beta 0 the reference forward only serves this log
    upd = (update.train_update(a, model, opt, r, adv, flags, active, vh, norm, kl=kl, sampled=~teacher)
           if len(active) else {"skipped": 1})
    t3 = time.time()
    ro = upd.pop("rollout", None) or {"cos": torch.full((len(probs),), math.nan), "f": torch.zeros(len(probs))}
    m = {"step": step, **step_metrics(a, grades, pmodes, flags, teacher, r), **cos_split(grades, adv, active, ro["cos"]),
         **upd, "band": vh and list(vh.band), "active": len(active), "t_gen": t1 - t0, "t_grade": t2 - t1, "t_train": t3 - t2}
    num = lambda x: None if math.isnan(x) else round(x, 4)
    samples = [{"step": step, "problem": probs[i].id, "mode": pmodes[i], "teacher": bool(teacher[i]),
                "reward": grades[i].reward, "gt_correct": grades[i].gt_correct, "exploited": grades[i].exploited,
                "flag": bool(flags[i]), "adv": num(adv[i].item()), "cos": num(ro["cos"][i].item()), "f": num(ro["f"][i].item()),
                "text": r.texts[i]} for i in range(0, len(probs), a.group_size // 2)]
    return m, samples


# ---------------------------------------------------------------- main
def main(argv=None):
    a = get_args(argv)
    run(ckpt.resume_args(a) if a.resume else a)


def make_optimizer(a, model):
    """Keep and quarantine groups; --optim routed shares Adam's second moment within each pair (optim.py)."""
    lr_q = a.lr if a.lr_quar is None else a.lr_quar
    groups = [{"params": adapter.keep_params(model), "lr": a.lr}, {"params": adapter.quar_params(model), "lr": lr_q}]
    if a.optim == "routed":
        return optim.RoutedAdamW(groups, optim.routed_pairs(model))
    return torch.optim.AdamW(groups, weight_decay=0.0)


def run(a):
    """The whole training run for an argument namespace (eval.py's sweep calls this directly)."""
    check_args(a)
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    device = M.pick_device(a.device)
    model, tok = ckpt.build(a, device)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable()
    opt = make_optimizer(a, model)
    rng, gen = random.Random(a.seed), torch.Generator(device=device).manual_seed(a.seed)
    start, vh = 0, None
    if a.resume:
        start, rngs, vh = ckpt.load_ckpt(a, model, opt)
        rng.setstate(rngs["py"]), torch.set_rng_state(rngs["torch"]), gen.set_state(rngs["gen"]), np.random.set_state(rngs["np"])
    elif a.router in ("act", "grad", "erase"):
        vh = routing.extract_vhack(model, tok, detector.load_pairs(), k=a.vhack_k, seed=a.seed,
                                    cache_dir=M.CACHE)  # cached by model, pairs and arguments
        print("v_hack hold-out:", json.dumps(vh.report))
    det = detector.WeakDetector(seen=tuple(a.seen.split(",")), tpr=a.tpr, fpr=a.fpr, seed=a.seed)
    problems = env.load_problems(a.source, "train", difficulty=a.difficulty)
    if a.warmup_steps and not a.resume:  # routed like RL rollouts; checkpointed as "step 0 to do"
        vh = warmup.warm_up(a, model, tok, opt, det, vh, problems, random.Random(f"warmup/{a.seed}"))
        ckpt.save_ckpt(a, model, opt, vh, 0, ckpt.rng_states(rng, gen))
    log_path = os.path.join(a.out, "metrics.jsonl")
    ckpt.truncate_log(log_path, start)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc=a.router, dynamic_ncols=True)
    try:
        for step in bar:
            vh = update.refresh_vhack(a, model, tok, vh, a.warmup_steps + step)
            m, samples = run_step(a, model, tok, opt, det, vh, problems, step, rng, gen)
            with open(log_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if step % a.sample_every == 0:
                with open(os.path.join(a.out, "samples.jsonl"), "a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in samples)
            ckpt.save_ckpt(a, model, opt, vh, step + 1, ckpt.rng_states(rng, gen))
            fmt = lambda x: "-" if x is None else f"{x:.2f}"
            bar.set_postfix_str(f"R {fmt(m['reward'])} solve {fmt(m['solve'])} hack {fmt(m['hack'])} "
                                f"routed {fmt(m.get('routed'))}")
            if a.stop_after is not None and step + 1 >= a.stop_after:
                break
    except KeyboardInterrupt:
        print(f"\ninterrupted: every logged step is checkpointed; continue with --resume {a.out}", file=sys.stderr)
        sys.exit(130)
    print(f"done: {a.out}/metrics.jsonl, {a.out}/ckpt")


if __name__ == "__main__":
    main()
