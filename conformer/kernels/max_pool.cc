// 2-D max-pooling of NCHW float32 with symmetric zero-free padding (padded cells never win) for MindSpore's CPU
// (ops.Custom, func_type="aot"): forward (with each output's argmax) and backward, the planes split over the cores.
// Ties go to the first maximum in row-major window order and NaN wins, as in PyTorch's and MindSpore's kernels.
#include <cmath>
#include <cstdint>
#include <limits>

#include "parallel.h"

namespace {
struct Geometry {
  int64_t kernel, stride, padding;
};

Geometry geometry(const float *values) {
  return {static_cast<int64_t>(values[0]), static_cast<int64_t>(values[1]), static_cast<int64_t>(values[2])};
}
}  // namespace

// inputs x [N, C, H, W], [kernel, stride, padding]; outputs y [N, C, Ho, Wo], argmax [N, C, Ho, Wo] (int32, the
// winner's index in its H x W plane)
extern "C" int MaxPoolForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const Geometry g = geometry(static_cast<const float *>(params[1]));
  float *y = static_cast<float *>(params[2]);
  int32_t *argmax = static_cast<int32_t *>(params[3]);
  const int64_t planes = shapes[0][0] * shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t ho = shapes[2][2], wo = shapes[2][3];
  conformer::parallel_for(planes, 1, [=](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const float *xp = x + plane * h * w;
      float *yp = y + plane * ho * wo;
      int32_t *ap = argmax + plane * ho * wo;
      for (int64_t i = 0; i < ho; ++i) {
        const int64_t top = i * g.stride - g.padding;
        const int64_t row_begin = top < 0 ? 0 : top, row_end = top + g.kernel < h ? top + g.kernel : h;
        for (int64_t j = 0; j < wo; ++j) {
          const int64_t left = j * g.stride - g.padding;
          const int64_t col_begin = left < 0 ? 0 : left, col_end = left + g.kernel < w ? left + g.kernel : w;
          float best = -std::numeric_limits<float>::infinity();
          int64_t where = row_begin * w + col_begin;
          bool found_nan = false;
          for (int64_t r = row_begin; r < row_end && !found_nan; ++r) {
            for (int64_t c = col_begin; c < col_end; ++c) {
              const float value = xp[r * w + c];
              found_nan = std::isnan(value);
              if (value > best || found_nan) {
                best = value;
                where = r * w + c;
              }
              if (found_nan) break;
            }
          }
          yp[i * wo + j] = best;
          ap[i * wo + j] = static_cast<int32_t>(where);
        }
      }
    }
  });
  return 0;
}

// inputs x [N, C, H, W] (its shape), argmax [N, C, Ho, Wo], dy [N, C, Ho, Wo]; outputs dx [N, C, H, W]
extern "C" int MaxPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const int32_t *argmax = static_cast<const int32_t *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t planes = shapes[0][0] * shapes[0][1], size = shapes[0][2] * shapes[0][3];
  const int64_t outputs = shapes[1][2] * shapes[1][3];
  conformer::parallel_for(planes, 1, [=](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float *dxp = dx + plane * size;
      for (int64_t i = 0; i < size; ++i) dxp[i] = 0.0f;
      const int32_t *ap = argmax + plane * outputs;
      const float *dyp = dy + plane * outputs;
      for (int64_t i = 0; i < outputs; ++i) dxp[ap[i]] += dyp[i];
    }
  });
  return 0;
}
