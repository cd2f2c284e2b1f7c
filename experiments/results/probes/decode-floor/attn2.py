"""One layer's decode attention (16 rows, 250 cached positions) cold: 30 layers' K/V cycled, in five formulations,
against reading K and V once.  python attn2.py"""
import time, torch, torch.nn.functional as F
torch.manual_seed(0)
n, H, Hkv, D, S, NL = 16, 9, 3, 64, 250, 30
g = H // Hkv
q = torch.randn(n, H, 1, D)
Kc = [torch.randn(n, Hkv, 320, D) for _ in range(NL)]; Vc = [torch.randn(n, Hkv, 320, D) for _ in range(NL)]
keys = torch.ones(n, 1, 1, S, dtype=torch.bool); keys[:, :, :, :10] = False
bias = torch.zeros(n, 1, 1, S).masked_fill(~keys, float("-inf"))
fl = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
def cur(K, V): return F.scaled_dot_product_attention(q, K, V, attn_mask=keys, enable_gqa=True)
def nomask(K, V): return F.scaled_dot_product_attention(q, K, V, enable_gqa=True)
def grouped_bias(K, V): return F.scaled_dot_product_attention(q.view(n, Hkv, g, D), K, V, attn_mask=bias).view(n, H, 1, D)
def manual(K, V):
    s = torch.matmul(q.view(n, Hkv, g, D), K.transpose(-1, -2)) * D ** -0.5 + bias
    return torch.matmul(s.softmax(-1), V).view(n, H, 1, D)
def math(K, V):
    return torch.ops.aten._scaled_dot_product_attention_math(q.view(n, Hkv, g, D), K, V, attn_mask=bias)[0].view(n, H, 1, D)
def reads(K, V): return K.sum() + V.sum()
for rep in range(2):
  for f in (cur, nomask, grouped_bias, manual, math, reads):
    for i in range(NL): f(Kc[i][:, :, :S], Vc[i][:, :, :S])
    t0 = time.perf_counter()
    for r in range(10):
        for i in range(NL): f(Kc[i][:, :, :S], Vc[i][:, :, :S])
    print(f"{f.__name__:16s} {1e6*(time.perf_counter()-t0)/10/NL:7.1f} us per layer")
