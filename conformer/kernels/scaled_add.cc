// x + branch * scale[b] per sample b (a residual add through drop path: scale is 0 for a dropped sample, 1 / keep
// otherwise) for MindSpore's CPU (ops.Custom, func_type="aot"), float32 [B, ...]: forward, and the branch's gradient
// (x's is the upstream gradient itself). Vectorised and split over the cores. One op in place of MindSpore's
// broadcast multiply and add.
#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace {
constexpr int64_t kGrain = 16384;

// Runs fn(sample, first, last) over element ranges that do not cross samples, split over the cores.
template <typename Fn>
void over_samples(int ndim, const int64_t *shape, Fn fn) {
  const int64_t total = conformer::elements(ndim, shape), per_sample = total / shape[0];
  conformer::parallel_for(total, kGrain, [=](int64_t begin, int64_t end) {
    for (int64_t at = begin; at < end;) {
      const int64_t sample = at / per_sample, stop = std::min(end, (sample + 1) * per_sample);
      fn(sample, at, stop);
      at = stop;
    }
  });
}
}  // namespace

// inputs x, branch [B, ...], scale [B]; outputs y = x + branch * scale[b]
extern "C" int ScaledAddForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict branch = static_cast<const float *>(params[1]);
  const float *scale = static_cast<const float *>(params[2]);
  float *__restrict y = static_cast<float *>(params[3]);
  over_samples(ndims[0], shapes[0], [=](int64_t sample, int64_t first, int64_t last) {
    const float s = scale[sample];
#pragma omp simd
    for (int64_t i = first; i < last; ++i) y[i] = x[i] + branch[i] * s;
  });
  return 0;
}

// inputs dy [B, ...], scale [B]; outputs dbranch = dy * scale[b]
extern "C" int ScaledAddBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  const float *__restrict dy = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  float *__restrict dbranch = static_cast<float *>(params[2]);
  over_samples(ndims[0], shapes[0], [=](int64_t sample, int64_t first, int64_t last) {
    const float s = scale[sample];
#pragma omp simd
    for (int64_t i = first; i < last; ++i) dbranch[i] = dy[i] * s;
  });
  return 0;
}
