// Exact (erf) GELU for MindSpore's CPU (ops.Custom, func_type="aot"): forward and backward, float32, vectorised
// (libmvec's erff and expf) and split over the cores. The same math as nn.GELU(approximate=False).
#include <cstdint>

#include "parallel.h"
#include "vector_math.h"

namespace {
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr int64_t kGrain = 16384;
}  // namespace

// inputs x; outputs y = x * Phi(x)
extern "C" int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *__restrict x = static_cast<const float *>(params[0]);
  float *__restrict y = static_cast<float *>(params[1]);
  conformer::parallel_for(conformer::elements(ndims[0], shapes[0]), kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * kSqrtHalf));
  });
  return 0;
}

// inputs x, dy; outputs dx = dy * (Phi(x) + x * phi(x))
extern "C" int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict dy = static_cast<const float *>(params[1]);
  float *__restrict dx = static_cast<float *>(params[2]);
  conformer::parallel_for(conformer::elements(ndims[0], shapes[0]), kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      const float cdf = 0.5f * (1.0f + erff(v * kSqrtHalf));
      dx[i] = dy[i] * (cdf + v * kInvSqrt2Pi * expf(-0.5f * v * v));
    }
  });
  return 0;
}
