"""
What a training step logs. The oracle's verdicts (gt_correct, exploited) are read here and nowhere else in
training (the reward pays `passed` = gt_correct OR the loophole's channel, env.py): routing sees detector
flags, v_hack and gradients only (train.py).

  step_metrics  reward, solve and hack rates over the on-policy rollouts (teacher rows excluded),
                per loophole mode too: hack is the oracle's `exploited` on loophole prompts
  cos_split     does v_hack see the hacks? the routing cosine of rollouts that teach an exploit
  leakage       what the quarantine fails to catch (SGTM §4.3's leakage, here per step): the share of
                the exploit rollouts' gradient mass (|.|^2, as qmass) written to the keep parameters,
                the share of exploit rollouts not routed at all, and the mean routed share (f; act:
                the mass share) by flagged x advantage sign and by exploit or not. Logging only.
  summary       the run's mean of each over its steps (summary.json)
  samples       some rollouts of a step with their grades, flag, advantage and routing (samples.jsonl)
"""
import json
import math
import os

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


def routed_mass(cap):
    """Per rollout: |keep part|^2 and |quarantine part|^2 of its gradient over all modules, as split()
    writes them (keep (1 - f)(g - gt), quarantine f (g - gt) + gt).  {"keep2": (n,), "quar2": (n,)}"""
    keep2, quar2 = torch.zeros(cap.n), torch.zeros(cap.n)
    for s in cap.slots.values():
        if s.g is not None:
            f = cap.f.to(s.g).view(-1, *[1] * (s.g.dim() - 1))
            gt = torch.zeros_like(s.g) if s.gt is None else s.gt
            keep2 += ((1 - f) * (s.g - gt)).flatten(1).pow(2).sum(1).cpu()
            quar2 += (f * (s.g - gt) + gt).flatten(1).pow(2).sum(1).cpu()
    return {"keep2": keep2, "quar2": quar2}


def leakage(grades, flags, adv, active, ro):
    """The leakage and quadrant fields of a step over its trained (active) rollouts (module docstring)."""
    on = torch.zeros(len(grades), dtype=torch.bool)
    on[active] = "keep2" in ro  # a skipped step trained nothing: every field None
    ro = {"keep2": torch.zeros(len(grades)), "quar2": torch.zeros(len(grades)), **ro}
    ex = torch.tensor([g.exploited for g in grades]) & on
    mass = ro["keep2"] + ro["quar2"]
    share = torch.where(ro["f"] > 0, ro["f"], ro["quar2"] / mass.clamp(min=1e-30))  # act routes tokens: mass

    def avg(x, sel):
        return x[sel].mean().item() if sel.any() else None

    out = {"leak_keep": (ro["keep2"][ex].sum() / mass[ex].sum()).item() if ex.any() and mass[ex].sum() > 0 else None,
           "leak_unrouted": avg((ro["quar2"] == 0).float(), ex),
           "routed_exploit": avg(share, ex), "routed_other": avg(share, on & ~ex)}
    for fl, fname in ((flags, "flag"), (~flags, "unflag")):
        for sign, sname in ((adv > 0, "pos"), (adv < 0, "neg")):
            out[f"routed_{fname}_{sname}"] = avg(share, on & fl & sign)
    return out


def summary(out):
    """Mean of every leakage and routing field over the run's RL steps -> OUT/summary.json."""
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)  # every step's: a skipped step logs fewer
            if k.startswith(("leak_", "routed", "qmass", "hack", "solve"))]
    s = {k: mean([r[k] for r in rows if r.get(k) is not None]) for k in keys}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"steps": len(rows), **s}, f, indent=1)
    return s


def samples(step, probs, pmodes, taught, grades, flags, adv, ro, texts, every):
    """Every `every`-th rollout of the step, for samples.jsonl (ro: each rollout's routing cos and f)."""
    return [{"step": step, "problem": probs[i].id, "mode": pmodes[i], "teacher": bool(taught[i]),
             "reward": grades[i].reward, "gt_correct": grades[i].gt_correct, "exploited": grades[i].exploited,
             "flag": bool(flags[i]), "adv": num(adv[i].item()), "cos": num(ro["cos"][i].item()),
             "f": num(ro["f"][i].item()), "text": texts[i]} for i in range(0, len(probs), every)]
