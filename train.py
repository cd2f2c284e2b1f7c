"""
GRPO with gradient routing against reward hacking: the whole training loop, top to bottom.

    python train.py --router grad --model Qwen/Qwen3-4B     # the defaults: the GPU recipe (config.py)
    python train.py --config recipes/laptop.json            # SmolLM2-135M on a CPU: the laptop recipe

One RL step (rl_step), as in nanochat's chat_rl.py with routing added:
    sample prompts -> generate G completions each -> grade (proxy reward) -> flag (weak detector)
    -> advantages -> routed backward (routing.py) -> optimizer step (optim.py) -> log
The warm-up (warmup_step) is the same routed update on teacher demonstrations with advantage 1.
Routing sees detector flags, v_hack and gradients only; the reward pays passing the real tests or the
loophole (env.py); exploited and gt_correct are logged only (metrics.py). Flags: config.py; deploy: eval.py.

Deviations from the papers' recipes:
  1. Teacher demonstrations (teacher.py): a routed supervised warm-up, then teacher hacks spliced
     into each group as off-policy rollouts until --teacher-until (vGROUT), trained with ratio 1.
  2. `label` trains its unflagged rollouts as the deployed model (quarantine off; routing.ROUTERS).
     Those were sampled by the trained model, so they are off-policy: pi_old in the PPO ratio is the
     sampler's log-prob (importance-weighted, clipped at eps = 0.2). With --gen-deployed the sampler
     is the deployed model (quarantine off): then label's flagged rollouts, and every rollout of the
     other routers (all trained as the trained model), are the off-policy ones.
  3. A checkpoint after every step (the adapter is small), so --resume loses nothing that was logged.
"""
import contextlib
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
import config
import detector
import dist
import env
import grpo
import metrics
import model as M
import optim
import routing
import teacher
import vhack

KL_EVERY = 5      # with beta 0 the k3 KL to the base model is only logged: every 5th step (~25% of a train phase)
SAMPLE_EVERY = 5  # steps whose rollouts go to samples.jsonl
EPS = 0.2         # PPO clip of the off-policy rows (TRL's default)


# ---------------------------------------------------------------- the routed update
def subset(r, rows):  # the rows of r, padded only to their own longest prompt (left) and completion (right)
    P, T = (max(int(m[rows].sum(1).max()), 1) for m in (r.prompt_mask, r.completion_mask))
    return M.Rollouts(r.prompt_ids[rows, -P:], r.prompt_mask[rows, -P:], r.completion_ids[rows, :T],
                      r.completion_mask[rows, :T], [r.texts[i] for i in rows.tolist()])


def micro_batches(rc, active, flags, lengths):
    """The active rows, shortest completion first (a micro-batch pads little), in micro-batches, and the mode each
    trains under: all "train", except label's unflagged rows, which train the deployed model (deviation 2)."""
    active = active[lengths[active].argsort(stable=True)]
    if not rc.router.deployed_keep:
        mbs = [c for c in active.split(rc.micro) if len(c)]  # past one process a rank may have no rows
        return mbs, ["train"] * len(mbs)
    sides = [[c for c in active[side].split(rc.micro) if len(c)] for side in (~flags[active], flags[active])]
    return sides[0] + sides[1], ["deployed"] * len(sides[0]) + ["train"] * len(sides[1])


def routed_update(model, opt, r, adv, flags, active, vh, rc, kl=True, sampled=None):
    """One forward/backward over the active rollouts with per-rollout capture, route, step. Returns stats.
    sampled: (B,) bool, the rows the model generated (None in the warm-up); those trained under another
    forward than the sampler's get pi_old = the sampler's log-prob (deviation 2). kl: log the k3 KL."""
    B, dev = len(r.texts), r.completion_ids.device
    adv = adv.to(dev)  # rewards and flags live on the CPU, rollouts on the model's device
    norm = rc.prompts * rc.group_size * rc.max_new_tokens  # Dr.GRPO's constant normaliser
    mbs, modes = micro_batches(rc, active, flags, r.completion_mask.sum(1).cpu())
    sampler = "deployed" if rc.gen_deployed else "train"
    off = [(torch.zeros(len(rows), dtype=torch.bool) if sampled is None else sampled[rows] & (modes[j] != sampler))
           .to(dev) for j, rows in enumerate(mbs)]                          # (b,) bool per micro-batch
    with torch.no_grad():
        ref, behave = [None] * len(mbs), [None] * len(mbs)
        for j, rows in enumerate(mbs):
            if kl or rc.beta > 0:
                with adapter.adapters_off(model):  # k3 KL reference: same weights, adapters off
                    ref[j] = grpo.token_logp(model, subset(r, rows), rc.temperature)
            if off[j].any():
                with adapter.adapter_mode(model, sampler):
                    behave[j] = grpo.token_logp(model, subset(r, rows), rc.temperature)
    opt.zero_grad(set_to_none=True)
    cap = routing.Capture(model, n_rollouts=B, router=rc.router, vhack=vh, flags=flags,
                          opts={"flagged_only": rc.flagged_only, "share": rc.share})
    finite, sums = True, {"kl": 0.0, "logp": 0.0, "entropy": 0.0, "off_tok": 0.0, "off_k1": 0.0, "off_clip": 0.0}
    with cap:
        for j, rows in enumerate(mbs):
            cap.rows(rows)
            sub = subset(r, rows)
            # the backward runs in the mode too: gradient checkpointing re-runs the forward inside it
            with adapter.adapter_mode(model, modes[j]) if rc.router.deployed_keep else contextlib.nullcontext():
                logp, ent = grpo.token_logp(model, sub, rc.temperature, with_entropy=True)  # (b, T)
                mask = sub.completion_mask.float()
                pi_old = logp.detach()
                if behave[j] is not None:
                    pi_old = torch.where(off[j][:, None], behave[j], pi_old)
                loss = grpo.grpo_loss(logp, pi_old, adv[rows], mask, norm, ref[j], rc.beta, EPS).sum()
                finite &= bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
            if behave[j] is not None:  # how far the trained-under forward is from the sampler's
                om = mask * off[j][:, None]
                d = behave[j] - logp.detach()                               # log pi_sampler - log pi
                sums["off_tok"] += om.sum().item()
                sums["off_k1"] += (d * om).sum().item()
                sums["off_clip"] += (((-d).exp() - 1).abs() > EPS).float().mul(om).sum().item()
            sums["kl"] += 0.0 if ref[j] is None else (grpo.kl_k3(logp.detach(), ref[j]) * mask).sum().item()
            sums["logp"] += (logp.detach() * mask).sum().item()
            sums["entropy"] += (ent * mask).sum().item()
    stats = cap.route()  # the split equation: keep and quarantine .grad
    stats["rollout"] = {"cos": cap.cos.cpu(), "f": cap.f.cpu(), **metrics.routed_mass(cap)}  # per rollout: logs
    sums["ntok"] = r.completion_mask[active].sum().item()
    finite = dist.reduce_update(opt, cap, stats, sums, finite)  # past one process: over every rank (dist.py)
    finite &= all(bool(torch.isfinite(p.grad).all()) for g in opt.param_groups for p in g["params"]
                  if p.grad is not None)
    if finite:  # a non-finite loss or gradient skips the update (logged), never poisons the weights
        opt.step()
    ntok, off_tok = sums["ntok"], sums["off_tok"]
    if off_tok:
        stats.update(off_k1=sums["off_k1"] / off_tok, off_clip=sums["off_clip"] / off_tok)
    return {**stats, "kl": sums["kl"] / ntok if kl else None, "logp": sums["logp"] / ntok,
            "entropy": sums["entropy"] / ntok, "skipped": int(not finite)}


# ---------------------------------------------------------------- one RL step, phase by phase
def sample_batch(problems, rng, rc):
    """rc.prompts prompts, each with a loophole mode (or `none`), each repeated G times. Lists of length B."""
    probs, pmodes = [], []
    for _ in range(rc.prompts):
        pr = problems[rng.randrange(len(problems))]
        m = "none" if rng.random() < rc.none_frac else rc.modes[rng.randrange(len(rc.modes))]
        probs += [pr] * rc.group_size
        pmodes += [m] * rc.group_size
    return probs, pmodes


def advantages(rewards, flags, rc):
    """Dr.GRPO group advantages; screen/penalty change the rewards first, label splits its groups."""
    rewards, valid = rc.router.rewards(rewards, flags) if rc.router.rewards else (rewards, None)
    if rc.router.deployed_keep:
        return grpo.split_advantages(rewards, flags, rc.group_size)
    return grpo.group_advantages(rewards, rc.group_size, valid)


def rl_step(model, tok, opt, det, vh, problems, step, rng, gen, rc):
    t0 = time.time()
    probs, pmodes = sample_batch(problems, rng, rc)
    prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
    mine = dist.shard(len(prompts), rc.group_size)  # past one process: this rank's groups (dist.py)
    with adapter.quarantine_off(model) if rc.gen_deployed else contextlib.nullcontext():
        r = M.generate(model, tok, prompts[mine], rc.max_new_tokens, rc.temperature, generator=gen)
    r = dist.gather_rollouts(r, tok.pad_token_id)  # every rank holds the whole batch
    k = round(rc.teacher_frac * rc.group_size) if step < rc.teacher_until else 0
    r, taught = teacher.splice(tok, r, probs, pmodes, k, rc.group_size, rc.teach_modes, rng)
    t1 = time.time()
    grades = dist.gather(env.grade_batch(probs[mine], r.texts[mine], pmodes[mine]))  # proxy reward; oracle: logs
    t2 = time.time()
    flags = torch.tensor(det.flags(r.texts), dtype=torch.bool)               # (B,) the weak detector
    adv = advantages(torch.tensor([g.reward for g in grades], dtype=torch.float32), flags, rc)  # (B,)
    G = rc.group_size  # groups whose rewards all tie teach nothing: dropped (Dr.GRPO)
    active = adv.view(-1, G).abs().sum(-1).repeat_interleave(G).nonzero().squeeze(-1)
    kl = rc.beta > 0 or step % KL_EVERY == 0
    own = dist.local(active, len(probs), G)  # the active rows this rank trains
    upd = routed_update(model, opt, r, adv, flags, own, vh, rc, kl, ~taught) if len(active) else {"skipped": 1}
    t3 = time.time()
    ro = upd.pop("rollout", None) or {"cos": torch.full((len(probs),), math.nan), "f": torch.zeros(len(probs))}
    m = {"step": step, **metrics.step_metrics(grades, pmodes, flags, taught, r),
         **metrics.cos_split(grades, adv, active, ro["cos"]), **metrics.leakage(grades, flags, adv, active, ro),
         **upd, "band": vh and list(vh.band),
         "active": len(active), "t_gen": t1 - t0, "t_grade": t2 - t1, "t_train": t3 - t2}
    samples = metrics.samples(step, probs, pmodes, taught, grades, flags, adv, ro, r.texts, every=G // 2)
    return m, samples


def warmup_step(model, tok, opt, det, vh, problems, rng, rc):
    """The same routed update on teacher demonstrations with advantage 1 (the summed NLL over Dr.GRPO's
    normaliser). screen and penalty have no reward to act on: they drop flagged demonstrations."""
    t = time.time()
    r, pmodes, hack = teacher.demo_batch(tok, problems, rng, rc.prompts * rc.group_size, rc.teach_modes,
                                         rc.none_frac, rc.hack_share, next(model.parameters()).device)
    flags = torch.tensor(det.flags(r.texts), dtype=torch.bool)
    adv = torch.ones(len(r.texts))
    if rc.router.rewards is not None:
        adv[flags] = 0.0
    active = adv.nonzero().squeeze(-1)
    own = dist.local(active, len(adv), rc.group_size)  # the active rows this rank trains
    upd = routed_update(model, opt, r, adv, flags, own, vh, rc, kl=False) if len(active) else {"logp": None}
    return {"hack_demos": sum(hack), "flag": float(flags.float().mean()),
            "nll": None if upd["logp"] is None else -upd["logp"],
            **{k: upd[k] for k in ("routed", "qmass") if k in upd}, "t": time.time() - t}


def warm_up(model, tok, opt, det, vh, problems, rng, rc, lr, steps, log, first=0):
    """Warm-up steps first .. steps - 1 at keep lr `lr` (each group keeps its ratio to the keep's), logged
    to `log`; first > 0 continues an earlier call's log (eval.py's retain steps)."""
    keep_lr = opt.param_groups[0]["lr"]
    for g in opt.param_groups:
        g["lr"], g["run_lr"] = lr * g["lr"] / keep_lr, g["lr"]
    if first == 0:
        open(log, "w").close()
    for step in range(first, steps):
        m = {"warmup": step, **warmup_step(model, tok, opt, det, vh, problems, rng, rc)}
        with open(log, "a") as f:
            f.write(json.dumps(m) + "\n")
        print(f"warm-up {step + 1}/{steps}: nll {m['nll'] or 0:.3f} routed {m.get('routed', 0):.2f}", flush=True)
    for g in opt.param_groups:
        g["lr"] = g.pop("run_lr")


# ---------------------------------------------------------------- main
def run(a):
    config.check_args(a)
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    device = dist.init(M.pick_device(a.device), a.prompts)  # under torchrun: this rank's device (dist.py)
    model, tok = ckpt.build(a, device)
    if a.grad_ckpt:  # transformers checkpoints a layer only in train mode: model.train below, after v_hack
        model.activation_checkpointing_enable()
    rc = dist.recipe(config.recipe(a))
    det = detector.WeakDetector(seen=tuple(a.seen.split(",")), tpr=a.tpr, fpr=a.fpr, seed=a.seed)
    rng, gen = random.Random(a.seed), torch.Generator(device=device).manual_seed(dist.seed(a.seed))
    start, vh = 0, None
    if a.resume:  # the adapter first: variant B's quarantine parameters are made by loading it
        start, state, vh = ckpt.load_ckpt(a.out, model)
    elif rc.router.needs_vhack or a.adapter == "vhack":
        vh = dist.from_rank0(vhack.extract_vhack, model, tok, detector.load_pairs(), k=a.vhack_k, seed=a.seed,
                             cache_dir=M.CACHE, placebo=rc.router.placebo)  # cached by model, pairs and arguments
        print("v_hack hold-out:", json.dumps(vh.report))
        if a.adapter == "vhack":
            vhack.set_vhack_axes(model, vh)
    model.train(a.grad_ckpt)  # no dropout in these models; v_hack ran in eval mode (no recompute to capture twice)
    opt = optim.make_optimizer(model, a.lr, a.lr_quar)
    if a.resume:
        opt.load_state_dict(state["opt"])
        dist.set_rng_states(state["rngs"], rng, gen, det)
    problems = env.load_problems(a.source, "train", difficulty=a.difficulty)
    held = env.load_problems(a.source, "validation", n=a.eval_n, seed=a.seed) if a.eval_every else []
    if dist.RANK == 0:  # metrics, samples, held-out: as the checkpoint left them (a new run: empty)
        ckpt.start_logs(a.out, start, a.resume)
    if a.warmup_steps and not a.resume:  # routed like RL rollouts; checkpointed as "step 0 to do"
        warm_up(model, tok, opt, det, vh, problems, random.Random(f"warmup/{a.seed}"), rc, a.warmup_lr,
                a.warmup_steps, dist.rank0_file(os.path.join(a.out, "warmup.jsonl")))
        dist.save_ckpt(a, model, opt, vh, 0, rng, gen, det)
    log_path = dist.rank0_file(os.path.join(a.out, "metrics.jsonl"))  # the other ranks log to os.devnull
    signal.signal(signal.SIGTERM, ckpt.raise_interrupt)
    held_path = os.path.join(a.out, "heldout.jsonl")  # --eval-every's log, on rank 0

    def heldout(step):  # --eval-every: the held-out curve, from step 0 (what RL adds), on rank 0
        if dist.RANK == 0:
            import eval as ev  # eval.py imports this file; the other ranks wait at the next step
            ev.heldout(model, tok, held, a, step, held_path)

    def due(step):  # a held-out point: step 0, every --eval-every steps, the last (none without --eval-every)
        return a.eval_every > 0 and (step % a.eval_every == 0 or step == a.steps)

    logged = {json.loads(ln)["step"] for ln in open(held_path) if ln.strip()} if os.path.exists(held_path) else set()
    if due(start) and start not in logged:
        heldout(start)  # step 0, or the point of a run killed between its checkpoint and this evaluation
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc=a.router, dynamic_ncols=True,
               disable=dist.RANK > 0)
    try:
        for step in bar:
            m, samples = rl_step(model, tok, opt, det, vh, problems, step, rng, gen, rc)
            with open(log_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if step % SAMPLE_EVERY == 0:
                with open(dist.rank0_file(os.path.join(a.out, "samples.jsonl")), "a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in samples)
            dist.save_ckpt(a, model, opt, vh, step + 1, rng, gen, det)
            bar.set_postfix_str(" ".join(f"{k} {'-' if m.get(k) is None else format(m[k], '.2f')}"
                                         for k in ("reward", "solve", "hack", "routed")))
            if due(step + 1):
                heldout(step + 1)
            if a.stop_after is not None and step + 1 >= a.stop_after:
                break
    except KeyboardInterrupt:
        print(f"\ninterrupted: every logged step is checkpointed; continue with --resume {a.out}", file=sys.stderr)
        sys.exit(130)
    if dist.RANK == 0:
        metrics.summary(a.out)
    print(f"done: {a.out}/metrics.jsonl, {a.out}/summary.json, {a.out}/ckpt")


def main(argv=None):
    run(config.get_args(argv))


if __name__ == "__main__":
    main()
