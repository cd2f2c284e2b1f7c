"""
v_hack: the hack direction of every wrapped delta_S module, from a few contrast pairs.

vGROUT (wassname), route2: a pair is one prompt answered twice, once by a hack and once honestly,
matched in everything but the trait (data/pairs.jsonl). Per module, in delta_S's coordinates:
    v_grad = top-k right singular vectors of the stacked differences
             grad log p(clean) - grad log p(hack)                          (p pairs, r) -> (k, r)
    v_act  = unit mean activation difference  mean(z_hack - z_clean)       (r,)
with log p the mean over the completion's tokens (length neutral), and z = x Vh^T. The gradients
come from routing.Capture, one backward per batch. The band (lo, hi) that the grad router maps
cosines through is the mean cos_b of the clean sides and of the hack sides, each scored as a
rollout with A = +1. vGROUT reports the band width on held-out pairs as +0.289 for the real
direction against -0.014 for a random one; `holdout_report` measures the same here.

Variant B (--adapter vhack, set_vhack_axes): routing within delta_S along the v_hack axes. Each
module's quarantine becomes c (k,) on the axes A = v_grad^T (r, k), s = s_keep + A c, so a routed
gradient can only move s along the hack direction; deleting c deletes exactly that.

Deviations: 1. each axis is oriented so the mean difference projects positively (an SVD's sign is
arbitrary); 2. a direction that does not separate the pairs even in-sample gets a band of width
1e-3 (a step), never a division by zero.

Shapes: p pairs, r delta_S rank, k axes, M modules.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import adapter
import grpo
from model import chat_prompt, encode
from routing import Capture, rollout_cos


@dataclass
class VHack:
    v_grad: dict                # name -> (k, r) orthonormal rows along grad log p(clean) - grad log p(hack)
    v_act: dict                 # name -> (r,) unit mean activation difference, hack - clean
    band: tuple = (0.0, 1.0)    # (lo, hi) of cos_b, calibrated on the pairs
    report: dict = field(default_factory=dict)

    def save(self, path):
        """Tensors, then the json last and atomic: its presence marks a whole save."""
        save_file({f"{n}.{kind}": v.contiguous().cpu() for kind in ("v_grad", "v_act")
                   for n, v in getattr(self, kind).items()}, path + ".safetensors")
        with open(path + ".json.tmp", "w") as fh:
            json.dump({"band": self.band, "report": self.report}, fh, indent=1)
        os.replace(path + ".json.tmp", path + ".json")

    @classmethod
    def load(cls, path):
        t, meta = load_file(path + ".safetensors"), json.load(open(path + ".json"))

        def pick(kind):
            return {k.rpartition(".")[0]: v for k, v in t.items() if k.endswith("." + kind)}

        return cls(pick("v_grad"), pick("v_act"), tuple(meta["band"]), meta["report"])


def side_grads(model, tok, prompts, comps, batch):
    """-grad mean_t log p(completion) and mean_t z per completion, {name: (p, r)}: one backward per batch."""
    with (cap := Capture(model, len(comps))):
        for i in range(0, len(comps), batch):
            r = encode(tok, prompts[i:i + batch], comps[i:i + batch], next(model.parameters()).device)
            m = r.completion_mask.float()                                      # (b, T)
            cap.rows(torch.arange(i, i + len(m)), torch.cat([torch.zeros_like(r.prompt_mask).float(), m], 1))
            (-(grpo.token_logp(model, r) * m).sum(1) / m.sum(1)).sum().backward()  # logp: (b, T)
    svd = {n: s for n, s in cap.slots.items() if isinstance(s.mod, adapter.SVDDelta)}
    return {n: s.g for n, s in svd.items()}, {n: s.act for n, s in svd.items()}


def top_axes(D, k):
    """Top-k right singular vectors of the differences D (p, r), oriented: D.mean(0) projects > 0."""
    V = torch.linalg.svd(D, full_matrices=False).Vh[:k]                       # (k, r)
    return V * torch.where(V @ D.mean(0) < 0, -1.0, 1.0)[:, None]


def band_of(gh, gc, idx, vh):
    """(lo, hi) = mean cos_b of the clean sides, of the hack sides, over pairs idx (A = +1 rollouts)."""
    def cos(G):
        return rollout_cos({n: g[idx] for n, g in G.items()}, vh).mean().item()
    return cos(gc), cos(gh)


def holdout_report(gh, gc, ah, ac, tr, ho, vh, seed):
    """How v_hack holds out: per-module alignment, and the band width against a random direction."""
    rep = {"n_train": len(tr), "n_held": len(ho), "band_train": vh.band[1] - vh.band[0]}
    if len(ho) == 0:
        return rep

    def cos(a, v):
        return a @ v / (a.norm(dim=-1) * v.norm() + 1e-12)

    align = torch.stack([cos(gh[n][ho] - gc[n][ho], vh.v_grad[n][0]).mean() for n in gh])  # (M,)
    act = torch.stack([cos((ah[n][ho] - ac[n][ho]).mean(0), vh.v_act[n]) for n in ah])     # (M,)
    gen = torch.Generator().manual_seed(seed + 1)
    rnd = VHack({n: F.normalize(torch.randn(1, v.shape[1], generator=gen), dim=1) for n, v in vh.v_grad.items()}, {})
    (lo, hi), (rlo, rhi) = band_of(gh, gc, ho, vh), band_of(gh, gc, ho, rnd)
    return {**rep, "align_frac": (align > 0).float().mean().item(), "align_median": align.median().item(),
            "band_real": hi - lo, "band_random": rhi - rlo, "act_align_frac": (act > 0).float().mean().item()}


def vhack_key(model, pairs, *args):
    """Cache key: the pairs, the arguments, the model, its wrapped modules' bases and current values."""
    state = adapter.adapter_state(model) | {n: m.S for n, m in adapter.adapter_modules(model, adapter.SVDDelta).items()}
    sums = [f"{n}:{t.double().abs().sum().item():.8e}" for n, t in sorted(state.items())]
    return hashlib.sha1(json.dumps([pairs, args, model.config.name_or_path, sums]).encode()).hexdigest()[:16]


def random_axes(D, k, gen):
    """The placebo's axes: k random orthonormal directions (k, r), oriented as top_axes orients its own."""
    V = torch.linalg.qr(torch.randn(D.shape[1], k, generator=gen)).Q.T.to(D)            # (k, r)
    return V * torch.where(V @ D.mean(0) < 0, -1.0, 1.0)[:, None]


def extract_vhack(model, tok, pairs, k=1, holdout=0.25, seed=0, batch=8, cache_dir=None, placebo=False):
    """v_hack of every wrapped delta_S module from contrast pairs {prompt, hack, clean}. placebo: random
    axes and v_act (seeded), oriented and band-calibrated on the same pairs, for the placebo router."""
    empty = [(i, s) for i, p in enumerate(pairs) for s in ("hack", "clean")
             if not tok(p[s], add_special_tokens=False).input_ids]
    if empty:
        raise ValueError("extract_vhack: pair %d has a %s completion that tokenizes to nothing" % empty[0])
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n_ho = min(round(holdout * len(pairs)), len(pairs) - 1)  # >= 1 pair to extract from
    ho, tr = perm[:n_ho], perm[n_ho:]
    if not 1 <= k <= len(tr):
        raise ValueError(f"extract_vhack: k={k} axes need 1 <= k <= {len(tr)} extraction pairs "
                         f"({len(pairs)} pairs, holdout={holdout})")
    args = (k, holdout, seed) + (("placebo",) if placebo else ())
    path = cache_dir and os.path.join(cache_dir, "vhack-" + vhack_key(model, pairs, *args))
    if path and os.path.exists(path + ".json"):
        return VHack.load(path)
    prompts = [p["prompt"] if "<|im_start|>" in p["prompt"] else chat_prompt(tok, p["prompt"]) for p in pairs]
    gh, ah = side_grads(model, tok, prompts, [p["hack"] for p in pairs], batch)
    gc, ac = side_grads(model, tok, prompts, [p["clean"] for p in pairs], batch)
    # g = -grad log p, so grad log p(clean) - grad log p(hack) = g_hack - g_clean
    vh = VHack({n: top_axes(gh[n][tr] - gc[n][tr], k) for n in gh},
               {n: F.normalize((ah[n][tr] - ac[n][tr]).mean(0), dim=0) for n in ah})  # (k, r), (r,)
    if placebo:
        gen = torch.Generator().manual_seed(seed + 2)
        vh = VHack({n: random_axes(gh[n][tr] - gc[n][tr], k, gen) for n in sorted(gh)},
                   {n: F.normalize(torch.randn(ah[n].shape[1], generator=gen), dim=0) for n in sorted(ah)})
    lo, hi = band_of(gh, gc, tr, vh)
    vh.band = (lo, max(hi, lo + 1e-3))  # deviation 2
    vh.report = holdout_report(gh, gc, ah, ac, tr, ho, vh, seed)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        vh.save(path)
    return vh


def install_axes(m, A):
    """Quarantine of m := span(A), A (r, k): s_quar becomes c (k,) and s = s_keep + A c."""
    old = m.s_quar.detach() if m.quar_axes is None else m.quar_axes @ m.s_quar.detach()  # (r,)
    m.quar_axes = A.to(m.S)
    m.s_quar = torch.nn.Parameter(m.quar_axes.T @ old)  # (k,): the on-axis part of any old s_quar


@torch.no_grad()
def set_vhack_axes(model, vh):
    """Variant B: the quarantine = the v_hack axes of delta_S. Build the optimizer after."""
    for name, m in adapter.adapter_modules(model, adapter.SVDDelta).items():
        if m.s_quar is not None:
            install_axes(m, vh.v_grad[name].T)  # v_grad (k, r) orthonormal rows -> A (r, k)


if __name__ == "__main__":
    # Self-check (tiny Qwen3): per-rollout gradients from padded micro-batches of 3, reduced by the hooks
    # in one backward each, equal plain autograd run on one rollout at a time; max relative error.
    import detector
    from model import load_model
    model, tok = load_model("tiny")
    adapter.wrap(model, "svd")
    pairs = detector.load_pairs()[:8]
    prompts, comps = [chat_prompt(tok, p["prompt"]) for p in pairs], [p["hack"] for p in pairs]
    g, err, mods = side_grads(model, tok, prompts, comps, batch=3)[0], [], adapter.adapter_modules(model)
    for b in range(8):  # the reference: plain autograd, one unpadded rollout at a time
        model.zero_grad()
        r = encode(tok, prompts[b:b + 1], comps[b:b + 1])
        (-grpo.token_logp(model, r).mean()).backward()
        err += [((g[n][b] - m.s_keep.grad).norm() / m.s_keep.grad.norm()).item() for n, m in mods.items()]
    print(f"v_hack hold-out {json.dumps(extract_vhack(model, tok, pairs).report)}")
    print(f"max rel |one backward - per-rollout autograd| = {max(err):.1e}")
    assert max(err) < 1e-5
