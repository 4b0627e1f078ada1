"""Evaluation over batches: sums per head, and a short last batch served by the graph of the full ones."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from conformer.runtime.hardware import ProcessGroup
from conformer.train.losses import DualHeadLoss
from conformer.train.trainer import EvalStep, evaluate_batches

from .test_step import CLASSES, TwoHeads, blobs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_a_short_last_batch_runs_in_the_full_batch_graph_and_counts_only_its_images() -> None:
    ms.set_seed(3)
    net = TwoHeads(bn=True)
    images, labels = blobs(10, seed=3)
    batches = [(images[i:i + 4], labels[i:i + 4]) for i in (0, 4, 8)]  # 4, 4 and a last batch of 2
    evaluator = EvalStep(net, DualHeadLoss(), CLASSES)

    metrics = evaluate_batches(evaluator, batches, ProcessGroup())

    assert len(evaluator.compile_cache) == 1  # one graph for the three batches
    net.set_train(False)
    conv, trans = (head.asnumpy().astype(np.float64) for head in net(images))
    y = labels.asnumpy()
    rows = np.arange(len(y))
    loss = 0.5 * -log_softmax(conv)[rows, y] + 0.5 * -log_softmax(trans)[rows, y]
    assert metrics["val/loss"] == pytest.approx(loss.mean(), rel=1e-6)
    for head, logits in (("conv", conv), ("trans", trans), ("sum", conv + trans)):
        assert metrics[f"val/top1_{head}"] == pytest.approx(100.0 * np.mean(logits.argmax(axis=1) == y))
    assert {metrics[f"val/top5_{head}"] for head in ("conv", "trans", "sum")} == {100.0}  # top-3 of 3 classes
