"""
PROBE (not adopted): sampler.py at 0e9aa39 with the KV cache split in two, each distinct prompt's K/V held
once (U, Hkv, P, D) and each row's completion K/V (B, Hkv, T, D); a decode step attends to both parts and
merges them by their log-normalisers (attend, Decoder.step). Only what differs is here: Decoder, prefill
(sampler.prefill on the prompt cache) and sample; the rest is sampler.py's. test_sampler.py's four sampling
tests pass on it (float64 tokens identical to the plain sampler, with the flash kernel and with the math
fallback: split_test.py; its other two call sampler.py's own Decoder and prepacked()). Compare with ab_split.py.
"""
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import sampler  # noqa: E402
from sampler import Fused, draw, rope, supported  # noqa: E402

prefix_groups = sampler.prefix_groups  # test_sampler calls it on this module


def flash():
    """Whether this torch has its CPU flash-attention kernel as an op that also returns the log-normaliser."""
    if not hasattr(flash, "ok"):
        flash.ok = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return flash.ok


def attend(q, K, V, bias=None):
    """softmax(s) V with s = q K^T / sqrt(D) + bias, and its log-normaliser logsumexp(s) (..., Lq): two parts of
    one softmax merge exactly by their log-normalisers. On CPU, torch's fused kernel (the one
    F.scaled_dot_product_attention runs there) returns both.  q (n, h, Lq, D), K/V (n, h, Lk, D)."""
    if q.device.type == "cpu" and flash():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, K, V, attn_mask=bias)
    s = q @ K.transpose(-1, -2) * q.shape[-1] ** -0.5 + (0 if bias is None else bias)  # (n, h, Lq, Lk)
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp() @ V, lse


class Decoder:
    """The model's decoder layers over preallocated KV caches, for one sampling call: each distinct prompt's
    K/V once, Kp/Vp (U, Hkv, P, D), and each row's completion K/V, K/V (B, Hkv, T, D)."""

    def __init__(self, model, U, B, P, T):
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
        self.Kp, self.Vp = ([w.new_zeros(U, self.Hkv, P, self.D) for _ in self.layers] for _ in "KV")
        self.K, self.V = ([w.new_zeros(B, self.Hkv, T, self.D) for _ in self.layers] for _ in "KV")
        self.lm_head = Fused([model.lm_head])

    def forward(self, ids, pos, attn):
        """Run ids (n, L) at positions pos (n, L), attention by attn(layer, q, k, v) -> (n, H, L, D) with
        q (n, H, L, D) and k, v (n, Hkv, L, D) -> the last position's logits (n, V)."""
        n, L = ids.shape
        x = self.m.embed_tokens(ids)                                             # (n, L, d)
        cos, sin = self.m.rotary_emb(x, pos)                                     # (n, L, D)
        for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
            q, k, v = (t.view(n, L, -1, self.D) for t in qkv(ln1(x)))            # (n, L, H or Hkv, D)
            q, k = (qn(q) if qn else q).transpose(1, 2), (kn(k) if kn else k).transpose(1, 2)
            a = attn(i, rope(q, cos, sin), rope(k, cos, sin), v.transpose(1, 2))    # (n, H, L, D)
            x = x + o(a.transpose(1, 2).reshape(n, L, self.H * self.D))[0]
            g, u = gate_up(ln2(x))
            x = x + down(F.silu(g) * u)[0]
        return self.lm_head(self.m.norm(x[:, -1]))[0].float()                   # (n, V)

    def prefill(self, ids, pos, keys, start, rows=None):
        """Prompt tokens: write K/V at [start, start + L) of prompt rows `rows` (None: the first n) and attend
        to [0, start + L) where keys (n, 1, L, start + L) is True."""
        rows = slice(0, ids.shape[0]) if rows is None else rows

        def attn(i, q, k, v):
            end = start + q.shape[2]
            self.Kp[i][rows, :, start:end], self.Vp[i][rows, :, start:end] = k, v
            return F.scaled_dot_product_attention(q, self.Kp[i][rows, :, :end], self.Vp[i][rows, :, :end],
                                                  attn_mask=keys, enable_gqa=True)
        return self.forward(ids, pos, attn)

    def set_rows(self, prompt_of, prompt_mask):
        """The batch's rows: prompt_of (n,) each row's prompt, prompt_mask (U, P) the prompts' real tokens.
        A step stacks each prompt's rows' queries, slot = the row's rank among its prompt's rows."""
        self.prompt_of = prompt_of
        self.slot = (prompt_of[:, None] == prompt_of[None]).tril(-1).sum(1)                  # (n,)
        self.R = int(self.slot.max()) + 1
        self.bias = torch.zeros(prompt_mask.shape, dtype=self.Kp[0].dtype, device=prompt_mask.device
                                ).masked_fill(~prompt_mask.bool(), float("-inf"))[:, None, None]  # (U, 1, 1, P)

    def step(self, ids, pos, t):
        """One token per row, ids (n, 1), at completion column t. Attention in two parts of one softmax: the
        prompt's K/V read once for all its rows (their G H queries stacked), the row's own completion K/V."""
        U, (n, _), G, D = self.Kp[0].shape[0], ids.shape, self.H // self.Hkv, self.D

        def attn(i, q, k, v):
            self.K[i][:, :, t:t + 1], self.V[i][:, :, t:t + 1] = k, v
            qs = q.new_zeros(U, self.R, self.H, D)
            qs[self.prompt_of, self.slot] = q[:, :, 0]
            qs = qs.view(U, self.R, self.Hkv, G, D).transpose(1, 2).reshape(U, self.Hkv, self.R * G, D)
            a1, l1 = attend(qs, self.Kp[i], self.Vp[i], self.bias)                # (U, Hkv, R G, D), (U, Hkv, R G)
            a1 = a1.view(U, self.Hkv, self.R, G, D).transpose(1, 2)[self.prompt_of, self.slot]  # (n, Hkv, G, D)
            l1 = l1.view(U, self.Hkv, self.R, G).transpose(1, 2)[self.prompt_of, self.slot, ..., None]
            a2, l2 = attend(q.reshape(n, self.Hkv, G, D), self.K[i][:, :, :t + 1], self.V[i][:, :, :t + 1])
            l2 = l2[..., None]
            lse = torch.logaddexp(l1, l2)                                         # (n, Hkv, G, 1)
            return (a1 * (l1 - lse).exp() + a2 * (l2 - lse).exp()).view(n, self.H, 1, D)
        return self.forward(ids, pos, attn)

    def keep(self, live, t):
        """Keep only rows `live` (bool over the rows), copying completion columns [0, t) alone; prompts with no
        row left leave the prompt cache."""
        for C in (self.K, self.V):
            for i, c in enumerate(C):
                C[i] = c.new_empty(int(live.sum()), *c.shape[1:])
                C[i][:, :, :t] = c[live, :, :t]
        used, prompt_of = self.prompt_of[live].unique(return_inverse=True)
        if len(used) < self.Kp[0].shape[0]:
            self.Kp, self.Vp = [c[used] for c in self.Kp], [c[used] for c in self.Vp]
        self.set_rows(prompt_of, self.bias[used, 0, 0] == 0)


def prefill(dec, seqs, P, pad):
    """sampler.prefill into the prompt cache: the same layout and forwards, with Decoder.prefill as the forward
    and Kp/Vp as the cache (U rows, one per distinct prompt)."""
    return sampler.prefill(types.SimpleNamespace(K=dec.Kp, V=dec.Vp, forward=dec.prefill), seqs, P, pad)


@torch.no_grad()
def sample(model, ids, attn, T, stops, pad, temperature=1.0, greedy=False, generator=None, plain=False):
    """Sample from B left-padded prompt rows ids/attn (B, P) -> completion ids (B, T') padded with `pad`
    after each row's first stop token, and mask (B, T'), 1 up to AND including that stop token."""
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
        dec = Decoder(model, len(uniq), B, P, T)
        logits, m = prefill(dec, [u[:P][u[P:].bool()].tolist() for u in uniq], P, pad)    # (U, V), (U, P)
        dec.set_rows(inv, m)
        logits, cur = logits[inv], m.sum(-1, keepdim=True)[inv]  # (B, V); (B, 1): the next position
    for t in range(T):
        u = torch.rand(B, generator=generator, device=dev)[rows]  # one per original row, always (docstring)
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
                dec.keep(live, t)
                cur = cur[live]
            rows, nxt, live = rows[live], nxt[live], live[live]
        if not plain:
            logits = dec.step(nxt[:, None], cur, t)
            cur = cur + 1
    return out[:, :t + 1], mask[:, :t + 1]
