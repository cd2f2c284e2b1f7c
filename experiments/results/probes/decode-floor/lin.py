"""Packed-weight matmuls of SmolLM2's 30 layers (qkv, o, gate|up, down) at M rows: one layer's weights over and over (hot,
in cache) against all 30 in turn (cold, streamed from memory as in a decode step).  python lin.py"""
import time, torch
torch.manual_seed(0)
d, I, NL = 576, 1536, 30
shapes = [(960, d), (d, d), (2 * I, d), (d, I)]
W = [[torch.randn(o, i) for (o, i) in shapes] for _ in range(NL)]
Pk = [[torch.ops.mkldnn._reorder_linear_weight(w) for w in ws] for ws in W]
lin = lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
fl = 2 * sum(o * i for o, i in shapes)
for M in (1, 8, 16, 32, 64):
    xs = {i: torch.randn(M, i) for i in (d, I)}
    for mode in ("hot", "cold"):
        layers = [0] * NL if mode == "hot" else list(range(NL))
        for _ in range(2):
            for l in layers:
                for (o, i), p in zip(shapes, Pk[l]): lin(xs[i], p)
        t0 = time.perf_counter(); reps = 5
        for _ in range(reps):
            for l in layers:
                for (o, i), p in zip(shapes, Pk[l]): lin(xs[i], p)
        dt = (time.perf_counter() - t0) / reps
        print(M, mode, f"{dt*1000:.1f} ms per 30 layers, {fl*M*NL/dt/1e9:.0f} GFLOP/s", flush=True)
x = torch.randn(2048, 2048); torch.mm(x, x); t0 = time.perf_counter(); torch.mm(x, x); print("peak", 2*2048**3/(time.perf_counter()-t0)/1e9)
