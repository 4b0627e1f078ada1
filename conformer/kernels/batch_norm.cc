// BatchNorm of NCHW float32 in training mode (batch statistics) for MindSpore's CPU (ops.Custom, func_type="aot"):
// forward and backward, sums in double, vectorised and split over the cores by channels. The same math as
// nn.BatchNorm2d in training; the forward also updates the moving statistics, in place (see batch_norm_forward).
// The *Relu entry points apply a ReLU to the output (y = max(BatchNorm(x), 0)); their backward takes y as one more
// input and passes the gradient only where y > 0, as MindSpore's ReluGrad does.
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "relu.h"

namespace {
struct Layout {
  int64_t batch, channels, plane;
};

Layout layout(int ndim, const int64_t *shape) {
  int64_t plane = 1;
  for (int i = 2; i < ndim; ++i) plane *= shape[i];
  return {shape[0], shape[1], plane};
}

template <bool relu>
inline float activate(float value) {
  return relu ? conformer::relu(value) : value;
}

// the upstream gradient dy[i], through the ReLU (whose output is y) with relu
template <bool relu>
inline float through(const float *__restrict dy, const float *__restrict y, int64_t i) {
  return relu ? conformer::relu_gradient(dy[i], y[i]) : dy[i];
}
}  // namespace

// inputs x [N, C, ...], gamma [C], beta [C], moving mean [C], moving variance [C], [eps, momentum];
// outputs y [N, C, ...], mean [C], rstd [C] (1 / sqrt(biased variance + eps)). The moving mean and variance are
// updated in their own memory (MindSpore hands a kernel a Parameter's memory on the CPU): momentum * moving +
// (1 - momentum) * batch statistic, with the unbiased batch variance. Nothing else in a train step reads them, so no
// other op can see them half-updated, and the step saves the two Assign ops per BatchNorm that would copy them back.
template <bool relu>
int batch_norm_forward(void **params, int *ndims, int64_t **shapes) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  float *moving_mean = static_cast<float *>(params[3]);
  float *moving_variance = static_cast<float *>(params[4]);
  const float eps = static_cast<const float *>(params[5])[0];
  const float momentum = static_cast<const float *>(params[5])[1];
  float *y = static_cast<float *>(params[6]);
  float *mean = static_cast<float *>(params[7]);
  float *rstd = static_cast<float *>(params[8]);
  const Layout s = layout(ndims[0], shapes[0]);
  const int64_t count = s.batch * s.plane;
  conformer::parallel_for(s.channels, 1, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < s.plane; ++i) sum += xp[i];
      }
      const float m = static_cast<float>(sum / count);
      double squares = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < s.plane; ++i) {
          const float centred = xp[i] - m;
          squares += static_cast<double>(centred) * centred;
        }
      }
      const float rs = 1.0f / std::sqrt(static_cast<float>(squares / count) + eps);
      const float scale = rs * gamma[c], shift = beta[c] - m * scale;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
        float *__restrict yp = y + (n * s.channels + c) * s.plane;
#pragma omp simd
        for (int64_t i = 0; i < s.plane; ++i) yp[i] = activate<relu>(xp[i] * scale + shift);
      }
      mean[c] = m;
      rstd[c] = rs;
      const float unbiased = static_cast<float>(squares / (count > 1 ? count - 1 : 1));
      moving_mean[c] = momentum * moving_mean[c] + (1.0f - momentum) * m;
      moving_variance[c] = momentum * moving_variance[c] + (1.0f - momentum) * unbiased;
    }
  });
  return 0;
}

// inputs x [N, C, ...], gamma [C], mean [C], rstd [C], dy [N, C, ...], (y with relu); outputs dx [N, C, ...],
// dgamma [C], dbeta [C]
template <bool relu>
int batch_norm_backward(void **params, int *ndims, int64_t **shapes) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  const float *y = relu ? static_cast<const float *>(params[5]) : nullptr;
  float *dx = static_cast<float *>(params[relu ? 6 : 5]);
  float *dgamma = static_cast<float *>(params[relu ? 7 : 6]);
  float *dbeta = static_cast<float *>(params[relu ? 8 : 7]);
  const Layout s = layout(ndims[0], shapes[0]);
  const int64_t count = s.batch * s.plane;
  conformer::parallel_for(s.channels, 1, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float m = mean[c], rs = rstd[c];
      double sum_dy = 0.0, sum_dy_xhat = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
        const float *__restrict dyp = dy + (n * s.channels + c) * s.plane;
        const float *__restrict yp = relu ? y + (n * s.channels + c) * s.plane : nullptr;
#pragma omp simd reduction(+ : sum_dy, sum_dy_xhat)
        for (int64_t i = 0; i < s.plane; ++i) {
          const float g = through<relu>(dyp, yp, i);
          sum_dy += g;
          sum_dy_xhat += static_cast<double>(g) * ((xp[i] - m) * rs);
        }
      }
      const float mean_dy = static_cast<float>(sum_dy / count);
      const float mean_dy_xhat = static_cast<float>(sum_dy_xhat / count);
      const float scale = gamma[c] * rs;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
        const float *__restrict dyp = dy + (n * s.channels + c) * s.plane;
        const float *__restrict yp = relu ? y + (n * s.channels + c) * s.plane : nullptr;
        float *__restrict dxp = dx + (n * s.channels + c) * s.plane;
#pragma omp simd
        for (int64_t i = 0; i < s.plane; ++i) {
          dxp[i] = scale * (through<relu>(dyp, yp, i) - mean_dy - (xp[i] - m) * rs * mean_dy_xhat);
        }
      }
      dgamma[c] = static_cast<float>(sum_dy_xhat);
      dbeta[c] = static_cast<float>(sum_dy);
    }
  });
  return 0;
}

// Inference (the moving statistics): per channel y = x * scale + shift, scale = gamma / sqrt(moving variance + eps).
// inputs x [N, C, ...], gamma [C], beta [C], moving mean [C], moving variance [C], [eps, momentum]; outputs y
template <bool relu>
int batch_norm_inference(void **params, int *ndims, int64_t **shapes) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *moving_mean = static_cast<const float *>(params[3]);
  const float *moving_variance = static_cast<const float *>(params[4]);
  const float eps = static_cast<const float *>(params[5])[0];
  float *y = static_cast<float *>(params[6]);
  const Layout s = layout(ndims[0], shapes[0]);
  conformer::parallel_for(s.batch * s.channels, 16384 / s.plane + 1, [=](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % s.channels;
      const float scale = gamma[c] / std::sqrt(moving_variance[c] + eps), shift = beta[c] - moving_mean[c] * scale;
      const float *__restrict xp = x + plane * s.plane;
      float *__restrict yp = y + plane * s.plane;
#pragma omp simd
      for (int64_t i = 0; i < s.plane; ++i) yp[i] = activate<relu>(xp[i] * scale + shift);
    }
  });
  return 0;
}

// The inference's backward. inputs x, gamma, moving mean, moving variance, [eps, momentum], dy, (y with relu);
// outputs dx = dy * scale, dgamma = sum(dy * (x - mean) / sqrt(variance + eps)), dbeta = sum(dy)
template <bool relu>
int batch_norm_inference_backward(void **params, int *ndims, int64_t **shapes) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *moving_mean = static_cast<const float *>(params[2]);
  const float *moving_variance = static_cast<const float *>(params[3]);
  const float eps = static_cast<const float *>(params[4])[0];
  const float *dy = static_cast<const float *>(params[5]);
  const float *y = relu ? static_cast<const float *>(params[6]) : nullptr;
  float *dx = static_cast<float *>(params[relu ? 7 : 6]);
  float *dgamma = static_cast<float *>(params[relu ? 8 : 7]);
  float *dbeta = static_cast<float *>(params[relu ? 9 : 8]);
  const Layout s = layout(ndims[0], shapes[0]);
  conformer::parallel_for(s.channels, 1, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float rs = 1.0f / std::sqrt(moving_variance[c] + eps), m = moving_mean[c], scale = gamma[c] * rs;
      double sum_dy = 0.0, sum_dy_xhat = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const float *__restrict xp = x + (n * s.channels + c) * s.plane;
        const float *__restrict dyp = dy + (n * s.channels + c) * s.plane;
        const float *__restrict yp = relu ? y + (n * s.channels + c) * s.plane : nullptr;
        float *__restrict dxp = dx + (n * s.channels + c) * s.plane;
#pragma omp simd reduction(+ : sum_dy, sum_dy_xhat)
        for (int64_t i = 0; i < s.plane; ++i) {
          const float g = through<relu>(dyp, yp, i);
          sum_dy += g;
          sum_dy_xhat += static_cast<double>(g) * ((xp[i] - m) * rs);
          dxp[i] = g * scale;
        }
      }
      dgamma[c] = static_cast<float>(sum_dy_xhat);
      dbeta[c] = static_cast<float>(sum_dy);
    }
  });
  return 0;
}

#define CONFORMER_BATCH_NORM_ENTRY(name, pass)                                                                   \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra) {                                                                            \
    return pass(params, ndims, shapes);                                                                         \
  }

CONFORMER_BATCH_NORM_ENTRY(BatchNormForward, batch_norm_forward<false>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormBackward, batch_norm_backward<false>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormInference, batch_norm_inference<false>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormInferenceBackward, batch_norm_inference_backward<false>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormReluForward, batch_norm_forward<true>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormReluBackward, batch_norm_backward<true>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormReluInference, batch_norm_inference<true>)
CONFORMER_BATCH_NORM_ENTRY(BatchNormReluInferenceBackward, batch_norm_inference_backward<true>)
