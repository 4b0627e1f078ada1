"""The project's compiled CPU kernels: LayerNorm equals MindSpore's to float32 rounding, forward and backward, and
falls back to MindSpore's kernel where it cannot be built or must not be used."""
from __future__ import annotations

import logging
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from conformer import kernels
from conformer.models.layer_norm import CpuLayerNorm, use_builtin_kernels


class _Loss(nn.Cell):
    """A weighted sum of the norm's output: every element gets its own upstream gradient."""

    def __init__(self, norm: nn.Cell, weights: Tensor) -> None:
        super().__init__()
        self.norm, self.weights = norm, weights

    def construct(self, x: Tensor) -> Tensor:
        return (self.norm(x) * self.weights).sum()


def _value_and_grads(norm: nn.Cell, x: Tensor, weights: Tensor) -> list[np.ndarray]:
    loss = _Loss(norm, weights)
    value, (dx, params) = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=loss.trainable_params()))(x)
    return [value.asnumpy(), norm(x).asnumpy(), dx.asnumpy(), *(g.asnumpy() for g in params)]


NEEDS_COMPILER = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler (g++ or $CXX) to build the kernel: apt install g++")


@NEEDS_COMPILER
@pytest.mark.parametrize(("shape", "eps"), [((4, 197, 384), 1e-6), ((3, 17, 96), 1e-5)])
def test_layer_norm_kernel_equals_mindspores_forward_and_backward(shape: tuple[int, ...], eps: float) -> None:
    rng = np.random.default_rng(0)
    x = Tensor((rng.standard_normal(shape) * 3 + 1).astype(np.float32))
    weights = Tensor(rng.standard_normal(shape).astype(np.float32))
    ours, builtin = CpuLayerNorm(shape[-1], eps), nn.LayerNorm((shape[-1],), epsilon=eps)
    assert ours.kernel is not None, "the kernel was not built (is g++ installed?)"
    for param in ("gamma", "beta"):
        value = rng.standard_normal(shape[-1]).astype(np.float32)
        getattr(ours, param).set_data(Tensor(value))
        getattr(builtin, param).set_data(Tensor(value))
    expected = _value_and_grads(builtin, x, weights)
    for name, got, want in zip(("loss", "y", "dx", "dgamma", "dbeta"), _value_and_grads(ours, x, weights), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max(), err_msg=name)
    assert [p.name for p in ours.get_parameters()] == [p.name for p in builtin.get_parameters()]  # checkpoints

    portable = CpuLayerNorm(shape[-1], eps)  # what an export does, before anything is compiled
    assert use_builtin_kernels(portable) == 1 and portable.kernel is None
    np.testing.assert_array_equal(portable(x).asnumpy(), nn.LayerNorm((shape[-1],), epsilon=eps)(x).asnumpy())


def test_without_a_compiler_the_builtin_kernel_is_used(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            norm = CpuLayerNorm(8, 1e-6)
        assert norm.kernel is None and "no C++ compiler" in caplog.text
        x = Tensor(np.arange(16, dtype=np.float32).reshape(2, 8))
        np.testing.assert_array_equal(norm(x).asnumpy(), nn.LayerNorm((8,), epsilon=1e-6)(x).asnumpy())
    finally:
        kernels.library.cache_clear()


@NEEDS_COMPILER
def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        path = kernels.library("layer_norm")
        assert path is not None and path.parent == tmp_path / "conformer" / "kernels" and path.is_file()
        built = path.stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library("layer_norm") == path and path.stat().st_mtime_ns == built  # found, not rebuilt
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    finally:
        kernels.library.cache_clear()


@NEEDS_COMPILER
def test_an_unwritable_cache_falls_back_to_the_builtin_kernel(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert kernels.library("layer_norm") is None
        assert "cannot build the layer_norm kernel" in caplog.text and "XDG_CACHE_HOME" in caplog.text
    finally:
        kernels.library.cache_clear()
