// max(x + r, 0) of two float32 tensors of one shape (the end of a ResNet block: the residual added, then the ReLU)
// for MindSpore's CPU (ops.Custom, func_type="aot"): forward, and a backward whose one output is the gradient of both
// inputs (dy where the output is positive, as MindSpore's ReluGrad). Vectorised and split over the cores.
#include <cstdint>

#include "parallel.h"
#include "relu.h"

namespace {
constexpr int64_t kGrain = 16384;
}  // namespace

// inputs x, r; outputs y = max(x + r, 0)
extern "C" int AddReluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict r = static_cast<const float *>(params[1]);
  float *__restrict y = static_cast<float *>(params[2]);
  conformer::parallel_for(conformer::elements(ndims[0], shapes[0]), kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = conformer::relu(x[i] + r[i]);
  });
  return 0;
}

// inputs y, dy; outputs d = dy where y > 0, else 0 (the gradient of x and of r)
extern "C" int AddReluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *__restrict y = static_cast<const float *>(params[0]);
  const float *__restrict dy = static_cast<const float *>(params[1]);
  float *__restrict d = static_cast<float *>(params[2]);
  conformer::parallel_for(conformer::elements(ndims[0], shapes[0]), kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) d[i] = conformer::relu_gradient(dy[i], y[i]);
  });
  return 0;
}
