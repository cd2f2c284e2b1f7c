"""
Routers: the share f of each rollout's gradient that goes to the quarantine (DESIGN.md §7); v_hack.

Cloud et al. 2024 (Gradient Routing, arXiv 2410.04332): out = m*a + (1-m)*a.detach(), a mask steers
the backward only. SGTM (Shilov, Cloud et al. 2025, arXiv 2512.05648): m = a noisy per-example label
(`label`), parameter masking after the backward. vGROUT (wassname): v_hack, route2-act, route2-grad.

Module m, rollout b, position l; z = x Vh^T (delta_S coordinates), dh = dL/d(z * s):
  g_b = sum_l z_bl * dh_bl              per-rollout gradient of s, reduced by hooks in ONE backward
  cos_b = mean_m cos(g_bm, v_m)         v_m = sum of module m's k oriented v_grad axes
  f_b = clamp((cos_b - lo)/(hi - lo), 0, 1)  (grad; label: f_b = flag_b; none, act, erase: 0)
  keep.grad = sum_b (1 - f_b) g_b,  quarantine.grad = sum_b f_b g'_b   (g'_b: the quarantine's own)
  act: per token f_bl = [cos(z_bl, v_act) > tau] inside the backward; erase: keep.grad (I - V^T V)
Sign: the loss is -A log p, so g_b = -A_b grad log p(o_b), and v_grad points along grad log p(clean)
- grad log p(hack): a hack with A > 0 (the update that teaches it) has cos_b > 0 and is routed, with
A < 0 (un-teaching it) it stays in keep. Band: the pairs as A = +1 rollouts, lo/hi = clean/hack mean.

Contract with update.py (train_update); f reads flags, v_hack and the captured gradients only, never the oracle:
    vh = routing.extract_vhack(model, tok, pairs, k=1, cache_dir=M.CACHE)   # after adapter.wrap
    cap = routing.Capture(model, n_rollouts=B, router="grad", vhack=vh, flags=flags, opts={})
    with cap:                                   # adapter params get no autograd .grad in here
        for rows in microbatches:               # LongTensor of global rollout indices
            cap.rows(rows)
            logp = grpo.token_logp(model, sub)   # sub = the rollouts `rows`, any padding
            grpo.grpo_loss(logp, logp.detach(), adv[rows], mask, norm).sum().backward()
    stats = cap.route()   # adds to keep & quarantine .grad; {routed, qmass, cos_mean}; cap.f, cap.cos
opts (OPTS): flagged_only (grad routes flagged rollouts only), act_threshold (tau), band (lo, hi).

Deviations:
  1. Parameter-gradient routing after the backward (SGTM's parameter masking), not activation
     detach: the same parameter gradients for a per-rollout f, and f may depend on the gradient.
  2. One f per rollout: the per-module cosines are averaged (every module votes equally).
  3. v_grad from mean-over-token log-probs (length neutral); g_b is a token sum (cosine: scale-free).
  4. act routes per module and position (prompt too); tau = 0 reproduces route2-act's over-routing.
  5. kind="split": the keep delta_S has no s_quar (its f share is dropped); forget units get only theirs.

Shapes: n rollouts in the step, b in a micro-batch, L positions, r delta_S rank, k v_hack axes, M modules.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import adapter
import grpo
from model import chat_prompt, encode

OPTS = {"flagged_only": False, "act_threshold": 0.0, "band": None}


@dataclass
class VHack:
    v_grad: dict                # name -> (k, r) orthonormal rows along grad log p(clean) - grad log p(hack)
    v_act: dict                 # name -> (r,) unit mean activation difference, hack - clean
    band: tuple = (0.0, 1.0)    # (lo, hi) of cos_b, calibrated on the pairs
    report: dict = field(default_factory=dict)

    def save(self, path):  # the json last and atomic: its presence marks a whole save
        save_file({f"{n}.{kind}": v.contiguous().cpu() for kind in ("v_grad", "v_act")
                   for n, v in getattr(self, kind).items()}, path + ".safetensors")
        with open(path + ".json.tmp", "w") as fh:
            json.dump({"band": self.band, "report": self.report}, fh, indent=1)
        os.replace(path + ".json.tmp", path + ".json")

    @classmethod
    def load(cls, path):
        t, meta = load_file(path + ".safetensors"), json.load(open(path + ".json"))
        pick = lambda kind: {k.rpartition(".")[0]: v for k, v in t.items() if k.endswith("." + kind)}
        return cls(pick("v_grad"), pick("v_act"), tuple(meta["band"]), meta["report"])


class Slot:
    """One adapter module's per-rollout gradient sums over the step, reduced by hooks in the backward."""

    def __init__(self, cap, mod, v_act=None, partner=None):
        self.cap, self.mod, self.v_act, self.partner = cap, mod, v_act, partner
        self.g = self.gt = self.act = self.f_tok = self.tok = None  # tok (n, 2): act's routed / carrying

    def scale(self, z, s):
        """h = z * s of SVDDelta; the hook on h keeps g_b = sum_l z_bl * dh_bl  (b, r)."""
        rows, zd = self.cap.cur_rows, z.detach()
        f = self.f_tok = None if self.v_act is None else act_token_f(zd, self.v_act, self.cap.opts)
        if self.cap.act_mask is not None:  # extraction: mean of z over each completion's tokens
            m = self.cap.act_mask.to(zd)                                   # (b, L)
            self.act = self.acc(self.act, rows, torch.einsum("bl,blr->br", m, zd) / m.sum(1, keepdim=True))
        def hook(dh):
            c = zd * dh                                                    # (b, L, r) shares of ds
            self.add(rows, c.sum(1), None if f is None else torch.einsum("bl,blr->br", f, c))  # (b, r)
            if f is not None:  # how many gradient-carrying positions the act router routed
                carry = dh.ne(0).any(-1).to(f)                             # (b, L)
                self.tok = self.acc(self.tok, rows, torch.stack([(f * carry).sum(1), carry.sum(1)], 1))
        h = z * s.detach().requires_grad_()  # same value; autograd never writes s_keep/s_quar .grad
        if h.requires_grad:  # False in the no-grad pass of reentrant gradient checkpointing
            h.register_hook(hook)
        return h

    def linear(self, x, Wf):
        """x Wf^T of the forget units; the hook on y keeps G_b = sum_l dy_bl^T x_bl  (b, d_out, d_in)."""
        rows, xd, f = self.cap.cur_rows, x.detach(), self.partner.f_tok  # token f of the retain delta
        y = x @ Wf.detach().requires_grad_().T
        if y.requires_grad:
            y.register_hook(lambda dy: self.add(rows, torch.einsum("blo,bli->boi", dy, xd),
                                                None if f is None else torch.einsum("bl,blo,bli->boi", f, dy, xd)))
        return y

    def acc(self, buf, rows, v):  # buf[rows] += v, buf (n, ...) created on first use
        buf = v.new_zeros((self.cap.n,) + v.shape[1:]) if buf is None else buf
        return buf.index_put_((rows.to(v.device),), v, accumulate=True)

    def add(self, rows, g, gt):  # gt: the token-routed part of g (act router), else None
        self.g, self.gt = self.acc(self.g, rows, g), self.gt if gt is None else self.acc(self.gt, rows, gt)


def act_token_f(z, v_act, opts):
    """route2-act: f_bl = [cos(z_bl, v_act) > tau]  (b, L)."""
    return (z @ v_act.to(z) / (z.norm(dim=-1) * v_act.norm() + 1e-12) > opts["act_threshold"]).to(z)

def rollout_cos(G, vh):
    """cos_b = mean_m cos(g_bm, v_m), v_m = sum of the k oriented axes of module m.  (n,)"""
    cs = [g @ vh.v_grad[n].sum(0).to(g) / (g.norm(dim=1) * vh.v_grad[n].sum(0).norm() + 1e-12) for n, g in G.items()]
    return torch.stack(cs).mean(0)                                         # (M, n) -> (n,)

def route_none(cos, flags, band, opts):
    return torch.zeros_like(cos)

def route_label(cos, flags, band, opts):
    return flags.to(cos)

def route_grad(cos, flags, band, opts):
    lo, hi = opts["band"] or band
    f = ((cos - lo) / (hi - lo)).clamp(0, 1)
    return f * flags.to(f) if opts["flagged_only"] else f

def erase_vhack(g, V):
    """The kept gradient without its v_hack component: (I - V^T V) g, V (k, r) orthonormal rows."""
    return g - (g @ V.T.to(g)) @ V.to(g)

# act routes per token inside the backward and erase projects the kept gradient: no per-rollout f
ROUTERS = {"none": route_none, "label": route_label, "act": route_none, "grad": route_grad, "erase": route_none}
TOKEN_ROUTERS, KEEP_PROJECTIONS = {"act"}, {"erase": erase_vhack}


class Capture:
    """Per-rollout gradients from one backward, then route(); the contract is in the module docstring."""

    def __init__(self, model, n_rollouts, router="none", vhack=None, flags=None, opts=None):
        if router not in ROUTERS or (router in ("act", "grad", "erase") and vhack is None):
            raise ValueError(f"Capture: router must be one of {sorted(ROUTERS)} (got {router!r}); act, grad and "
                             "erase need a vhack (routing.extract_vhack)")
        self.mods = adapter.adapter_modules(model)
        if not self.mods:
            raise ValueError("routing: the model has no adapters; call adapter.wrap first")
        self.n, self.router, self.vh, self.opts = n_rollouts, router, vhack, {**OPTS, **(opts or {})}
        self.flags = torch.zeros(n_rollouts, dtype=torch.bool) if flags is None else torch.as_tensor(flags).bool()
        self.cur_rows, self.act_mask, self.seen = None, None, torch.zeros(n_rollouts, dtype=torch.bool)
        svd = {n: m for n, m in self.mods.items() if isinstance(m, adapter.SVDDelta)}
        self.slots = {n: Slot(self, m, vhack.v_act[n] if router in TOKEN_ROUTERS else None) for n, m in svd.items()}
        self.slots |= {n: Slot(self, m, partner=self.slots[n + ".retain"]) for n, m in self.mods.items() if n not in svd}

    def __enter__(self):
        for n, m in self.mods.items():
            m.slot = self.slots[n]
        return self

    def __exit__(self, *exc):
        for m in self.mods.values():
            m.slot = None

    def rows(self, rows, act_mask=None):
        """Global rollout indices of the next micro-batch (and for extraction a (b, L) token mask)."""
        self.cur_rows, self.act_mask = torch.as_tensor(rows, dtype=torch.long), act_mask
        self.seen[self.cur_rows] = True  # stats cover these only (train.py skips zero-advantage groups)

    @torch.no_grad()
    def route(self):
        """Add keep / quarantine .grad from the captured per-rollout gradients; returns the stats."""
        done = {n: s for n, s in self.slots.items() if s.g is not None}  # none if every loss was skipped
        G = {n: s.g for n, s in done.items() if isinstance(s.mod, adapter.SVDDelta)}
        self.cos = rollout_cos(G, self.vh) if self.vh and G else torch.full((self.n,), math.nan)
        self.f = ROUTERS[self.router](self.cos, self.flags, self.vh.band if self.vh else (0, 1), self.opts)
        project, norms = KEEP_PROJECTIONS.get(self.router, lambda g, V: g), [(0.0, 0.0)]
        for name, s in done.items():
            f, gt = self.f.to(s.g), torch.zeros_like(s.g) if s.gt is None else s.gt  # gt: token-routed
            keep = torch.einsum("b,b...->...", 1 - f, s.g - gt)                # summed over rollouts
            V = self.vh.v_grad.get(name) if self.vh else None                # None for forget units
            quar = torch.einsum("b,b...->...", f, s.g - gt) + gt.sum(0)
            norms.append(write_grads(s.mod, keep if V is None else project(keep, V), quar))
        keep2, quar2 = map(sum, zip(*norms))
        tok = sum(s.tok.sum(0) for s in self.slots.values() if s.tok is not None)  # (2,) routed, carrying
        routed = tok[0] / tok[1] if self.router in TOKEN_ROUTERS and torch.is_tensor(tok) else self.f[self.seen].mean()
        cos_mean = self.cos[self.seen].mean().item()
        return {"routed": routed.item(), "qmass": quar2 / max(keep2 + quar2, 1e-30),
                "cos_mean": None if math.isnan(cos_mean) else cos_mean}


def write_grads(mod, keep, quar):
    """keep -> s_keep; quar -> s_quar (its v_hack axes in variant B) or the forget units. A share with
    no parameter to go to is dropped (deviation 5). Returns the squared norms written."""
    axes, norms = getattr(mod, "quar_axes", None), []
    for p, g in ((getattr(mod, "s_keep", None), keep),
                 (getattr(mod, "weight_forget", getattr(mod, "s_quar", None)), quar if axes is None else quar @ axes)):
        if p is not None:
            p.grad = g.to(p) if p.grad is None else p.grad + g.to(p)
        norms.append(0.0 if p is None else g.square().sum().item())
    return norms

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
    cos = lambda G: rollout_cos({n: g[idx] for n, g in G.items()}, vh).mean().item()
    return cos(gc), cos(gh)

def holdout_report(gh, gc, ah, ac, tr, ho, vh, seed):
    """How v_hack holds out: per-module alignment, and the band width against a random direction."""
    rep = {"n_train": len(tr), "n_held": len(ho), "band_train": vh.band[1] - vh.band[0]}
    if len(ho) == 0:
        return rep
    cos = lambda a, v: a @ v / (a.norm(dim=-1) * v.norm() + 1e-12)
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

def extract_vhack(model, tok, pairs, k=1, holdout=0.25, seed=0, batch=8, cache_dir=None):
    """v_hack of every wrapped delta_S module from contrast pairs {prompt, hack, clean}."""
    empty = [(i, s) for i, p in enumerate(pairs) for s in ("hack", "clean")
             if not tok(p[s], add_special_tokens=False).input_ids]
    if empty:
        raise ValueError("extract_vhack: pair %d has a %s completion that tokenizes to nothing" % empty[0])
    perm, n_ho = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)), round(holdout * len(pairs))
    ho, tr = perm[:min(n_ho, len(pairs) - 1)], perm[min(n_ho, len(pairs) - 1):]  # >= 1 pair to extract from
    if not 1 <= k <= len(tr):
        raise ValueError(f"extract_vhack: k={k} axes need 1 <= k <= {len(tr)} extraction pairs "
                         f"({len(pairs)} pairs, holdout={holdout})")
    path = cache_dir and os.path.join(cache_dir, "vhack-" + vhack_key(model, pairs, k, holdout, seed))
    if path and os.path.exists(path + ".json"):
        return VHack.load(path)
    prompts = [p["prompt"] if "<|im_start|>" in p["prompt"] else chat_prompt(tok, p["prompt"]) for p in pairs]
    gh, ah = side_grads(model, tok, prompts, [p["hack"] for p in pairs], batch)
    gc, ac = side_grads(model, tok, prompts, [p["clean"] for p in pairs], batch)
    # g = -grad log p, so grad log p(clean) - grad log p(hack) = g_hack - g_clean
    vh = VHack({n: top_axes(gh[n][tr] - gc[n][tr], k) for n in gh},
               {n: F.normalize((ah[n][tr] - ac[n][tr]).mean(0), dim=0) for n in ah})  # (k, r), (r,)
    lo, hi = band_of(gh, gc, tr, vh)
    vh.band = (lo, max(hi, lo + 1e-3))  # a direction that does not separate even in-sample: a step
    vh.report = holdout_report(gh, gc, ah, ac, tr, ho, vh, seed)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        vh.save(path)
    return vh


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
