"""Mixed precision on the real model: O1 (the seed recipe's level) with dynamic loss scaling trains."""
from __future__ import annotations

import math
from pathlib import Path

import mindspore as ms
import numpy as np

from conformer.losses import DualHeadLoss
from conformer.models import Conformer, create_model
from conformer.optim import build_optimizer
from conformer.train.step import TrainStep, apply_amp


def test_o1_with_dynamic_loss_scale_trains_the_conformer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ms.set_seed(0)
    rundir = tmp_path / "run"
    rundir.mkdir()
    network = apply_amp(create_model("conformer_nano", num_classes=10, depth=3, img_size=16), "O1", workdir=rundir)
    assert type(network) is not Conformer  # rewritten with fp16 casts around its ops
    assert (rundir / "rewritten_network").is_dir() and not (tmp_path / "rewritten_network").exists()
    assert all(p.dtype == ms.float32 for p in network.trainable_params())  # O1 keeps fp32 master weights

    step = TrainStep(network, DualHeadLoss(), build_optimizer(network, lr=1e-3), loss_scale="dynamic",
                     init_loss_scale=2.0**20, clip_grad_norm=5.0)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    y = ms.Tensor(np.arange(8, dtype=np.int32))
    results = [step(x, y) for _ in range(10)]
    # fp16 gradients overflow at a 2**20 scale: those steps are skipped and the scale halves until they fit.
    assert results[0].overflow and not results[0].applied
    assert [r.loss_scale for r in results][:2] == [2.0**19, 2.0**18]
    applied = [r for r in results if r.applied]
    assert len(applied) >= 2 and all(math.isfinite(r.loss) for r in results)
    assert applied[-1].loss < results[0].loss  # the applied updates fit the batch
