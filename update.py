"""
One routed GRPO update (DESIGN.md §9): forward/backward over micro-batches with per-rollout gradient
capture, the router's split of each rollout's gradient into keep and quarantine, one optimizer step.
train.py calls it once per RL step, warmup.py once per supervised warm-up step.

Which forward a rollout is trained under (--keep-forward):
  train     every rollout runs as the trained model, keep + quarantine. Routing never changes the
            forward (Cloud et al. 2024).
  deployed  `label` only: unflagged rollouts run as the deployed model (quarantine off), so the keep
            is trained as the model it will be deployed as; flagged ones run as the trained model.
            The mirror image of SGTM's masking, where forget examples run with the retain part zeroed.

A rollout trained under another forward than the one that sampled it is off-policy: with
--keep-forward deployed, every unflagged rollout was sampled by the trained model and trains the
deployed one. With --off-policy ratio, pi_old in the PPO ratio is the sampler's log-prob, so the
ratio is pi_train_forward / pi_sampler, importance-weighted and clipped. A negative advantage then no
longer pushes the deployed model off a sample it would not have produced (for ratio < 1 - eps the clip
zeroes that token's gradient), and a positive one is weighted by how likely the deployed model finds
it. --off-policy ignore uses ratio 1 (plain REINFORCE on the sampler's rollouts). Rows not sampled by
the model (teacher demonstrations, the warm-up) always use ratio 1.

--quar-kl beta_q (deployed keep-forward only): the quarantine pays for what it changes on unflagged
rollouts. Nothing else trains the trained model (keep + quarantine) on them, so a quarantine that
learned to hack on flagged prompts can spread to every prompt and take the sampler with it (label-s1
collapsed so). The term is beta_q * k3 KL(trained || deployed) on the keep side's tokens, GRPO's KL
with the deployed model as the reference, and its gradient reaches the quarantine only. Its price: on
a loophole prompt, a quarantine that makes the hack likelier makes the honest rollouts less likely, which
the KL charges too (README: the sampler no longer collapses, but unflagged modes go to the keep).
"""
import contextlib

import torch

import adapter
import detector
import grpo
import model as M
import routing


def refresh_vhack(a, model, tok, vh, i):
    """--vhack-every N: before update i (warm-up and RL steps counted together), every N updates, v_hack
    and its band are fitted again at the current weights on the same contrast pairs. The start-of-run
    v_hack describes the base model's gradients; the model it routes for moves away from it."""
    if vh is None or not a.vhack_every or not i or i % a.vhack_every:
        return vh
    return routing.extract_vhack(model, tok, detector.load_pairs(), k=a.vhack_k, seed=a.seed)  # no cache: these weights


def keep_forward(a):
    """deployed for label under auto or deployed (f is known before the forward), train otherwise."""
    return "deployed" if a.router == "label" and a.keep_forward in ("auto", "deployed") else "train"


def subset(r, rows):
    return M.Rollouts(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                      [r.texts[i] for i in rows.tolist()])


def micro_batches(a, active, flags):
    """The active rows in micro-batches, and the adapter mode each trains under ("train" or "deployed")."""
    if keep_forward(a) != "deployed":
        mbs = list(active.split(a.micro))
        return mbs, ["train"] * len(mbs)
    sides = [[c for c in active[side].split(a.micro) if len(c)] for side in (~flags[active], flags[active])]
    return sides[0] + sides[1], ["deployed"] * len(sides[0]) + ["train"] * len(sides[1])


def quarantine_kl(a, model, r, mbs, modes, dep, norm):
    """Add --quar-kl's gradient to the quarantine's .grad (the keep is frozen for it). Returns the mean
    per-token k3 KL of the trained model from the deployed one (dep: its detached log-probs) on the keep side."""
    keep, total, ntok = adapter.keep_params(model), 0.0, 0.0
    for p in keep:
        p.requires_grad_(False)
    try:
        for j, rows in enumerate(mbs):
            if modes[j] == "deployed":
                sub = subset(r, rows)
                with adapter.adapter_mode(model, "train"):
                    kl = (grpo.kl_k3(grpo.token_logp(model, sub, a.temperature), dep[j]) * sub.completion_mask).sum()
                    (a.quar_kl * kl / norm).backward()
                total, ntok = total + kl.item(), ntok + sub.completion_mask.sum().item()
    finally:
        for p in keep:
            p.requires_grad_(True)
    return total / max(ntok, 1.0)


def train_update(a, model, opt, r, adv, flags, active, vh, norm, kl=True, sampled=None):
    """Forward/backward over the active rollouts with per-rollout capture, route, step. Returns stats.
    sampled: (B,) bool, rows the model generated (None: none were, as in the warm-up); with --off-policy
    ratio those trained under another forward than the sampler's get pi_old = the sampler's log-prob.
    kl=False (warm-up): no reference forward unless --beta needs it; kl is then not logged. With
    --keep-forward deployed the logged logp/entropy/kl mix deployed (unflagged) and trained forwards."""
    B, dev = len(r.texts), r.completion_ids.device
    adv = adv.to(dev)  # rewards and flags live on the CPU, rollouts on the model's device
    mbs, modes = micro_batches(a, active, flags)
    # the backward runs in the mode too: gradient checkpointing re-runs the forward inside it
    mode = lambda j: adapter.adapter_mode(model, modes[j]) if keep_forward(a) == "deployed" else contextlib.nullcontext()
    sampler = "deployed" if a.gen_deployed else "train"
    ratio_on = a.off_policy == "ratio" and sampled is not None
    off = [(sampled[rows] & (modes[j] != sampler) if ratio_on else torch.zeros(len(rows), dtype=torch.bool)).to(dev)
           for j, rows in enumerate(mbs)]                                   # per micro-batch, (b,) bool
    with torch.no_grad():
        with adapter.adapters_off(model):  # k3 KL reference: same weights, adapters off
            ref = [grpo.token_logp(model, subset(r, rows), a.temperature) if kl or a.beta > 0 else None for rows in mbs]
        old, behave = [None] * len(mbs), [None] * len(mbs)  # pi_old None: the current policy itself (ratio 1)
        for j, rows in enumerate(mbs):
            if a.iters > 1:
                with mode(j):
                    old[j] = grpo.token_logp(model, subset(r, rows), a.temperature)
            if off[j].any():
                with adapter.adapter_mode(model, sampler):
                    behave[j] = grpo.token_logp(model, subset(r, rows), a.temperature)
    router = a.router if a.router in routing.ROUTERS else "none"  # screen/penalty act on rewards
    for _ in range(a.iters):
        opt.zero_grad(set_to_none=True)
        cap = routing.Capture(model, n_rollouts=B, router=router, vhack=vh, flags=flags,
                              opts={"flagged_only": a.flagged_only})
        finite, kl_sum, logp_sum, ent_sum, off_tok, off_k1, off_clip = True, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        dep = [None] * len(mbs)  # the deployed forward's log-probs, for --quar-kl
        with cap:
            for j, rows in enumerate(mbs):
                cap.rows(rows)
                sub = subset(r, rows)
                with mode(j):
                    logp, ent = grpo.token_logp(model, sub, a.temperature, with_entropy=True)  # (b, T)
                    mask = sub.completion_mask.float()
                    pi_old = logp.detach() if old[j] is None else old[j]
                    if behave[j] is not None:
                        pi_old = torch.where(off[j][:, None], behave[j], pi_old)
                    loss = grpo.grpo_loss(logp, pi_old, adv[rows], mask, norm, ref[j], a.beta, a.eps, a.dual_clip).sum()
                    finite &= bool(torch.isfinite(loss))
                    dep[j] = logp.detach() if modes[j] == "deployed" else None
                    if finite:
                        loss.backward()
                if behave[j] is not None:  # how far the trained-under forward is from the sampler's
                    om = mask * off[j][:, None]
                    d = behave[j] - logp.detach()                           # log pi_sampler - log pi
                    off_tok, off_k1 = off_tok + om.sum().item(), off_k1 + (d * om).sum().item()
                    off_clip += (((-d).exp() - 1).abs() > a.eps).float().mul(om).sum().item()
                kl_sum += 0.0 if ref[j] is None else (grpo.kl_k3(logp.detach(), ref[j]) * mask).sum().item()
                logp_sum += (logp.detach() * mask).sum().item()
                ent_sum += (ent * mask).sum().item()
        stats = cap.route()
        stats["rollout"] = {"cos": cap.cos, "f": cap.f}  # per rollout, for train.py's logs (popped there)
        if a.quar_kl > 0 and finite:  # after route(): the capture hooks are gone, autograd writes .grad
            stats["qkl"] = quarantine_kl(a, model, r, mbs, modes, dep, norm)
        finite &= all(bool(torch.isfinite(p.grad).all()) for g in opt.param_groups for p in g["params"]
                      if p.grad is not None)
        if finite:  # a non-finite loss or gradient skips the update (logged), never poisons the weights
            opt.step()
    ntok = r.completion_mask[active].sum().item()
    offp = {"off_k1": off_k1 / off_tok, "off_clip": off_clip / off_tok} if off_tok else {}
    return {**stats, **offp, "kl": kl_sum / ntok if kl else None, "logp": logp_sum / ntok, "entropy": ent_sum / ntok,
            "skipped": int(not finite)}
