"""
PROBE (not adopted): sampler.py with the KV cache split in two, each distinct prompt's K/V held once
(U, Hkv, P, D) and each row's completion K/V (B, Hkv, T, D); a decode step attends to both parts and merges
them by their log-normalisers (attend, Decoder.forward). Only the Decoder differs, behind sampler.Decoder's
contract (forward, keep, K/V the cache sampler.prefill writes): `sample` is sampler.sample with it, `prefill`
sampler.prefill with the caches sized first. (ab_split.out and the profiles were measured at 0e9aa39, when
this file carried its own copy of the sampling loop; the steps are the same.) test_sampler.py's four sampling
tests pass on it (float64 tokens identical to the plain sampler, with the flash kernel and with the math
fallback: split_test.py; its other two call sampler.py's own Decoder and prepacked()). Compare with ab_split.py.
"""
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import sampler  # noqa: E402
from sampler import rope  # noqa: E402

prefix_groups = sampler.prefix_groups  # test_sampler calls it on this module
REF_DECODER, REF_PREFILL = sampler.Decoder, sampler.prefill  # the reference's; `sample` swaps them out


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


class Decoder(REF_DECODER):
    """The model's decoder layers over preallocated KV caches, for one sampling call: each distinct prompt's
    K/V once, K/V (U, Hkv, P, D), the cache sampler.prefill writes; each row's completion K/V, Kc/Vc
    (n, Hkv, T, D); prompt_of (n,) each row's prompt. prefill (below) allocates them: it knows U and P."""

    def __init__(self, model, B, S):
        super().__init__(model, 0, S)  # the reference's fused layers and lm_head; caches of 0 rows
        self.S = S

    def run(self, ids, pos, attn):
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

    def forward(self, ids, pos, keys, start, rows=None):
        """sampler.Decoder.forward's contract. Prompt columns (start < P, sampler.prefill's calls) go to the
        prompt cache's rows `rows`; a decode step (start = P + t, one token a row) attends to both caches in two
        parts of one softmax: the prompt's K/V read once for all its rows (their G H queries stacked), then the
        row's own completion K/V. A step ignores `keys`: set_rows' bias is their prompt part."""
        if start < self.P:
            rows = slice(0, ids.shape[0]) if rows is None else rows

            def attn(i, q, k, v):
                end = start + q.shape[2]
                self.K[i][rows, :, start:end], self.V[i][rows, :, start:end] = k, v
                return F.scaled_dot_product_attention(q, self.K[i][rows, :, :end], self.V[i][rows, :, :end],
                                                      attn_mask=keys, enable_gqa=True)
            return self.run(ids, pos, attn)
        U, (n, _), G, D, t = self.K[0].shape[0], ids.shape, self.H // self.Hkv, self.D, start - self.P

        def attn(i, q, k, v):
            self.Kc[i][:, :, t:t + 1], self.Vc[i][:, :, t:t + 1] = k, v
            qs = q.new_zeros(U, self.R, self.H, D)
            qs[self.prompt_of, self.slot] = q[:, :, 0]
            qs = qs.view(U, self.R, self.Hkv, G, D).transpose(1, 2).reshape(U, self.Hkv, self.R * G, D)
            a1, l1 = attend(qs, self.K[i], self.V[i], self.bias)                  # (U, Hkv, R G, D), (U, Hkv, R G)
            a1 = a1.view(U, self.Hkv, self.R, G, D).transpose(1, 2)[self.prompt_of, self.slot]  # (n, Hkv, G, D)
            l1 = l1.view(U, self.Hkv, self.R, G).transpose(1, 2)[self.prompt_of, self.slot, ..., None]
            a2, l2 = attend(q.reshape(n, self.Hkv, G, D), self.Kc[i][:, :, :t + 1], self.Vc[i][:, :, :t + 1])
            l2 = l2[..., None]
            lse = torch.logaddexp(l1, l2)                                         # (n, Hkv, G, 1)
            return (a1 * (l1 - lse).exp() + a2 * (l2 - lse).exp()).view(n, self.H, 1, D)
        return self.run(ids, pos, attn)

    def set_rows(self, prompt_of, prompt_mask):
        """The batch's rows: prompt_of (n,) each row's prompt, prompt_mask (U, P) the prompts' real tokens.
        A step stacks each prompt's rows' queries, slot = the row's rank among its prompt's rows."""
        self.prompt_of = prompt_of
        self.slot = (prompt_of[:, None] == prompt_of[None]).tril(-1).sum(1)                  # (n,)
        self.R = int(self.slot.max()) + 1
        self.bias = torch.zeros(prompt_mask.shape, dtype=self.K[0].dtype, device=prompt_mask.device
                                ).masked_fill(~prompt_mask.bool(), float("-inf"))[:, None, None]  # (U, 1, 1, P)

    def keep(self, rows, end):
        """sampler.Decoder.keep's contract: rows (a bool mask or indices over the rows) stay, completion columns
        [0, end - P) copied alone (sampler.Decoder.keep on Kc/Vc); prompts with no row left leave the prompt cache."""
        REF_DECODER.keep(types.SimpleNamespace(K=self.Kc, V=self.Vc), rows, end - self.P)
        used, prompt_of = self.prompt_of[rows].unique(return_inverse=True)
        if len(used) < self.K[0].shape[0]:
            self.K, self.V = [c[used] for c in self.K], [c[used] for c in self.V]
        self.set_rows(prompt_of, self.bias[used, 0, 0] == 0)


def prefill(dec, seqs, P, pad):
    """sampler.prefill, the caches allocated first: U = len(seqs) prompt rows of P columns, and U completion
    rows (sampler.sample's keep(inv, P) makes them its B) of S - P columns; row u is prompt u."""
    w, dec.P = dec.m.embed_tokens.weight, P
    dec.K, dec.V = ([w.new_zeros(len(seqs), dec.Hkv, P, dec.D) for _ in dec.layers] for _ in "KV")
    dec.Kc, dec.Vc = ([w.new_zeros(len(seqs), dec.Hkv, dec.S - P, dec.D) for _ in dec.layers] for _ in "KV")
    logits, m = REF_PREFILL(dec, seqs, P, pad)
    dec.set_rows(torch.arange(len(seqs), device=m.device), m)
    return logits, m


def sample(*args, **kwargs):
    """sampler.sample with this module's Decoder and prefill."""
    saved = sampler.Decoder, sampler.prefill
    sampler.Decoder, sampler.prefill = Decoder, prefill
    try:
        return sampler.sample(*args, **kwargs)
    finally:
        sampler.Decoder, sampler.prefill = saved
