// Dense (y = x W^T + b over the last axis of x) for MindSpore's CPU (ops.Custom, func_type="aot"): forward and
// backward as OpenBLAS sgemm calls (the scipy-openblas32 wheel), split over the cores by parallel.h. The same math as
// nn.Dense, in another summation order. Without a bias the ops (the *NoBias entry points) take one input and return one gradient fewer.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "parallel.h"

namespace {
constexpr int64_t kRowBlock = 64;

// c[m, n] = op(a) op(b) + beta * c with the rows of c split over the pool's threads (see gemm.h for the arguments)
void gemm_rows(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
               const float *b, int64_t ldb, float beta, float *c) {
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(n * k / 64, 1));
  conformer::parallel_for(m, grain, [=](int64_t begin, int64_t end) {
    const float *a_rows = a_transposed ? a + begin : a + begin * lda;
    conformer::sgemm(a_transposed, b_transposed, end - begin, n, k, 1.0f, a_rows, lda, b, ldb, beta, c + begin * n, n);
  });
}

int64_t leading(int ndim, const int64_t *shape) {
  int64_t rows = 1;
  for (int i = 0; i < ndim - 1; ++i) rows *= shape[i];
  return rows;
}
}  // namespace

// inputs x [..., k], w [n, k], (b [n]); outputs y [..., n]
extern "C" int DenseForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  const bool bias = nparam == 4;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[bias ? 3 : 2]);
  const int64_t m = leading(ndims[0], shapes[0]), k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  if (bias) {
    conformer::parallel_for(m, 16384 / n + 1, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::copy(b, b + n, y + r * n);
    });
  }
  gemm_rows(false, true, m, n, k, x, k, w, k, bias ? 1.0f : 0.0f, y);
  return 0;
}

// inputs x [..., k], w [n, k], dy [..., n]; outputs dx [..., k], dw [n, k], (db [n])
extern "C" int DenseBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  const bool bias = nparam == 6;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  const int64_t m = leading(ndims[0], shapes[0]), k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  gemm_rows(false, false, m, k, n, dy, n, w, k, 0.0f, dx);  // dx = dy w
  gemm_rows(true, false, n, k, m, dy, n, x, k, 0.0f, dw);    // dw = dy^T x
  if (!bias) return 0;
  float *db = static_cast<float *>(params[5]);
  // db sums dy over the rows: each thread takes a block of columns, sums blocks of rows in float, adds them in double
  conformer::parallel_for(n, 16, [=](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> total(width, 0.0);
    std::vector<float> block(width);
    float *__restrict partial = block.data();
    for (int64_t first = 0; first < m; first += kRowBlock) {
      std::fill(block.begin(), block.end(), 0.0f);
      for (int64_t r = first; r < std::min(m, first + kRowBlock); ++r) {
        const float *__restrict dyr = dy + r * n + begin;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) partial[i] += dyr[i];
      }
      for (int64_t i = 0; i < width; ++i) total[i] += partial[i];
    }
    for (int64_t i = 0; i < width; ++i) db[begin + i] = static_cast<float>(total[i]);
  });
  return 0;
}

// MindSpore keys a custom op by its function name: each arity has its own entry point
extern "C" int DenseForwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  return DenseForward(nparam, params, ndims, shapes, dtypes, stream, extra);
}
extern "C" int DenseBackwardNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  return DenseBackward(nparam, params, ndims, shapes, dtypes, stream, extra);
}
