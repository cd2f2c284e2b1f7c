"""
The deploy evaluation's numbers: rates with 95% Wilson intervals, a model's summary, the table.

Every rate is {"p", "lo", "hi", "n"}: k/n with its Wilson score interval (Wilson 1927), which stays
inside [0, 1] and is honest at the small n of a laptop run (a normal interval at k = 0 is [0, 0]).
A summary is over one model's graded completions (eval.rollouts): solve (the oracle's gt_correct),
compiles, hack (exploited, over loophole prompts only), hack on the detector's seen vs unseen modes
(absorption), the same among completions that compile, per mode, flagged rate and mean reward.
"""
import math

import env


def wilson(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials (Wilson 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def rate(xs):
    k, n = sum(bool(x) for x in xs), len(xs)
    lo, hi = wilson(k, n)
    return {"p": k / n if n else None, "lo": lo, "hi": hi, "n": n}


def summarize(rows, seen):
    hackable = [r for r in rows if r["mode"] != "none"]
    s = {"solve": rate([r["solve"] for r in rows]), "hack": rate([r["hack"] for r in hackable]),
         "compiles": rate([r["compiled"] for r in rows]),  # did deleting the quarantine break the model?
         "hack_seen": rate([r["hack"] for r in hackable if r["mode"] in seen]),
         "hack_unseen": rate([r["hack"] for r in hackable if r["mode"] not in seen]),
         # among completions that compile: is a drop in hacking more than the model breaking?
         "hack_seen_compiled": rate([r["hack"] for r in hackable if r["mode"] in seen and r["compiled"]]),
         "hack_unseen_compiled": rate([r["hack"] for r in hackable if r["mode"] not in seen and r["compiled"]]),
         "flag": rate([r["flag"] for r in rows]),
         "reward": sum(r["reward"] for r in rows) / max(1, len(rows))}
    for m in env.MODES + ("none",):
        s[f"hack_{m}" if m != "none" else "solve_none"] = rate(
            [r["hack" if m != "none" else "solve"] for r in rows if r["mode"] == m])
    return s


def fmt_rate(r):
    return "-" if r["p"] is None else f"{r['p']:.2f} [{r['lo']:.2f},{r['hi']:.2f}] n={r['n']}"


def fmt_num(x):
    return "-" if x is None else f"{x:.3f}"


def markdown(res):
    """The table a reader wants: rates with intervals, per model."""
    keys = ["solve", "compiles", "hack", "hack_seen", "hack_unseen"] + [f"hack_{m}" for m in env.MODES] + ["flag"]
    lines = ["| model | " + " | ".join(keys) + " | reward |", "|---" * (len(keys) + 2) + "|"]
    for name in res["models"]:
        s = res["models"][name]
        lines.append(f"| {name} | " + " | ".join(fmt_rate(s[k]) for k in keys) + f" | {s['reward']:.2f} |")
    if "adjacent" in res:
        lines += ["", "| near-hack-but-legit solve | base | deployed |", "|---|---|---|",
                  f"| adjacent.jsonl | {fmt_rate(res['adjacent']['base'])} | {fmt_rate(res['adjacent']['deployed'])} |"]
    if "relearn" in res:
        lines += ["", f"relearn probe (hack per plain-GRPO step): {res['relearn']['hack_per_step']}, "
                      f"steps to the trained level {res['relearn']['trained_hack']:.2f}: "
                      f"{res['relearn']['steps_to_trained_level']}"]
    if "vhack" in res:
        lines += ["", "| v_hack on the trained model's loophole completions | hacks / other | AUC | cos hack / other "
                      "| band | routed share f, hack / other |", "|---|---|---|---|---|---|"]
        for k, v in res["vhack"].items():
            if v:
                lines.append(f"| {k} | {v['n_hack']} / {v['n_other']} | {fmt_num(v['auc'])} "
                             f"| {fmt_num(v['cos_hack'])} / {fmt_num(v['cos_other'])} "
                             f"| {fmt_num(v['band'][0])}, {fmt_num(v['band'][1])} "
                             f"| {fmt_num(v['f_hack'])} / {fmt_num(v['f_other'])} |")
    return "\n".join(lines)
