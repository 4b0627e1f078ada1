// 1x1 convolution with stride 1 of NCHW float32 (a pointwise conv: per image Y = W X over the channels) for
// MindSpore's CPU (ops.Custom, func_type="aot"): forward and backward as OpenBLAS sgemm calls, the images split
// over the cores (in the forward, column blocks of an image where there are fewer images than cores). The same math as nn.Conv2d(kernel_size=1), in another summation order.
// Without a bias the ops (the *NoBias entry points) take one input and return one gradient fewer.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
struct Layout {
  int64_t batch, in_channels, out_channels, plane;
};

// from x's shape [N, Cin, H, W] and the weight's [Cout, Cin, 1, 1]
Layout layout(const int64_t *x, const int64_t *w) { return {x[0], x[1], w[0], x[2] * x[3]}; }

// Runs fn(image, first column, column count) over tasks of whole images, or of column blocks where there are fewer
// images than threads.
template <typename Fn>
void over_images(const Layout &s, Fn fn) {
  const int64_t splits = std::max<int64_t>(1, conformer::Pool::instance().threads() / std::max<int64_t>(s.batch, 1));
  const int64_t width = (s.plane + splits - 1) / splits;
  conformer::parallel_for(s.batch * splits, 1, [=](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / splits, first = (task % splits) * width;
      if (first < s.plane) fn(image, first, std::min(width, s.plane - first));
    }
  });
}
}  // namespace

// inputs x [N, Cin, H, W], w [Cout, Cin, 1, 1], (b [Cout]); outputs y [N, Cout, H, W]
extern "C" int PointwiseConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  const bool bias = nparam == 4;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[bias ? 3 : 2]);
  const Layout s = layout(shapes[0], shapes[1]);
  over_images(s, [=](int64_t image, int64_t first, int64_t count) {
    float *yi = y + image * s.out_channels * s.plane + first;
    if (bias) {
      for (int64_t o = 0; o < s.out_channels; ++o) std::fill(yi + o * s.plane, yi + o * s.plane + count, b[o]);
    }
    conformer::sgemm(false, false, s.out_channels, count, s.in_channels, 1.0f, w, s.in_channels,
                     x + image * s.in_channels * s.plane + first, s.plane, bias ? 1.0f : 0.0f, yi, s.plane);
  });
  return 0;
}

// inputs x [N, Cin, H, W], w [Cout, Cin, 1, 1], dy [N, Cout, H, W]; outputs dx [N, Cin, H, W], dw [Cout, Cin, 1, 1],
// (db [Cout])
extern "C" int PointwiseConvBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  const bool bias = nparam == 6;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = bias ? static_cast<float *>(params[5]) : nullptr;
  const Layout s = layout(shapes[0], shapes[1]);
  const int64_t weights = s.out_channels * s.in_channels;
  std::fill(dw, dw + weights, 0.0f);
  if (bias) std::fill(db, db + s.out_channels, 0.0f);
  // each chunk of images: dx per image; its share of dw = sum of dy x^T and of db = sum of dy in a buffer of its
  // own, the chunks' buffers added in chunk order (the same sums on every run)
  std::vector<std::vector<float>> partials(conformer::chunks(s.batch, 1));
  conformer::parallel_chunks(s.batch, partials.size(), [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<float> &partial = partials[chunk];
    partial.assign(weights + (bias ? s.out_channels : 0), 0.0f);
    for (int64_t image = begin; image < end; ++image) {
      const float *xi = x + image * s.in_channels * s.plane;
      const float *dyi = dy + image * s.out_channels * s.plane;
      conformer::sgemm(true, false, s.in_channels, s.plane, s.out_channels, 1.0f, w, s.in_channels, dyi, s.plane,
                       0.0f, dx + image * s.in_channels * s.plane, s.plane);
      conformer::sgemm(false, true, s.out_channels, s.in_channels, s.plane, 1.0f, dyi, s.plane, xi, s.plane, 1.0f,
                       partial.data(), s.in_channels);
      for (int64_t o = 0; bias && o < s.out_channels; ++o) {
        float sum = 0.0f;
        const float *row = dyi + o * s.plane;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < s.plane; ++i) sum += row[i];
        partial[weights + o] += sum;
      }
    }
  });
  for (const auto &partial : partials) {
#pragma omp simd
    for (int64_t i = 0; i < weights; ++i) dw[i] += partial[i];
    for (int64_t o = 0; bias && o < s.out_channels; ++o) db[o] += partial[weights + o];
  }
  return 0;
}

// MindSpore keys a custom op by its function name: each arity has its own entry point
extern "C" int PointwiseConvForwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                          void *stream, void *extra) {
  return PointwiseConvForward(nparam, params, ndims, shapes, dtypes, stream, extra);
}
extern "C" int PointwiseConvBackwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                           void *stream, void *extra) {
  return PointwiseConvBackward(nparam, params, ndims, shapes, dtypes, stream, extra);
}
