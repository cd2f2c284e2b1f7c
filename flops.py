"""
bench.py's FLOPs: the train phase's analytic count and this machine's matmul peak.

FLOPs of the train phase (train_peak_fraction's numerator): every matmul, per position (tok =
B (P + T)), per module with frozen weight W and delta_S factors U, Vh (full rank: U + Vh = 1.5 W
in SmolLM2): ref 2 W; forward 2 (W + U + Vh); backward 2 (W + U + Vh) per wrapped layer, dL/dx
only (no frozen W needs a weight gradient; s's, sum z * dh, is O(r)) but down to the FIRST
wrapped layer, where q/k/v read an input needing no gradient: 2 U there (dh = dy U). In float32
the delta runs merged (adapter.py deviation 7): forward 2 (W + Vh), backward 2 (W + U). Plus
lm_head 3 * 2 V d B (T + 1) and attention 4 B n_h h_d (P + T)^2 a layer forward, 2x backward.
Not the usual 6 N tok; test_train.py checks the linear part against torch.utils.flop_counter. Peak:
the best (2048, 2048) @ (2048, 2048) torch.mm in the model's dtype, in the same process.

Shapes: B rollouts, P prompt tokens, T completion tokens, V vocab, d hidden.
"""
import time

import torch

import adapter
import slot


def matmul_peak(device, dtype, n=2048, reps=5):
    """Best FLOP/s of one (n, n) @ (n, n) torch.mm in the model's dtype: this machine's ceiling."""
    x, cuda, best = torch.randn(n, n, device=device, dtype=dtype), str(device).startswith("cuda"), float("inf")
    for i in range(reps + 1):  # i = 0: warm-up
        cuda and torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(x, x)
        cuda and torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0) if i else best
    return 2 * n**3 / best


def train_flops(model, B, P, T):
    """Matmul FLOPs of one train phase, the module docstring's count -> (linear, attention)."""
    c, tok, L = model.config, B * (P + T), P + T
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 4 * B * c.num_attention_heads * hd * L * L                         # one layer's forward
    first = min(int(n.split(".")[2]) for n in adapter.adapter_modules(model, adapter.SVDDelta))
    lin, att = 3 * 2 * c.vocab_size * c.hidden_size * B * (T + 1), 0           # lm_head
    merged = model.dtype in slot.Slot.MERGED                                   # adapter.py deviation 7
    for i, layer in enumerate(model.model.layers):
        for n, m in layer.named_modules():
            delta = isinstance(m, adapter.SVDDelta)
            if not delta and (not isinstance(m, torch.nn.Linear) or n.endswith("base")):
                continue  # not a linear, or the frozen base inside a delta
            W, U, Vh = (m.base.weight.numel(), m.U.numel(), m.Vh.numel()) if delta else (m.weight.numel(), 0, 0)
            fwd, dx = (W + Vh, W + U) if merged else (W + U + Vh, W + U + Vh)
            bwd = 0 if i < first else U if i == first and n.endswith(("q_proj", "k_proj", "v_proj")) else dx
            lin += 2 * (W + fwd + bwd) * tok                                   # ref, forward, backward
        att += attn * (2 + 2 * (i >= first))
    return lin, att
