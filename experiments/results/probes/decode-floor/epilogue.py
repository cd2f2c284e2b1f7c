"""
PROBE (not adopted): the small ops of a decode step folded away, measured on bench's own row schedule.

`Epilogue` is sampler.Decoder with
  - oneDNN's post-ops fused into the prepacked matmuls (what Inductor emits on x86): silu(x W_gate^T) and
    (x W_up^T) * that, with gate and up as two matmuls; the residual adds of o_proj and down_proj;
  - RoPE as x cos + roll(x, D/2) sin' (sin' = sin with its first half negated) in one addcmul: 3 ops, not 5;
  - with `fmask`, the bool key mask turned into an additive float mask once per step, not once per layer.

    python epilogue.py test        # test_sampler.py's six tests with sampler.Decoder = Epilogue (float64 path)
    python epilogue.py replay N    # N rounds: bench's generate recorded once (rows alive and cached length
                                   # per decode step), then replayed through each variant in chunks of 10
                                   # steps, the variants' order rotated per chunk: the ratio to sampler.py
                                   # per chunk cancels the box's drift, which swamps 5% between whole runs
"""
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import sampler  # noqa: E402

LP, LPB = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._linear_pointwise.binary


class Post(sampler.Fused):
    """One linear, with a post-op: None, "silu" (silu(x W^T + b)), "add" / "mul" (other + / * (x W^T + b))."""

    def __call__(self, x, post=None, other=None):
        b = self.bs[0]
        if self.packed is not None:
            if post in ("add", "mul"):
                return LPB(x, other, self.packed, b, post)
            return LP(x, self.packed, b, "swish" if post == "silu" else "none", [], "")
        y = super().__call__(x)[0]
        return F.silu(y) if post == "silu" else other + y if post == "add" else other * y if post == "mul" else y


class Epilogue(sampler.Decoder):
    fmask = False

    def __init__(self, model, B, S):
        super().__init__(model, B, S)
        self.layers = [(ln1, qkv, Post([L.self_attn.o_proj]), qn, kn, ln2,
                        (Post([L.mlp.gate_proj]), Post([L.mlp.up_proj])), Post([L.mlp.down_proj]))
                       for (ln1, qkv, _, qn, kn, ln2, _, _), L in zip(self.layers, self.m.layers)]

    def forward(self, ids, pos, keys, start, rows=None):
        n, L = ids.shape
        rows = slice(0, n) if rows is None else rows
        if self.fmask and keys.dtype == torch.bool:
            keys = torch.zeros(keys.shape, dtype=self.K[0].dtype, device=keys.device).masked_fill_(~keys, float("-inf"))
        x = self.m.embed_tokens(ids)
        cos, sin = self.m.rotary_emb(x, pos)
        sin = torch.cat([-sin[..., :self.D // 2], sin[..., self.D // 2:]], -1)[:, None]
        cos = cos[:, None]
        for i, (ln1, qkv, o, qn, kn, ln2, (gate, up), down) in enumerate(self.layers):
            q, k, v = (t.view(n, L, -1, self.D) for t in qkv(ln1(x)))
            q, k = (qn(q) if qn else q).transpose(1, 2), (kn(k) if kn else k).transpose(1, 2)
            q, k = (torch.addcmul(t * cos, t.roll(self.D // 2, -1), sin) for t in (q, k))
            self.K[i][rows, :, start:start + L], self.V[i][rows, :, start:start + L] = k, v.transpose(1, 2)
            K, V = self.K[i][rows, :, :start + L], self.V[i][rows, :, :start + L]
            a = F.scaled_dot_product_attention(q, K, V, attn_mask=keys, enable_gqa=True)
            x = o(a.transpose(1, 2).reshape(n, L, self.H * self.D), "add", x)
            h = ln2(x)
            x = down(up(h, "mul", gate(h, "silu")), "add", x)
        return self.lm_head(self.m.norm(x[:, -1]))[0].float()


class EpilogueMask(Epilogue):
    fmask = True


def test():
    import test_sampler
    from test_all import run_all
    sampler.Decoder = Epilogue
    tests = types.ModuleType("epilogue_sampling")
    tests.__dict__.update({n: f for n, f in vars(test_sampler).items() if n.startswith("test_")})
    return run_all([tests])


def replay(rounds):
    import bench
    import env
    import flops
    import model as M
    a = bench.get_args(["--routers", "none"])
    model, tok, _, _, probs, pmodes, _ = bench.setup(a, "cpu")
    prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
    sched, orig = [], sampler.Decoder.forward

    def record(self, ids, pos, keys, start, rows=None):
        if ids.shape[1] == 1:
            sched.append((ids.shape[0], start))
        return orig(self, ids, pos, keys, start, rows)
    sampler.Decoder.forward = record
    g = M.generate(model, tok, prompts, 200, 1.0, generator=torch.Generator().manual_seed(0))
    sampler.Decoder.forward = orig
    print(f"schedule: {len(sched)} decode steps, {int(g.completion_mask.sum())} tokens, "
          f"{sum(n for n, _ in sched) / len(sched):.1f} rows a step on average", flush=True)
    B, S = 16, max(s for _, s in sched) + 1
    V = {"sampler.py": sampler.Decoder(model, B, S), "epilogues": Epilogue(model, B, S),
         "epilogues+fmask": EpilogueMask(model, B, S)}

    def matmuls_only(n):  # the packed matmuls of a step alone, on zeros: the ceiling
        d = V["sampler.py"]
        x, h = torch.zeros(n, 1, model.config.hidden_size), torch.zeros(n, 1, model.config.intermediate_size)
        for (_, qkv, o, _, _, _, gate_up, down) in d.layers:
            qkv(x), o(x), gate_up(x), down(h)
        d.lm_head(x[:, -1])
    ids, chunks = torch.randint(0, 1000, (B, 1)), [sched[i:i + 10] for i in range(0, len(sched), 10)]
    with torch.no_grad():  # float32, prepacked: the post-ops against sampler.py on one 16-row step
        n, s = B, S - 1
        ref = V["sampler.py"].forward(ids, torch.full((n, 1), s), torch.ones(n, 1, 1, s + 1, dtype=torch.bool), s)
        for k in list(V)[1:]:
            got = V[k].forward(ids, torch.full((n, 1), s), torch.ones(n, 1, 1, s + 1, dtype=torch.bool), s)
            print(f"{k}: logits within {(got - ref).abs().max().item():.1e} of sampler.py's (|logit| <= "
                  f"{ref.abs().max().item():.0f})", flush=True)
    tot, ratios = {k: 0.0 for k in [*V, "matmuls only"]}, {k: [] for k in V}
    with torch.no_grad():
        for r in range(rounds):
            for c, ch in enumerate(chunks):
                t, names = {}, [*V, "matmuls only"]
                for k in names[(r + c) % 4:] + names[:(r + c) % 4]:
                    t0 = time.perf_counter()
                    for n, s in ch:
                        if k == "matmuls only":
                            matmuls_only(n)
                        else:
                            keys = torch.ones(n, 1, 1, s + 1, dtype=torch.bool)
                            V[k].forward(ids[:n], torch.full((n, 1), s), keys, s)
                    t[k] = time.perf_counter() - t0
                for k in t:
                    tot[k] += t[k]
                for k in V:
                    ratios[k].append(t[k] / t["sampler.py"])
            print(r, {k: round(v / (r + 1), 2) for k, v in tot.items()}, flush=True)
    peak, frac = flops.matmul_peak("cpu", model.dtype), 2 * model.num_parameters() * int(g.completion_mask.sum())
    for k in tot:
        q = sorted(ratios.get(k, [1.0]))
        iqr = f"IQR [{q[len(q) // 4]:.3f}, {q[3 * len(q) // 4]:.3f}]"
        print(f"{k:16s} {tot[k] / rounds:6.2f} s per generate's decode, {frac / (tot[k] / rounds) / peak:.3f} of the "
              f"peak ({peak / 1e9:.0f} GFLOP/s, measured after)"
              + ("" if k not in ratios else f"; per chunk / sampler.py: median {statistics.median(q):.3f}, {iqr}"))


if __name__ == "__main__":
    sys.exit(1 if test() else 0) if sys.argv[1] == "test" else replay(int(sys.argv[2]))
