"""
Peak GPU memory of `python train.py --router grad --model Qwen/Qwen3-4B` with its defaults.

No GPU is needed: the one number that is hard to get on paper, the bytes autograd keeps per token
for one wrapped decoder layer, is MEASURED on a real-size Qwen3-4B layer (random weights, bf16, on
the CPU), wrapped as train.py wraps it, inside routing.Capture as in a training step, with
torch.autograd.graph.saved_tensors_hooks counting every distinct storage kept for the backward.
Everything else is arithmetic on the config, printed term by term.

    python experiments/memory.py                          # train.py's defaults
    python experiments/memory.py --group-size 64 --grad-ckpt

Terms (bf16 weights on the GPU, model.load_model; adapter.py deviation 4: U, S, Vh in float32):
  weights      all parameters, 2 bytes each
  svd          U (d_out, r), S (r,), Vh (r, d_in) of each wrapped Linear, 4 bytes each
  merged       the merged weight W + U diag(s) Vh cached for no-grad forwards (adapter.py deviation 5)
  activations  one micro-batch: wrapped layers x tokens x measured bytes/token/layer (with
               --grad-ckpt: each wrapped layer keeps its input, and one layer is recomputed)
  logits       one micro-batch: bf16 logits, their float32 copy, /temperature, softmax (grpo.token_logp)
  kv cache     generation: 2 x layers x kv_heads x head_dim x 2 bytes per token, all rollouts
  per-rollout  routing.Slot buffers (n, r) float32 per wrapped module; s_keep/s_quar, grads, AdamW
Peak = weights + svd + merged + max(training: activations + logits, generation: kv cache) + the rest.
"""
import argparse
import os
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# the repo root: adapter, routing, config are top-level modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adapter  # noqa: E402
import routing  # noqa: E402

# Qwen/Qwen3-4B config.json (written out: no hub on this machine).
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
GB = 1e9


def linear_shapes(c):
    """(d_out, d_in) of the seven wrapped projections of one decoder layer."""
    h, i, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["head_dim"]
    return {"q_proj": (q * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, q * hd),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def n_params(c):
    per_layer = sum(o * i for o, i in linear_shapes(c).values()) + 2 * c["hidden_size"] + 2 * c["head_dim"]
    emb = c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * per_layer + emb + c["hidden_size"]


def measure_layer_bytes(c, tokens=(128, 384), dtype=torch.bfloat16):
    """Bytes autograd saves per token inside ONE wrapped decoder layer during a routed forward: the
    slope between two sequence lengths, not counting storages that exist anyway (weights, U, S, Vh)."""
    cfg = Qwen3Config(**{**c, "num_hidden_layers": 1, "vocab_size": 256})
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    adapter.wrap(model, "svd", layers=[0])
    layer, seen, inside = model.model.layers[0], {}, [False]
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in resident:
            seen[s.data_ptr()] = s.nbytes()
        return t
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    total = []
    for n in tokens:
        seen.clear()
        cap = routing.Capture(model, n_rollouts=1, router=routing.ROUTERS["label"], vhack=None,
                              flags=torch.ones(1, dtype=torch.bool))
        with cap, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cap.rows(torch.arange(1))
            out = model(input_ids=torch.randint(0, 256, (1, n))).logits.float().sum()
            total.append(sum(seen.values()))
            out.backward()
    return (total[1] - total[0]) / (tokens[1] - tokens[0])


def estimate(a, per_tok_layer):
    c, L = QWEN3_4B, a.layers
    shapes = linear_shapes(c)
    r = {k: min(o, i) for k, (o, i) in shapes.items()}
    svd = L * sum(4 * (o * r[k] + r[k] + r[k] * i) for k, (o, i) in shapes.items())
    merged = L * sum(2 * o * i for o, i in shapes.values())
    seq = a.prompt_tokens + a.max_new_tokens
    tok = a.micro * seq
    act_full = L * tok * per_tok_layer
    act_ckpt = L * tok * 2 * c["hidden_size"] + tok * per_tok_layer
    V, T = c["vocab_size"], a.max_new_tokens + 1
    logits = a.micro * T * V * (2 + 4 + 4 + 4)
    n = a.prompts * a.group_size
    kv = n * seq * 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2
    n_s = L * sum(r.values())
    rest = n * n_s * 4 + 2 * n_s * 4 * 4  # Slot buffers; s_keep+s_quar with grads and two AdamW moments
    terms = {"weights": 2 * n_params(c), "svd": svd, "merged": merged,
             "activations": act_ckpt if a.grad_ckpt else act_full, "logits": logits, "kv cache": kv,
             "per-rollout + optimizer": rest}
    peak = svd + merged + terms["weights"] + max(terms["activations"] + logits, kv) + rest
    return terms, peak, {"act_full": act_full, "act_ckpt": act_ckpt, "kv_per_rollout": kv / n,
                         "slot_per_rollout": n_s * 4}


def largest_group(a, per_tok_layer, budget):
    g = 1
    while estimate(argparse.Namespace(**{**vars(a), "group_size": g * 2}), per_tok_layer)[1] <= budget and g < 2 ** 20:
        g *= 2
    lo, hi = g, g * 2  # bisect between a fitting and a non-fitting size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = estimate(argparse.Namespace(**{**vars(a), "group_size": mid}), per_tok_layer)[1] <= budget
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


def main(argv=None):
    import config
    d = config.get_args([])  # the defaults of the command whose memory this is
    p = argparse.ArgumentParser(description="Qwen3-4B peak GPU memory on paper (train.py defaults)")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--micro", type=int, default=d.micro)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--prompt-tokens", type=int, default=200, help="chat prompt length (simple problems: ~150-200)")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--budget-gb", type=float, default=80.0)
    a = p.parse_args(argv)
    per = measure_layer_bytes(QWEN3_4B)
    print(f"measured: {per / 1e3:.0f} kB saved per token per wrapped Qwen3-4B layer (bf16, routed forward)")
    terms, peak, extra = estimate(a, per)
    for k, v in terms.items():
        print(f"  {k:>24}: {v / GB:7.2f} GB")
    other = extra["act_full"] if a.grad_ckpt else extra["act_ckpt"]
    print(f"  {'activations (other mode)':>24}: {other / GB:7.2f} GB"
          f"  ({'without' if a.grad_ckpt else 'with'} --grad-ckpt)")
    print(f"peak ~ {peak / GB:.1f} GB (+ CUDA context and allocator slack, ~1-2 GB)")
    print(f"per extra rollout: kv cache {extra['kv_per_rollout'] / 1e6:.0f} MB, routing buffers "
          f"{extra['slot_per_rollout'] / 1e6:.1f} MB; micro-batch activations do not grow with G")
    g = largest_group(a, per, (a.budget_gb - 2) * GB)
    print(f"largest --group-size on {a.budget_gb:g} GB (2 GB slack, {a.prompts} prompts): {g}")


if __name__ == "__main__":
    main()
