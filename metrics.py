"""
What a training step logs. The oracle (gt_correct, exploited) is read here and nowhere else in
training: routing sees detector flags, v_hack and gradients only (train.py).

  step_metrics  reward, solve and hack rates over the on-policy rollouts (teacher rows excluded),
                per loophole mode too: hack is the oracle's `exploited` on loophole prompts
  cos_split     does v_hack see the hacks? the routing cosine of rollouts that teach an exploit
  samples       some rollouts of a step with their grades, flag, advantage and routing (samples.jsonl)
"""
import math

import numpy as np
import torch

import env


def num(x):
    return None if math.isnan(x) else round(x, 4)


def mean(xs):
    return float(np.mean(xs)) if xs else None


def step_metrics(grades, pmodes, flags, taught, r):
    """Oracle metrics over the on-policy rollouts; teacher rows are excluded."""
    on = [i for i in range(len(grades)) if not taught[i]]
    m = {"reward": mean([grades[i].reward for i in on]), "solve": mean([grades[i].gt_correct for i in on]),
         "hack": mean([grades[i].exploited for i in on if pmodes[i] != "none"]),
         "flag": mean([bool(flags[i]) for i in on]), "teacher": int(taught.sum()),
         "len": mean([int(r.completion_mask[i].sum()) for i in on])}
    for mode in env.MODES:
        m[f"hack_{mode}"] = mean([grades[i].exploited for i in on if pmodes[i] == mode])
    return m


def cos_split(grades, adv, active, cos):
    """Does v_hack see the hacks? Mean routing cosine of the active rollouts whose update teaches an
    exploit (exploited, A > 0: grad should route them) and of the other active rollouts."""
    on = torch.zeros(len(grades), dtype=torch.bool)
    on[active] = True
    teach = torch.tensor([g.exploited for g in grades]) & (adv > 0) & on

    def avg(sel):
        return cos[sel].mean().item() if sel.any() and not cos[sel].isnan().any() else None

    return {"cos_teach": avg(teach), "cos_other": avg(on & ~teach)}


def samples(step, probs, pmodes, taught, grades, flags, adv, ro, texts, every):
    """Every `every`-th rollout of the step, for samples.jsonl (ro: each rollout's routing cos and f)."""
    return [{"step": step, "problem": probs[i].id, "mode": pmodes[i], "teacher": bool(taught[i]),
             "reward": grades[i].reward, "gt_correct": grades[i].gt_correct, "exploited": grades[i].exploited,
             "flag": bool(flags[i]), "adv": num(adv[i].item()), "cos": num(ro["cos"][i].item()),
             "f": num(ro["f"][i].item()), "text": texts[i]} for i in range(0, len(probs), every)]
