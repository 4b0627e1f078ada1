// torch.optim.AdamW over many float32 parameters at once for MindSpore's CPU (ops.Custom, func_type="aot"): one
// launch per parameter group in place of one AdamWeightDecay launch per parameter (235 for Conformer-nano). Updates
// the parameters and both moments in place, with torch's formula and order of operations:
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   p = p (1 - lr decay);  p -= lr / c1 * m / (sqrt(v) / sqrt(c2) + eps),  c1 = 1 - beta1^t, c2 = 1 - beta2^t
// The elements of all tensors are split evenly over the cores.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tensor_list.h"

// inputs: lr (float32 scalar), constants (float64 [4] = beta1, beta2, eps, weight decay), step t >= 1 (int32
// scalar), then k parameters, their k exp_avg, their k exp_avg_sq and their k gradients; output [1] = t (what a
// caller may depend on). The scalars are worked out in double, as torch does in Python.
extern "C" int AdamW(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  const int count = (nparam - 4) / 4;
  const double lr = static_cast<const float *>(params[0])[0];
  const double *constants = static_cast<const double *>(params[1]);
  const double beta1 = constants[0], beta2 = constants[1], eps = constants[2], decay = constants[3];
  const int32_t t = static_cast<const int32_t *>(params[2])[0];
  const float keep = static_cast<float>(1.0 - lr * decay);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  const float c2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), e = static_cast<float>(eps);
  const float one_minus_b1 = static_cast<float>(1.0 - beta1), one_minus_b2 = static_cast<float>(1.0 - beta2);
  void **tensors = params + 3;
  for (int i = 0; i < 4 * count; ++i) {
    if (std::strcmp(dtypes[3 + i], "float32") != 0) return 1;  // the caller passes float32 tensors only
  }
  const conformer::TensorList parameters(count, ndims + 3, shapes + 3);
  conformer::parallel_for(parameters.elements_in_all(), 1 << 14, [&](int64_t begin, int64_t end) {
    parameters.for_each_piece(begin, end, [&](int i, int64_t offset, int64_t n) {
      float *__restrict p = static_cast<float *>(tensors[i]) + offset;
      float *__restrict m = static_cast<float *>(tensors[count + i]) + offset;
      float *__restrict v = static_cast<float *>(tensors[2 * count + i]) + offset;
      const float *__restrict g = static_cast<const float *>(tensors[3 * count + i]) + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float mj = b1 * m[j] + one_minus_b1 * g[j];
        const float vj = b2 * v[j] + one_minus_b2 * (g[j] * g[j]);
        m[j] = mj;
        v[j] = vj;
        p[j] = p[j] * keep - step_size * (mj / (std::sqrt(vj) / c2_sqrt + e));
      }
    });
  });
  static_cast<float *>(params[nparam - 1])[0] = static_cast<float>(t);
  return 0;
}
