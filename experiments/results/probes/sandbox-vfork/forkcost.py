"""Grading 64 completions of one eval file (python eval.py --ckpt RUN --n 16 first) from a process holding 0, 2 and 5 GiB.
    python forkcost.py   (reads runs/ed-prof/eval_trained.jsonl)"""
import sys, json, time, torch
sys.path.insert(0, ".")
import env
probs = {p.id: p for p in env.load_problems("simple", "test")}
rows = [json.loads(l) for l in open("runs/ed-prof/eval_trained.jsonl")]
P = [probs[r["problem"]] for r in rows]; texts = [r["text"] for r in rows]; modes = [r["mode"] for r in rows]
env.grade_batch(P[:4], texts[:4], modes[:4])
for gb in (0, 2, 5):
    big = torch.ones(gb * 2**28) if gb else None   # gb GiB, touched
    t0 = time.perf_counter()
    g = env.grade_batch(P[:64], texts[:64], modes[:64])
    print(f"{gb} GiB resident: grade 64 in {time.perf_counter()-t0:.2f}s", flush=True)
    del big
