// Vectorised float math for the project's CPU kernels: glibc's libmvec (2.35 and later) provides SIMD erff and
// expf (at most 4 ulp); declaring them `simd` lets the compiler call the variant for this CPU from loops marked
// `#pragma omp simd` (built with -fopenmp-simd, linked with -lmvec).
#pragma once

extern "C" {
float erff(float) __attribute__((simd("notinbranch"), nothrow, const));
float expf(float) __attribute__((simd("notinbranch"), nothrow, const));
}
