"""
Sampling, written out: prefill each distinct prompt once, share its KV cache across the group,
decode with a preallocated cache, logits only where a token is drawn, finished rows dropped.

GRPO samples G completions of each prompt (Shao et al. 2024, DeepSeekMath §4.1), and a CPU spends a
decode step reading every weight for a handful of rows. So the sampler:
  1. prefills the U distinct prompts, not the B = U G rows (the group's rows copy the prompt's K/V),
     a prefix shared by several prompts once (eval's modes of one problem share ~70% of their tokens:
     its prefill halves), and computes the vocabulary logits at each prompt's last position only;
  2. writes K/V into a cache preallocated at (B, kv heads, P + T, head dim): no concatenation per step;
  3. runs the decoder layers itself (Llama / Qwen2 / Qwen3: RMSNorm, RoPE, GQA, SwiGLU) with q/k/v
     and gate/up fused, and on CPU prepacks their weights and the lm_head's once per call (oneDNN's
     blocked layout): SmolLM2's matmuls for one token of 16 rows take ~38 ms so, ~80 ms as `x @ W^T`
     (experiments/results/probes/prepack/);
  4. drops finished rows from the batch (and copies the cache to the rows left) once 1/8 of them (at least
     one) have stopped, so a step computes at most a few finished completions.
The weights are whatever each module computes in its current adapter mode (`weight_of`): the merged
delta_S weight, the split layers' forget units, the base weight under adapters_off.

Draws. Each step draws one uniform u per row of the original batch from `generator`, finished or
not, and a row samples the token where the CDF of softmax(logits / temperature) passes u. For a
given number of rows B, the other rows and dropping finished rows therefore never change which u a
row sees, and `plain` (the model's own forward on the whole sequence at every step, no cache) draws
the SAME tokens wherever the logits agree. In float64 they agree to ~1e-12 and the tokens are identical
(test_sampler.py, against a naive sampler written apart); in float32 the summation order differs by
~1e-5 in a logit, which moves a token only when u falls that close to a CDF boundary.

Other architectures (any with sliding windows, other norms or activations) use `plain` with a warning.

Shapes: U distinct prompts, B rows, P prompt tokens (left padded), T new tokens, S = P + T, H heads,
Hkv kv heads, D head dim, d hidden, V vocab.
"""
import sys

import torch
import torch.nn.functional as F

import adapter

FAST = ("llama", "qwen2", "qwen3")


def weight_of(m):
    """The (d_out, d_in) weight a no-grad forward of m applies in its current adapter mode."""
    if isinstance(m, adapter.SVDDelta):
        return m.base.weight if m.mode == "base" else m.merged()
    if isinstance(m, adapter.SplitLinearOut):
        return torch.cat([weight_of(m.retain), m.weight_forget], 0)
    if isinstance(m, adapter.SplitLinearIn):  # the forget columns count in train mode only
        Wf = m.weight_forget if m.mode == "train" else torch.zeros_like(m.weight_forget)
        return torch.cat([weight_of(m.retain), Wf], 1)
    return m.weight


def prepacked(dtype=torch.float32):
    """Whether this torch and CPU run oneDNN's prepacked linear (the op torch.compile uses on x86) in dtype."""
    ok = prepacked.__dict__.setdefault("ok", {})
    if dtype not in ok:
        try:
            W = torch.ones(2, 2, dtype=dtype)
            ok[dtype] = bool(torch.ops.mkldnn._linear_pointwise(W, torch.ops.mkldnn._reorder_linear_weight(W), None,
                                                                "none", [], "").eq(2).all())
        except (AttributeError, RuntimeError):
            ok[dtype] = False
    return ok[dtype]


class Fused:
    """Several linears on one input: x -> [x W_1^T + b_1, x W_2^T + b_2, ...], one matmul with the weights
    concatenated. On CPU in float32/bfloat16, where oneDNN runs it, they are prepacked once per sampling call;
    otherwise on CPU (float64), transposed (W^T contiguous); on a GPU, used as they are."""

    def __init__(self, mods):
        self.Ws = [weight_of(m) for m in mods]
        self.bs = [getattr(getattr(m, "base", m), "bias", None) for m in mods]
        self.packed, self.Wt, cpu = None, None, self.Ws[0].device.type == "cpu"
        if cpu and self.Ws[0].dtype in (torch.float32, torch.bfloat16) and prepacked(self.Ws[0].dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(self.Ws))  # (sum d_out, d_in)
        elif cpu:
            self.Wt = torch.cat(self.Ws).T.contiguous()                               # (d_in, sum d_out)

    def __call__(self, x):
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        elif self.Wt is not None:
            y = x @ self.Wt
        else:
            return [F.linear(x, W, b) for W, b in zip(self.Ws, self.bs)]
        return [y if b is None else y + b for y, b in zip(y.split([W.shape[0] for W in self.Ws], -1), self.bs)]


def supported(model):
    c = model.config
    return (c.model_type in FAST and c.hidden_act == "silu" and not getattr(c, "use_sliding_window", False)
            and not getattr(c, "mlp_bias", False))


def rope(x, cos, sin):
    """Rotary embedding as transformers' Llama applies it (rotate_half).  x (n, H, L, D), cos/sin (n, L, D)."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


class Decoder:
    """The model's decoder layers over a preallocated KV cache, for one sampling call."""

    def __init__(self, model, B, S):
        c, self.m = model.config, model.model
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.layers = []
        for L in self.m.layers:
            at, mlp = L.self_attn, L.mlp
            self.layers.append((L.input_layernorm, Fused([at.q_proj, at.k_proj, at.v_proj]), Fused([at.o_proj]),
                                getattr(at, "q_norm", None), getattr(at, "k_norm", None),
                                L.post_attention_layernorm, Fused([mlp.gate_proj, mlp.up_proj]),
                                Fused([mlp.down_proj])))
        w = self.m.embed_tokens.weight
        self.K = [w.new_zeros(B, self.Hkv, S, self.D) for _ in self.layers]  # (B, Hkv, S, D) per layer
        self.V = [w.new_zeros(B, self.Hkv, S, self.D) for _ in self.layers]
        self.lm_head = Fused([model.lm_head])

    def forward(self, ids, pos, keys, start, rows=None):
        """Run ids (n, L) at positions pos (n, L), writing K/V at [start, start + L) of cache rows `rows`
        (None: the first n) and attending to cache [0, start + L) where keys (n, 1, L, start + L) is True.
        -> the last position's logits (n, V)."""
        n, L = ids.shape
        rows = slice(0, n) if rows is None else rows
        x = self.m.embed_tokens(ids)                                             # (n, L, d)
        cos, sin = self.m.rotary_emb(x, pos)                                     # (n, L, D)
        for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = (t.view(n, L, -1, self.D) for t in qkv(ln1(x)))            # (n, L, H or Hkv, D)
            q, k = (qn(q) if qn else q).transpose(1, 2), (kn(k) if kn else k).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)                          # (n, H or Hkv, L, D)
            self.K[i][rows, :, start:start + L], self.V[i][rows, :, start:start + L] = k, v.transpose(1, 2)
            K, V = self.K[i][rows, :, :start + L], self.V[i][rows, :, :start + L]  # (n, Hkv, start + L, D)
            a = F.scaled_dot_product_attention(q, K, V, attn_mask=keys, enable_gqa=True)  # (n, H, L, D)
            x = x + o(a.transpose(1, 2).reshape(n, L, self.H * self.D))[0]
            g, u = gate_up(ln2(x))
            x = x + down(F.silu(g) * u)[0]
        return self.lm_head(self.m.norm(x[:, -1]))[0].float()                   # (n, V)

    def keep(self, rows, end):
        """Make the cache rows `rows` (a bool mask or indices over the rows), copying positions [0, end) alone."""
        n = int(rows.sum()) if rows.dtype == torch.bool else len(rows)
        for C in (self.K, self.V):
            for i, c in enumerate(C):
                C[i] = c.new_empty(n, *c.shape[1:])
                C[i][:, :, :end] = c[rows, :, :end]


def prefill_keys(attn, start=0):
    """The attention mask (n, 1, W - start, W) of queries at columns [start, W) of a prompt layout attn (n, W):
    causal over its real tokens; a pad query sees itself (no NaN rows)."""
    W, dev = attn.shape[1], attn.device
    q, k = torch.arange(start, W, device=dev)[:, None], torch.arange(W, device=dev)[None]
    return (attn[:, None, None, :].bool() & (k <= q)) | (k == q)


def prefix_groups(seqs, share=0.5):
    """Distinct prompts (token lists) grouped by a shared prefix, in sorted order: a prompt joins the group
    before it when it shares at least `share` of its tokens, and of the group's first prompt's, with that
    prompt (eval's five modes of one problem; a chat template's system prompt alone is too little). The
    prefix is what the members share, short of each one's last token. Prompts in no group form one group
    with an empty prefix.
    -> [(prefix length, [prompt indices])]"""
    def lcp(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    runs = []
    for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
        if runs and lcp(seqs[runs[-1][0]], seqs[i]) >= share * max(len(seqs[runs[-1][0]]), len(seqs[i])):
            runs[-1].append(i)
        else:
            runs.append([i])
    out = [(min(min(lcp(seqs[r[0]], seqs[i]), len(seqs[i]) - 1) for i in r), r) for r in runs if len(r) > 1]
    alone = [r[0] for r in runs if len(r) == 1]
    return out + ([(0, alone)] if alone else [])


def prefill(dec, seqs, P, pad):
    """Prefill the distinct prompts `seqs` into cache rows 0..U-1, each group's prefix once (prefix_groups).
    Row layout, ending at column P - 1: [pad | the group's prefix | pad | the row's suffix]. The gaps are
    masked keys and positions count real tokens only, so each row computes exactly its own prompt.
    -> the last position's logits (U, V) and the layout's real-token mask (U, P)."""
    dev = dec.K[0].device
    mask = torch.zeros(len(seqs), P, dtype=torch.bool, device=dev)
    order, logits = [], []
    for n, rows in prefix_groups(seqs):
        s = P - max(len(seqs[i]) - n for i in rows)        # the suffixes' columns [s, P), the prefix's [s - n, s)
        ids = torch.full((len(rows), P), pad, dtype=torch.long, device=dev)
        for j, i in enumerate(rows):
            suffix = seqs[i][n:]
            ids[j, s - n:s], ids[j, P - len(suffix):] = torch.tensor(seqs[i][:n]), torch.tensor(suffix)
            mask[i, s - n:s], mask[i, P - len(suffix):] = True, True
        r, m = torch.tensor(rows, device=dev), mask[rows]
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        if n:  # the prefix once, in the group's first row, then copied to the others
            dec.forward(ids[:1, s - n:s], pos[:1, s - n:s], prefill_keys(m[:1, :s], s - n), s - n, r[:1])
            for C in (dec.K, dec.V):
                for c in C:
                    c[r[1:], :, s - n:s] = c[r[:1], :, s - n:s]
        logits.append(dec.forward(ids[:, s:], pos[:, s:], prefill_keys(m, s), s, r))  # (len(rows), V)
        order += rows
    return torch.cat(logits)[torch.tensor(order, device=dev).argsort()], mask


def draw(logits, u, temperature, greedy):
    """Inverse-CDF sampling with the given uniforms: the token where cumsum(softmax) first exceeds u."""
    if greedy:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)                     # (n, V)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample(model, ids, attn, T, stops, pad, temperature=1.0, greedy=False, generator=None, plain=False):
    """Sample from B left-padded prompt rows ids/attn (B, P) -> completion ids (B, T') padded with `pad`
    after each row's first stop token, and mask (B, T'), 1 up to AND including that stop token.
    generator: one for the batch, or a list of B, one per row (a row's draws then depend on its own alone)."""
    if not plain and not supported(model):
        print(f"note: sampler: no fast path for {model.config.model_type}; full recompute (slow)", file=sys.stderr)
        plain = True
    (B, P), dev = ids.shape, ids.device
    stops = torch.tensor(stops, device=dev)
    out = torch.full((B, T), pad, dtype=torch.long, device=dev)
    mask = torch.zeros(B, T, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)                   # the original row of each batch row
    live = torch.ones(B, dtype=torch.bool, device=dev)   # batch rows that have not stopped
    if not plain:  # prefill the distinct prompts once (a shared prefix once); their rows share the K/V
        uniq, inv = torch.unique(torch.cat([ids, attn], 1), dim=0, return_inverse=True)  # row -> prompt
        dec = Decoder(model, B, P + T)
        logits, m = prefill(dec, [u[:P][u[P:].bool()].tolist() for u in uniq], P, pad)    # (U, V), (U, P)
        logits, m = logits[inv], m[inv]                                                 # (B, V), (B, P)
        dec.keep(inv, P)                               # row b's cache: its prompt's K/V
        keys = torch.cat([m, m.new_ones(B, T)], 1)     # (B, P + T): the key positions a row attends to
        cur = m.sum(-1, keepdim=True)                  # (B, 1): the next position (real tokens so far)
    U = torch.stack([torch.rand(T, generator=g, device=dev) for g in generator]) if isinstance(generator, list) \
        else None                                        # (B, T): each row's own stream
    t = -1                                               # T = 0: no step, empty completions
    for t in range(T):
        u = (torch.rand(B, generator=generator, device=dev) if U is None else U[:, t])[rows]  # one per original row
        if plain:
            seq, seq_attn = torch.cat([ids, out[:, :t]], 1), torch.cat([attn, mask[:, :t]], 1)
            p = (seq_attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=seq_attn, position_ids=p).logits[rows, -1].float()
        nxt = draw(logits, u, temperature, greedy)                                       # (n,)
        out[rows[live], t], mask[rows[live], t] = nxt[live], 1
        live &= ~torch.isin(nxt, stops)
        if not bool(live.any()) or t == T - 1:
            break
        if int((~live).sum()) >= max(1, len(rows) // 8):  # drop finished rows (a cache copy costs ~20 row-steps)
            if not plain:
                dec.keep(live, P + t)
                cur, keys = cur[live], keys[live]
            rows, nxt, live = rows[live], nxt[live], live[live]
        if not plain:
            logits = dec.forward(nxt[:, None], cur, keys[:, None, None, :P + t + 1], P + t)
            cur = cur + 1
    return out[:, :t + 1], mask[:, :t + 1]
