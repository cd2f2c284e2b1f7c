"""
Peak GPU memory of the GPU recipe, `python train.py --router grad --model Qwen/Qwen3-4B` (config.py's
defaults: 16 prompts x 16 rollouts, 1024 new tokens, micro-batches, --grad-ckpt, the last 12 layers
wrapped), in bf16, on paper from figures measured on a CPU.

No GPU and no download: the per-layer and per-token costs are MEASURED on the random Qwen3-4B
(model.load_random, data/qwen3-4b.json's shapes) with its first 2 decoder layers (--layers 2), in bf16
on the CPU, the last one wrapped as ckpt.build wraps a layer. They are then EXTRAPOLATED to 36 layers
(12 wrapped) and to the recipe's batch; the table says which figure is which.

    python experiments/memory.py                                # the GPU recipe
    python experiments/memory.py --micro 8 --rank 256 --out D   # other settings; D gets memory.md, .json

Measured, per unit (bf16 weights; adapter.py deviation 4: U, Vh bf16, S and the offsets float32):
  params       bytes of decoder layer 0's parameters; the embedding (= lm_head, tied) and final norm apart
  svd          U, S, Vh of the wrapped layer's 7 projections, at --rank (0: full)
  merged       the merged weight W + U diag(s) Vh that a no-grad forward caches per module (deviation 5)
  adapter      s_keep, s_quar and their gradients, and RoutedAdamW's state after one step
  slots        slot.Slot's per-rollout gradient sums, (n, r) float32 per module, per rollout
  activations  bytes autograd keeps per token inside the wrapped layer during a routed forward (the
               slope between two lengths). --grad-ckpt keeps only each wrapped layer's input, 2 d bytes a
               token (torch.utils.checkpoint's definition, not measured), and recomputes one layer
  head         the rise of the RSS high-water mark per completion token of grpo.token_logp with the
               entropy, then backward, less the wrapped layer's activations (CPU allocator: approximate)
  kv cache     sampler.Decoder's K/V buffers, per rollout, position and layer
Not counted: the CUDA context and allocator slack (~1-2 GB), kernels' workspace, the first 24 layers'
transient activations (no gradient flows there: autograd keeps nothing).
Peak = resident + max(train: activations + head, generation: the KV cache of the GEN_ROWS rollouts
model.generate samples at once, as sampler.sample allocates it, + its logits).
"""
import argparse
import json
import os
import re
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# the repo root: adapter, config, grpo, model, optim, routing, sampler are top-level modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import adapter  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
import optim  # noqa: E402
import routing  # noqa: E402
import sampler  # noqa: E402

KEPT = 2  # decoder layers built on the CPU; the last is wrapped
GB = 1e9


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def vm(key):
    """A /proc/self/status figure in bytes (Linux)."""
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def rss_rise(fn):
    """How far the RSS high-water mark rose above the current RSS while fn ran."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = vm("VmRSS")
    fn()
    return vm("VmHWM") - base


def build(rank):
    """The random Qwen3-4B's first KEPT layers in bf16 on the CPU, the last wrapped: (model, {name: SVDDelta})."""
    model, _ = M.load_model("qwen3-4b-random", "cpu", layers=KEPT)
    model.to(torch.bfloat16)
    mods = adapter.wrap(model, "svd", layers=[KEPT - 1], rank=rank or None, cache_dir=M.CACHE,
                        model_id="qwen3-4b-random")
    return model, mods


def rollouts(b, P, T, gen):
    ids = torch.randint(0, 49152, (b, P + T), generator=gen)  # SmolLM2's token ids
    ones = torch.ones_like(ids)
    return M.Rollouts(ids[:, :P], ones[:, :P], ids[:, P:], ones[:, P:], [""] * b)


def measure_static(model, mods, n_rollouts):
    """Bytes of what stays resident: per layer, per wrapped layer, per rollout."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    layer = nbytes(model.model.layers[0].parameters())
    trainable = adapter.keep_params(model) + adapter.quar_params(model)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))             # fills the merged-weight caches
    merged = nbytes(hit[1] for m in mods.values() for hit in m._cache.values())
    opt = optim.make_optimizer(model, 1e-3)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = nbytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    cap = routing.Capture(model, n_rollouts, routing.ROUTERS["label"], flags=torch.zeros(n_rollouts, dtype=bool))
    with cap:
        cap.rows(torch.arange(1))
        grpo.token_logp(model, rollouts(1, 4, 4, torch.Generator().manual_seed(0))).sum().backward()
    slots = nbytes(s.g for s in cap.slots.values())
    return {"params_layer": layer, "params_other": nbytes(frozen) - KEPT * layer,
            "svd_layer": nbytes(t for m in mods.values() for t in (m.U, m.S, m.Vh)), "merged_layer": merged,
            "adapter_layer": 2 * nbytes(trainable), "optimizer_layer": state, "slots_rollout_layer": slots / n_rollouts}


def measure_activations(model, tokens=(128, 384)):
    """Bytes autograd saves per token inside the wrapped layer in a routed forward: the slope between two
    lengths, storages that exist anyway (weights, U, S, Vh) not counted."""
    layer, seen, inside = model.model.layers[KEPT - 1], {}, [False]
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in resident:
            seen[s.data_ptr()] = s.nbytes()
        return t
    hooks = [layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    total = []
    for n in tokens:
        seen.clear()
        cap = routing.Capture(model, 1, routing.ROUTERS["label"], flags=torch.ones(1, dtype=torch.bool))
        with cap, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cap.rows(torch.arange(1))
            out = model(input_ids=torch.randint(0, 49152, (1, n))).logits[:, -1].float().sum()
            total.append(sum(seen.values()))
            out.backward()
    for h in hooks:
        h.remove()
    return (total[1] - total[0]) / (tokens[1] - tokens[0])


def measure_head(model, act_tok, T=(128, 512), P=16):
    """Peak bytes per completion token of token_logp (with the entropy, as train.py logs it) and its backward."""
    def step(t):
        r = rollouts(1, P, t, torch.Generator().manual_seed(t))
        logp, _ = grpo.token_logp(model, r, 1.0, with_entropy=True)     # (1, t)
        logp.sum().backward()
    rise = [rss_rise(lambda: step(t)) for t in (T[0], T[1], T[0], T[1])]  # twice each: the allocator warms up
    return (rise[3] - rise[2]) / (T[1] - T[0]) - act_tok


def measure_kv(model, S=64):
    dec = sampler.Decoder(model, 1, S)
    return nbytes(dec.K + dec.V) / (S * KEPT)                            # per rollout, position, layer


def svd_bytes(c, s_bytes, uv_bytes, rank=0):
    """Every layer's 7 projections: sum of d_out r + r + r d_in elements (S float32, U and Vh as given)."""
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    per = sum(uv_bytes * (o + d) * min(rank or o, o, d) + s_bytes * min(rank or o, o, d) for o, d in shapes)
    return c.num_hidden_layers * per


def estimate(u, a, c):
    """{row: (GB on the GPU, how it was obtained)}: measured units x the recipe's counts."""
    L, W = c.num_hidden_layers, a.wrap_layers or c.num_hidden_layers
    n, seq = a.prompts * a.group_size, a.prompt_tokens + a.max_new_tokens
    g = min(n, M.GEN_ROWS)  # model.generate samples GEN_ROWS rollouts at a time
    act_ckpt = W * a.micro * seq * 2 * c.hidden_size + a.micro * seq * u["act_tok_layer"]
    act = act_ckpt if a.grad_ckpt else W * a.micro * seq * u["act_tok_layer"]
    rows = {
        "weights (36 layers, embedding = lm_head)": (u["params_other"] + L * u["params_layer"], "measured/layer x 36"),
        f"SVD factors U, S, Vh ({W} wrapped layers)": (W * u["svd_layer"], f"measured/layer x {W}"),
        "merged weights, no-grad forwards": (W * u["merged_layer"], f"measured/layer x {W}"),
        "s_keep, s_quar, grads, RoutedAdamW":
            (W * (u["adapter_layer"] + u["optimizer_layer"]), f"measured/layer x {W}"),
        f"per-rollout gradient sums ({n} rollouts)": (n * W * u["slots_rollout_layer"], f"measured x {n} x {W}"),
        f"train: activations ({a.micro} x {seq} tokens{', --grad-ckpt' if a.grad_ckpt else ''})":
            (act, "measured/token/layer" + (" + 2d/token/layer (ckpt)" if a.grad_ckpt else "")),
        f"train: logits head ({a.micro} x {a.max_new_tokens + 1} tokens)":
            (a.micro * (a.max_new_tokens + 1) * u["head_tok"], "measured/token (RSS)"),
        f"generation: KV cache ({g} of the {n} rollouts at a time x {seq} tokens, 36 layers)":
            (g * seq * L * u["kv_tok_layer"], "measured/token/layer x 36"),
        f"generation: logits, softmax, cdf ({g} rows)": (3 * g * c.vocab_size * 4, "shapes"),
    }
    rows = {k: (v / GB, how) for k, (v, how) in rows.items()}
    resident = sum(v for k, (v, _) in rows.items() if not k.startswith(("train", "generation")))
    train = sum(v for k, (v, _) in rows.items() if k.startswith("train"))
    gen = sum(v for k, (v, _) in rows.items() if k.startswith("generation"))
    return rows, {"resident": resident, "train": train, "generation": gen, "peak": resident + max(train, gen),
                  "act_other_mode": (W * a.micro * seq * u["act_tok_layer"] if a.grad_ckpt else act_ckpt) / GB}


def table(u, a, c, rows, tot):
    L = ["Written by `python experiments/memory.py " + " ".join(sys.argv[1:]) + "`.", "",
         f"Qwen3-4B, bf16, `python train.py --router grad --model Qwen/Qwen3-4B`: {a.prompts} x {a.group_size} "
         f"rollouts, {a.prompt_tokens} prompt + {a.max_new_tokens} new tokens, micro-batch {a.micro}, "
         f"--wrap-layers {a.wrap_layers}, --rank {a.rank}{', --grad-ckpt' if a.grad_ckpt else ''}", "",
         "| term | GB | how |", "|---|---:|---|"]
    L += [f"| {k} | {v:.2f} | {how} |" for k, (v, how) in rows.items()]
    L += [f"| **resident** | {tot['resident']:.2f} | sum of the rows above train |",
          f"| **train phase** | {tot['train']:.2f} | activations + head |",
          f"| **generation phase** | {tot['generation']:.2f} | KV cache + logits |",
          f"| **peak** | **{tot['peak']:.1f}** | resident + max(train, generation); + CUDA context ~1-2 GB |", "",
          f"Measured on the CPU (random Qwen3-4B, first {KEPT} layers, bf16): a decoder layer's parameters "
          f"{u['params_layer'] / 1e6:.1f} MB, embedding + norm {u['params_other'] / 1e6:.1f} MB; a wrapped layer's "
          f"U, S, Vh {u['svd_layer'] / 1e6:.1f} MB, merged weights {u['merged_layer'] / 1e6:.1f} MB, offsets + grads "
          f"{u['adapter_layer'] / 1e3:.0f} kB, RoutedAdamW {u['optimizer_layer'] / 1e3:.0f} kB, per-rollout sums "
          f"{u['slots_rollout_layer'] / 1e3:.0f} kB a rollout; activations {u['act_tok_layer'] / 1e3:.0f} kB a token "
          f"a wrapped layer; logits head {u['head_tok'] / 1e6:.2f} MB a completion token; KV cache "
          f"{u['kv_tok_layer']:.0f} B a token a layer.",
          f"Parameters: {u['n_params'] / 1e9:.3f} B (counted on the meta device, all 36 layers); activations "
          f"{'without' if a.grad_ckpt else 'with'} --grad-ckpt would be {tot['act_other_mode']:.2f} GB.",
          f"SVD factors of all 36 layers at full rank (shapes): float32 {u['svd36_fp32'] / GB:.2f} GB, bf16 "
          f"{u['svd36_bf16'] / GB:.2f} GB (S float32); the disk cache (model.CACHE) holds the same bytes."]
    return "\n".join(L)


def main(argv=None):
    import config
    d = config.get_args([])  # the defaults: the GPU recipe
    p = argparse.ArgumentParser(description="Qwen3-4B peak GPU memory, measured per layer on a CPU")
    p.add_argument("--wrap-layers", type=int, default=d.wrap_layers)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--micro", type=int, default=d.micro)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--prompt-tokens", type=int, default=300, help="chat prompt length (not measured)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=d.grad_ckpt)
    p.add_argument("--out", default=None, help="a folder for memory.md and memory.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = Qwen3Config(**{k: v for k, v in json.load(open(os.path.join(ROOT, "data", "qwen3-4b.json"))).items()
                         if not k.startswith("_")})
    with torch.device("meta"):
        n_params = sum(t.numel() for t in Qwen3ForCausalLM(cfg).parameters())
    model, mods = build(a.rank)
    u = measure_static(model, mods, a.prompts * a.group_size)
    u["act_tok_layer"] = measure_activations(model)
    u["head_tok"] = measure_head(model, u["act_tok_layer"])
    u["kv_tok_layer"] = measure_kv(model)
    u.update(n_params=n_params, svd36_fp32=svd_bytes(cfg, 4, 4), svd36_bf16=svd_bytes(cfg, 4, 2))
    rows, tot = estimate(u, a, cfg)
    text = table(u, a, cfg, rows, tot)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        open(os.path.join(a.out, "memory.md"), "w").write(text + "\n")
        json.dump({"args": vars(a), "measured": u, "gb": {k: v for k, (v, _) in rows.items()}, "totals": tot},
                  open(os.path.join(a.out, "memory.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
