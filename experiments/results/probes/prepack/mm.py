"""
One decode step's matmuls for SmolLM2-135M (30 layers of fused q/k/v, o, fused gate/up, down, then the
lm_head), the weights cycled so they stream from memory as in the sampler, at n rows:
F.linear (W as stored), x @ W^T (W^T contiguous: the sampler before), oneDNN prepacked (the sampler now).

    .venv/bin/python experiments/results/probes/prepack/mm.py
"""
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30 + [(576, 49152)]   # (d_in, d_out)
Ws = [torch.randn(n, k) * 0.02 for k, n in SHAPES]
Wts = [W.T.contiguous() for W in Ws]
Ps = [torch.ops.mkldnn._reorder_linear_weight(W) for W in Ws]


def clock(f, n=10):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step (GFLOP/s)")
for rows in (4, 16, 64):
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    gf = sum(2 * rows * k * n for k, n in SHAPES) / 1e9
    ms = [clock(lambda: [F.linear(xs[W.shape[1]], W) for W in Ws]),
          clock(lambda: [xs[W.shape[0]] @ W for W in Wts]),
          clock(lambda: [torch.ops.mkldnn._linear_pointwise(xs[W.shape[1]], P, None, "none", [], "")
                         for W, P in zip(Ws, Ps)])]
    print(f"{rows:3d} rows  " + "  ".join(f"{name} {m:6.1f} ({gf / m * 1e3:4.0f})"
                                          for name, m in zip(("F.linear", "x@W^T", "prepacked"), ms)))
