"""
AdamW for routed parameter pairs: one shared second moment, so the quarantine moves by its share.

Gradient routing (Cloud et al. 2024, arXiv 2410.04332) and SGTM (Shilov, Cloud et al. 2025,
arXiv 2512.05648) steer only the backward: the forward is the same with or without routing, and
the routed share of each example's gradient is stored in parameters that are deleted at deploy.
With delta_S both halves sit on the same singular values, s = s_keep + s_quar, and each gets
  keep.grad = sum_b (1 - f_b) g_b        quar.grad = sum_b f_b g_b        (routing.py)
so keep.grad + quar.grad is exactly the unrouted gradient. SGD keeps that: the two updates add up
to plain SGD's, and s_quar holds exactly the routed share. Plain Adam does not: it divides each
parameter by the root of ITS OWN second moment, so a quarantine that receives a sliver of the
gradient (f_b ~ 0.05) still moves ~lr per step, in the direction of that sliver's noise; with
momentum it keeps moving on steps where nothing is routed at all. Measured on SmolLM2 with plain
AdamW (experiments/RESULTS.md): `grad` routed 3-12% of the step's gradient, yet deleting its s_quar
broke the model (compile rate 0.76 -> 0.09).

RoutedAdamW gives each pair (s_keep, s_quar) of one module one second moment, of both parts:
  m_k = b1 m_k + (1-b1) g_k          m_q = b1 m_q + (1-b1) g_q
  v   = b2 v   + (1-b2) (g_k^2 + g_q^2)                    (one v per singular value)
  s_keep -= lr   * m_k^ / (sqrt(v^) + eps)     s_quar -= lr_q * m_q^ / (sqrt(v^) + eps)
so each part moves in proportion to its share of the gradient: a quarantine fed f g moves f/(1-f)
as far as the keep fed (1-f) g (each f/sqrt(f^2 + (1-f)^2) lr a step, so the pair moves up to 1.41x
AdamW's step at f = 0.5), and with nothing routed (router none) s_keep takes exactly AdamW's step.
Each partner stores its own copy of v (equal while train.py writes both grads every step).
Why not the second moment of the SUM g_k + g_q (which would make the two updates add up to AdamW's
exactly)? Because keep and
quarantine gradients often cancel (clean and hack demonstrations pull a singular value opposite
ways): the sum's v is then small while each part is large, and each part's step explodes (measured:
|s_keep| 2-3x |s_keep + s_quar| after an earlier recipe's 16 warm-up steps, cos(s_keep, s_quar) -0.5 to -0.95).
Parameters without a partner (SGTM's forget units, the v_hack-axes quarantine of variant B, a keep
with no quarantine) get plain AdamW.

Deviations from torch.optim.AdamW: no amsgrad, foreach or fused paths; decoupled weight decay is
applied to each parameter (it too adds up). Shapes: every tensor has its parameter's shape.
"""
import torch

import adapter


def routed_pairs(model):
    """{keep: quar, quar: keep} for every delta_S whose s_quar shares s_keep's axes."""
    out = {}
    for m in adapter.adapter_modules(model, adapter.SVDDelta).values():
        if m.s_quar is not None and m.quar_axes is None:
            out[m.s_keep], out[m.s_quar] = m.s_quar, m.s_keep
    return out


class RoutedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW, except that partnered parameters share one second moment of both their grads."""

    def __init__(self, params, partner=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.partner = partner or {}  # param -> param: not in the state dict (rebuilt from the model)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                q, g = self.partner.get(p), p.grad
                st = self.state[p]
                if not st:
                    st["step"], st["m"], st["v"] = torch.tensor(0.0), torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["m"].lerp_(g, 1 - b1)                                   # m = b1 m + (1-b1) g
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)              # v = b2 v + (1-b2) (g_k^2 + g_q^2)
                if q is not None and q.grad is not None:
                    st["v"].addcmul_(q.grad, q.grad, value=1 - b2)         # the partner's energy
                t = st["step"].item()                                      # torch.optim.AdamW's op order:
                denom = (st["v"].sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)  # with no partner, bit-identical
                if wd:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(st["m"], denom, value=-lr / (1 - b1 ** t))
        return loss


def make_optimizer(model, lr, lr_quar=None):
    """Keep and quarantine groups; s_keep / s_quar pairs share Adam's second moment (above)."""
    groups = [{"params": adapter.keep_params(model), "lr": lr},
              {"params": adapter.quar_params(model), "lr": lr if lr_quar is None else lr_quar}]
    return RoutedAdamW(groups, routed_pairs(model))


def _ratio(a, b):
    return (a.abs().mean() / b.abs().mean()).item()


if __name__ == "__main__":
    # Self-check: a pair fed (1-f) g and f g: the quarantine moves f/(1-f) as far as the keep (AdamW: as far),
    # and with f = 0 the keep follows AdamW exactly.
    torch.manual_seed(0)
    for f in (0.0, 0.05, 0.5):
        k, q, k2, q2, c = (torch.nn.Parameter(torch.zeros(64)) for _ in range(5))
        opts = [RoutedAdamW([k, q], partner={k: q, q: k}, lr=0.01),
                torch.optim.AdamW([k2, q2], lr=0.01, weight_decay=0.0),
                torch.optim.AdamW([c], lr=0.01, weight_decay=0.0)]
        for _ in range(20):
            g = torch.randn(64) + 1.0
            k.grad, q.grad, k2.grad, q2.grad, c.grad = (1 - f) * g, f * g, (1 - f) * g, f * g, g.clone()
            [o.step() for o in opts]
        print(f"f {f:.2f}: |s_quar|/|s_keep| routed {_ratio(q, k):.3f}, AdamW {_ratio(q2, k2):.3f}; "
              f"|keep - AdamW(g)| {(k - c).abs().max().item() if f == 0 else float('nan'):.1e}")
        assert abs(_ratio(q, k) - f / (1 - f)) < 1e-3 and (f > 0 or torch.equal(k, c))
