"""Mixed precision on the real model, on MindSpore's ops (the path Ascend and GPU run): every level trains with dynamic
loss scaling; the project's float32 kernels refuse AMP up front."""
from __future__ import annotations

import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conformer import kernels
from conformer.models import Conformer, create_model
from conformer.train.losses import DualHeadLoss
from conformer.train.optim import build_optimizer
from conformer.train.step import DEFAULT_INIT_LOSS_SCALE, TrainStep, apply_amp


def tiny_conformer() -> Conformer:
    return create_model("conformer_nano", num_classes=10, depth=3, img_size=16)


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_every_amp_level_with_dynamic_loss_scale_trains_the_conformer(level: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ms.set_seed(0)
    rundir = tmp_path / "run"
    rundir.mkdir()
    with kernels.using("mindspore"):
        network = apply_amp(tiny_conformer(), level, workdir=rundir)
    assert type(network) is not Conformer  # rewritten (O1) or wrapped (O2, O3) with fp16 casts
    # O1 writes its rewritten source in the run dir, not in the working directory
    assert (rundir / "rewritten_network").is_dir() == (level == "O1")
    assert not (tmp_path / "rewritten_network").exists()
    assert all(p.dtype == ms.float32 for p in network.trainable_params())  # fp32 master weights

    step = TrainStep(network, DualHeadLoss(label_smoothing=0.1), build_optimizer(network, lr=1e-3),
                     loss_scale="dynamic", clip_grad_norm=5.0)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    y = ms.Tensor(np.arange(8, dtype=np.int32))
    # the recipe's first AMP steps apply their updates (a debug=fdr run has one step): Conformer-Ti's first step fits
    # up to 2^14 (benchmarks/loss_scale.py), the default starts at 2^12
    first = step(x, y)
    assert first.applied and not first.overflow and first.loss_scale == DEFAULT_INIT_LOSS_SCALE == 2.0**12
    step.load_parameters_dict({"loss_scale.value": ms.Tensor(2.0**20, ms.float32)})  # the same graph, far too high
    results = [step(x, y) for _ in range(10)]
    # fp16 gradients overflow at a 2**20 scale: those steps are skipped and the scale halves until they fit
    assert results[0].overflow and not results[0].applied and results[0].loss_scale == 2.0**19
    scales = [r.loss_scale for r in results]
    assert all(later <= earlier for earlier, later in zip(scales, scales[1:]))  # no growth within the window
    applied = [r for r in results if r.applied]
    assert len(applied) >= 2 and all(math.isfinite(r.loss) for r in results)
    assert all(not r.overflow for r in applied) and applied[-1].loss < results[0].loss  # the updates fit the batch


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_amp_on_the_projects_float32_kernels_is_refused_before_any_compile(level: str) -> None:
    with kernels.using("project"):
        network = tiny_conformer()
    with pytest.raises(ValueError, match=f"AMP {level} runs on MindSpore's ops; this network was built on the "
                                         r"project's CPU kernels \(.*CpuBatchNorm2d.*\)"):
        apply_amp(network, level)
