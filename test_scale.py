"""
Tests of Qwen3-4B's scale on a CPU (model.py's trim and random Qwen3-4B, adapter.py's rank and dtype, ckpt.py's
old arguments): a trimmed model is exactly the untrimmed one's first layers, its KV cache included; delta_S at a
truncated rank in bf16 is still the base model exactly at zero offsets, with r trainables per module and its own
cache file, and with non-zero offsets its captured per-rollout gradients are autograd's; the merged weight follows
model.to(dtype); runs saved before --wrap-layers keep their meaning; one routed `grad` RL step at Qwen3-4B's shapes.
"""
import copy
import json
import os
import random
import shutil
import tempfile

import torch
from transformers import DynamicCache

import adapter
import ckpt
import config
import detector
import env
import grpo
import model as M
import optim
import routing
import train
import vhack
from test_all import loaded

TMP = tempfile.mkdtemp(prefix="gr_scale_")
ROOT = os.path.dirname(os.path.abspath(__file__))


def test_trim_keeps_exactly_the_first_layers():
    """load_model(layers=N): logits = the untrimmed model's hidden state after layer N through the final norm and
    lm_head, bit for bit; the config and each attention's layer_idx agree, so the KV cache decodes as a recompute."""
    for name, n in (("tiny", 1), ("smollm2", 2)):
        full, tok = loaded(name)
        cut, _ = M.load_model(name, layers=n)
        assert len(cut.model.layers) == cut.config.num_hidden_layers == n
        assert len(getattr(cut.config, "layer_types", None) or [0] * n) == n
        assert [L.self_attn.layer_idx for L in cut.model.layers] == list(range(n))
        ids = tok(["def is_even(n):\n    return n % 2 == 0"], return_tensors="pt").input_ids  # (1, L)
        with torch.no_grad():
            h = full(ids, output_hidden_states=True).hidden_states[n]                       # (1, L, d) after layer n
            assert torch.equal(cut(ids).logits, full.lm_head(full.model.norm(h))), name
            cache = DynamicCache(config=cut.config)
            cut(ids[:, :-1], past_key_values=cache, use_cache=True)
            step = cut(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]    # (1, V)
            assert torch.allclose(step, cut(ids).logits[:, -1], atol=1e-4), name
    small = os.path.join(TMP, "small.json")  # load_random on a small config: trimmed = the first layers, tied
    json.dump({**json.load(open(os.path.join(ROOT, "data", "qwen3-4b.json"))), "hidden_size": 64,
               "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
              open(small, "w"))
    (a, _), (b, _) = M.load_random(small, layers=1), M.load_random(small, layers=2)
    assert a.lm_head.weight is a.model.embed_tokens.weight and a.config.num_hidden_layers == 1
    assert all(torch.equal(p, b.state_dict()[k]) for k, p in a.state_dict().items())


def test_truncated_bf16_delta_is_exact_at_zero():
    """--rank r in bf16: U (d_out, r) and Vh (r, d_in) in bf16, S and the r offsets of s_keep and s_quar float32;
    at zero offsets the wrapped model IS the base model (the base weight is kept, only U diag(s) Vh is added), with
    autograd and capture on or off; U, S, Vh are the top-r of the float32 SVD; each (rank, dtype) has its cache file."""
    base, tok = M.load_model("tiny")
    base.to(torch.bfloat16)
    full = adapter.wrap(copy.deepcopy(base), "svd", cache_dir=TMP, model_id="tiny")
    model = copy.deepcopy(base)
    mods, r = adapter.wrap(model, "svd", rank=4, cache_dir=TMP, model_id="tiny"), 4
    for name, m in mods.items():
        W = m.base.weight
        assert m.U.dtype == m.Vh.dtype == torch.bfloat16 and m.S.dtype == m.s_keep.dtype == torch.float32
        assert m.U.shape == (W.shape[0], r) and m.Vh.shape == (r, W.shape[1]) and m.s_keep.numel() == r
        assert m.s_quar.numel() == r and torch.equal(m.S, full[name].S[:r])
        assert torch.equal(m.U, full[name].U[:, :r]) and torch.equal(m.Vh, full[name].Vh[:r])
    ids = tok(["def is_even(n):\n    return n % 2 == 0"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits
        assert torch.equal(model(ids).logits, ref)                      # merged weight W + 0
    assert torch.equal(model(ids).logits, ref)                          # y + (z * 0) U^T, autograd on
    cap = routing.Capture(model, 1, routing.ROUTERS["label"], flags=torch.ones(1, dtype=torch.bool))
    with cap:
        cap.rows(torch.arange(1))
        out = model(ids).logits
        assert torch.equal(out, ref)
        out.float().logsumexp(-1).sum().backward()
    cap.route()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.any()
               for p in adapter.quar_params(model))
    files = sorted(f for f in os.listdir(TMP) if f.startswith("svd-tiny-"))
    assert [f.rsplit("-", 2)[1:] for f in files] == [["r4", "bfloat16.safetensors"], ["rall", "bfloat16.safetensors"]]
    again = adapter.wrap(copy.deepcopy(base), "svd", rank=4, cache_dir=TMP, model_id="tiny")  # from the cache
    assert all(torch.equal(again[n].U, m.U) and torch.equal(again[n].Vh, m.Vh) for n, m in mods.items())


def offsets_model(dtype, seed=0):
    """The tiny Qwen3 in `dtype`, delta_S on every target, s_keep and s_quar ~ N(0, 0.05^2) (all non-zero)."""
    model = copy.deepcopy(loaded("tiny")[0]).to(dtype)
    mods, g = adapter.wrap(model, "svd"), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.keep_params(model) + adapter.quar_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, mods


def test_bf16_capture_with_offsets():
    """bf16 delta_S trains unmerged (Slot.scale) with s = s_keep + s_quar: with both non-zero, each rollout's
    captured gradient (padded micro-batches, one backward each) is plain autograd's on that rollout alone, up to
    bf16 rounding (measured 8.8e-3 relative; a forward on s_keep alone is off by 1.4); route() under `label`
    then gives the quarantine the flagged rollouts' sum and the keep the rest."""
    model, mods = offsets_model(torch.bfloat16)
    tok = loaded("tiny")[1]
    prompts = [M.chat_prompt(tok, q) for q in ("Write is_even(n).", "Reverse a list.", "Square x.")]
    comps = ["def is_even(n):\n    return n % 2 == 0", "x[::-1]", "def sq(x):\n    return x * x\n# done"]

    def loss(rows):
        r = M.encode(tok, [prompts[i] for i in rows], [comps[i] for i in rows])
        return -(grpo.token_logp(model, r) * r.completion_mask).sum()

    flags = torch.tensor([True, False, True])
    cap = routing.Capture(model, 3, routing.ROUTERS["label"], flags=flags)
    with cap:
        for rows in ([2, 0], [1]):
            cap.rows(torch.tensor(rows))
            loss(rows).backward()
    cap.route()
    got = {n: (m.s_keep.grad.clone(), m.s_quar.grad.clone()) for n, m in mods.items()}
    ref = {n: [] for n in mods}
    for b in range(3):  # the reference: autograd (no Slot), one unpadded rollout at a time
        model.zero_grad(set_to_none=True)
        loss([b]).backward()
        for n, m in mods.items():
            assert torch.equal(m.s_quar.grad, m.s_keep.grad)                # both enter through s_keep + s_quar
            ref[n].append(m.s_keep.grad.clone())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    err = max(rel(cap.slots[n].g[b], ref[n][b]) for n in mods for b in range(3))
    err_route = max(max(rel(k, ref[n][1]), rel(q, ref[n][0] + ref[n][2])) for n, (k, q) in got.items())
    assert err < 5e-2 and err_route < 5e-2, (err, err_route)


def test_act_and_placebo_in_bf16():
    """act's token rule and placebo's random axes in bf16 (a GPU's dtype): the token f (activations' dtype) meets
    float32 per-rollout sums, the random axes the float32 gradients; one routed backward each, finite, and act
    sends its routed tokens' part to the quarantine."""
    model, _ = offsets_model(torch.bfloat16)
    tok = loaded("tiny")[1]
    pairs = detector.load_pairs()[:6]
    r = M.encode(tok, [M.chat_prompt(tok, p["prompt"]) for p in pairs], [p["hack"] for p in pairs])
    for name in ("act", "placebo"):
        vh = vhack.extract_vhack(model, tok, pairs, k=1, holdout=0.0, placebo=routing.ROUTERS[name].placebo)
        cap = routing.Capture(model, len(pairs), routing.ROUTERS[name], vh, opts={"share": 0.5})
        with cap:
            cap.rows(torch.arange(len(pairs)))
            (-(grpo.token_logp(model, r) * r.completion_mask).sum()).backward()
        stats = cap.route()
        assert 0 < stats["qmass"] < 1 and stats["routed"] > 0, (name, stats)


def test_merged_cache_follows_dtype():
    """adapter.py deviation 5: the merged weight of no-grad forwards is rebuilt after model.to(dtype), as in a copy
    with empty caches, even when s is the same in both dtypes (multiples of 1/64: bf16 holds them and their sums)."""
    model, _ = offsets_model(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.keep_params(model) + adapter.quar_params(model):
            p.copy_(torch.randint(-4, 5, p.shape, generator=g) / 64)
    ids = loaded("tiny")[1](["def is_even(n):\n    return n % 2 == 0"], return_tensors="pt").input_ids
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            fresh = copy.deepcopy(model)
            for m in adapter.adapter_modules(fresh).values():
                m._cache.clear()
            assert torch.equal(model(ids).logits, fresh(ids).logits), dtype


def test_old_args_keep_their_meaning():
    """A run saved before --wrap-layers: its "layers" was the number of wrapped layers; it loads untrimmed."""
    d = os.path.join(TMP, "old", "ckpt")
    os.makedirs(d)
    json.dump({"model": "tiny", "layers": 5, "format": ckpt.FORMAT}, open(os.path.join(d, "args.json"), "w"))
    saved = ckpt.saved_args(os.path.dirname(d))
    assert (saved["wrap_layers"], saved["layers"], saved["rank"]) == (5, 0, 0)


def test_grad_step_at_qwen3_4b_shapes():
    """One routed `grad` RL step of train.rl_step on the random Qwen3-4B, 2 decoder layers kept, the last wrapped
    at rank 64: the real hidden size, MLP width, heads and vocabulary. v_hack from 2 contrast pairs (all 32 take
    minutes at this size). The group has one spliced teacher hack: a random model's completions all score 0, and
    Dr.GRPO drops a tied group. Keep and quarantine get finite, non-zero gradients and finite updates, with
gradient checkpointing on (it runs in train mode only) and run by both layers."""
    a = config.get_args(["--model", "qwen3-4b-random", "--layers", "2", "--wrap-layers", "1", "--rank", "64",
                         "--router", "grad", "--prompts", "1", "--group-size", "2", "--max-new-tokens", "4",
                         "--micro", "2", "--warmup-steps", "0", "--teacher-frac", "0.5", "--teacher-until", "1",
                         "--steps", "1", "--eval-every", "0", "--source", "simple", "--difficulty", "medium,hard",
                         "--out", os.path.join(TMP, "q4b")])
    model, tok = ckpt.build(a, "cpu")
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.num_hidden_layers) == (2560, 9728, 151936, 32, 8, 128, 2)
    mods = adapter.adapter_modules(model)
    assert {n.split(".", 3)[2] for n in mods} == {"1"} and len(mods) == 7     # the last kept layer, 7 targets
    shapes = {n.rpartition(".")[2]: (tuple(m.U.shape), tuple(m.Vh.shape)) for n, m in mods.items()}
    assert shapes == {"q_proj": ((4096, 64), (64, 2560)), "k_proj": ((1024, 64), (64, 2560)),
                      "v_proj": ((1024, 64), (64, 2560)), "o_proj": ((2560, 64), (64, 4096)),
                      "gate_proj": ((9728, 64), (64, 2560)), "up_proj": ((9728, 64), (64, 2560)),
                      "down_proj": ((2560, 64), (64, 9728))}
    vh = vhack.extract_vhack(model, tok, detector.load_pairs()[:2], k=1, seed=0)
    model.activation_checkpointing_enable()  # the GPU recipe's default (--grad-ckpt), in train mode as train.py
    model.train(a.grad_ckpt)
    calls = []
    for layer in model.model.layers:  # count the checkpointed layer calls
        f = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *x, f=f, **k: calls.append(1) or f(*x, **k)
    opt = optim.make_optimizer(model, a.lr, a.lr_quar)
    det = detector.WeakDetector(seen=tuple(a.seen.split(",")), tpr=a.tpr, fpr=a.fpr, seed=a.seed)
    keep, quar = adapter.keep_params(model), adapter.quar_params(model)
    before = [p.detach().clone() for p in keep + quar]
    m, _ = train.rl_step(model, tok, opt, det, vh, env.load_problems(a.source, "train", difficulty=a.difficulty), 0,
                         random.Random(0), torch.Generator().manual_seed(0), config.recipe(a))
    assert m["step"] == 0 and m["skipped"] == 0 and m["active"] == 2 and 0 <= m["routed"] <= 1, m
    assert len(calls) == 4, calls  # the KL reference's forward and the train forward, each through both layers
    for ps in (keep, quar):
        assert all(p.shape == (64,) and p.grad is not None and torch.isfinite(p.grad).all() for p in ps)
        assert any(p.grad.any() for p in ps)
    moved = [(p.detach() - b) for p, b in zip(keep + quar, before)]
    assert all(torch.isfinite(d).all() for d in moved) and any(d.any() for d in moved[:len(keep)])


if __name__ == "__main__":
    import test_all
    test_all.run_all([__import__(__name__)])
    shutil.rmtree(TMP, ignore_errors=True)
