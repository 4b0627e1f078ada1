// Softmax over the last axis for MindSpore's CPU (ops.Custom, func_type="aot"): forward and backward, float32,
// vectorised (libmvec's expf) and split over the cores by rows. The same math as nn.Softmax(axis=-1).
#include <cstdint>

#include "parallel.h"
#include "rows.h"

namespace {
constexpr int64_t kGrainElements = 16384;

struct Rows {
  int64_t count, length;
};

Rows rows(int ndim, const int64_t *shape) {
  int64_t count = 1;
  for (int i = 0; i < ndim - 1; ++i) count *= shape[i];
  return {count, shape[ndim - 1]};
}
}  // namespace

// inputs x [..., d]; outputs y [..., d] = exp(x - max) / sum(exp(x - max))
extern "C" int SoftmaxForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const Rows shape = rows(ndims[0], shapes[0]);
  const int64_t d = shape.length;
  conformer::parallel_for(shape.count, kGrainElements / d + 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) conformer::softmax_row(x + r * d, y + r * d, d);
  });
  return 0;
}

// inputs y [..., d], dy [..., d]; outputs dx [..., d] = y * (dy - sum(dy * y))
extern "C" int SoftmaxBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *y = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const Rows shape = rows(ndims[0], shapes[0]);
  const int64_t d = shape.length;
  conformer::parallel_for(shape.count, kGrainElements / d + 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) conformer::softmax_row_backward(y + r * d, dy + r * d, dx + r * d, d);
  });
  return 0;
}
