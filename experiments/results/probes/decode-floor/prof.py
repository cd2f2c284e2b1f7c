"""The profiler over ten 16-row decode steps at 250 cached positions (sampler.Decoder as written).  python prof.py"""
import sys, time, torch
sys.path.insert(0, ".")
import bench, sampler
from torch.profiler import profile, ProfilerActivity
a = bench.get_args(["--routers", "none"])
model, tok, *_ = bench.setup(a, "cpu")
B, P, T = 16, 120, 200
dec = sampler.Decoder(model, B, P + T)
ids = torch.randint(0, 1000, (B, 1)); S = 250
cur = torch.full((B, 1), S - 1); keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
with torch.no_grad():
    for _ in range(5): dec.forward(ids, cur, keys, S - 1)
    t0 = time.perf_counter()
    for _ in range(20): dec.forward(ids, cur, keys, S - 1)
    print("step ms", (time.perf_counter() - t0) / 20 * 1000)
    with profile(activities=[ProfilerActivity.CPU]) as pr:
        for _ in range(10): dec.forward(ids, cur, keys, S - 1)
print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
