"""
Tests of one routed update (update.py) and of the optimizer that steps it (optim.py), on the tiny
Qwen3: RoutedAdamW's steps, --keep-forward deployed's gradients against plain autograd, and the
off-policy ratio against the sampler's log-prob.
"""
import os

import torch
from safetensors.torch import load_file

import adapter
import ckpt
import grpo
import test_routing as tr
import train
import update
from test_train import FAST, TMP, run


def test_routed_adamw():
    """optim.RoutedAdamW: with nothing routed (router none) the run equals plain AdamW's; a quarantine fed a
    share f of the gradient moves f/(1-f) as far as the keep (plain AdamW moves it as far, whatever f); when
    the two cancel (g_q = -0.9 g_k) neither steps further than lr (one v of the SUM would give ~10 lr)."""
    ends = {}
    for opt in ("routed", "adamw"):
        out = os.path.join(TMP, f"optim-{opt}")
        assert run(FAST + ["--router", "none", "--optim", opt, "--steps", "2", "--lr", "0.05", "--out", out]) == 0
        ends[opt] = load_file(os.path.join(out, "ckpt", "adapter.safetensors"))
    # bit-identical (same op order as torch's AdamW; the partner's zero grad adds exact zeros)
    assert all(torch.equal(ends["routed"][k], ends["adamw"][k]) for k in ends["adamw"])
    assert any(v.abs().max() > 1e-2 for k, v in ends["routed"].items() if k.endswith("s_keep"))
    model, _ = ckpt.build(train.get_args(["--model", "tiny", "--layers", "1", "--targets", "q_proj"]), "cpu")
    (m,) = adapter.adapter_modules(model).values()
    for f in (0.05, 0.5, "cancel"):
        m.s_keep.data.zero_(), m.s_quar.data.zero_()
        opt, g = train.make_optimizer(train.get_args(["--lr", "0.01"]), model), torch.Generator().manual_seed(0)
        for _ in range(10):
            grad = torch.randn(m.s_keep.shape, generator=g) + 1.0
            m.s_keep.grad, m.s_quar.grad = ((1 - f) * grad, f * grad) if f != "cancel" else (grad, -0.9 * grad)
            opt.step()
        ratio = (m.s_quar.abs().mean() / m.s_keep.abs().mean()).item()
        most = max(m.s_keep.abs().max(), m.s_quar.abs().max())
        assert most <= 10 * 0.01 + 1e-6 if f == "cancel" else abs(ratio - f / (1 - f)) < 1e-3, (f, ratio, most)


def test_keep_forward_deployed():
    """--keep-forward deployed (label): s_keep.grad is the unflagged rollouts' gradient AT THE DEPLOYED MODEL
    (quarantine off), the quarantine's .grad the flagged rollouts' gradient at the trained model; each against
    plain autograd over one batch of that side. Both adapter kinds; micro-batches mix flags in the input order."""
    rew, fl = torch.tensor([3.5, .5, .5, 0., .5, .5, 3.5, 3.5]), torch.tensor([1, 0, 0, 0, 0, 0, 1, 0]).bool()
    want = torch.tensor([2.375, 1 / 6, 1 / 6, -1 / 3, -1.0, -1.0, 1.5, 2.0])  # flagged: its group; else: unflagged only
    assert torch.allclose(grpo.split_advantages(rew, fl, 4), want)
    a = train.get_args(["--router", "label", "--keep-forward", "deployed", "--micro", "2", "--temperature", "1"])
    rows, r = torch.arange(len(tr.COMPS)), tr.rollouts(range(len(tr.COMPS)))
    for kind in ("svd", "split", "svd_ckpt"):  # ckpt: the backward re-runs each layer's forward
        m = tr.wrapped(kind)
        if kind == "svd_ckpt":
            m.gradient_checkpointing_enable(), m.train()
        sides = ((~tr.FLAGS, "deployed", adapter.keep_params(m)), (tr.FLAGS, "train", adapter.quar_params(m)))
        update.train_update(a, m, torch.optim.SGD(sides[0][2] + sides[1][2], lr=0.0), r, tr.ADV, tr.FLAGS, rows,
                            None, 100.0, kl=False)
        got = [[p.grad.clone() for p in params] for _, _, params in sides]
        for (side, mode, params), g in zip(sides, got):
            m.zero_grad(set_to_none=True)
            sub = update.subset(r, rows[side])
            with adapter.adapter_mode(m, mode):
                logp = grpo.token_logp(m, sub, 1.0)                                        # (b, T)
                grpo.grpo_loss(logp, logp.detach(), tr.ADV[side], sub.completion_mask.float(), 100.0).sum().backward()
            err = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(g, params))
            assert err < 1e-4, (kind, mode, err)
        for fl in (torch.zeros_like(tr.FLAGS), torch.ones_like(tr.FLAGS)):  # one side empty: no empty micro-batch
            update.train_update(a, m, torch.optim.SGD(sides[0][2], lr=0.0), r, tr.ADV, fl, rows, None, 100.0, kl=False)
    assert run(FAST + ["--router", "grad", "--keep-forward", "deployed", "--out", os.path.join(TMP, "kf")]) == 2


def test_off_policy_ratio():
    """--off-policy ratio: a rollout trained under another forward than the sampler's gets pi_old = the
    sampler's log-prob (PPO ratio and clip); a teacher row (not sampled) keeps ratio 1. Label's keep side
    (sampled by the trained model, trained as the deployed one), and with --gen-deployed the flagged side
    (sampled by the deployed model, trained as the trained one). Grads against plain autograd; the other
    side is unchanged; the clip must act. --dual-clip (1.1, so that it acts here) against autograd too."""
    a = train.get_args(["--router", "label", "--keep-forward", "deployed", "--micro", "2", "--temperature", "1"])
    rows, r = torch.arange(len(tr.COMPS)), tr.rollouts(range(len(tr.COMPS)))
    sampled = torch.tensor([True, False, True, True, True, True])      # row 1: a teacher demonstration
    m = tr.wrapped("svd")
    for mod in adapter.adapter_modules(m).values():
        mod.s_quar.data.mul_(30)                                        # deployed far from trained: ratios leave 1 +- eps
    keep, quar = adapter.keep_params(m), adapter.quar_params(m)
    for gen_deployed, side, params, other, (sampler, forward) in (
            (False, ~tr.FLAGS, keep, quar, ("train", "deployed")), (True, tr.FLAGS, quar, keep, ("deployed", "train"))):
        a.gen_deployed, grads, stats = gen_deployed, {}, {}
        for how, dual in (("ratio", 0.0), ("ignore", 0.0), ("dual", 1.1)):
            a.off_policy, a.dual_clip = "ignore" if how == "ignore" else "ratio", dual
            stats[how] = update.train_update(a, m, torch.optim.SGD(keep + quar, lr=0.0), r, tr.ADV, tr.FLAGS, rows,
                                             None, 100.0, kl=False, sampled=sampled)
            grads[how] = [[p.grad.clone() for p in ps] for ps in (params, other)]
        a.dual_clip = 0.0
        assert 0 < stats["ratio"]["off_clip"] < 1 and "off_clip" not in stats["ignore"], stats
        sub = update.subset(r, rows[side])
        with torch.no_grad(), adapter.adapter_mode(m, sampler):
            behave = grpo.token_logp(m, sub, 1.0)
        for how, dual in (("ratio", 0.0), ("dual", 1.1)):
            m.zero_grad(set_to_none=True)
            with adapter.adapter_mode(m, forward):
                logp = grpo.token_logp(m, sub, 1.0)
                pi_old = torch.where(sampled[side][:, None], behave, logp.detach())
                loss = grpo.grpo_loss(logp, pi_old, tr.ADV[side], sub.completion_mask.float(), 100.0, dual=dual)
                loss.sum().backward()
            err = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(grads[how][0], params))
            moved = max(((x - p.grad).norm() / p.grad.norm()).item() for x, p in zip(grads["ignore"][0], params))
            assert err < 1e-4 and moved > 1e-2, (gen_deployed, how, err, moved)
        assert all(torch.equal(x, y) for x, y in zip(grads["ratio"][1], grads["ignore"][1]))
        dual_moved = max(((x - y).norm() / y.norm()).item() for x, y in zip(grads["dual"][0], grads["ratio"][0]))
        assert (dual_moved > 1e-3) == bool((tr.ADV[side & sampled] < 0).any()), dual_moved  # acts on A < 0 only


def test_quarantine_kl():
    """--quar-kl 2: the quarantine's .grad gains 2 * grad of sum_t k3 KL(trained || deployed) / norm on the
    unflagged rows, the deployed log-probs detached (against autograd); the keep's .grad is unchanged; the
    logged qkl is that KL per token. Both adapter kinds."""
    a = train.get_args(["--router", "label", "--keep-forward", "deployed", "--micro", "2", "--temperature", "1"])
    rows, r = torch.arange(len(tr.COMPS)), tr.rollouts(range(len(tr.COMPS)))
    for kind in ("svd", "split"):
        m = tr.wrapped(kind)
        keep, quar, got = adapter.keep_params(m), adapter.quar_params(m), {}
        for beta in (0.0, 2.0):
            a.quar_kl = beta
            st = update.train_update(a, m, torch.optim.SGD(keep + quar, lr=0.0), r, tr.ADV, tr.FLAGS, rows,
                                     None, 100.0, kl=False)
            got[beta] = [p.grad.clone() for p in keep + quar]
        assert all(torch.equal(x, y) for x, y in zip(got[0.0][:len(keep)], got[2.0][:len(keep)]))
        sub = update.subset(r, rows[~tr.FLAGS])
        mask = sub.completion_mask.float()
        with torch.no_grad(), adapter.adapter_mode(m, "deployed"):
            dep = grpo.token_logp(m, sub, 1.0)
        kl = (grpo.kl_k3(grpo.token_logp(m, sub, 1.0), dep) * mask).sum()
        want = torch.autograd.grad(2.0 * kl / 100.0, quar)
        err = max(((y - x - w).norm() / w.norm()).item()
                  for x, y, w in zip(got[0.0][len(keep):], got[2.0][len(keep):], want))
        assert err < 1e-4 and kl > 1e-3 and abs(st["qkl"] - kl.item() / mask.sum().item()) < 1e-6, (kind, err, kl)


def test_dual_clip_surrogate():
    """grpo.clipped_surrogate, exact: ratios 0.5, 1, 2, 5 at A = -1 and +1 (eps 0.2). Plain PPO leaves
    A < 0 unbounded (-5 at ratio 5); dual clip 3 caps it at -3 with zero gradient; A > 0 is unchanged."""
    old = torch.zeros(2, 4)
    logp = torch.tensor([0.5, 1.0, 2.0, 5.0]).log().repeat(2, 1).requires_grad_()
    adv = torch.tensor([-1.0, 1.0])
    plain = torch.tensor([[-0.8, -1.0, -2.0, -5.0], [0.5, 1.0, 1.2, 1.2]])
    dual = torch.tensor([[-0.8, -1.0, -2.0, -3.0], [0.5, 1.0, 1.2, 1.2]])
    assert torch.allclose(grpo.clipped_surrogate(logp, old, adv, 0.2), plain)
    obj = grpo.clipped_surrogate(logp, old, adv, 0.2, dual=3.0)
    assert torch.allclose(obj, dual)
    obj.sum().backward()  # d(ratio * A)/d logp = ratio * A where unclipped, 0 where clipped
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.5, 1.0, 0.0, 0.0]]))


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
