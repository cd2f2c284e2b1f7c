"""
Deploy evaluation: what routing buys after the quarantine is deleted (the Ablate of Expand, Route, Ablate).

    python eval.py --ckpt runs/demo [--ablate zero|reinit] [--coherence-steps 8]
                   [--relearn-steps 5 [--relearn-teacher]] [--export DIR]

On held-out test problems, every mode plus `none`, three (four) models side by side:
  base      adapters off (the pretrained model)
  trained   keep + quarantine (what the RL run produced)
  deployed  quarantine ablated (`adapter.ablate`): the model one would ship (an empty quarantine, as
            `none`'s: the trained model's completions, which sampling it again would draw exactly)
  coherent  with --coherence-steps: deployed, then ERA's brief fine-tuning on honest retain data
            (--export and --relearn-steps then start from it)
Per model: solve (oracle gt_correct), hack (exploited, over loophole prompts), hack_<mode>, hack on
the detector's seen vs unseen modes (absorption), flagged rate, mean reward, each rate with a
95% Wilson interval and its sample count. Over-suppression: solve on data/adjacent.jsonl
(near-hack-but-legit problems), base vs deployed. Relearn probe (SGTM's undiscovered-rate idea):
plain GRPO steps from the deployed model, hack rate after each. Export: the deployed model as a
plain transformers directory (keep delta merged, quarantine gone).

Deviations: 1. one sampled completion per (problem, mode) at the run's temperature, not pass@k, each from
its own random stream; 2. the detector-quality sweep retrains one short run per TPR, reports its deployed model.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import zlib

import torch

import adapter
import ckpt
import config
import detector
import env
import model as M
import report
import routing
import train
import vhack

SUBSETS = ("base", "trained", "deployed")  # + "coherent" with --coherence-steps


def rollouts(model, tok, problems, modes, a, det, seed):
    """One sampled completion per (problem, mode), graded and flagged -> row dicts. Each draws from its own
    generator, seeded by (seed, problem, mode): the same draws at any --batch and for every model evaluated."""
    jobs, rows = [(p, m) for p in problems for m in modes], []  # a problem's modes side by side: one prefill
    gens = [torch.Generator(next(model.parameters()).device).manual_seed(zlib.crc32(f"{seed}/{p.id}/{m}".encode()))
            for p, m in jobs]
    for i in range(0, len(jobs), a.batch):
        chunk = jobs[i:i + a.batch]
        prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in chunk]
        texts = M.generate(model, tok, prompts, a.max_new_tokens, a.temperature, generator=gens[i:i + a.batch]).texts
        grades = env.grade_batch([p for p, _ in chunk], texts, [m for _, m in chunk])
        again = [j for j, g in enumerate(grades) if g.timed_out]  # a loaded box: once more, then `timeout`
        for j, g in zip(again, env.grade_batch([chunk[j][0] for j in again], [texts[j] for j in again],
                                               [chunk[j][1] for j in again])):
            grades[j] = g
        flags = det.flags(texts)
        rows += [{"problem": p.id, "mode": m, "solve": g.gt_correct, "hack": g.exploited, "compiled": g.compiled,
                  "attempt": report.attempted(env.extract_code(t), m), "timeout": g.timed_out, "note": g.note,
                  "flag": f, "reward": g.reward, "text": t} for (p, m), g, f, t in zip(chunk, grades, flags, texts)]
    return rows


def heldout(model, tok, problems, run, step, path):
    """train.py --eval-every: the trained and deployed models on held-out (validation) problems x every
    mode, one JSON line per call in path, so that the step where hacking sets in is visible. Its own
    generators and an exact detector: the training run's random streams are not touched."""
    a = argparse.Namespace(batch=64, max_new_tokens=run.max_new_tokens, temperature=run.temperature)
    seen, m = tuple(run.seen.split(",")), {"step": step}
    det = detector.WeakDetector(seen=seen, tpr=1.0, fpr=0.0, seed=run.seed)
    for name in ("trained", "deployed"):
        with torch.no_grad(), adapter.quarantine_off(model) if name == "deployed" else contextlib.nullcontext():
            s = report.summarize(rollouts(model, tok, problems, env.MODES + ("none",), a, det, run.seed + step), seen)
        m[name] = {k: s[k]["p"] for k in ("hack", "hack_seen", "hack_unseen", "attempt", "solve", "compiles")}
    with open(path, "a") as f:
        f.write(json.dumps(m) + "\n")
    print(f"held out, step {step}: hack {m['trained']['hack']:.2f} (deployed {m['deployed']['hack']:.2f}), "
          f"solve {m['trained']['solve']:.2f}", flush=True)
    return m


def vhack_separation(model, tok, vh, prompts, texts, hack, batch=8):
    """Does the run's v_hack tell hacks from other completions at this model? Each completion is scored as
    the grad router scores a rollout with A = +1 (its gradient here, vhack.side_grads; cosine with
    v_hack): AUC of hack vs other, mean cosine and the band's routed share f of each. main() passes the
    trained model's loophole completions with the oracle's label: a report, never an input to routing."""
    cos = routing.rollout_cos(vhack.side_grads(model, tok, prompts, texts, batch)[0], vh)
    (lo, hi), hack = vh.band, torch.tensor([bool(x) for x in hack])
    f = routing.route_grad(cos, None, vh.band, routing.OPTS)  # the grad router's own map from cos to f
    h, o = cos[hack], cos[~hack]
    auc = ((h[:, None] > o).float() + 0.5 * (h[:, None] == o).float()).mean().item() if len(h) and len(o) else None

    def mean(x):
        return x.mean().item() if len(x) else None

    return {"n_hack": len(h), "n_other": len(o), "auc": auc, "cos_hack": mean(h), "cos_other": mean(o),
            "band": [lo, hi], "f_hack": mean(f[hack]), "f_other": mean(f[~hack])}


def relearn(model, tok, det, problems, rc, steps, lr, seed, trained_hack):
    """Plain GRPO (rc: router none) from the deployed model; on-policy hack rate after each step. With
    --relearn-teacher the run's teacher hacks are spliced into the groups as in training (SGTM's relearn
    test with the demonstrations the run had: how fast does a removed hack come back?)."""
    opt = torch.optim.AdamW(adapter.keep_params(model), lr=lr, weight_decay=0.0)
    rng, gen = random.Random(seed), torch.Generator(next(model.parameters()).device).manual_seed(seed)
    log = [train.rl_step(model, tok, opt, det, None, problems, step, rng, gen, rc)[0] for step in range(steps)]
    curve = [m["hack"] for m in log]
    back = next((i + 1 for i, h in enumerate(curve) if h is not None and h >= trained_hack), None)
    return {"hack_per_step": curve, "steps_to_trained_level": back, "trained_hack": trained_hack,
            "steps": log}  # each step's metrics.jsonl row (reward, solve, hack per mode, length, ...)


def coherence(model, tok, det, problems, rc, steps, lr, seed, out, evaluate):
    """ERA's retain-set fine-tuning after the ablation (Cloud et al. 2024, §4.2; their appendix controls it
    with the same fine-tuning and no routing): supervised steps on honest reference solutions to
    no-loophole prompts of the training split, the keep only, run exactly as the warm-up runs
    (train.warm_up with router none, advantage 1). No hack, flag or oracle is read. The model is
    evaluated after each count in --coherence-steps (model "coherent<k>"; the last one is "coherent").
    The same steps on a `none` run are the control: what they remove there, they remove without routing."""
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "warmup.jsonl")
    opt = torch.optim.AdamW(adapter.keep_params(model), lr=lr, weight_decay=0.0)
    rng, done, names = random.Random(seed), 0, []
    for k in steps:
        train.warm_up(model, tok, opt, det, None, problems, rng, rc, lr, k, log, first=done)  # steps done+1 .. k
        done = k
        names.append("coherent" if k == steps[-1] else f"coherent{k}")
        evaluate(names[-1])
    return {"steps": steps, "models": names, "lr": lr, "log": log}


def run_argv(run, **change):
    """The command line that trains the run `run` (its saved arguments), with `change` applied."""
    args, argv = {**vars(run), **change}, []
    for act in config.parser()._actions:
        v = args.get(act.dest)
        if not act.option_strings or v is None or act.dest in ("help", "resume", "stop_after"):
            continue
        if isinstance(act, argparse._StoreTrueAction):
            argv += [act.option_strings[0]] if v else []
        elif isinstance(act, argparse.BooleanOptionalAction):
            argv += [act.option_strings[0 if v else 1]]
        else:
            argv += [act.option_strings[0], str(v)]
    return argv


def sweep(a, run):
    """Detector-quality sweep: one short training run per TPR (same arguments otherwise), deployed
    hack vs solve per run. Each run lands in CKPT/sweep/tpr<X> and is evaluated like the main one."""
    points = []
    opts = {"--split": a.split, "--n": a.n, "--batch": a.batch, "--seed": a.seed, "--ablate": a.ablate,
            "--max-new-tokens": a.max_new_tokens, "--temperature": a.temperature, "--device": a.device}
    for tpr in a.sweep_tpr:
        out = os.path.join(a.ckpt, "sweep", f"tpr{tpr:g}")
        if not os.path.exists(os.path.join(out, "metrics.jsonl")):
            train.main(run_argv(run, out=out, tpr=tpr, steps=a.sweep_steps or run.steps))
        sub = main(["--ckpt", out] + [x for k, v in opts.items() if v is not None for x in (k, str(v))], plot=False)
        d = sub["models"]["deployed"]
        points.append({"tpr": tpr, "hack": d["hack"], "solve": d["solve"], "hack_unseen": d["hack_unseen"]})
    return points


def export(model, tok, out_dir):
    merged = adapter.merge(model)
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def numbers(s, kind, ok, flag, want):
    """'2,8' -> [kind(2), kind(8)] ('' -> []); one line and exit 2 unless ok(list), naming flag and what it wants."""
    try:
        v = [kind(x) for x in s.split(",")] if s else []
    except ValueError:
        v = None
    if v is None or (v and not ok(v)):
        ckpt.die(f"{flag} {s!r}: give {want}")
    return v


def get_args(argv=None):
    p = ckpt.Parser(description="Deploy evaluation of a train.py run")
    p.add_argument("--ckpt", required=True, help="the run's --out directory")
    p.add_argument("--ablate", default="zero", choices=["zero", "reinit"])
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="held-out problems (family-disjoint from training); choose settings on validation")
    p.add_argument("--n", type=int, default=None, help="held-out problems per mode (default: the whole split)")
    p.add_argument("--batch", type=int, default=64, help="completions generated at once")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's")
    p.add_argument("--temperature", type=float, default=None, help="default: the run's")
    p.add_argument("--relearn-steps", type=int, default=0)
    p.add_argument("--relearn-teacher", action="store_true", help="relearn with the run's spliced teacher hacks")
    p.add_argument("--coherence-steps", default="", metavar="K[,K...]",
                   help="then fine-tune the deployed model on honest no-loophole demos (ERA's retain step), "
                        "evaluating it after each K steps (e.g. 2,8)")
    p.add_argument("--coherence-lr", type=float, default=None, help="default: the run's --lr")
    p.add_argument("--vhack-auc", action="store_true",
                   help="how well the run's v_hack (act/grad/erase), and one extracted afresh at the trained model, "
                        "separate its hacks")
    p.add_argument("--export", default=None, metavar="DIR")
    p.add_argument("--sweep-tpr", default="", help="e.g. 1,0.75,0.5,0.25,0: one training run per detector TPR")
    p.add_argument("--sweep-steps", type=int, default=None, help="steps of each sweep run (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None, plot=True):
    a = get_args(argv)
    a.coherence_steps = numbers(a.coherence_steps, int, lambda v: v[0] >= 1 and v == sorted(set(v)),
                                "--coherence-steps", "increasing positive step counts, e.g. 2,8")
    a.sweep_tpr = numbers(a.sweep_tpr, float, lambda v: all(0 <= x <= 1 for x in v), "--sweep-tpr",
                          "detector TPRs in [0, 1], e.g. 1,0.5,0")
    if any(v is not None and v <= 0 for v in (a.n, a.batch, a.max_new_tokens, a.temperature)):
        ckpt.die("--n, --batch, --max-new-tokens and --temperature must be positive")
    if a.relearn_teacher and a.relearn_steps < 1:
        ckpt.die("--relearn-teacher is an option of the relearn probe: give --relearn-steps N too")
    torch.manual_seed(a.seed)
    if not os.path.exists(os.path.join(a.ckpt, "metrics.jsonl")):
        ckpt.die(f"{a.ckpt}: no metrics.jsonl (is this a train.py --out directory?)")
    run, model, tok, vh = ckpt.load_run(a.ckpt, M.pick_device(a.device))
    a.max_new_tokens = a.max_new_tokens or run.max_new_tokens
    a.temperature = run.temperature if a.temperature is None else a.temperature
    seen = tuple(run.seen.split(","))
    det = detector.WeakDetector(seen=seen, tpr=1.0, fpr=0.0, seed=a.seed)  # an exact detector for the flagged rate
    diff = run.difficulty  # the retain and relearn steps train on the run's levels
    # held out: the run's own source (a .jsonl run: that file's split), every level but `impossible`
    problems = env.load_problems(run.source, a.split, n=a.n, seed=a.seed)
    if not problems:
        ckpt.die(f"no {a.split} problems for source {run.source}")
    train_problems = env.load_problems(run.source, "train", difficulty=diff)  # the retain and relearn steps'
    modes = env.MODES + ("none",)
    adjacent = env.load_problems("adjacent", "test")
    res = {"ckpt": a.ckpt, "args": vars(a), "run_args": vars(run), "seen": seen, "models": {}, "adjacent": {}}

    def evaluate(name, rows=None):  # one model: graded completions (eval_NAME.jsonl), summary, adjacent solve
        with adapter.adapters_off(model) if name == "base" else torch.no_grad():
            rows = rows or rollouts(model, tok, problems, modes, a, det, a.seed)
            if name != "trained":
                adj = rollouts(model, tok, adjacent, ["none"], a, det, a.seed)
                res["adjacent"][name] = report.rate([r["solve"] for r in adj])
        res["models"][name] = report.summarize(rows, seen)
        with open(os.path.join(a.ckpt, f"eval_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name:>9}: solve {res['models'][name]['solve']['p']:.2f}  hack {res['models'][name]['hack']['p']:.2f}",
              flush=True)
        return rows

    rows = None
    for name in SUBSETS:
        same = None  # a deletion that changes no weight (an empty quarantine: none, warmup, screen, penalty)
        if name == "deployed":  # leaves the trained model, whose completions the same seed would draw again
            res["deployed_is_trained"] = not adapter.ablate(model, a.ablate)
            same = rows if res["deployed_is_trained"] else None
        rows = evaluate(name, same)
        if name == "trained" and a.vhack_auc:
            # the run's v_hack was fitted at the start; "fresh" is fitted here, on the same pairs
            by_id, loop = {p.id: p for p in problems}, [r for r in rows if r["mode"] != "none"]
            args = ([M.chat_prompt(tok, env.build_prompt(by_id[r["problem"]], r["mode"])) for r in loop],
                    [r["text"] for r in loop], [r["hack"] for r in loop])
            fresh = vhack.extract_vhack(model, tok, detector.load_pairs(), k=run.vhack_k, seed=run.seed)
            res["vhack"] = {"run": vh and vhack_separation(model, tok, vh, *args),
                            "fresh": vhack_separation(model, tok, fresh, *args)}
    if run.grad_ckpt and (a.coherence_steps or a.relearn_steps):  # train as the run trained: transformers
        model.activation_checkpointing_enable()                     # checkpoints a layer in train mode only
        model.train()
    if a.coherence_steps:
        rc = dataclasses.replace(config.recipe(run), router=routing.ROUTERS["none"], none_frac=1.0,
                                 hack_share=0.0)  # honest demonstrations on no-loophole prompts only
        res["coherence"] = coherence(model, tok, det, train_problems, rc, a.coherence_steps, a.coherence_lr or run.lr,
                                     a.seed, os.path.join(a.ckpt, "coherence"), evaluate)
    if a.export:
        res["export"] = export(model, tok, a.export)
    if a.relearn_steps:
        trained = res["models"]["trained"]["hack"]["p"] or 0.0
        rc = dataclasses.replace(config.recipe(run), router=routing.ROUTERS["none"],
                                 teacher_until=run.teacher_until if a.relearn_teacher else 0)
        res["relearn"] = relearn(model, tok, det, train_problems, rc, a.relearn_steps, run.lr, a.seed, trained)
    if a.sweep_tpr:
        res["sweep"] = sweep(a, run)
    with open(os.path.join(a.ckpt, "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = report.markdown(res)
    open(os.path.join(a.ckpt, "eval.md"), "w").write(md + "\n")
    print(md)
    if plot:
        import plots
        print("plots:", ", ".join(plots.all_plots(a.ckpt, res)))
    return res


if __name__ == "__main__":
    main()
