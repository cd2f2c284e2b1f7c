"""
The GPU check (make gpu-check): what this project could not run without a GPU, in one command that
needs no network, printing one summary.

    python experiments/gpu_check.py [--out runs/gpu-check] [--layers 0]

  1. SmolLM2-135M on CUDA in bf16: 2 RL steps of `grad` on the laptop recipe (no warm-up): the bf16
     path of sampling, capture, routing and RoutedAdamW on a real model, with finite updates.
  2. Qwen3-4B's shapes with random weights (--model qwen3-4b-random, every layer unless --layers):
     one `grad` step at the GPU recipe's batch (16 prompts x 16, 1024 new tokens; random weights never
     stop early, so every rollout runs to the limit: the worst case), half of each group a spliced teacher
     hack so that the groups' rewards differ and the step trains. Its time and peak memory.
On a machine without CUDA it prints one line saying so and exits 0 (nothing to check here).
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def step_summary(out):
    """A step with no active group (all rewards tied) is skipped before any update; `finite`: every step that
    updated had a finite loss and gradient."""
    ms = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    updated = [m for m in ms if m["active"]]
    finite = bool(updated) and all(m.get("skipped", 0) == 0 for m in updated)
    return {"steps": len(ms), "updated": len(updated), "finite": finite, "t_gen": round(sum(m["t_gen"] for m in ms), 1),
            "t_train": round(sum(m["t_train"] for m in ms), 1), "routed": [round(m.get("routed", 0), 3) for m in ms]}


def timed_run(argv):
    import train
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    train.main(argv)
    return time.time() - t, torch.cuda.max_memory_allocated() / 2 ** 30


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--layers", default="0", help="Qwen3-4B shapes: decoder layers kept (0 = all 36)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU, and this machine has none; nothing was run")
        return 0
    import config
    os.chdir(ROOT)
    small, big = os.path.join(a.out, "smollm2-bf16"), os.path.join(a.out, "qwen3-4b-shapes")
    s_wall, s_mem = timed_run(["--config", config.LAPTOP, "--device", "cuda", "--router", "grad", "--steps", "2",
                               "--warmup-steps", "0", "--out", small])
    b_wall, b_mem = timed_run(["--model", "qwen3-4b-random", "--layers", a.layers, "--device", "cuda",
                               "--router", "grad", "--steps", "1", "--source", "simple", "--difficulty", "hard",
                               "--teacher-frac", "0.5", "--teacher-until", "1",  # random weights: rewards all 0
                               "--eval-every", "0", "--out", big])
    res = {"gpu": torch.cuda.get_device_name(), "smollm2_bf16": {**step_summary(small), "wall_s": round(s_wall, 1),
                                                                 "peak_gib": round(s_mem, 2)},
           "qwen3_4b_shapes": {**step_summary(big), "wall_s": round(b_wall, 1), "peak_gib": round(b_mem, 2),
                               "batch": "16 x 16, 1024 new tokens", "layers": a.layers}}
    json.dump(res, open(os.path.join(a.out, "gpu_check.json"), "w"), indent=1)
    ok = res["smollm2_bf16"]["finite"] and res["qwen3_4b_shapes"]["finite"]
    print(f"gpu-check on {res['gpu']}: SmolLM2 bf16 2 grad steps {'finite' if ok else 'NOT FINITE'} in "
          f"{s_wall:.0f} s (peak {s_mem:.1f} GiB); Qwen3-4B shapes, one step at 16 x 16 x 1024: {b_wall:.0f} s, "
          f"peak {b_mem:.1f} GiB -> {a.out}/gpu_check.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
