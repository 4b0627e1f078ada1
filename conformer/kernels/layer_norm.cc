// LayerNorm over the last axis for MindSpore's CPU (ops.Custom, func_type="aot"): forward and backward.
// float32 in and out, sums in double; the same math as nn.LayerNorm, at a fraction of its kernel's time.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {
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
  const int64_t rows = leading(ndims[0], shapes[0]);
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += xr[i];
    const float m = static_cast<float>(sum / d);
    double squares = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float c = xr[i] - m;
      squares += static_cast<double>(c) * c;
    }
    const float rs = 1.0f / std::sqrt(static_cast<float>(squares / d) + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - m) * rs * gamma[i] + beta[i];
    mean[r] = m;
    rstd[r] = rs;
  }
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
  std::vector<double> dgamma_sum(d, 0.0), dbeta_sum(d, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    const float *dyr = dy + r * d;
    float *dxr = dx + r * d;
    const float m = mean[r], rs = rstd[r];
    double sum_gdy = 0.0, sum_gdy_xhat = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float xhat = (xr[i] - m) * rs;
      const float gdy = dyr[i] * gamma[i];
      sum_gdy += gdy;
      sum_gdy_xhat += static_cast<double>(gdy) * xhat;
      dgamma_sum[i] += static_cast<double>(dyr[i]) * xhat;
      dbeta_sum[i] += dyr[i];
    }
    const float a = static_cast<float>(sum_gdy / d), c = static_cast<float>(sum_gdy_xhat / d);
    for (int64_t i = 0; i < d; ++i) dxr[i] = rs * (dyr[i] * gamma[i] - a - (xr[i] - m) * rs * c);
  }
  for (int64_t i = 0; i < d; ++i) {
    dgamma[i] = static_cast<float>(dgamma_sum[i]);
    dbeta[i] = static_cast<float>(dbeta_sum[i]);
  }
  return 0;
}
