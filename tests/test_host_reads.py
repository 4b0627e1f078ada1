"""The host stays out of the device's way between log points: a training reads the device back once per log window,
the drop-path masks of a window come in one upload and equal the per-step ones to the bit, a non-finite loss is
caught where its window is read."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conformer.models import create_model
from conformer.models.conformer_net import drop_path_masks
from conformer.train.losses import DualHeadLoss
from conformer.train.optim import build_optimizer
from conformer.train.prefetch import prefetched
from conformer.train.step import StepResult, TrainStep
from conformer.train.window import StepWindow

from .conftest import KERNEL_PATHS
from .helpers import tiny_folder, train_in_process

# every way a Tensor's value comes back to the host
READS = ("asnumpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _record_reads_and_launches(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Log 'launch' for every train step launched and 'read' for every device-to-host read on the training thread
    (a read inside a read, e.g. float() on asnumpy, counts once)."""
    main, depth = threading.main_thread(), threading.local()

    def counted(original, name: str):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            outer = not getattr(depth, "n", 0)
            if outer and threading.current_thread() is main:
                events.append(name)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth.n -= 1
        return wrapper

    for name in READS:
        if name in vars(Tensor):
            monkeypatch.setattr(Tensor, name, counted(vars(Tensor)[name], "read"))
    monkeypatch.setattr(TrainStep, "launch", counted(TrainStep.launch, "launch"))


@pytest.mark.parametrize("kernels", KERNEL_PATHS)
def test_a_training_reads_the_device_once_per_log_window(tmp_path: Path, tmp_path_factory,
                                                        monkeypatch: pytest.MonkeyPatch, kernels: str) -> None:
    """2 epochs of 6 steps, a log point every 4: the compile step, steps 4 and 8 read once (the records of the
    window), the epoch ends read (records, eval, checkpoint), no other step reads anything."""
    events: list[str] = []
    _record_reads_and_launches(monkeypatch, events)
    train_in_process(tmp_path, tiny_folder(tmp_path_factory.getbasetemp()), "trainer.epochs=2",
                     "trainer.log_every_n_steps=4", "model.drop_path_rate=0.1", "trainer.ema_decay=0.9",
                     f"hardware.kernels={kernels}")
    start = events.index("launch")
    reads_after: list[int] = []  # reads after each launch, up to the next launch (or the end)
    for event in events[start:]:
        if event == "launch":
            reads_after.append(0)
        else:
            reads_after[-1] += 1
    assert len(reads_after) == 12
    between = {step: reads for step, reads in enumerate(reads_after, start=1) if step not in (1, 4, 6, 8, 12)}
    assert between == dict.fromkeys(between, 0)
    assert reads_after[0] >= 1 and reads_after[3] == reads_after[7] == 1
    assert reads_after[5] > 1 and reads_after[11] > 1


def test_masks_uploaded_per_window_are_the_per_step_masks_to_the_bit() -> None:
    """Drop-path masks drawn for a window of 3 steps at once (one upload) train to the same weights as masks
    uploaded for every step, from a resumed counter on."""
    ms.set_seed(3)
    images = Tensor(np.random.default_rng(0).normal(size=(5, 4, 3, 16, 16)).astype(np.float32))
    labels = Tensor(np.random.default_rng(1).integers(0, 3, (5, 4)).astype(np.int32))
    nets = [create_model("conformer_nano", num_classes=3, depth=3, img_size=16, drop_path_rate=0.3)
            for _ in range(2)]
    for a, b in zip(nets[0].get_parameters(), nets[1].get_parameters()):
        b.set_data(Tensor(a.asnumpy().copy()))
    steps = [TrainStep(net, DualHeadLoss(), build_optimizer(net, lr=1e-3), window=window, mask_seed=(7, 0))
             for net, window in zip(nets, (1, 3))]
    for step in steps:
        step.seek(10)
        for index in range(5):
            step.launch(images[index], labels[index])
            if index % 3 == 2 or step.window == 1:
                step.results()
        step.results()
    masks = steps[1]._cell.mask_table.asnumpy()  # the window of steps 13..15, step s in row s % 3
    rates = nets[1].drop_path_rates
    assert 0 < np.count_nonzero(masks == 0) < masks.size  # some samples dropped, not all
    for s in (13, 14, 15):
        np.testing.assert_array_equal(masks[s % 3], drop_path_masks(rates, 4, (7, 0, s)))
    for a, b in zip(nets[0].get_parameters(), nets[1].get_parameters()):
        np.testing.assert_array_equal(b.asnumpy(), a.asnumpy(), err_msg=a.name)


def _result(loss: float, overflow: bool = False, scale: float = 1.0) -> StepResult:
    return StepResult(loss=loss, grad_norm=1.0, overflow=overflow, loss_scale=scale, applied=not overflow)


def test_a_non_finite_loss_is_named_with_its_step_and_window() -> None:
    window = StepWindow(epoch=2)
    window.add([_result(1.0), _result(float("inf"), overflow=True, scale=8.0)], first_step=20)  # a scale shrinks
    assert (window.counted, window.mean_loss, window.loss_scale) == (1, 1.0, 8.0)
    with pytest.raises(FloatingPointError, match=r"^loss is nan at epoch 3, step 23 \(read back for the log window "
                                                 r"of steps 22-24\)"):
        window.add([_result(2.0), _result(float("nan")), _result(3.0)], first_step=22)



def _batches(n: int, fail_at: int | None = None):
    for index in range(n):
        if index == fail_at:
            raise OSError(f"unreadable batch {index}")
        yield Tensor(np.full((2, 3), index, np.float32)), Tensor(np.array([index, -index], np.int32))


def _prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "batch-prefetch"]


def test_prefetched_batches_come_in_order_errors_reach_the_trainer_and_closing_stops_the_reader() -> None:
    got = [(images.asnumpy()[0, 0], labels.asnumpy()[1]) for images, labels in prefetched(_batches(5), depth=2)]
    assert got == [(float(i), -i) for i in range(5)]
    with pytest.raises(OSError, match="unreadable batch 3"):
        list(prefetched(_batches(5, fail_at=3)))
    early = prefetched(_batches(100))
    next(early)
    early.close()  # a loop that stops early (an error, Ctrl+C) leaves no reader behind
    assert _prefetch_threads() == []
