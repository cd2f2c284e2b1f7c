"""
Routers: how much of each rollout's gradient goes to the quarantine, and the split itself.

Gradient Routing (Cloud et al. 2024, arXiv 2410.04332, §3): out = m*a + (1-m)*a.detach(), a mask
that steers the backward only; the forward is the same for every example. SGTM (Shilov, Cloud et
al. 2025, arXiv 2512.05648, §3): the mask is a noisy per-example label (`label` here), applied as
parameter masking after the backward. vGROUT (wassname): a hack direction v_hack (vhack.py) and
the routers route2-act (`act`) and route2-grad (`grad`).

The split equation (`split`), per adapter module, with f_b in [0, 1] the routed share of rollout b:
    keep.grad = sum_b (1 - f_b) g_b        quarantine.grad = sum_b f_b g_b
so keep + quarantine is exactly the unrouted gradient (not in variant B: deviation 6), and deleting
the quarantine at deploy removes what the routed rollouts taught. g_b, the rollout's own gradient,
comes from ONE backward: hooks reduce the per-token contributions to per-rollout sums (slot.py),
never a loop of backwards.

Module m, rollout b, position l; z = x Vh^T (delta_S coordinates), dh = dL/d(z * s):
    g_b = sum_l z_bl * dh_bl                        per-rollout gradient of s   (b, r)
    cos_b = mean_m cos(g_bm, v_m)                   v_m = sum of module m's k oriented v_grad axes
    grad:  f_b = clamp((cos_b - lo) / (hi - lo), 0, 1), band (lo, hi) calibrated on the pairs
    label: f_b = flag_b (the weak detector)         none, erase, screen, penalty: f_b = 0
    placebo: grad's map on random axes, lo shifted so that mean_b f_b = share (controls the choice)
    uniform: f_b = share (controls the deletion: no selection at all)
    act:   per token f_bl = [cos(z_bl, v_act) > tau], inside the backward
    erase: keep.grad (I - V^T V), the v_hack component projected out, nothing kept aside (deviation 5)
Sign: the loss is -A log p, so g_b = -A_b grad log p(o_b), and v_grad points along
grad log p(clean) - grad log p(hack): a hack with A > 0 (the update that teaches it) has cos_b > 0
and is routed; with A < 0 (un-teaching it) it stays in keep. f never reads the oracle.

Use (train.py's routed_update):
    cap = routing.Capture(model, n_rollouts=B, router=routing.ROUTERS["grad"], vhack=vh, flags=flags)
    with cap:                                   # adapter params get no autograd .grad in here
        for rows in microbatches:               # LongTensor of global rollout indices
            cap.rows(rows)
            grpo.grpo_loss(...).sum().backward()
    stats = cap.route()   # adds to keep & quarantine .grad; {routed, qmass, cos_mean}; cap.f, cap.cos

Deviations:
  1. Parameter-gradient routing after the backward (SGTM's parameter masking), not activation
     detach: the same parameter gradients for a per-rollout f, and f may depend on the gradient.
  2. One f per rollout: the per-module cosines are averaged (every module votes equally).
  3. act routes per module and position (prompt too); tau = 0 reproduces route2-act's over-routing.
  4. kind="split": the keep delta_S has no s_quar (its f share is dropped); forget units get only theirs.
  5. erase projects v_hack out of the kept GRADIENT, not the step: Adam's per-coordinate scaling turns the
     update partly back toward v_hack. Measured (tiny Qwen3, test_routing's six rollouts and MICRO, v_hack
     from its four PAIRS with k = 1, holdout 0; three optim.RoutedAdamW steps at lr 1e-2, each one Capture
     and route()): |V g_keep| / |g_keep| < 3e-7, but |V ds_keep| / |ds_keep| over the modules is median 0.029,
     max 0.18 with erase, against 0.19, 0.41 with none (a random direction: 1/sqrt(r), 0.13 to 0.18).
  6. Variant B (--adapter vhack, vhack.set_vhack_axes): write_grads sends only quar @ A, the on-axis part,
     to c; the off-axis rest of sum_b f_b g_b reaches neither part, so keep + quarantine is NOT the
     unrouted gradient. Measured (test_routing.wrapped("svd_axes"), k = 2 axes, grad router with a k = 1
     v_hack, holdout 0.25): |sum_b g_b - (keep.grad + A quar.grad)| = 0.63 |sum_b g_b|.

Shapes: n rollouts in the step, b in a micro-batch, L positions, r delta_S rank, k v_hack axes, M modules.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

import adapter
import grpo
from slot import Slot

# flagged_only: grad routes only flagged rollouts (--flagged-only). share: the controls' mean routed share (--share),
# grad's mean `routed` over every step (32 warm-up 0.102, 8 RL 0.079) of experiments/results/controls/grad-s0.
OPTS = {"flagged_only": False, "share": 0.097}
ACT_TAU = 0.0  # act: a token is routed when cos(z, v_act) > tau


# ---------------------------------------------------------------- f: the routed share of each rollout
def route_none(cos, flags, band, opts):
    return torch.zeros_like(cos)


def route_label(cos, flags, band, opts):
    return flags.to(cos)


def route_grad(cos, flags, band, opts):
    lo, hi = band
    f = ((cos - lo) / (hi - lo)).clamp(0, 1)
    if opts["flagged_only"]:  # only rollouts the weak detector flagged are eligible
        return f * flags.to(f)
    return f


def route_uniform(cos, flags, band, opts):
    """Control, no selection: every rollout routes the same share."""
    return torch.full_like(cos, opts["share"])


def route_placebo(cos, flags, band, opts):
    """Control, a random direction: grad's map with the band's width, shifted (bisection on lo) so that
    the step's mean f is exactly `share`, which matches grad's routed amount and leaves only the choice."""
    c = cos[opts["seen"]] if "seen" in opts else cos  # the step's trained rollouts (Capture.seen)
    w = band[1] - band[0]
    lo, hi = c.min().item() - w, c.max().item()
    for _ in range(60):  # mean f falls as lo rises: keep the share inside [mean f(hi), mean f(lo)]
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ((c - mid) / w).clamp(0, 1).mean() > opts["share"] else (lo, mid)
    return ((cos - (lo + hi) / 2) / w).clamp(0, 1)


def act_token_f(z, v_act):
    """route2-act: f_bl = [cos(z_bl, v_act) > tau]  (b, L)."""
    cos = z @ v_act.to(z) / (z.norm(dim=-1) * v_act.norm() + 1e-12)
    return (cos > ACT_TAU).to(z)


def erase_vhack(g, V):
    """The kept gradient without its v_hack component: (I - V^T V) g, V (k, r) orthonormal rows."""
    return g - (g @ V.T.to(g)) @ V.to(g)


def rollout_cos(G, vh):
    """cos_b = mean_m cos(g_bm, v_m), v_m = sum of the k oriented axes of module m.  (n,)"""
    cs = []
    for n, g in G.items():
        v = vh.v_grad[n].sum(0).to(g)                                      # (r,)
        cs.append(g @ v / (g.norm(dim=1) * v.norm() + 1e-12))              # (n,)
    return torch.stack(cs).mean(0)                                         # (M, n) -> (n,)


@dataclass(frozen=True)
class Router:
    """Everything --router changes, in one record."""
    f: Callable                             # per-rollout share f_b = f(cos, flags, band, opts)  (n,)
    quarantine: bool = False                # does anything reach the quarantine (deploy changes the model)?
    needs_vhack: bool = False               # f or the projection reads v_hack (vhack.extract_vhack)
    token: bool = False                     # act: f per token inside the backward
    keep_projection: Optional[Callable] = None  # erase: applied to the kept gradient
    rewards: Optional[Callable] = None      # screen, penalty: (rewards, flags) -> (rewards, valid) (grpo.py)
    deployed_keep: bool = False             # label: unflagged rollouts train the deployed model (below)
    placebo: bool = False                   # placebo: v_hack's axes are random (vhack.extract_vhack)


# label's deployed keep: f is known before the forward, so unflagged rollouts run as the deployed model
# (quarantine off) and the keep is trained as the model it will be deployed as; flagged ones run as the
# trained model. The mirror image of SGTM's masking, where forget examples run with the retain part zeroed.
ROUTERS = {
    "none": Router(route_none),
    "label": Router(route_label, quarantine=True, deployed_keep=True),
    "act": Router(route_none, quarantine=True, needs_vhack=True, token=True),
    "grad": Router(route_grad, quarantine=True, needs_vhack=True),
    "placebo": Router(route_placebo, quarantine=True, needs_vhack=True, placebo=True),
    "uniform": Router(route_uniform, quarantine=True),
    "erase": Router(route_none, needs_vhack=True, keep_projection=erase_vhack),
    "screen": Router(route_none, rewards=grpo.screen),
    "penalty": Router(route_none, rewards=grpo.penalty),
}


def split(g, f, gt=None):
    """The routing equation: keep = sum_b (1 - f_b) g_b, quar = sum_b f_b g_b.  g (n, ...), f (n,).
    gt: the token-routed part of each g_b (act), which goes to the quarantine whole."""
    gt = torch.zeros_like(g) if gt is None else gt
    keep = torch.einsum("b,b...->...", 1 - f, g - gt)                     # summed over rollouts
    quar = torch.einsum("b,b...->...", f, g - gt) + gt.sum(0)
    return keep, quar


class Capture:
    """Per-rollout gradients from one backward, then route(); the use is in the module docstring."""

    def __init__(self, model, n_rollouts, router=ROUTERS["none"], vhack=None, flags=None, opts=None):
        if router.needs_vhack and vhack is None:
            raise ValueError("Capture: this router needs a vhack (vhack.extract_vhack)")
        self.mods = adapter.adapter_modules(model)
        if not self.mods:
            raise ValueError("routing: the model has no adapters; call adapter.wrap first")
        self.n, self.router, self.vh, self.opts = n_rollouts, router, vhack, {**OPTS, **(opts or {})}
        self.flags = torch.zeros(n_rollouts, dtype=torch.bool) if flags is None else torch.as_tensor(flags).bool()
        self.cur_rows, self.act_mask, self.seen = None, None, torch.zeros(n_rollouts, dtype=torch.bool)
        svd = {n: m for n, m in self.mods.items() if isinstance(m, adapter.SVDDelta)}
        self.slots = {n: Slot(self, m, partial(act_token_f, v_act=vhack.v_act[n]) if router.token else None)
                      for n, m in svd.items()}
        self.slots |= {n: Slot(self, m, partner=self.slots[n + ".retain"])
                       for n, m in self.mods.items() if n not in svd}

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
        """Add keep / quarantine .grad from the captured per-rollout gradients; returns the stats:
        routed = mean f_b over the rollouts trained (act: the share of routed tokens), qmass =
        |quar|^2 / (|keep|^2 + |quar|^2) of the gradients written, cos_mean = mean cos_b. Sets self.cos
        and self.f per rollout (act routes per token: its f_b is 0)."""
        done = {n: s for n, s in self.slots.items() if s.g is not None}  # none if every loss was skipped
        G = {n: s.g for n, s in done.items() if isinstance(s.mod, adapter.SVDDelta)}
        self.cos = rollout_cos(G, self.vh) if self.vh and G else torch.full((self.n,), math.nan)
        self.f = self.router.f(self.cos, self.flags, self.vh.band if self.vh else (0, 1),
                               {**self.opts, "seen": self.seen})
        norms = [(0.0, 0.0)]
        for name, s in done.items():
            keep, quar = split(s.g, self.f.to(s.g), s.gt)
            V = self.vh.v_grad.get(name) if self.vh else None                # None for forget units
            if self.router.keep_projection is not None and V is not None:
                keep = self.router.keep_projection(keep, V)
            norms.append(write_grads(s.mod, keep, quar))
        keep2, quar2 = map(sum, zip(*norms))
        tok = sum(s.tok.sum(0) for s in self.slots.values() if s.tok is not None)  # (2,) routed, carrying
        routed = tok[0] / tok[1] if self.router.token and torch.is_tensor(tok) else self.f[self.seen].mean()
        cos_mean = self.cos[self.seen].mean().item()
        return {"routed": routed.item(), "qmass": quar2 / max(keep2 + quar2, 1e-30),
                "cos_mean": None if math.isnan(cos_mean) else cos_mean}


def write_grads(mod, keep, quar):
    """keep -> s_keep; quar -> s_quar or the forget units. A share with no parameter to go to is dropped
    (deviation 4); variant B keeps only quar's part on its v_hack axes, quar @ A (deviation 6: 0.63 of the
    unrouted gradient's norm lost in test_routing's setting). Returns the squared norms written."""
    axes, norms = getattr(mod, "quar_axes", None), []
    if axes is not None:
        quar = quar @ axes                                                 # (r,) -> (k,)
    for p, g in ((getattr(mod, "s_keep", None), keep),
                 (getattr(mod, "weight_forget", getattr(mod, "s_quar", None)), quar)):
        if p is not None:
            p.grad = g.to(p) if p.grad is None else p.grad + g.to(p)
        norms.append(0.0 if p is None else g.square().sum().item())
    return norms


if __name__ == "__main__":
    # Self-check: the split equation on random per-rollout gradients (keep + quarantine = the unrouted sum).
    torch.manual_seed(0)
    g, f = torch.randn(8, 5), torch.rand(8)
    keep, quar = split(g, f)
    err = max((keep + quar - g.sum(0)).abs().max().item(), (quar - (f[:, None] * g).sum(0)).abs().max().item())
    print(f"max |keep + quar - sum_b g_b|, |quar - sum_b f_b g_b| = {err:.1e}")
    for name, r in ROUTERS.items():
        print(f"{name:8s} quarantine {r.quarantine!s:5s} v_hack {r.needs_vhack!s:5s} token {r.token!s:5s} "
              f"rewards {r.rewards.__name__ if r.rewards else '-'}")
    assert err < 1e-5
