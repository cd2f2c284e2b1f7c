"""eval.py's sampling of one checkpoint (16 test problems x 5 modes): tok/s per --batch, then prefill vs decode.
    python evgen.py RUN_DIR [BATCH ...]"""
import sys, time, torch
sys.path.insert(0, ".")
import ckpt, env, model as M
run, model, tok, vh = ckpt.load_run(sys.argv[1], "cpu")
problems = env.load_problems(run.source, "test", n=16, seed=1234)
adj = env.load_problems("adjacent", "test")
print("adjacent", len(adj), "max_new", run.max_new_tokens, "temp", run.temperature)
jobs = [(p, m) for p in problems for m in env.MODES + ("none",)]
prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in jobs]
M.generate(model, tok, prompts[:2], 4)
peak = 171e9
for batch in (int(x) for x in sys.argv[2:]):
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter(); n = 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            g = M.generate(model, tok, prompts[i:i + batch], run.max_new_tokens, run.temperature, generator=gen)
            n += int(g.completion_mask.sum())
    dt = time.perf_counter() - t0
    print(f"batch {batch}: {dt:.1f}s {n} tok {n/dt:.0f} tok/s frac {2*model.num_parameters()*n/dt/peak:.2f}", flush=True)
import sampler, collections
orig_prefill, orig_fwd = sampler.prefill, sampler.Decoder.forward
T = collections.defaultdict(float)
def pf(*a, **k):
    t = time.perf_counter(); r = orig_prefill(*a, **k); T["prefill"] += time.perf_counter() - t; return r
def fw(self, ids, *a, **k):
    t = time.perf_counter(); r = orig_fwd(self, ids, *a, **k); T["fwd%d" % (ids.shape[1] > 1)] += time.perf_counter() - t
    T["tokens%d" % (ids.shape[1] > 1)] += ids.numel(); return r
sampler.prefill, sampler.Decoder.forward = pf, fw
gen = torch.Generator().manual_seed(0)
t0 = time.perf_counter()
with torch.no_grad():
    g = M.generate(model, tok, prompts, run.max_new_tokens, run.temperature, generator=gen)
print("total", time.perf_counter() - t0, dict(T), "prompt lens", g.prompt_mask.sum(1).float().mean().item(), g.prompt_ids.shape)
