// The global L2 norm of many float32 tensors (a train step's gradients) for MindSpore's CPU (ops.Custom,
// func_type="aot"): one op in place of a square, a sum per tensor and their sum (two launches per parameter).
// Sums in double, the elements of all tensors split evenly over the cores; inf and NaN propagate.
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensor_list.h"

// inputs any number of float32 tensors; output [1] = sqrt(sum of all squares)
extern "C" int GlobalNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  const int count = nparam - 1;
  const conformer::TensorList tensors(count, ndims, shapes);
  // one partial sum per chunk of elements, added in chunk order: the same norm on every run
  const int64_t elements = tensors.elements_in_all();
  std::vector<double> partials(conformer::chunks(elements, 1 << 16), 0.0);
  conformer::parallel_chunks(elements, partials.size(), [&](int64_t chunk, int64_t begin, int64_t end) {
    double sum = 0.0;
    tensors.for_each_piece(begin, end, [&](int t, int64_t offset, int64_t n) {
      const float *__restrict values = static_cast<const float *>(params[t]) + offset;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(values[i]) * values[i];
    });
    partials[chunk] = sum;
  });
  double total = 0.0;
  for (double sum : partials) total += sum;
  static_cast<float *>(params[count])[0] = static_cast<float>(std::sqrt(total));
  return 0;
}
