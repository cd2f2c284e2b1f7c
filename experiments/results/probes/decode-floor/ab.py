"""A/B the sampler's decode as written against `grouped` (SDPA with the query heads grouped per kv head and an
additive float mask), alternating in one process, same prompts and seeds: tok/s.  python ab.py [ROUNDS]"""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import bench, sampler, model as M, env
a = bench.get_args(["--routers", "none"])
model, tok, vh, opt, probs, pmodes, _ = bench.setup(a, "cpu")
prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
orig = sampler.Decoder.forward

def grouped(self, ids, pos, keys, start, rows=None):
    n, L = ids.shape
    if L > 1:
        return orig(self, ids, pos, keys, start, rows)
    rows = slice(0, n) if rows is None else rows
    if keys.dtype == torch.bool:
        keys = torch.zeros(keys.shape, dtype=self.K[0].dtype).masked_fill_(~keys, float("-inf"))
    x = self.m.embed_tokens(ids)
    cos, sin = self.m.rotary_emb(x, pos)
    G = self.H // self.Hkv
    for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
        q, k, v = (t.view(n, L, -1, self.D) for t in qkv(ln1(x)))
        q, k = (qn(q) if qn else q).transpose(1, 2), (kn(k) if kn else k).transpose(1, 2)
        q, k = sampler.rope(q, cos, sin), sampler.rope(k, cos, sin)
        self.K[i][rows, :, start:start + L], self.V[i][rows, :, start:start + L] = k, v.transpose(1, 2)
        K, V = self.K[i][rows, :, :start + L], self.V[i][rows, :, :start + L]
        a = F.scaled_dot_product_attention(q.view(n, self.Hkv, G, self.D), K, V, attn_mask=keys)
        x = x + o(a.reshape(n, L, self.H * self.D))[0]
        g, u = gate_up(ln2(x))
        x = x + down(F.silu(g) * u)[0]
    return self.lm_head(self.m.norm(x[:, -1]))[0].float()

VARIANTS = {"orig": orig, "grouped": grouped}
M.generate(model, tok, prompts[:2], 4, generator=torch.Generator().manual_seed(0))
res = {k: [] for k in VARIANTS}
outs = {}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for name, f in VARIANTS.items():
        sampler.Decoder.forward = f
        gen = torch.Generator().manual_seed(rep)
        t0 = time.perf_counter()
        with torch.no_grad():
            g = M.generate(model, tok, prompts, 200, 1.0, generator=gen)
        dt = time.perf_counter() - t0
        n = int(g.completion_mask.sum())
        res[name].append(n / dt)
        outs.setdefault(rep, {})[name] = g.completion_ids
        print(rep, name, f"{dt:.2f}s {n} tok {n/dt:.0f} tok/s", flush=True)
    same = all(torch.equal(outs[rep]["orig"], outs[rep][k]) for k in VARIANTS)
    print("same tokens:", same)
for k, v in res.items():
    print(k, "tok/s", [round(x) for x in v], "mean", round(sum(v) / len(v)))
