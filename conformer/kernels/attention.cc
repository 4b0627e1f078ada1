// Multi-head self-attention from the qkv projection for MindSpore's CPU (ops.Custom, func_type="aot"): forward and
// backward, float32. Per (image, head): S = scale * Q K^T, P = softmax(S), O = P V, as OpenBLAS sgemm calls and a
// vectorised softmax, the (image, head) pairs split over the cores. The same math as Conformer's Attention without
// attention dropout: qkv [B, N, 3C] holds q, k, v side by side, head h at columns h * D .. (h + 1) * D - 1 of each
// (the reshape (B, N, 3, H, D)); O comes out as [B, N, C], the heads side by side (the transpose back and reshape).
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "rows.h"

namespace {
struct Geometry {
  int64_t batch, tokens, channels, heads, head_dim;
};

// from qkv's shape [B, N, 3C] and P's [B, H, N, N]
Geometry geometry(const int64_t *qkv, const int64_t *probs) {
  const int64_t channels = qkv[2] / 3;
  return {qkv[0], qkv[1], channels, probs[1], channels / probs[1]};
}
}  // namespace

// inputs qkv [B, N, 3C], scale [1]; outputs o [B, N, C], p [B, H, N, N] (the attention probabilities, for backward)
extern "C" int AttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const float *qkv = static_cast<const float *>(params[0]);
  const float scale = static_cast<const float *>(params[1])[0];
  float *o = static_cast<float *>(params[2]);
  float *p = static_cast<float *>(params[3]);
  const Geometry g = geometry(shapes[0], shapes[3]);
  const int64_t n = g.tokens, c = g.channels, d = g.head_dim, row = 3 * c;
  conformer::parallel_for(g.batch * g.heads, 1, [=](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / g.heads, h = pair % g.heads;
      const float *q = qkv + b * n * row + h * d;
      float *probs = p + pair * n * n;
      conformer::sgemm(false, true, n, n, d, scale, q, row, q + c, row, 0.0f, probs, n);  // S = scale Q K^T
      for (int64_t i = 0; i < n; ++i) conformer::softmax_row(probs + i * n, probs + i * n, n);
      conformer::sgemm(false, false, n, d, n, 1.0f, probs, n, q + 2 * c, row, 0.0f, o + b * n * c + h * d, c);
    }
  });
  return 0;
}

// inputs qkv [B, N, 3C], p [B, H, N, N], do [B, N, C], scale [1]; outputs dqkv [B, N, 3C]
extern "C" int AttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  const float *qkv = static_cast<const float *>(params[0]);
  const float *p = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[2]);
  const float scale = static_cast<const float *>(params[3])[0];
  float *dqkv = static_cast<float *>(params[4]);
  const Geometry g = geometry(shapes[0], shapes[1]);
  const int64_t n = g.tokens, c = g.channels, d = g.head_dim, row = 3 * c;
  conformer::parallel_for(g.batch * g.heads, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> scores(n * n);  // dP, then dS in place
    float *ds = scores.data();
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / g.heads, h = pair % g.heads;
      const float *q = qkv + b * n * row + h * d;
      const float *probs = p + pair * n * n;
      const float *dO = dout + b * n * c + h * d;
      float *dq = dqkv + b * n * row + h * d;
      conformer::sgemm(true, false, n, d, n, 1.0f, probs, n, dO, c, 0.0f, dq + 2 * c, row);  // dV = P^T dO
      conformer::sgemm(false, true, n, n, d, 1.0f, dO, c, q + 2 * c, row, 0.0f, ds, n);      // dP = dO V^T
      for (int64_t i = 0; i < n; ++i) conformer::softmax_row_backward(probs + i * n, ds + i * n, ds + i * n, n);
      conformer::sgemm(false, false, n, d, n, scale, ds, n, q + c, row, 0.0f, dq, row);     // dQ = scale dS K
      conformer::sgemm(true, false, n, d, n, scale, ds, n, q, row, 0.0f, dq + c, row);      // dK = scale dS^T Q
    }
  });
  return 0;
}
