import sys, time, torch, collections
sys.path.insert(0, ".")
import ckpt, env, model as M, sampler
run, model, tok, vh = ckpt.load_run("./runs/evalspeed", "cpu")
probs = env.load_problems("simple", "test", n=16, seed=1234)
jobs = [(p, m) for p in probs for m in env.MODES + ("none",)][:64]
prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in jobs]
from torch.profiler import profile, ProfilerActivity
res = {}
with torch.no_grad():
    M.generate(model, tok, prompts, 1, 0.7, generator=torch.Generator().manual_seed(0))
    for T in (1, 25):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.time(); M.generate(model, tok, prompts, T, 0.7, generator=torch.Generator().manual_seed(0)); print(T, time.time() - t0)
        res[T] = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
d = {k: (res[25][k][0] - res[1].get(k, (0, 0))[0], res[25][k][1] - res[1].get(k, (0, 0))[1]) for k in res[25]}
tot = sum(v[0] for v in d.values())
print("decode 24 steps, self cpu ms total", tot / 1e3)
for k, v in sorted(d.items(), key=lambda kv: -kv[1][0])[:15]:
    print(f"{k:50s} {v[0]/1e3/24:8.2f} ms/step  {v[1]//24} calls/step")
