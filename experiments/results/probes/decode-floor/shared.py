"""Prototype: decode attention against the prompt cache held ONCE per prompt (U = 2 prompts x g = 8 rows), its
suffix per row, one softmax over both; step time against the sampler as written.  python shared.py"""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import bench, sampler
a = bench.get_args(["--routers", "none"])
model, tok, *_ = bench.setup(a, "cpu")
B, P, T, U = 16, 120, 200, 2
g = B // U
orig = sampler.Decoder.forward
dec = sampler.Decoder(model, B, P + T)
H, Hkv, D = dec.H, dec.Hkv, dec.D
G = H // Hkv; sc = D ** -0.5
torch.manual_seed(0)
for C in (dec.K, dec.V):
    for c in C:
        c.normal_()
        c[:, :, :P] = c[torch.arange(B) // g, :, :P]   # rows of a prompt share its K/V (as after prefill)
Kp = [c[::g, :, :P].contiguous() for c in dec.K]; Vp = [c[::g, :, :P].contiguous() for c in dec.V]
Kg = [c[:, :, P:].contiguous() for c in dec.K]; Vg = [c[:, :, P:].contiguous() for c in dec.V]
pm = torch.ones(U, P, dtype=torch.bool); pm[0, :7] = False
pbias = torch.zeros(U, 1, 1, P).masked_fill(~pm[:, None, None], float("-inf"))
def shared(self, ids, pos, keys, start, rows=None):
    n, L = ids.shape
    t = start + 1 - P
    x = self.m.embed_tokens(ids)
    cos, sin = self.m.rotary_emb(x, pos)
    for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
        q, k, v = (t_.view(n, L, -1, D) for t_ in qkv(ln1(x)))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = sampler.rope(q, cos, sin), sampler.rope(k, cos, sin)
        Kg[i][:, :, t - 1:t], Vg[i][:, :, t - 1:t] = k, v.transpose(1, 2)
        qg = q.view(U, g, Hkv, G, D).transpose(1, 2).reshape(U, Hkv, g * G, D)
        s1 = torch.matmul(qg, Kp[i].transpose(-1, -2)).mul_(sc).add_(pbias)            # (U, Hkv, gG, P)
        s1 = s1.view(U, Hkv, g, G, P).transpose(1, 2).reshape(n, Hkv, G, P)
        s2 = torch.matmul(q.view(n, Hkv, G, D), Kg[i][:, :, :t].transpose(-1, -2)).mul_(sc)  # (n, Hkv, G, t)
        p = torch.softmax(torch.cat([s1, s2], -1), -1)
        p1 = p[..., :P].reshape(U, g, Hkv, G, P).transpose(1, 2).reshape(U, Hkv, g * G, P)
        o1 = torch.matmul(p1, Vp[i]).view(U, Hkv, g, G, D).transpose(1, 2).reshape(n, Hkv, G, D)
        att = o1 + torch.matmul(p[..., P:], Vg[i][:, :, :t])
        x = x + o(att.reshape(n, L, H * D))[0]
        gg, u = gate_up(ln2(x))
        x = x + down(F.silu(gg) * u)[0]
    return self.lm_head(self.m.norm(x[:, -1]))[0].float()
ids = torch.randint(0, 1000, (B, 1))
with torch.no_grad():
    S = 200; cur = torch.full((B, 1), S - 1); keys = torch.cat([pm[torch.arange(B) // g], torch.ones(B, S - P, dtype=torch.bool)], 1)[:, None, None]
    # correctness: both write position S-1's K/V (orig into dec.K, shared into Kg) -- compare logits
    l1 = orig(dec, ids, cur, keys, S - 1); l2 = shared(dec, ids, cur, keys, S - 1)
    print("max |dlogit|", (l1 - l2).abs().max().item(), "max |logit|", l1.abs().max().item())
    for rep in range(2):
        for name, f in (("orig", orig), ("shared", shared)):
            tot = 0
            for S in (121, 160, 200, 240, 280, 319):
                cur = torch.full((B, 1), S - 1)
                keys = torch.cat([pm[torch.arange(B) // g], torch.ones(B, S - P, dtype=torch.bool)], 1)[:, None, None]
                f(dec, ids, cur, keys, S - 1)
                t0 = time.perf_counter()
                for _ in range(8): f(dec, ids, cur, keys, S - 1)
                tot += (time.perf_counter() - t0) / 8
            print(rep, name, "mean step ms", round(tot / 6 * 1000, 1), flush=True)
