// Row operations shared by the project's CPU kernels: softmax of one row and its backward, vectorised.
#pragma once

#include <cstdint>

#include "vector_math.h"

namespace conformer {

// y = exp(x - max) / sum(exp(x - max)) over one row of d values (y may be x)
inline void softmax_row(const float *x, float *y, int64_t d) {
  float top = x[0];
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < d; ++i) top = top > x[i] ? top : x[i];
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    y[i] = expf(x[i] - top);
    sum += y[i];
  }
  const float scale = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] *= scale;
}

// dx = y * (dy - sum(dy * y)) over one row of d values, the softmax's backward (dx may be dy)
inline void softmax_row_backward(const float *y, const float *dy, float *dx, int64_t d) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += dy[i] * y[i];
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dx[i] = y[i] * (dy[i] - dot);
}

}  // namespace conformer
