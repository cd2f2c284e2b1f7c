"""
Per-rollout gradients from one backward: the hooks that routing.Capture attaches to the adapters.

The routers (routing.py) need each rollout's own gradient g_b, not only the batch's sum. A loop of
one backward per rollout would cost B backwards; instead each adapter module gets a Slot, and hooks
on its activations reduce the per-token contributions of ONE backward to per-rollout sums:
    SVDDelta (h = z * s, z = x Vh^T):   g_b = sum_l z_bl * dh_bl, dh = dL/dh      (b, r)
    merged SVDDelta (y = x Wm^T):       the same, with dh = dy U                   (adapter.py deviation 7)
    forget units (y = x Wf^T):          G_b = sum_l dy_bl^T x_bl                   (b, d_out, d_in)
Autograd never writes the adapters' .grad while a Slot is attached: routing.Capture.route() writes
keep and quarantine from the sums. For the per-token `act` router a Slot also keeps, per rollout,
the part of g_b from its routed tokens (f_bl = token_f(z_bl)), which goes to the quarantine whole.
This is Goodfellow's per-example gradient trick for linear layers (Goodfellow 2015, "Efficient
Per-Example Gradient Computations", arXiv 1510.01799): a weight's gradient is a sum over positions
of input x output-gradient outer products, so one backward gives every example's own. Routing by
parameter masking after the backward (SGTM, Shilov, Cloud et al. 2025, §3) needs exactly these.
test_routing.py checks the sums against a naive loop of one backward per rollout, and `act` against
Cloud et al.'s detach routing. Deviations: none (the sums are exact up to float rounding).

Shapes: n rollouts in the step, b in a micro-batch, L positions, r delta_S rank.
"""
import torch


class Slot:
    """One adapter module's per-rollout gradient sums over the step, reduced by hooks in the backward.
    cap: the routing.Capture (its n rollouts, cur_rows of the micro-batch, act_mask for extraction);
    token_f: act's per-token rule z -> f (b, L); partner: a forget unit's retain delta (its token f)."""
    MERGED = (torch.float32, torch.float64)  # dtypes in which SVDDelta runs merged (adapter.py deviation 7)

    def __init__(self, cap, mod, token_f=None, partner=None):
        self.cap, self.mod, self.token_f, self.partner = cap, mod, token_f, partner
        # (n, ...) per-rollout gradient, its token-routed part (act); (n, r) mean z over each completion
        # (extraction); (b, L) act's token f of the current micro-batch; (n, 2) act's routed / carrying positions
        self.g, self.gt, self.act, self.f_tok, self.tok = None, None, None, None, None

    def hook(self, zd):
        """-> the hook on dh = dL/d(z * s) that keeps g_b = sum_l z_bl * dh_bl  (b, r). z = x Vh^T detached."""
        rows, f = self.cap.cur_rows, None if self.token_f is None else self.token_f(zd)
        self.f_tok = f
        if self.cap.act_mask is not None:  # extraction: mean of z over each completion's tokens
            m = self.cap.act_mask.to(zd)                                   # (b, L)
            self.act = self.acc(self.act, rows, torch.einsum("bl,blr->br", m, zd) / m.sum(1, keepdim=True))

        def hook(dh):
            c = zd * dh                                                    # (b, L, r) shares of ds
            self.add(rows, c.sum(1), None if f is None else torch.einsum("bl,blr->br", f.to(c), c))  # (b, r)
            if f is not None:  # how many gradient-carrying positions the act router routed
                carry = dh.ne(0).any(-1).to(f)                             # (b, L)
                self.tok = self.acc(self.tok, rows, torch.stack([(f * carry).sum(1), carry.sum(1)], 1))
        return hook

    def scale(self, z, s):
        """h = z * s of SVDDelta (unmerged), with the hook on h. Autograd never writes s .grad."""
        hook, h = self.hook(z.detach()), z * s.detach().requires_grad_()
        if h.requires_grad:  # False in reentrant gradient checkpointing's no-grad pass
            h.register_hook(hook)
        return h

    def merged(self, x, y):
        """y = x (W + U diag(s) Vh)^T of a merged SVDDelta: the hook on y turns dy into dh = dy U, the
        gradient the hook on h receives in the unmerged forward, so g_b is the same."""
        U, hook = self.mod.U, self.hook(x.detach().to(self.mod.Vh.dtype) @ self.mod.Vh.T)
        if torch.is_grad_enabled():  # not in the no-grad pass of reentrant gradient checkpointing
            if not y.requires_grad:  # nothing below trains: y is a leaf, where the backward stops
                y.requires_grad_()
            y.register_hook(lambda dy: hook(dy.to(U.dtype) @ U))
        return y

    def linear(self, x, Wf):
        """x Wf^T of the forget units; the hook on y keeps G_b = sum_l dy_bl^T x_bl  (b, d_out, d_in)."""
        rows, xd, f = self.cap.cur_rows, x.detach(), self.partner.f_tok  # token f of the retain delta

        def hook(dy):
            gt = None if f is None else torch.einsum("bl,blo,bli->boi", f.to(dy), dy, xd)
            self.add(rows, torch.einsum("blo,bli->boi", dy, xd), gt)

        y = x @ Wf.detach().requires_grad_().T
        if y.requires_grad:
            y.register_hook(hook)
        return y

    def acc(self, buf, rows, v):
        """buf[rows] += v, buf (n, ...) created on first use."""
        buf = v.new_zeros((self.cap.n,) + v.shape[1:]) if buf is None else buf
        return buf.index_put_((rows.to(v.device),), v, accumulate=True)

    def add(self, rows, g, gt):
        self.g = self.acc(self.g, rows, g)
        if gt is not None:
            self.gt = self.acc(self.gt, rows, gt)
