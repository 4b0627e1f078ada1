// 2-D max-pooling of NCHW float32 with symmetric zero-free padding (padded cells never win) for MindSpore's CPU
// (ops.Custom, func_type="aot"): forward (with each output's argmax) and backward, the planes split over the cores.
// Ties go to the first maximum in row-major window order and NaN wins, as in PyTorch's and MindSpore's kernels.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"

namespace {
struct Geometry {
  int64_t kernel, stride, padding;
};

Geometry geometry(const float *values) {
  return {static_cast<int64_t>(values[0]), static_cast<int64_t>(values[1]), static_cast<int64_t>(values[2])};
}

// Whether `value`, met after `best` in a column's rows, takes its place: greater, or the first NaN.
inline bool takes(float value, float best) { return value > best || (value != value && best == best); }

// Whether (value, at) beats (best, best_at) where either may come first: greater, or equal (both NaN included) and
// earlier in the plane's row-major order, or a NaN against a number.
inline bool beats(float value, int32_t at, float best, int32_t best_at) {
  const bool nan = value != value, best_nan = best != best, earlier = at < best_at;
  return (nan && (!best_nan || earlier)) || (!best_nan && (value > best || (value == best && earlier)));
}
}  // namespace

// inputs x [N, C, H, W], [kernel, stride, padding]; outputs y [N, C, Ho, Wo], argmax [N, C, Ho, Wo] (int32, the
// winner's index in its H x W plane). Per output row: first each column's topmost maximum over the window's rows
// (whole input rows at once: contiguous values), then per output the maximum of its window's columns, ties to the
// earliest in row-major order. That is the first maximum in row-major window order; a NaN wins over numbers and the
// first NaN over later ones. The column winners go to `stride` phases of the padded row (phase q holds padded
// columns q, q + stride, ...; padding cells hold -inf at an index after every real one, so they never win), where
// each tap of the outputs' windows is a contiguous run: the second pass runs over contiguous values too.
extern "C" int MaxPoolForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const Geometry g = geometry(static_cast<const float *>(params[1]));
  float *y = static_cast<float *>(params[2]);
  int32_t *argmax = static_cast<int32_t *>(params[3]);
  const int64_t planes = shapes[0][0] * shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t ho = shapes[2][2], wo = shapes[2][3];
  const int64_t padded = std::max(w + 2 * g.padding, (wo - 1) * g.stride + g.kernel);
  const int64_t length = (padded + g.stride - 1) / g.stride;  // of one phase
  std::vector<int64_t> slot(w), tap(g.kernel);  // a column's place in the phases; a tap's first place
  for (int64_t c = 0; c < w; ++c) slot[c] = (c + g.padding) % g.stride * length + (c + g.padding) / g.stride;
  for (int64_t t = 0; t < g.kernel; ++t) tap[t] = t % g.stride * length + t / g.stride;
  conformer::parallel_for(planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> column_best(w), phase_best(g.stride * length, -std::numeric_limits<float>::infinity());
    std::vector<int32_t> column_where(w), phase_where(g.stride * length, std::numeric_limits<int32_t>::max());
    for (int64_t plane = begin; plane < end; ++plane) {
      const float *xp = x + plane * h * w;
      for (int64_t i = 0; i < ho; ++i) {
        const int64_t top = i * g.stride - g.padding;
        const int64_t first = std::max<int64_t>(top, 0), last = std::min(top + g.kernel, h);
        float *__restrict best = column_best.data();
        int32_t *__restrict where = column_where.data();
        const int32_t first_at = static_cast<int32_t>(first * w);
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) {
          best[c] = xp[first * w + c];
          where[c] = first_at + static_cast<int32_t>(c);
        }
        for (int64_t r = first + 1; r < last; ++r) {
          const float *__restrict candidate = xp + r * w;
          const int32_t at = static_cast<int32_t>(r * w);
#pragma omp simd
          for (int64_t c = 0; c < w; ++c) {
            const bool better = takes(candidate[c], best[c]);
            best[c] = better ? candidate[c] : best[c];
            where[c] = better ? at + static_cast<int32_t>(c) : where[c];
          }
        }
        for (int64_t c = 0; c < w; ++c) {
          phase_best[slot[c]] = best[c];
          phase_where[slot[c]] = where[c];
        }
        float *__restrict out = y + (plane * ho + i) * wo;
        int32_t *__restrict out_at = argmax + (plane * ho + i) * wo;
        const float *pb = phase_best.data();
        const int32_t *pw = phase_where.data();
#pragma omp simd
        for (int64_t j = 0; j < wo; ++j) {
          out[j] = pb[tap[0] + j];
          out_at[j] = pw[tap[0] + j];
        }
        for (int64_t t = 1; t < g.kernel; ++t) {
          const float *__restrict candidate = pb + tap[t];
          const int32_t *__restrict candidate_at = pw + tap[t];
#pragma omp simd
          for (int64_t j = 0; j < wo; ++j) {
            const bool better = beats(candidate[j], candidate_at[j], out[j], out_at[j]);
            out[j] = better ? candidate[j] : out[j];
            out_at[j] = better ? candidate_at[j] : out_at[j];
          }
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
