// LayerNorm over the last axis for MindSpore's CPU (ops.Custom, func_type="aot"): forward and backward.
// float32 in and out, sums in double, vectorised and split over the cores; the same math as nn.LayerNorm.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {
constexpr int64_t kGrainElements = 16384;
constexpr int64_t kRowBlock = 32;

int64_t leading(int ndim, const int64_t *shape) {
  int64_t rows = 1;
  for (int i = 0; i < ndim - 1; ++i) rows *= shape[i];
  return rows;
}
}  // namespace

// inputs x [..., d], gamma [d], beta [d], eps [1]; outputs y [..., d], mean [...], rstd [...]
extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  float *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  const int64_t d = shapes[0][ndims[0] - 1];
  conformer::parallel_for(leading(ndims[0], shapes[0]), kGrainElements / d + 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict xr = x + r * d;
      float *__restrict yr = y + r * d;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < d; ++i) sum += xr[i];
      const float m = static_cast<float>(sum / d);
      double squares = 0.0;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < d; ++i) {
        const float c = xr[i] - m;
        squares += static_cast<double>(c) * c;
      }
      const float rs = 1.0f / std::sqrt(static_cast<float>(squares / d) + eps);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - m) * rs * gamma[i] + beta[i];
      mean[r] = m;
      rstd[r] = rs;
    }
  });
  return 0;
}

// inputs x [..., d], gamma [d], mean [...], rstd [...], dy [..., d]; outputs dx [..., d], dgamma [d], dbeta [d]
extern "C" int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  const int64_t d = shapes[0][ndims[0] - 1];
  const int64_t rows = leading(ndims[0], shapes[0]);
  conformer::parallel_for(rows, kGrainElements / d + 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict xr = x + r * d;
      const float *__restrict dyr = dy + r * d;
      float *__restrict dxr = dx + r * d;
      const float m = mean[r], rs = rstd[r];
      double sum_gdy = 0.0, sum_gdy_xhat = 0.0;
#pragma omp simd reduction(+ : sum_gdy, sum_gdy_xhat)
      for (int64_t i = 0; i < d; ++i) {
        const float gdy = dyr[i] * gamma[i];
        sum_gdy += gdy;
        sum_gdy_xhat += static_cast<double>(gdy) * ((xr[i] - m) * rs);
      }
      const float a = static_cast<float>(sum_gdy / d), c = static_cast<float>(sum_gdy_xhat / d);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) dxr[i] = rs * (dyr[i] * gamma[i] - a - (xr[i] - m) * rs * c);
    }
  });
  // dgamma and dbeta sum over the rows: each thread takes a block of columns, and sums blocks of rows in float
  // before adding them up in double
  conformer::parallel_for(d, 16, [=](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> dgamma_sum(width, 0.0), dbeta_sum(width, 0.0);
    std::vector<float> dgamma_block(width), dbeta_block(width);
    float *__restrict gblock = dgamma_block.data();
    float *__restrict bblock = dbeta_block.data();
    for (int64_t first = 0; first < rows; first += kRowBlock) {
      std::fill(dgamma_block.begin(), dgamma_block.end(), 0.0f);
      std::fill(dbeta_block.begin(), dbeta_block.end(), 0.0f);
      for (int64_t r = first; r < std::min(rows, first + kRowBlock); ++r) {
        const float *__restrict xr = x + r * d + begin;
        const float *__restrict dyr = dy + r * d + begin;
        const float m = mean[r], rs = rstd[r];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          gblock[i] += dyr[i] * ((xr[i] - m) * rs);
          bblock[i] += dyr[i];
        }
      }
      for (int64_t i = 0; i < width; ++i) {
        dgamma_sum[i] += gblock[i];
        dbeta_sum[i] += bblock[i];
      }
    }
    for (int64_t i = 0; i < width; ++i) {
      dgamma[begin + i] = static_cast<float>(dgamma_sum[i]);
      dbeta[begin + i] = static_cast<float>(dbeta_sum[i]);
    }
  });
  return 0;
}
