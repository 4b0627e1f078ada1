"""Run by tests/test_kernels.py in a fresh process, as `python -m tests.kernel_threads_probe CASE ...` with
CONFORMER_KERNEL_THREADS set (the kernels' thread pool reads it once, at the first kernel): the kernel-equality
test for each CASE and the global-norm test, then prints the process's thread count."""
from __future__ import annotations

import os
import sys

import mindspore as ms

from tests import conftest  # noqa: F401  (the tests' CPU tuning and device)
from tests.test_kernels import (
    test_global_norm_kernel_equals_the_sum_of_squares,
    test_kernel_equals_mindspores_forward_and_backward,
)

if __name__ == "__main__":
    ms.set_context(mode=ms.GRAPH_MODE)
    for case in sys.argv[1:]:
        test_kernel_equals_mindspores_forward_and_backward(case)
    test_global_norm_kernel_equals_the_sum_of_squares()
    print("threads", len(os.listdir("/proc/self/task")))
