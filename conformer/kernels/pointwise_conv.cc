// 1x1 convolution with stride 1 of float32 (a pointwise conv: per image Y = W X over the channels) for MindSpore's
// CPU (ops.Custom, func_type="aot"): forward and backward as OpenBLAS sgemm calls, the images split over the cores
// (in the forward, pixel blocks of an image where there are fewer images than cores). The same math as
// nn.Conv2d(kernel_size=1), in another summation order.
//
// Three layouts, each its own entry points (MindSpore keys an op by its function name):
// - PointwiseConv*: NCHW in, NCHW out; without a bias (the *NoBias entry points) one input and one gradient fewer.
// - PointwiseConvToTokens*: NCHW [N, Cin, H, W] in, tokens [N, H * W, Cout] out (the conv then the transpose of
//   Conformer's FCUDown, in one op).
// - PointwiseConvFromTokens*: tokens [N, 1 + P, Cin] in, the first (class) token skipped, [N, Cout, P] out (the
//   slice, transpose and conv of FCUUp in one op; the class token's gradient is zero).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
// One image's [channels, pixels] matrix inside a tensor: channels first (NCHW: row stride = pixels) or last (tokens:
// row stride = channels, after `skip` leading tokens).
struct Operand {
  int64_t channels, pixels, skip;
  bool channels_last;
  int64_t image_stride() const { return (skip + pixels) * channels; }
  int64_t ld() const { return channels_last ? channels : pixels; }  // the matrix's row stride
  int64_t at(int64_t image, int64_t pixel) const {  // where pixel `pixel` of channel 0 of `image` is
    return image * image_stride() + (channels_last ? (skip + pixel) * channels : pixel);
  }
};

struct Layout {
  int64_t batch, pixels;
  Operand x, y;
};

enum class Kind { Maps, ToTokens, FromTokens };

// from x's shape and the weight's [Cout, Cin, 1, 1]
Layout layout(Kind kind, const int64_t *x, const int64_t *w) {
  const int64_t cin = w[1], cout = w[0];
  if (kind == Kind::FromTokens) {  // x [N, 1 + P, Cin]
    const int64_t pixels = x[1] - 1;
    return {x[0], pixels, {cin, pixels, 1, true}, {cout, pixels, 0, false}};
  }
  const int64_t pixels = x[2] * x[3];
  return {x[0], pixels, {cin, pixels, 0, false}, {cout, pixels, 0, kind == Kind::ToTokens}};
}

// Runs fn(image, first pixel, pixel count) over tasks of whole images, or of pixel blocks where there are fewer
// images than threads.
template <typename Fn>
void over_images(const Layout &s, Fn fn) {
  const int64_t splits = std::max<int64_t>(1, conformer::Pool::instance().threads() / std::max<int64_t>(s.batch, 1));
  const int64_t width = (s.pixels + splits - 1) / splits;
  conformer::parallel_for(s.batch * splits, 1, [=](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / splits, first = (task % splits) * width;
      if (first < s.pixels) fn(image, first, std::min(width, s.pixels - first));
    }
  });
}

// y = w x (+ b); inputs x, w, (b); output y
int forward(Kind kind, int nparam, void **params, int64_t **shapes) {
  const bool bias = nparam == 4;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[bias ? 3 : 2]);
  const Layout s = layout(kind, shapes[0], shapes[1]);
  const Operand &in = s.x, &out = s.y;
  over_images(s, [=](int64_t image, int64_t first, int64_t count) {
    const float *xi = x + in.at(image, first);
    float *yi = y + out.at(image, first);
    for (int64_t o = 0; bias && o < out.channels; ++o) {
      for (int64_t p = 0; p < count; ++p) yi[out.channels_last ? p * out.ld() + o : o * out.ld() + p] = b[o];
    }
    const float beta = bias ? 1.0f : 0.0f;
    if (out.channels_last) {  // y^T [P, Cout] = x^T w^T
      conformer::sgemm(!in.channels_last, true, count, out.channels, in.channels, 1.0f, xi, in.ld(), w, in.channels,
                       beta, yi, out.ld());
    } else {  // y [Cout, P] = w x
      conformer::sgemm(false, in.channels_last, out.channels, count, in.channels, 1.0f, w, in.channels, xi, in.ld(),
                       beta, yi, out.ld());
    }
  });
  return 0;
}

// inputs x, w, dy; outputs dx, dw, (db)
int backward(Kind kind, int nparam, void **params, int64_t **shapes) {
  const bool bias = nparam == 6;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = bias ? static_cast<float *>(params[5]) : nullptr;
  const Layout s = layout(kind, shapes[0], shapes[1]);
  const Operand &in = s.x, &out = s.y;
  const int64_t cin = in.channels, cout = out.channels, weights = cout * cin;
  std::fill(dw, dw + weights, 0.0f);
  if (bias) std::fill(db, db + cout, 0.0f);
  // each chunk of images: dx per image; its share of dw = sum of dy x^T and of db = sum of dy in a buffer of its
  // own, the chunks' buffers added in chunk order (the same sums on every run)
  std::vector<std::vector<float>> partials(conformer::chunks(s.batch, 1));
  conformer::parallel_chunks(s.batch, partials.size(), [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<float> &partial = partials[chunk];
    partial.assign(weights + (bias ? cout : 0), 0.0f);
    for (int64_t image = begin; image < end; ++image) {
      const float *xi = x + in.at(image, 0);
      const float *dyi = dy + out.at(image, 0);
      float *dxi = dx + in.at(image, 0);
      if (in.channels_last) {  // dx^T [P, Cin] = dy^T w; the skipped tokens' gradient is zero
        std::fill(dx + image * in.image_stride(), dxi, 0.0f);
        conformer::sgemm(!out.channels_last, false, s.pixels, cin, cout, 1.0f, dyi, out.ld(), w, cin, 0.0f, dxi,
                         in.ld());
      } else {  // dx [Cin, P] = w^T dy
        conformer::sgemm(true, out.channels_last, cin, s.pixels, cout, 1.0f, w, cin, dyi, out.ld(), 0.0f, dxi,
                         in.ld());
      }
      // dw [Cout, Cin] += dy x^T
      conformer::sgemm(out.channels_last, !in.channels_last, cout, cin, s.pixels, 1.0f, dyi, out.ld(), xi, in.ld(),
                       1.0f, partial.data(), cin);
      float *dbi = partial.data() + weights;
      for (int64_t p = 0; bias && out.channels_last && p < s.pixels; ++p) {
        const float *row = dyi + p * out.ld();
#pragma omp simd
        for (int64_t o = 0; o < cout; ++o) dbi[o] += row[o];
      }
      for (int64_t o = 0; bias && !out.channels_last && o < cout; ++o) {
        float sum = 0.0f;
        const float *row = dyi + o * out.ld();
#pragma omp simd reduction(+ : sum)
        for (int64_t p = 0; p < s.pixels; ++p) sum += row[p];
        dbi[o] += sum;
      }
    }
  });
  for (const auto &partial : partials) {
#pragma omp simd
    for (int64_t i = 0; i < weights; ++i) dw[i] += partial[i];
    for (int64_t o = 0; bias && o < cout; ++o) db[o] += partial[weights + o];
  }
  return 0;
}
}  // namespace

#define CONFORMER_POINTWISE_ENTRY(name, kind, pass)                                                              \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra) {                                                                            \
    return pass(kind, nparam, params, shapes);                                                                  \
  }

CONFORMER_POINTWISE_ENTRY(PointwiseConvForward, Kind::Maps, forward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvBackward, Kind::Maps, backward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvForwardNoBias, Kind::Maps, forward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvBackwardNoBias, Kind::Maps, backward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvToTokensForward, Kind::ToTokens, forward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvToTokensBackward, Kind::ToTokens, backward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvFromTokensForward, Kind::FromTokens, forward)
CONFORMER_POINTWISE_ENTRY(PointwiseConvFromTokensBackward, Kind::FromTokens, backward)
