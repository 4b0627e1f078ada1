// 2-D max-pooling of NCHW float32 with symmetric zero-free padding (padded cells never win) for MindSpore's CPU
// (ops.Custom, func_type="aot"): forward (with each output's argmax) and backward, the planes split over the cores.
// Ties go to the first maximum in row-major window order and NaN wins, as in PyTorch's and MindSpore's kernels.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {
struct Geometry {
  int64_t kernel, stride, padding;
};

Geometry geometry(const float *values) {
  return {static_cast<int64_t>(values[0]), static_cast<int64_t>(values[1]), static_cast<int64_t>(values[2])};
}

// Whether `value`, met after `best` in window order, takes its place: greater, or the first NaN.
inline bool takes(float value, float best) { return value > best || (value != value && best == best); }
}  // namespace

// inputs x [N, C, H, W], [kernel, stride, padding]; outputs y [N, C, Ho, Wo], argmax [N, C, Ho, Wo] (int32, the
// winner's index in its H x W plane). Separable: each input row's winner per output column (the leftmost maximum of
// its window's part of the row), then per output the first of its rows' winners that no later row beats (the topmost).
// That is the first maximum in row-major window order; a NaN wins over numbers and the first NaN over later ones.
extern "C" int MaxPoolForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const Geometry g = geometry(static_cast<const float *>(params[1]));
  float *y = static_cast<float *>(params[2]);
  int32_t *argmax = static_cast<int32_t *>(params[3]);
  const int64_t planes = shapes[0][0] * shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t ho = shapes[2][2], wo = shapes[2][3];
  conformer::parallel_for(planes, 1, [=](int64_t begin, int64_t end) {
    // output columns whose window lies inside the row: from the first with left >= 0 to the last with right <= w
    const int64_t inner_begin = std::min(wo, (g.padding + g.stride - 1) / g.stride);
    const int64_t room = w - g.kernel + g.padding;  // inside: j * stride <= room
    const int64_t inner_end = room < 0 ? inner_begin : std::max(inner_begin, std::min(wo, room / g.stride + 1));
    std::vector<float> row_best(h * wo);  // per input row and output column: the row's winner in the window
    std::vector<int32_t> row_where(h * wo);
    for (int64_t plane = begin; plane < end; ++plane) {
      const float *xp = x + plane * h * w;
      for (int64_t r = 0; r < h; ++r) {
        const float *row = xp + r * w;
        float *__restrict best = row_best.data() + r * wo;
        int32_t *__restrict where = row_where.data() + r * wo;
        const int32_t offset = static_cast<int32_t>(r * w);
        // windows inside the row, vectorised over the output columns one tap at a time; the edges one by one
        const auto edge = [&](int64_t j) {
          const int64_t left = j * g.stride - g.padding;
          const int64_t first = std::max<int64_t>(left, 0), last = std::min(left + g.kernel, w);
          best[j] = row[first];
          where[j] = static_cast<int32_t>(offset + first);
          for (int64_t c = first + 1; c < last; ++c) {
            if (takes(row[c], best[j])) {
              best[j] = row[c];
              where[j] = static_cast<int32_t>(offset + c);
            }
          }
        };
        for (int64_t j = 0; j < inner_begin; ++j) edge(j);
        for (int64_t j = inner_end; j < wo; ++j) edge(j);
#pragma omp simd
        for (int64_t j = inner_begin; j < inner_end; ++j) {
          best[j] = row[j * g.stride - g.padding];
          where[j] = static_cast<int32_t>(offset + j * g.stride - g.padding);
        }
        for (int64_t tap = 1; tap < g.kernel; ++tap) {
#pragma omp simd
          for (int64_t j = inner_begin; j < inner_end; ++j) {
            const int64_t c = j * g.stride - g.padding + tap;
            const bool better = takes(row[c], best[j]);
            best[j] = better ? row[c] : best[j];
            where[j] = better ? static_cast<int32_t>(offset + c) : where[j];
          }
        }
      }
      float *yp = y + plane * ho * wo;
      int32_t *ap = argmax + plane * ho * wo;
      for (int64_t i = 0; i < ho; ++i) {
        const int64_t top = i * g.stride - g.padding;
        const int64_t first = std::max<int64_t>(top, 0), last = std::min(top + g.kernel, h);
        float *__restrict best = yp + i * wo;
        int32_t *__restrict where = ap + i * wo;
        std::copy(row_best.data() + first * wo, row_best.data() + (first + 1) * wo, best);
        std::copy(row_where.data() + first * wo, row_where.data() + (first + 1) * wo, where);
        for (int64_t r = first + 1; r < last; ++r) {
          const float *__restrict candidate = row_best.data() + r * wo;
          const int32_t *__restrict candidate_where = row_where.data() + r * wo;
#pragma omp simd
          for (int64_t j = 0; j < wo; ++j) {
            const bool better = takes(candidate[j], best[j]);
            best[j] = better ? candidate[j] : best[j];
            where[j] = better ? candidate_where[j] : where[j];
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
