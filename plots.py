"""
Plots of a run for eval.py: training curves from metrics.jsonl and before/after bars per mode.

    python plots.py runs/demo        # re-draws from runs/demo/metrics.jsonl and eval.json

Deviations: none (no paper here). PNGs only, matplotlib's Agg backend (no screen needed).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("run_tests", "exit_code", "eq_override", "file_marker")


def save(fig, out, name):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def smooth(xs, w=3):
    """Trailing mean over w steps, skipping steps where the metric was undefined (None)."""
    out = []
    for i in range(len(xs)):
        win = [x for x in xs[max(0, i - w + 1):i + 1] if x is not None]
        out.append(sum(win) / len(win) if win else None)
    return out


def training_curves(out, router=""):
    ms = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    steps = [m["step"] for m in ms]
    panels = [("reward", ["reward"]), ("solve / hack", ["solve", "hack"]),
              ("hack per mode (each step, unsmoothed)", [f"hack_{m}" for m in MODES]),
              ("routing", ["routed", "qmass", "flag"]),
              ("KL to base (k3, per token)", ["kl"]), ("entropy", ["entropy"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            raw = k.startswith("hack_")  # a mode is not drawn every step: its points stand alone
            ys = [m.get(k) for m in ms] if raw else smooth([m.get(k) for m in ms])
            pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if raw else ".", ls="" if raw else "-", label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(os.path.normpath(out))}: training, router {router or '?'} (3-step trailing mean)")
    return save(fig, out, "curves.png")


def before_after(out, res):
    """Solve, compile and hack rate per mode for base / trained / deployed (/ coherent), with Wilson
    intervals. Compile is shown because on hard problems solve is ~0: a deletion that breaks the model shows there."""
    keys = ["solve", "compiles"] + [f"hack_{m}" for m in MODES]
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(res["models"])
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        s = res["models"][name]
        ps = [s[k]["p"] or 0.0 for k in keys]
        err = [[p - s[k]["lo"] for p, k in zip(ps, keys)], [s[k]["hi"] - p for p, k in zip(ps, keys)]]
        ax.bar([j + (i - (len(names) - 1) / 2) * w for j in range(len(keys))], ps, w, yerr=err, capsize=2, label=name)
    seen = set(res.get("seen", ()))
    ax.set_xticks(range(len(keys)), [k + (" (seen)" if k[5:] in seen else "") for k in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% Wilson)")
    ax.set_title(f"{os.path.basename(os.path.normpath(out))}: before / after deleting the quarantine")
    ax.legend()
    return save(fig, out, "before_after.png")


def pareto(out, res):
    """Detector-quality sweep: deployed hack vs deployed solve, one point per TPR."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for p in res["sweep"]:
        h, s = p["hack"], p["solve"]
        ax.errorbar(h["p"], s["p"], xerr=[[h["p"] - h["lo"]], [h["hi"] - h["p"]]],
                    yerr=[[s["p"] - s["lo"]], [s["hi"] - s["p"]]], fmt="o", capsize=2)
        ax.annotate(f"TPR {p['tpr']:g}", (h["p"], s["p"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("deployed hack rate (lower is better)")
    ax.set_ylabel("deployed solve rate (higher is better)")
    ax.set_title("detector quality sweep")
    return save(fig, out, "pareto.png")


def all_plots(out, res=None):
    if res is None and os.path.exists(os.path.join(out, "eval.json")):
        res = json.load(open(os.path.join(out, "eval.json")))
    paths = [training_curves(out, (res or {}).get("run_args", {}).get("router", ""))]
    if res is not None:
        paths.append(before_after(out, res))
        if res.get("sweep"):
            paths.append(pareto(out, res))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(os.path.join(sys.argv[1], "metrics.jsonl")):
        print("error: usage: python plots.py RUN_DIR (a train.py --out directory)", file=sys.stderr)
        sys.exit(2)
    print("\n".join(all_plots(sys.argv[1])))
