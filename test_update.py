"""
Tests of one routed update (train.routed_update) and of the optimizer that steps it (optim.py), on
the tiny Qwen3: RoutedAdamW's steps, label's deployed keep against plain autograd, and the
off-policy ratio against the sampler's log-prob; the pieces of the update against independent
references: grpo.py's token log-probs and k3 KL, erase's projection, act's token rule, v_hack's sign.
"""
import dataclasses

import torch

import adapter
import ckpt
import config
import grpo
import optim
import routing
import test_routing as tr
import train
import vhack
from model import chat_prompt, encode


def test_routed_adamw():
    """optim.RoutedAdamW: with nothing routed (s_quar's grad 0) the keep follows torch's AdamW bit for bit; a
    quarantine fed a share f of the gradient moves f/(1-f) as far as the keep (plain AdamW moves it as far,
    whatever f); when the two cancel (g_q = -0.9 g_k) neither steps further than lr (one v of the SUM would
    give ~10 lr)."""
    a = config.get_args(["--config", config.LAPTOP, "--model", "tiny", "--wrap-layers", "1", "--targets", "q_proj"])
    model, _ = ckpt.build(a, "cpu")
    (m,) = adapter.adapter_modules(model).values()
    ref = torch.nn.Parameter(torch.zeros_like(m.s_keep))
    opt, plain = optim.make_optimizer(model, 0.01), torch.optim.AdamW([ref], lr=0.01, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        grad = torch.randn(m.s_keep.shape, generator=g) + 1.0
        m.s_keep.grad, m.s_quar.grad, ref.grad = grad.clone(), torch.zeros_like(grad), grad.clone()
        opt.step(), plain.step()
    assert torch.equal(m.s_keep, ref) and not m.s_quar.any() and ref.abs().max() > 1e-2
    for f in (0.05, 0.5, "cancel"):
        m.s_keep.data.zero_(), m.s_quar.data.zero_()
        opt = optim.make_optimizer(model, 0.01)
        for _ in range(10):
            grad = torch.randn(m.s_keep.shape, generator=g) + 1.0
            m.s_keep.grad, m.s_quar.grad = ((1 - f) * grad, f * grad) if f != "cancel" else (grad, -0.9 * grad)
            opt.step()
        ratio = (m.s_quar.abs().mean() / m.s_keep.abs().mean()).item()
        most = max(m.s_keep.abs().max(), m.s_quar.abs().max())
        assert most <= 10 * 0.01 + 1e-6 if f == "cancel" else abs(ratio - f / (1 - f)) < 1e-3, (f, ratio, most)


def label_recipe():
    """label's recipe, micro-batches of 2, T 1, Dr.GRPO's normaliser 1 * 4 * 25 = 100."""
    a = config.get_args(["--config", config.LAPTOP, "--router", "label", "--micro", "2", "--temperature", "1",
                         "--prompts", "1", "--group-size", "4", "--max-new-tokens", "25"])
    return config.recipe(a)


def test_label_deployed_keep():
    """label's deployed keep: s_keep.grad is the unflagged rollouts' gradient AT THE DEPLOYED MODEL
    (quarantine off), the quarantine's .grad the flagged rollouts' gradient at the trained model; each against
    plain autograd over one batch of that side. Both adapter kinds; micro-batches mix flags in the input order."""
    rew, fl = torch.tensor([3.5, .5, .5, 0., .5, .5, 3.5, 3.5]), torch.tensor([1, 0, 0, 0, 0, 0, 1, 0]).bool()
    want = torch.tensor([2.375, 1 / 6, 1 / 6, -1 / 3, -1.0, -1.0, 1.5, 2.0])  # flagged: its group; else: unflagged only
    assert torch.allclose(grpo.split_advantages(rew, fl, 4), want)
    rc, rows, r = label_recipe(), torch.arange(len(tr.COMPS)), tr.rollouts(range(len(tr.COMPS)))
    for kind in ("svd", "split", "svd_ckpt"):  # ckpt: the backward re-runs each layer's forward
        m = tr.wrapped(kind)
        if kind == "svd_ckpt":
            m.activation_checkpointing_enable(), m.train()
        sides = ((~tr.FLAGS, "deployed", adapter.keep_params(m)), (tr.FLAGS, "train", adapter.quar_params(m)))
        train.routed_update(m, torch.optim.SGD(sides[0][2] + sides[1][2], lr=0.0), r, tr.ADV, tr.FLAGS, rows,
                            None, rc, kl=False)
        got = [[p.grad.clone() for p in params] for _, _, params in sides]
        for (side, mode, params), g in zip(sides, got):
            m.zero_grad(set_to_none=True)
            sub = train.subset(r, rows[side])
            with adapter.adapter_mode(m, mode):
                logp = grpo.token_logp(m, sub, 1.0)                                        # (b, T)
                grpo.grpo_loss(logp, logp.detach(), tr.ADV[side], sub.completion_mask.float(), 100.0).sum().backward()
            err = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(g, params))
            assert err < 1e-4, (kind, mode, err)
        for fl in (torch.zeros_like(tr.FLAGS), torch.ones_like(tr.FLAGS)):  # one side empty: no empty micro-batch
            train.routed_update(m, torch.optim.SGD(sides[0][2], lr=0.0), r, tr.ADV, fl, rows, None, rc, kl=False)


def test_off_policy_ratio():
    """A rollout trained under another forward than the sampler's gets pi_old = the sampler's log-prob (PPO
    ratio and clip); a teacher row (not sampled) keeps ratio 1. Label's keep side (sampled by the trained
    model, trained as the deployed one), and with --gen-deployed the flagged side (sampled by the deployed
    model, trained as the trained one). Grads against plain autograd; the other side is unchanged against
    ratio 1 everywhere (sampled=None); the clip must act."""
    rows, r = torch.arange(len(tr.COMPS)), tr.rollouts(range(len(tr.COMPS)))
    sampled = torch.tensor([True, False, True, True, True, True])      # row 1: a teacher demonstration
    m = tr.wrapped("svd")
    for mod in adapter.adapter_modules(m).values():
        mod.s_quar.data.mul_(30)  # deployed far from trained: ratios leave 1 +- eps
    keep, quar = adapter.keep_params(m), adapter.quar_params(m)
    for gen_deployed, side, params, other, (sampler, forward) in (
            (False, ~tr.FLAGS, keep, quar, ("train", "deployed")), (True, tr.FLAGS, quar, keep, ("deployed", "train"))):
        rc = dataclasses.replace(label_recipe(), gen_deployed=gen_deployed)
        grads, stats = {}, {}
        for how, rows_sampled in (("ratio", sampled), ("one", None)):
            stats[how] = train.routed_update(m, torch.optim.SGD(keep + quar, lr=0.0), r, tr.ADV, tr.FLAGS, rows,
                                             None, rc, kl=False, sampled=rows_sampled)
            grads[how] = [[p.grad.clone() for p in ps] for ps in (params, other)]
        assert 0 < stats["ratio"]["off_clip"] < 1 and "off_clip" not in stats["one"], stats
        sub = train.subset(r, rows[side])
        with torch.no_grad(), adapter.adapter_mode(m, sampler):
            behave = grpo.token_logp(m, sub, 1.0)
        m.zero_grad(set_to_none=True)
        with adapter.adapter_mode(m, forward):
            logp = grpo.token_logp(m, sub, 1.0)
            pi_old = torch.where(sampled[side][:, None], behave, logp.detach())
            grpo.grpo_loss(logp, pi_old, tr.ADV[side], sub.completion_mask.float(), 100.0).sum().backward()
        err = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(grads["ratio"][0], params))
        moved = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(grads["one"][0], params))
        assert err < 1e-4 and moved > 1e-2, (gen_deployed, err, moved)
        assert all(torch.equal(x, y) for x, y in zip(grads["ratio"][1], grads["one"][1]))


def test_clipped_surrogate():
    """grpo.clipped_surrogate, exact: ratios 0.5, 1, 2, 5 at A = -1 and +1 (eps 0.2), and its gradient, which
    is ratio * A where the ratio is inside the clip's active side and 0 where clipped."""
    old = torch.zeros(2, 4)
    logp = torch.tensor([0.5, 1.0, 2.0, 5.0]).log().repeat(2, 1).requires_grad_()
    adv = torch.tensor([-1.0, 1.0])
    obj = grpo.clipped_surrogate(logp, old, adv, 0.2)
    assert torch.allclose(obj, torch.tensor([[-0.8, -1.0, -2.0, -5.0], [0.5, 1.0, 1.2, 1.2]]))
    obj.sum().backward()  # d(ratio * A)/d logp = ratio * A where unclipped, 0 where clipped
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.0, -2.0, -5.0], [0.5, 1.0, 0.0, 0.0]]))


def test_control_routers_route_the_share():
    """placebo: grad's map from cos to f (monotone, in [0, 1], the band's width) shifted so the mean is the
    share, whatever the cosines; uniform: the share for every rollout. Placebo's axes: random, orthonormal,
    oriented as the real ones are."""
    g = torch.Generator().manual_seed(0)
    for share, width, n in ((0.043, 0.35, 16), (0.5, 1e-3, 7), (0.2, 0.05, 64)):
        cos = torch.randn(n, generator=g) * 0.1
        opts = {**routing.OPTS, "share": share}
        f = routing.route_placebo(cos, None, (0.1, 0.1 + width), opts)
        assert abs(f.mean().item() - share) < 1e-6 and f.min() >= 0 and f.max() <= 1, (share, f)
        assert (f[cos.argsort()].diff() >= 0).all()  # monotone in cos, as grad's
        assert torch.equal(routing.route_uniform(cos, None, (0, 1), opts), torch.full_like(cos, share))
    D = torch.randn(12, 40, generator=g) + 0.3
    V = vhack.random_axes(D, 3, g)
    assert torch.allclose(V @ V.T, torch.eye(3), atol=1e-5) and (V @ D.mean(0) > 0).all()
    assert (V @ vhack.top_axes(D, 3).T).abs().max() < 0.9  # not the real axes


def test_token_logp_matches_unpadded_reference():
    """grpo.token_logp on left-padded prompts and right-padded completions of different lengths, at temperature
    0.7: on the mask, each rollout's log_softmax(logits / T) of its completion tokens from ONE unpadded forward of
    prompt + completion (token t scored at position t - 1), and the entropy -sum p log p."""
    r = tr.rollouts(range(6))
    P, T = r.prompt_mask.sum(1), r.completion_mask.sum(1)
    assert P.min() < P.max() and T.min() < T.max()                      # both paddings are exercised
    with torch.no_grad():
        lp, ent = grpo.token_logp(tr.BASE, r, 0.7, with_entropy=True)     # (6, T)
        for b in range(6):
            p, t = P[b].item(), T[b].item()
            ids = torch.cat([r.prompt_ids[b, -p:], r.completion_ids[b, :t]])  # unpadded
            ref = torch.log_softmax(tr.BASE(ids[None]).logits[0].double() / 0.7, -1)[p - 1:p + t - 1]  # (t, V)
            assert torch.equal(r.completion_mask[b, :t], torch.ones(t, dtype=torch.long))
            assert (lp[b, :t] - ref.gather(-1, ids[p:, None])[:, 0]).abs().max() < 1e-4, b
            assert (ent[b, :t] + (ref.exp() * ref).sum(-1)).abs().max() < 1e-4, b


def test_kl_k3_is_an_unbiased_kl():
    """grpo.kl_k3 per token is >= 0 (0 where the two log-probs agree), and its expectation under o ~ p, summed
    exactly over a small support with weights p, is KL(p || q) = sum p (log p - log q)."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 4.0):                                           # near-equal to peaked
        lp, lq = (torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64) * scale, 0) for _ in range(2))
        k3 = grpo.kl_k3(lp, lq)                                             # (5,) one "token" per outcome
        kl = sum(lp[i].exp() * (lp[i] - lq[i]) for i in range(5))
        assert (k3 >= 0).all() and abs((lp.exp() * k3).sum() - kl) < 1e-12, (scale, kl)
    assert torch.equal(grpo.kl_k3(lp, lp), torch.zeros(5, dtype=torch.float64))


def test_erase_is_the_orthogonal_projection():
    """routing.erase_vhack: with V (k, r) orthonormal rows completed to an orthonormal basis by W, the result has
    no component along any row of V, and its components along W are g's: g - result lies in V's row span."""
    g0 = torch.Generator().manual_seed(0)
    for k, r in ((1, 8), (3, 16)):
        G = torch.randn(r + 5, r, generator=g0, dtype=torch.float64)
        Q = torch.linalg.qr(G[:r]).Q.T                                      # (r, r) orthonormal rows
        V, W = Q[:k], Q[k:]
        for g in (G[r], G[r + 1:]):                                         # (r,) and (4, r)
            out = routing.erase_vhack(g, V)
            assert out.shape == g.shape and (out @ V.T).abs().max() < 1e-12, (k, r)
            assert ((g - out) @ W.T).abs().max() < 1e-12 and (g @ V.T).abs().max() > 0.1, (k, r)


def test_act_token_f_thresholds_the_cosine():
    """routing.act_token_f: a token is routed (1) exactly when cos(z, v_act) > ACT_TAU, else 0; z is built with
    known cosines and norms (v_act not unit; a zero z is not routed), at tau 0 (the default), 0.5 and -0.5."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, generator=g) * 3                                     # (r,)
    e = v / v.norm()
    u = torch.randn(8, generator=g)
    u = (u - (u @ e) * e) / (u - (u @ e) * e).norm()                        # unit, orthogonal to v
    cos = torch.tensor([[0.9, 0.2, 0.01, 0.0], [-0.01, -0.4, -1.0, 0.6]])   # (b, L); z = 0 has cos 0
    norm = torch.tensor([[1.0, 5.0, 0.1, 0.0], [2.0, 1e-2, 7.0, 3.0]])
    z = norm[..., None] * (cos[..., None] * e + (1 - cos[..., None] ** 2).sqrt() * u)  # (b, L, r)
    tau0 = routing.ACT_TAU
    try:
        for tau in (0.0, 0.5, -0.5):
            routing.ACT_TAU = tau
            assert torch.equal(routing.act_token_f(z, v), (cos > tau).float()), tau
    finally:
        routing.ACT_TAU = tau0


def test_vhack_sign_follows_the_loss():
    """v_hack's sign, tied to the training loss -A log p: the contrast pairs' hacks trained with A = +1 (the update
    that teaches them) score cos_b = the band's top (calibrated as A = +1 rollouts) and are routed by `grad`, more
    than their clean sides at A = +1; the same hacks at A = -1 (un-teaching them) score -cos_b, routed less."""
    m, n = tr.wrapped("svd"), len(tr.PAIRS)
    vh = vhack.extract_vhack(m, tr.TOK, tr.PAIRS, k=1, holdout=0.0)
    prompts = [chat_prompt(tr.TOK, p["prompt"]) for p in tr.PAIRS] * 2
    r = encode(tr.TOK, prompts, [p["hack"] for p in tr.PAIRS] + [p["clean"] for p in tr.PAIRS])
    cos, f = {}, {}
    for a in (1.0, -1.0):
        cap = routing.Capture(m, 2 * n, routing.ROUTERS["grad"], vh)
        with cap:
            cap.rows(torch.arange(2 * n))
            logp = grpo.token_logp(m, r)
            adv = torch.tensor([a] * n + [1.0] * n)
            grpo.grpo_loss(logp, logp.detach(), adv, r.completion_mask.float(), 100.0).sum().backward()
        cap.route()
        cos[a], f[a] = cap.cos, cap.f
    lo, hi = vh.band
    assert hi - lo > 0.05 and abs(cos[1.0][:n].mean() - hi) < 1e-4 and abs(cos[1.0][n:].mean() - lo) < 1e-4, vh.band
    assert torch.allclose(cos[-1.0][:n], -cos[1.0][:n], atol=1e-5)
    assert f[1.0][:n].min() > max(f[1.0][n:].max(), f[-1.0][:n].max()) and f[1.0][:n].mean() > 0.9, (f[1.0], f[-1.0])


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
