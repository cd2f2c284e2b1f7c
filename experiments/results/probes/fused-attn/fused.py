"""PROBE (not the reference's code): how much of a decode step a fused attention kernel would win back.
A ~40-line C++ decode attention (one query position, grouped kv heads, an additive mask), compiled at first
use with torch.utils.cpp_extension (needs g++ and `pip install ninja`), in place of SDPA inside the
sampler's decode step; step times against sampler.Decoder.forward as written, alternating, at cache lengths
121-319 (the ceil.py harness), and the logits' agreement.  python fused.py [ROUNDS]"""
import sys, time, torch, torch.nn.functional as F
from torch.utils.cpp_extension import load_inline
sys.path.insert(0, ".")
import bench, sampler

SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
// q (n, H, D); K, V (n, Hkv, Smax, D), all float32 contiguous; bias (n, >= S) additive; attend [0, S).
torch::Tensor decode_attn(torch::Tensor q, torch::Tensor K, torch::Tensor V, torch::Tensor bias, int64_t S) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), Hkv = K.size(1), Smax = K.size(2), G = H / Hkv,
                Sb = bias.size(1);
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *Kp = K.data_ptr<float>(), *Vp = V.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)D);
  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * S), acc(G * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const float *k = Kp + bh * Smax * D, *v = Vp + bh * Smax * D, *qq = qp + (b * H + h * G) * D, *bb = bp + b * Sb;
      for (int64_t j = 0; j < S; ++j) {
        const float *kj = k + j * D;
        for (int64_t g = 0; g < G; ++g) {
          const float *qg = qq + g * D;
          float d = 0.f;
#pragma omp simd reduction(+:d)
          for (int64_t x = 0; x < D; ++x) d += qg[x] * kj[x];
          s[g * S + j] = d * scale + bb[j];
        }
      }
      std::vector<float> tot(G);
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY, z = 0.f;
        for (int64_t j = 0; j < S; ++j) m = std::max(m, s[g * S + j]);
        for (int64_t j = 0; j < S; ++j) { s[g * S + j] = std::exp(s[g * S + j] - m); z += s[g * S + j]; }
        tot[g] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < S; ++j) {
        const float *vj = v + j * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * S + j];
          float *a = acc.data() + g * D;
#pragma omp simd
          for (int64_t x = 0; x < D; ++x) a[x] += p * vj[x];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t x = 0; x < D; ++x) op[(b * H + h * G + g) * D + x] = acc[g * D + x] / tot[g];
    }
  });
  return out;
}
"""
ext = load_inline("decode_attn", cpp_sources=SRC, functions=["decode_attn"],
                  extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)

a = bench.get_args(["--routers", "none"])
model, tok, *_ = bench.setup(a, "cpu")
B, P, T = 16, 120, 200
orig = sampler.Decoder.forward


def fused(self, ids, pos, keys, start, rows=None, skip=False):
    """Decoder.forward for one new token per row over the whole cache (rows=None), SDPA replaced by ext
    (skip: by nothing, the attention output replaced by q: wrong outputs, a bound)."""
    n, L = ids.shape
    bias = torch.zeros(keys.shape[0], keys.shape[-1]).masked_fill_(~keys[:, 0, 0], float("-inf")).contiguous()
    x = self.m.embed_tokens(ids)
    cos, sin = self.m.rotary_emb(x, pos)
    for i, (ln1, qkv, o, qn, kn, ln2, gate_up, down) in enumerate(self.layers):
        q, k, v = (t.view(n, L, -1, self.D) for t in qkv(ln1(x)))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = sampler.rope(q, cos, sin), sampler.rope(k, cos, sin)
        self.K[i][:n, :, start:start + 1], self.V[i][:n, :, start:start + 1] = k, v.transpose(1, 2)
        att = q[:, :, 0] if skip else ext.decode_attn(q[:, :, 0].contiguous(), self.K[i], self.V[i], bias, start + 1)
        x = x + o(att.reshape(n, 1, self.H * self.D))[0]
        g, u = gate_up(ln2(x))
        x = x + down(F.silu(g) * u)[0]
    return self.lm_head(self.m.norm(x[:, -1]))[0].float()


dec = sampler.Decoder(model, B, P + T)
torch.manual_seed(0)
for C in (dec.K, dec.V):
    for c in C:
        c.normal_()
ids = torch.randint(0, 1000, (B, 1))
with torch.no_grad():
    S = 200
    keys = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keys[:4, :, :, :9] = False                                     # some left padding
    cur = torch.full((B, 1), S - 1)
    l0, l1 = orig(dec, ids, cur, keys, S - 1), fused(dec, ids, cur, keys, S - 1)
    print("max |dlogit|", (l0 - l1).abs().max().item(), "max |logit|", l0.abs().max().item(), flush=True)
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        noattn = lambda *x: fused(*x, skip=True)  # noqa: E731
        for name, f in (("sdpa", orig), ("fused", fused), ("no attention", noattn))[::1 if rep % 2 else -1]:
            tot = 0
            for S in (121, 160, 200, 240, 280, 319):
                cur, keys = torch.full((B, 1), S - 1), torch.ones(B, 1, 1, S, dtype=torch.bool)
                f(dec, ids, cur, keys, S - 1)
                t0 = time.perf_counter()
                for _ in range(8):
                    f(dec, ids, cur, keys, S - 1)
                tot += (time.perf_counter() - t0) / 8
            print(rep, name, "mean step ms", round(tot / 6 * 1000, 1), flush=True)
