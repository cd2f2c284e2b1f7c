"""Streaming read bandwidth of 512 MB with and without PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages).
    for i in 1 2 3; do python thp.py; THP_MEM_ALLOC_ENABLE=1 python thp.py; done"""
import time, torch
def ahp():
    for l in open("/proc/self/smaps_rollup"):
        if l.startswith("AnonHugePages"): return l.split()[1] + " kB"
x = torch.randn(128 * 1024 * 1024)  # 512 MB
print("AnonHugePages", ahp())
for _ in range(2): x.sum()
t0 = time.perf_counter()
for _ in range(5): x.sum()
print("read GB/s", 5 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
W = torch.randn(1536, 576); p = torch.ops.mkldnn._reorder_linear_weight(W)
ps = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(1536, 576)) for _ in range(100)]
print("AnonHugePages after packs", ahp())
