"""Ceilings of one 16-row decode step (SmolLM2, S = 121..319): as written, without attention, without
RMSNorm/RoPE/SiLU, without both (wrong outputs: a bound, not a variant).  python ceil.py"""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import bench, sampler
a = bench.get_args(["--routers", "none"])
model, tok, *_ = bench.setup(a, "cpu")
B, P, T = 16, 120, 200
orig = sampler.Decoder.forward
def variant(skip_attn=False, skip_small=False):
    def fwd(self, ids, pos, keys, start, rows=None):
        n, L = ids.shape
        rows = slice(0, n)
        x = self.m.embed_tokens(ids)
        cos, sin = self.m.rotary_emb(x, pos)
        for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = (t.view(n, L, -1, self.D) for t in qkv(x if skip_small else ln1(x)))
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            if not skip_small:
                q, k = sampler.rope(q, cos, sin), sampler.rope(k, cos, sin)
            self.K[i][rows, :, start:start + L], self.V[i][rows, :, start:start + L] = k, v.transpose(1, 2)
            K, V = self.K[i][rows, :, :start + L], self.V[i][rows, :, :start + L]
            a = q if skip_attn else F.scaled_dot_product_attention(q, K, V, attn_mask=keys, enable_gqa=True)
            x = x + o(a.transpose(1, 2).reshape(n, L, self.H * self.D))[0]
            g, u = gate_up(x if skip_small else ln2(x))
            x = x + down(g * u if skip_small else F.silu(g) * u)[0]
        return self.lm_head(self.m.norm(x[:, -1]))[0].float()
    return fwd
V = {"orig": orig, "noattn": variant(True), "nosmall": variant(False, True), "neither": variant(True, True)}
dec = sampler.Decoder(model, B, P + T)
ids = torch.randint(0, 1000, (B, 1))
with torch.no_grad():
    for rep in range(2):
        for name, f in V.items():
            tot = 0
            for S in (121, 160, 200, 240, 280, 319):
                cur = torch.full((B, 1), S - 1); keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
                f(dec, ids, cur, keys, S - 1)
                t0 = time.perf_counter()
                for _ in range(8): f(dec, ids, cur, keys, S - 1)
                tot += (time.perf_counter() - t0) / 8
            print(rep, name, "mean step ms", round(tot / 6 * 1000, 1), flush=True)
