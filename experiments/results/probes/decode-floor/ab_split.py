"""A/B: bench's generate (2 prompts x 8 rows, 200 tokens, temperature 1) with sampler.py ("old") and split_sampler.py
("new"), alternating, each with the matmul peak measured right after it.  python ab_split.py ROUNDS"""
import sys, time, importlib.util, torch
sys.path.insert(0, ".")
import bench, sampler, model as M, env, flops
spec = importlib.util.spec_from_file_location("split_sampler", __file__.replace("ab_split.py", "split_sampler.py"))
new = importlib.util.module_from_spec(spec); spec.loader.exec_module(new)
old = sampler
a = bench.get_args(["--routers", "none"])
model, tok, vh, opt, probs, pmodes, _ = bench.setup(a, "cpu")
prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
params = model.num_parameters()
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
res = {"old": [], "new": []}
for r in range(rounds + 1):
    for name, mod in (("old", old), ("new", new))[::1 if r % 2 else -1]:
        M.sampler = mod
        gen = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        g = M.generate(model, tok, prompts, 200, 1.0, generator=gen)
        dt = time.perf_counter() - t0
        n = int(g.completion_mask.sum())
        peak = flops.matmul_peak("cpu", model.dtype)
        if r:
            res[name].append((n / dt, 2 * params * n / dt / peak))
        print(r, name, f"{dt:.2f}s {n} tok {n / dt:.0f} tok/s frac {2 * params * n / dt / peak:.3f} peak {peak / 1e9:.0f}", flush=True)
for k, v in res.items():
    print(k, "mean tok/s", round(sum(x[0] for x in v) / len(v)), "mean frac", round(sum(x[1] for x in v) / len(v), 3))
