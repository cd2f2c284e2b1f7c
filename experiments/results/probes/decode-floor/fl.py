"""torch's CPU flash-attention kernel at 16 rows x 3 kv heads x 3 grouped queries, hot, by cached length S.  python fl.py"""
import time, torch
fl = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
n, Hkv, G, D = 16, 3, 3, 64
q = torch.randn(n, Hkv, G, D)
for S in (1, 16, 64, 128, 250, 320):
    K = torch.randn(n, Hkv, S, D); V = torch.randn(n, Hkv, S, D)
    m = torch.zeros(n, 1, 1, S)
    for nm, kw in (("nomask", {}), ("mask", {"attn_mask": m})):
        for _ in range(20): fl(q, K, V, **kw)
        t0 = time.perf_counter()
        for _ in range(200): fl(q, K, V, **kw)
        print(S, nm, round(1e6 * (time.perf_counter() - t0) / 200, 1), "us")
