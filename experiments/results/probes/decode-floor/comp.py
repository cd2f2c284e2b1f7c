"""torch.compile of one decode layer with the prepacked weights as inputs: Inductor fails to lower
mkldnn._linear_pointwise on the packed weight (its layout reads size [960, 576], stride [1, 0]).  python comp.py"""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import bench, sampler
a = bench.get_args(["--routers", "none"])
model, tok, *_ = bench.setup(a, "cpu")
B, P, T = 16, 120, 200
dec = sampler.Decoder(model, B, P + T)
for C in (dec.K, dec.V):
    for c in C: c.normal_()
eps = model.config.rms_norm_eps
lin = lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
H, Hkv, D = dec.H, dec.Hkv, dec.D
def layer(x, cos, sin, Kc, Vc, keys, start: int, w1, w2, pqkv, po, pgu, pdn):
    n = x.shape[0]
    h = F.rms_norm(x, (x.shape[-1],), w1, eps)
    qkv = lin(h, pqkv)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(n, 1, H, D).transpose(1, 2), k.view(n, 1, Hkv, D).transpose(1, 2), v.view(n, 1, Hkv, D).transpose(1, 2)
    q, k = sampler.rope(q, cos, sin), sampler.rope(k, cos, sin)
    Kc[:, :, start:start + 1] = k
    Vc[:, :, start:start + 1] = v
    att = F.scaled_dot_product_attention(q, Kc[:, :, :start + 1], Vc[:, :, :start + 1], attn_mask=keys, enable_gqa=True)
    x = x + lin(att.transpose(1, 2).reshape(n, 1, H * D), po)
    g, u = lin(F.rms_norm(x, (x.shape[-1],), w2, eps), pgu).chunk(2, -1)
    return x + lin(F.silu(g) * u, pdn)
Ls = []
for (ln1, qkv, o, qn, kn, ln2, gu, dn) in dec.layers:
    Ls.append((ln1.weight, ln2.weight, qkv.packed, o.packed, gu.packed, dn.packed))
def step(f, ids, pos, keys, start):
    x = dec.m.embed_tokens(ids)
    cos, sin = dec.m.rotary_emb(x, pos)
    for i, (w1, w2, a1, a2, a3, a4) in enumerate(Ls):
        x = f(x, cos, sin, dec.K[i], dec.V[i], keys, start, w1, w2, a1, a2, a3, a4)
    return dec.lm_head(dec.m.norm(x[:, -1]))[0].float()
cl = torch.compile(layer, dynamic=True)
ids = torch.randint(0, 1000, (B, 1))
with torch.no_grad():
    t0 = time.perf_counter()
    S = 200; cur = torch.full((B, 1), S - 1); keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
    r1 = step(cl, ids, cur, keys, S - 1)
    print("compile s", time.perf_counter() - t0, flush=True)
    r0 = step(layer, ids, cur, keys, S - 1); r2 = dec.forward(ids, cur, keys, S - 1)
    print("dlogit", (r1 - r0).abs().max().item(), (r0 - r2).abs().max().item())
    for rep in range(3):
        for name, f in (("eager", None), ("mine", layer), ("compiled", cl)):
            tot = 0
            for S in (121, 160, 200, 240, 280, 319):
                cur = torch.full((B, 1), S - 1); keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
                g = (lambda: dec.forward(ids, cur, keys, S - 1)) if f is None else (lambda: step(f, ids, cur, keys, S - 1))
                g()
                t0 = time.perf_counter()
                for _ in range(8): g()
                tot += (time.perf_counter() - t0) / 8
            print(rep, name, "mean step ms", round(tot / 6 * 1000, 1), flush=True)
