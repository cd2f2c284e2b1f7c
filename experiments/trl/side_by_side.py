"""
TRL's GRPOTrainer and the project's step, back to back on this machine: step time, generation
throughput, and their ratios (the README's Performance section).

    .venv/bin/python experiments/trl/side_by_side.py [--steps 3] [--tokens 200]

1. TRL: experiments/trl/trl_step.py in its own venv (experiments/trl/README.md), beta 0, the project's
   two prompts x 8 rollouts, --tokens new tokens at most. Medians of the steps after the first.
2. The project: python train.py --config recipes/laptop.json --router grad with no warm-up and no
   teacher hacks (--warmup-steps 0 --teacher-frac 0), 2 prompts x 8, the same max new tokens and
   temperature (1.0), --steps steps; per step t_gen + t_grade + t_train from its metrics.jsonl, medians of
   the steps after the first. Its first step's prompts are trl_step.py's (export_prompts.py); later steps
   draw new ones.
Tokens are sampled completion tokens up to and including the stop token. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def trl(a):
    py = os.path.join(HERE, ".venv", "bin", "python")
    if not os.path.exists(py):
        sys.exit(f"error: no TRL venv at {py}; set it up as experiments/trl/README.md says")
    out = subprocess.run([py, os.path.join(HERE, "trl_step.py"), "--steps", str(a.steps), "--tokens", str(a.tokens)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"error: trl_step.py exited {out.returncode}:\n{out.stderr[-2000:]}")
    return next(json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith('{"summary"'))


def project(a):
    d = tempfile.mkdtemp(prefix="side_by_side_")
    cmd = [sys.executable, "train.py", "--config", "recipes/laptop.json", "--router", "grad",
           "--warmup-steps", "0", "--teacher-frac", "0", "--prompts", "2", "--group-size", "8",
           "--max-new-tokens", str(a.tokens), "--temperature", "1.0",
           "--steps", str(a.steps), "--out", d]  # temperature 1.0: trl_step.py's
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed: {(out.stderr.strip().splitlines() or [''])[-1]}")
    ms = [json.loads(ln) for ln in open(os.path.join(d, "metrics.jsonl"))][1:]  # the first step warms up
    step = [m["t_gen"] + m["t_grade"] + m["t_train"] for m in ms]
    tok = [16 * m["len"] for m in ms]
    return {"cmd": " ".join(cmd[1:]), "step_s": statistics.median(step),
            "gen_s": statistics.median(m["t_gen"] for m in ms), "completion_tokens": statistics.median(tok),
            "gen_tok_s": statistics.median(t / m["t_gen"] for t, m in zip(tok, ms))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=200)
    a = p.parse_args()
    t, m = trl(a), project(a)
    print(json.dumps({"trl": t, "project": m, "step_speedup": t["step_s"] / m["step_s"],
                      "gen_tok_s_ratio": m["gen_tok_s"] / t["gen_tok_s"],
                      "per_token_step_speedup": (t["step_s"] / t["completion_tokens"])
                      / (m["step_s"] / m["completion_tokens"])}, indent=1))


if __name__ == "__main__":
    main()
