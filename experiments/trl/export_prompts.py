"""
Write the prompts of the first step of `train.py --config recipes/laptop.json` (2 prompts x 8 rollouts,
seed 0) to a JSON file.

Runs with the PROJECT's venv (it imports the project, not TRL):

    /work/main/.venv/bin/python experiments/trl/export_prompts.py OUT.json [--prompts 2] [--group-size 8]

One entry per group (prompt): the user message env.build_prompt(p, m), the string the project
feeds its sampler (M.chat_prompt of that message), and its token count as the project tokenizes it.
"""
import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import config  # noqa: E402  (the project's modules, found through ROOT)
import env  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    a = ap.parse_args()
    ta = config.get_args(["--config", os.path.join(ROOT, "recipes", "laptop.json"), "--prompts", str(a.prompts),
                          "--group-size", str(a.group_size)])
    problems = env.load_problems(ta.source, "train", difficulty=ta.difficulty)  # as train.py's first step
    probs, pmodes = train.sample_batch(problems, random.Random(ta.seed), config.recipe(ta))
    _, tok = M.load_model("smollm2")
    rows = []
    for p, m in zip(probs[::a.group_size], pmodes[::a.group_size]):  # one (problem, mode) per group
        user = env.build_prompt(p, m)
        text = M.chat_prompt(tok, user)
        rows.append({"id": p.id, "mode": m, "user": user, "text": text,
                     "n_tokens": len(tok(text, add_special_tokens=False).input_ids)})
    with open(a.out, "w") as f:
        json.dump({"group_size": a.group_size, "prompts": rows}, f, indent=1)
    print(f"wrote {len(rows)} prompts x {a.group_size} to {a.out}: "
          + ", ".join(f"{r['id']}/{r['mode']} ({r['n_tokens']} tok)" for r in rows))


if __name__ == "__main__":
    main()
