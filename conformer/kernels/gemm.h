// Row-major sgemm for the project's CPU kernels, on the calling thread: OpenBLAS from the scipy-openblas32 wheel,
// its own threads off (they spin after each call and would take the cores from the kernels that come next); a kernel
// splits its work over the cores with parallel.h instead.
#pragma once

#include <cblas.h>

#include <cstdint>

namespace conformer {

// c[m, n] = alpha * op(a) op(b) + beta * c, where op(a) is [m, k] (a stored [k, m] when a_transposed) and op(b) is
// [k, n] (b stored [n, k] when b_transposed); lda, ldb, ldc are the stored row strides.
inline void sgemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  static const bool single_threaded = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)single_threaded;
  scipy_cblas_sgemm(CblasRowMajor, a_transposed ? CblasTrans : CblasNoTrans, b_transposed ? CblasTrans : CblasNoTrans,
                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace conformer
