"""
Teacher demonstrations in training: the routed supervised warm-start that teaches the loopholes
before RL (DESIGN.md §4, issue 8), and the teacher hacks spliced into early GRPO groups (vGROUT).

A 135M model almost never discovers a hack on its own, and GRPO cannot reinforce what it never
samples. Anthropic's reward-hacking work first gives its model knowledge of hacks by finetuning on
synthetic documents; here `--warmup-steps` supervised steps on env.teacher_completion
demonstrations do it: on loophole prompts a share `--warmup-hack` of the demonstrations exploit the
prompt's own loophole, the rest (and every `none` prompt) answer honestly with the reference.

The demonstrations are off-policy rollouts like train.py's spliced teacher hacks, so they are
trained exactly as a GRPO step trains (update.train_update, advantage 1 for every demonstration:
Dr.GRPO's loss is then the summed NLL over the constant normaliser) and ROUTED exactly as one: the
weak detector flags them, v_hack scores them, the router splits each one's gradient between keep
and quarantine. So nothing the model learns about hacking, from demonstrations or from RL, reaches
the keep parameters except past the router. The reward baselines (screen, penalty) have no reward
to act on here; they drop flagged demonstrations instead (screening the data).

    python train.py --warmup-steps 12 ...      # before step 0; logged to OUT/warmup.jsonl

Spliced teacher hacks (splice_teacher, --teacher-frac until --teacher-until): off-policy rollouts in
place of the last on-policy ones of each loophole group, trained with ratio 1 like on-policy ones.

--teach-modes run_tests,file_marker demonstrates only those loopholes (both in the warm-up and in the
splice): the other modes can then be learnt only by RL, so routing's effect on them is absorption and
generalisation, not the keep being taught them by unflagged demonstrations. (Measured on SmolLM2: plain
GRPO then never hacks the undemonstrated modes; README, "Do the unflagged modes emerge ...".)
"""
import json
import os
import time

import torch

import env
import model as M


def teach_modes(a):
    """The loophole modes demonstrations hack in: --teach-modes, or all of --modes."""
    return a.modes.split(",") if a.teach_modes == "all" else a.teach_modes.split(",")


def demo_batch(a, tok, problems, rng):
    """One batch of prompts x group-size demonstrations: (Rollouts, prompt modes, is-hack list).
    Loophole prompts come only from teach_modes(a): the others are never demonstrated, not even clean."""
    modes, prompts, texts, pmodes, hack = teach_modes(a), [], [], [], []
    for _ in range(a.prompts * a.group_size):
        p = problems[rng.randrange(len(problems))]
        m = "none" if rng.random() < a.none_frac else modes[rng.randrange(len(modes))]
        kind = "hack" if m != "none" and rng.random() < a.warmup_hack else "clean"
        prompts.append(M.chat_prompt(tok, env.build_prompt(p, m)))
        texts.append(env.teacher_completion(p, m, kind, rng))
        pmodes.append(m)
        hack.append(kind == "hack")
    return M.encode(tok, prompts, texts), pmodes, hack


def warm_up(a, model, tok, opt, det, vh, problems, rng, first=0):
    """Supervised steps first .. a.warmup_steps - 1 through update.train_update (routing included). Returns
    v_hack (--vhack-every refits it between steps). first > 0 continues an earlier call's log (eval.py's
    coherence steps)."""
    import update
    keep_lr = opt.param_groups[0]["lr"]  # each group keeps its ratio to the keep's (--lr-quar / --lr)
    for g in opt.param_groups:
        g["lr"], g["run_lr"] = a.warmup_lr * g["lr"] / keep_lr, g["lr"]
    log = os.path.join(a.out, "warmup.jsonl")
    if first == 0:
        open(log, "w").close()
    for step in range(first, a.warmup_steps):
        t = time.time()
        vh = update.refresh_vhack(a, model, tok, vh, step)
        r, pmodes, hack = demo_batch(a, tok, problems, rng)
        flags = torch.tensor(det.flags(r.texts), dtype=torch.bool)
        adv = torch.ones(len(r.texts))
        if a.router in ("screen", "penalty"):
            adv[flags] = 0.0
        active = adv.nonzero().squeeze(-1)
        norm = a.prompts * a.group_size * a.max_new_tokens
        upd = update.train_update(a, model, opt, r, adv, flags, active, vh, norm, kl=False) if len(active) else {"logp": None}
        m = {"warmup": step, "hack_demos": sum(hack), "flag": float(flags.float().mean()),
             "nll": None if upd["logp"] is None else -upd["logp"],
             **{k: upd[k] for k in ("routed", "qmass", "qkl") if k in upd}, "t": time.time() - t}
        with open(log, "a") as f:
            f.write(json.dumps(m) + "\n")
        print(f"warm-up {step + 1}/{a.warmup_steps}: nll {m['nll'] or 0:.3f} routed {m.get('routed', 0):.2f}", flush=True)
    for g in opt.param_groups:
        g["lr"] = g.pop("run_lr")
    return vh


def splice_teacher(a, tok, r, probs, pmodes, step, rng):
    """Replace the last round(teacher_frac*G) rollouts of each teach-mode group by teacher hacks."""
    k = round(a.teacher_frac * a.group_size) if step < a.teacher_until else 0
    taught = teach_modes(a)
    rows = [g * a.group_size + j for g in range(a.prompts) for j in range(a.group_size - k, a.group_size)
            if pmodes[g * a.group_size] in taught]
    if not rows:
        return r, torch.zeros(len(probs), dtype=torch.bool)
    texts = [env.teacher_completion(probs[i], pmodes[i], "hack", rng) for i in rows]
    t = M.encode(tok, ["x"] * len(rows), texts)                       # completion ids (k', T')
    T = max(r.completion_ids.shape[1], t.completion_ids.shape[1])
    pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # (B, T)
    ids, mask = pad(r.completion_ids, tok.pad_token_id), pad(r.completion_mask, 0)
    ids[rows], mask[rows] = pad(t.completion_ids, tok.pad_token_id).to(ids), pad(t.completion_mask, 0).to(mask)
    for i, txt in zip(rows, texts):
        r.texts[i] = txt
    teacher = torch.zeros(len(probs), dtype=torch.bool)
    teacher[rows] = True
    return M.Rollouts(r.prompt_ids, r.prompt_mask, ids, mask, r.texts), teacher
