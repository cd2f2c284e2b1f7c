"""
Tests of data parallel training (dist.py), with the gloo backend on the CPU.

Two ranks under `python -m torch.distributed.run --nproc_per_node 2` (torchrun, what users run) train the
tiny Qwen3 for one warm-up step and two RL steps with the placebo router, whose f depends on every
rank's rollouts (its band is shifted so that the step's mean f is --share). Each rank runs this file as
its entry point: train.main with routed_update recorded (its inputs and the adapter after it). The ranks
sample other completions than a 1-process run would (dist.py: each rank its own stream), so the reference
is one process replaying the same updates on the very rollouts the ranks generated, the whole batch in one
routed_update: it must end with the same adapter (float tolerance) and log the same routing. Every rank
holds the same adapter after every update (exactly), trains disjoint whole groups, and only rank 0 logs.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

import adapter
import ckpt
import config
import dist
import optim
import test_train
import train
import vhack

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp(prefix="gr_test_dist_")
FAST = test_train.FAST  # the tiny Qwen3, 2 prompts x 4 rollouts, 24 new tokens, micro-batches of 4, 1 warm-up step


def worker(argv):
    """One rank: train.main, recording each routed_update's inputs, outputs and the adapter after it."""
    for d in (TMP, test_train.TMP):  # made on import, used by the tests only
        shutil.rmtree(d, ignore_errors=True)
    calls, update = [], train.routed_update

    def recorded(model, opt, r, adv, flags, active, vh, rc, kl=True, sampled=None):
        lrs = [g["lr"] for g in opt.param_groups]
        out = update(model, opt, r, adv, flags, active, vh, rc, kl, sampled)
        calls.append({"r": r, "adv": adv, "flags": flags, "active": active, "kl": kl, "sampled": sampled,
                      "lrs": lrs, "out": {**out},
                      "adapter": {k: v.clone() for k, v in adapter.adapter_state(model).items()}})
        return out

    train.routed_update = recorded
    a = config.get_args(argv)
    train.run(a)
    torch.save(calls, os.path.join(a.out, f"calls-rank{dist.RANK}.pt"))


def close(x, y, tol=1e-5):
    return (x is None and y is None) or abs(x - y) <= tol * max(1.0, abs(y))


def test_two_ranks_equal_one_process_on_their_rollouts():
    out = os.path.join(TMP, "placebo")
    args = FAST + ["--router", "placebo", "--steps", "2", "--out", out]
    t = time.time()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    p = subprocess.run(torchrun + ["test_dist.py"] + args, cwd=HERE, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"  torchrun, 2 ranks: {time.time() - t:.1f}s")
    assert p.returncode == 0, p.stderr[-4000:]
    c0, c1 = (torch.load(os.path.join(out, f"calls-rank{k}.pt"), weights_only=False) for k in (0, 1))
    assert len(c0) == len(c1) == 3  # the warm-up step, 2 RL steps
    B = 8  # 2 prompts x 4: rank 0 holds group 0, rank 1 group 1
    for x, y in zip(c0, c1):  # the same batch on both ranks, disjoint whole groups, the same adapter after
        assert x["r"].texts == y["r"].texts and torch.equal(x["adv"], y["adv"]) and torch.equal(x["flags"], y["flags"])
        assert (x["active"] < B // 2).all() and (y["active"] >= B // 2).all(), (x["active"], y["active"])
        assert all(torch.equal(x["adapter"][k], y["adapter"][k]) for k in x["adapter"])
    f = torch.stack([x["out"]["rollout"]["f"].cpu() for x in c0[1:]])  # (steps, B) of the RL steps
    assert (f[:, :B // 2].sum(1) * f[:, B // 2:].sum(1) > 0).any(), f  # some step routes rows of both ranks
    ms = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in ms] == [0, 1]  # rank 0 logs, once
    ta = config.get_args(args)
    assert all(abs(m["routed"] - ta.share) < 1e-4 for m in ms), ms  # placebo's share, over both ranks' rollouts
    # the reference: one process, the same updates, each on the whole batch
    model, _ = ckpt.build(ta, "cpu")
    vh = vhack.VHack.load(os.path.join(out, "ckpt", "vhack"))
    opt, rc, err = optim.make_optimizer(model, ta.lr, ta.lr_quar), config.recipe(ta), 0.0
    for x, y in zip(c0, c1):
        for g, lr in zip(opt.param_groups, x["lrs"]):
            g["lr"] = lr
        active = torch.cat([x["active"], y["active"]])  # (n,) sorted: rank 0 holds the first groups
        ref = train.routed_update(model, opt, x["r"], x["adv"], x["flags"], active, vh, rc, x["kl"], x["sampled"])
        err = max([err] + [(v - x["adapter"][k]).abs().max().item() for k, v in adapter.adapter_state(model).items()])
        for k in ("routed", "qmass", "cos_mean", "kl", "logp", "entropy", "skipped"):
            assert close(x["out"].get(k), ref.get(k)), (k, x["out"].get(k), ref.get(k))
        for k in ("cos", "f", "keep2", "quar2"):
            assert torch.allclose(x["out"]["rollout"][k].cpu(), ref["rollout"][k].cpu(), rtol=1e-4, atol=1e-6), k
    moved = [max(p.abs().max().item() for p in ps) for ps in (adapter.keep_params(model), adapter.quar_params(model))]
    print(f"  max |adapter 2 ranks - adapter 1 process| = {err:.1e} (largest keep, quarantine entry {moved})")
    assert err < 1e-5 and min(moved) > 1e-3
    st = load_file(os.path.join(out, "ckpt", "adapter.safetensors"))
    assert all(torch.equal(st[k], c0[-1]["adapter"][k]) for k in st)


def test_prompts_not_divisible_by_ranks_is_one_line_exit_2():
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            train.main(FAST + ["--prompts", "3", "--out", os.path.join(TMP, "odd")])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --prompts 3"), (code, lines)
    assert dist.WORLD == 1  # nothing was initialised


if __name__ == "__main__":
    if os.environ.get("WORLD_SIZE"):  # a rank under torchrun
        worker(sys.argv[1:])
    else:
        import test_all
        failed = test_all.run_all([sys.modules[__name__]])
        shutil.rmtree(TMP, ignore_errors=True)
        shutil.rmtree(test_train.TMP, ignore_errors=True)
        sys.exit(1 if failed else 0)
