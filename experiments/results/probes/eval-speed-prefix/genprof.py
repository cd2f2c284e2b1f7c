import sys, time, torch
sys.path.insert(0, ".")
import ckpt, env, model as M, sampler
run, model, tok, vh = ckpt.load_run("./runs/evalspeed", "cpu")
probs = env.load_problems("simple", "test", n=16, seed=1234)
modes = env.MODES + ("none",)
jobs = [(p, m) for p in probs for m in modes][:64]
prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in jobs]
orig = sampler.prefix_groups
def t(T, share=True, reps=2):
    sampler.prefix_groups = orig if share else (lambda seqs, share=0.5: [(0, list(range(len(seqs))))])
    best = 1e9
    for _ in range(reps):
        g = torch.Generator().manual_seed(0); t0 = time.time()
        r = M.generate(model, tok, prompts, T, 0.7, generator=g); best = min(best, time.time() - t0)
    return best, int(r.completion_mask.sum())
with torch.no_grad():
    for share in (False, True):
        p1, _ = t(1, share); full, ntok = t(96, share, 1)
        print(f"share={share}: prefill {p1:.1f}s, generate(96) {full:.1f}s, {ntok} tokens, decode {full - p1:.1f}s")
