"""
PROBE: is a decode step's attention bound by the bytes of its K/V cache or by its arithmetic?

SmolLM2's shapes at 16 rows (9 heads, 3 kv heads, head dim 64, 250 cached positions), 30 layers' caches
cycled so each is cold: SDPA with a bool mask, a float mask, no mask, and written as two batched matmuls
with the 3 query heads of a kv head grouped; against reading the same K and V once (sum) or copying K once.
Then the same at 1 thread: time that doubles is arithmetic, time that stays is memory.

    python experiments/results/probes/decode-floor/attn_threads.py
"""
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
n, H, Hkv, D, S, LAYERS = 16, 9, 3, 64, 250, 30
Ks = [torch.randn(n, Hkv, 320, D) for _ in range(LAYERS)]
Vs = [torch.randn(n, Hkv, 320, D) for _ in range(LAYERS)]
q = torch.randn(n, H, 1, D)
m = torch.ones(n, 1, 1, S, dtype=torch.bool)
m[:8, ..., :20] = False  # half the rows left-padded by 20
fm = torch.zeros(n, 1, 1, S).masked_fill_(~m, float("-inf"))


def run(kind):
    """ms for one decode step's 30 layers of `kind`."""
    t0 = time.perf_counter()
    for i in range(LAYERS):
        K, V = Ks[i][:, :, :S], Vs[i][:, :, :S]
        if kind == "bool":
            F.scaled_dot_product_attention(q, K, V, attn_mask=m, enable_gqa=True)
        elif kind == "float":
            F.scaled_dot_product_attention(q, K, V, attn_mask=fm, enable_gqa=True)
        elif kind == "none":
            F.scaled_dot_product_attention(q, K, V, enable_gqa=True)
        elif kind == "grouped-bmm":
            s = torch.matmul(q.view(n, Hkv, H // Hkv, D), K.transpose(-1, -2)) * D ** -0.5 + fm
            torch.matmul(s.softmax(-1), V)
        elif kind == "read K+V":
            K.sum(), V.sum()
        elif kind == "copy K":
            K * 1.0
    return (time.perf_counter() - t0) * 1e3


KINDS = ["bool", "float", "none", "grouped-bmm", "read K+V", "copy K"]
for threads in (2, 1):
    torch.set_num_threads(threads)
    for r in range(3):
        print(f"{threads} thread(s), round {r}: ms per step", {k: round(run(k), 1) for k in KINDS}, flush=True)
