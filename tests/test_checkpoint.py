"""Atomic checkpoints: round trip with experimental AdamW state, best/last logic, strict loading, resume."""
from __future__ import annotations

import errno
import logging
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn
from mindspore.experimental.optim import AdamW

from conformer.models.checkpoint_file import load_weights, read_checkpoint, save_checkpoint
from conformer.train.checkpoint import CheckpointManager, TrainState
from conformer.train.ema import ModelEma
from conformer.train.optim import FusedAdamW


class TinyNet(nn.Cell):
    """Dense + BatchNorm (non-trainable moving statistics) + Dense."""

    def __init__(self, hidden: int = 8, extra_layer: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Dense(4, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Dense(hidden, 3)
        self.extra = nn.Dense(3, 3) if extra_layer else None

    def construct(self, x: Tensor) -> Tensor:
        out = self.fc2(ms.ops.relu(self.bn(self.fc1(x))))
        return self.extra(out) if self.extra is not None else out


def make_trainer(seed: int) -> tuple[TinyNet, AdamW, object]:
    ms.set_seed(seed)
    net = TinyNet()
    net.set_train(True)
    opt = AdamW(net.trainable_params(), lr=1e-2, weight_decay=0.05)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def forward(x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    @ms.jit
    def step(x: Tensor, y: Tensor) -> Tensor:
        loss, grads = grad_fn(x, y)
        opt(grads)
        return loss

    return net, opt, step


def batch(seed: int) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    return Tensor(rng.normal(size=(6, 4)).astype(np.float32)), Tensor(rng.integers(0, 3, 6).astype(np.int32))


def arrays(params: dict[str, Parameter]) -> dict[str, np.ndarray]:
    return {name: p.asnumpy().copy() for name, p in params.items()}


def optimizer_state(opt: AdamW, net: nn.Cell) -> dict[str, np.ndarray]:
    own = {id(p) for p in net.get_parameters()}
    return {n: p.asnumpy().copy() for n, p in opt.parameters_dict().items() if id(p) not in own}


def test_round_trip_network_adamw_ema_and_extra(tmp_path, kernel_path: str):
    net, opt, step = make_trainer(seed=0)
    ema = ModelEma(net, decay=0.5)
    for i in range(2):
        step(*batch(i))
        ema.update()
    manager = CheckpointManager(tmp_path, monitor="val/top1_sum", mode="max")
    metrics = {"val/top1_sum": 0.1 + 0.2, "val/loss": 1.25}
    paths = manager.save(net, opt, ema, epoch=3, step=2, metrics=metrics)
    assert set(paths) == {"last", "best"} and paths["last"].is_file() and paths["best"].is_file()

    raw = ms.load_checkpoint(str(paths["last"]))
    assert "fc1.weight" in raw and "bn.moving_mean" in raw  # network names unprefixed, BN statistics included
    assert "optimizer.exp_avg.fc1.weight" in raw and "optimizer.state_step" in raw
    assert "ema.fc2.bias" in raw and "ema.bn.moving_variance" in raw
    assert int(raw["meta.epoch"].asnumpy()) == 3 and int(raw["meta.step"].asnumpy()) == 2

    net2, opt2, step2 = make_trainer(seed=1)
    ema2 = ModelEma(net2, decay=0.5)
    assert not np.allclose(net2.fc1.weight.asnumpy(), net.fc1.weight.asnumpy())
    state = CheckpointManager(tmp_path / "other").load(paths["last"], net2, opt2, ema2)

    assert state == TrainState(epoch=3, step=2, best_metric=0.1 + 0.2, best_epoch=3, metrics=metrics)
    for name, value in arrays(net.parameters_dict()).items():
        np.testing.assert_array_equal(net2.parameters_dict()[name].asnumpy(), value, err_msg=name)
    expected_opt = optimizer_state(opt, net)
    assert int(expected_opt["state_step"]) == 2
    for name, value in expected_opt.items():
        np.testing.assert_array_equal(optimizer_state(opt2, net2)[name], value, err_msg=name)
    ema_values = arrays(ema.parameters_dict())
    assert not np.array_equal(ema_values["fc1.weight"], net.fc1.weight.asnumpy())
    for name, value in ema_values.items():
        np.testing.assert_array_equal(ema2.parameters_dict()[name].asnumpy(), value, err_msg=name)
    evaluated = TinyNet()
    load_weights(paths["best"], evaluated, ema=True)
    np.testing.assert_array_equal(evaluated.fc1.weight.asnumpy(), ema_values["fc1.weight"])

    # The restored optimizer continues exactly like the original (moments and bias-correction step).
    loss_a, loss_b = step(*batch(7)), step2(*batch(7))
    assert float(loss_a.asnumpy()) == float(loss_b.asnumpy())
    for name, value in arrays(net.parameters_dict()).items():
        restored = net2.parameters_dict()[name].asnumpy()
        np.testing.assert_allclose(restored, value, rtol=0, atol=1e-7, err_msg=name)


def test_load_weights_ignores_optimizer_state_and_returns_extra(tmp_path):
    net, opt, _ = make_trainer(seed=0)
    CheckpointManager(tmp_path).save(net, opt, epoch=1, step=5, metrics={"val/top1_sum": 0.5})
    fresh = TinyNet()
    extra = load_weights(tmp_path / "last.ckpt", fresh)
    np.testing.assert_array_equal(fresh.fc2.weight.asnumpy(), net.fc2.weight.asnumpy())
    assert extra["epoch"] == 1 and extra["step"] == 5 and extra["metrics"] == {"val/top1_sum": 0.5}
    with pytest.raises(KeyError, match="no EMA weights"):
        load_weights(tmp_path / "last.ckpt", fresh, ema=True)


@pytest.mark.parametrize(("mode", "values", "best_epochs"), [
    ("max", [0.5, 0.4, 0.7, 0.7, float("nan"), 0.9], [1, 1, 3, 3, 3, 6]),
    ("min", [2.0, 2.5, 1.0, 1.0, float("nan"), 0.5], [1, 1, 3, 3, 3, 6]),
])
def test_best_only_on_improvement(tmp_path, mode, values, best_epochs):
    net = TinyNet()
    manager = CheckpointManager(tmp_path, monitor="val/loss", mode=mode)
    for epoch, (value, best_epoch) in enumerate(zip(values, best_epochs), start=1):
        paths = manager.save(net, epoch=epoch, step=10 * epoch, metrics={"val/loss": value})
        assert ("best" in paths) == (best_epoch == epoch)
        _, last = read_checkpoint(tmp_path / "last.ckpt")
        _, best = read_checkpoint(tmp_path / "best.ckpt")
        assert last["epoch"] == epoch
        assert best["epoch"] == best_epoch == manager.best_epoch
        assert best["best_metric"] == values[best_epoch - 1] == manager.best_metric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize(("mode", "values", "kept"), [
    ("max", [0.5, 0.4, 0.7, 0.7, float("nan"), 0.9, 0.6, 0.8], {6: 0.9, 8: 0.8}),
    ("min", [2.0, 2.5, 1.0, 1.0, float("nan"), 0.5, 1.5, 0.8], {6: 0.5, 8: 0.8}),
])
def test_keep_top_k_keeps_the_k_best_epochs(tmp_path, mode, values, kept):
    """timm's CheckpointSaver: the 2 best epochs as ranked files, the best a hard link of best.ckpt; a manager
    continuing in the same dir picks them up."""
    net = TinyNet()
    manager = CheckpointManager(tmp_path, monitor="val/loss", mode=mode, keep_top_k=2)
    for epoch, value in enumerate(values[:7], start=1):
        manager.save(net, epoch=epoch, step=epoch, metrics={"val/loss": value})
    assert [(epoch, value) for value, epoch, _ in manager.ranked] == [(6, values[5]), (3, values[2])]
    assert os.path.samefile(manager.ranked[0][2], tmp_path / "best.ckpt")  # stored once on disk

    resumed = CheckpointManager(tmp_path, monitor="val/loss", mode=mode, keep_top_k=2)
    assert resumed.ranked == manager.ranked
    resumed.load(resumed.last_path, TinyNet())
    paths = resumed.save(net, epoch=8, step=8, metrics={"val/loss": values[7]})
    assert "best" not in paths and paths["ranked"] == resumed.ranked_path(8, values[7])
    ranked = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch"))
    assert ranked == [f"epoch{epoch:03d}-val_loss-{value:.4f}.ckpt" for epoch, value in sorted(kept.items())]
    for name in ranked:
        _, meta = read_checkpoint(tmp_path / name)
        assert meta["metrics"]["val/loss"] == kept[meta["epoch"]]
    assert len(list(tmp_path.iterdir())) == 4  # + best.ckpt, last.ckpt; no temp files


def test_missing_monitor_is_a_clear_error(tmp_path):
    manager = CheckpointManager(tmp_path, monitor="val/top1_sum")
    with pytest.raises(KeyError, match=r"val/top1_sum.*\['val/loss', 'val/top1_conv'\]"):
        manager.save(TinyNet(), epoch=1, step=1, metrics={"val/top1_conv": 0.2, "val/loss": 1.0})
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="'max' or 'min'"):
        CheckpointManager(tmp_path, mode="maximum")


def test_failed_save_keeps_old_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "last.ckpt"
    good = {"w": Tensor(np.arange(4, dtype=np.float32))}
    save_checkpoint(good, path, {"epoch": 1})
    # MindSpore leaves saved files read-only: a second save must still replace it.
    save_checkpoint({"w": Tensor(np.arange(4, dtype=np.float32) * 2)}, path, {"epoch": 2})
    bad = {"w": Tensor(np.zeros(4, np.float32)), "broken": np.array([object()])}
    with pytest.raises(TypeError):
        save_checkpoint(bad, path, {"epoch": 3})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(good, path, {"epoch": 4, "thing": object()})
    tensors, extra = read_checkpoint(path)
    assert extra == {"epoch": 2}
    np.testing.assert_array_equal(tensors["w"].asnumpy(), np.arange(4, dtype=np.float32) * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(ValueError, match=r"\.ckpt"):
        save_checkpoint(good, tmp_path / "weights.bin")


def test_failure_after_the_data_is_written_cleans_up(tmp_path):
    # The final rename fails (the target is a non-empty directory) after MindSpore wrote the whole temp file.
    target = tmp_path / "best.ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("untouched")
    with pytest.raises(OSError):
        save_checkpoint({"w": Tensor(np.ones(3, np.float32))}, target, {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]
    assert (target / "keep.txt").read_text() == "untouched"
    manager = CheckpointManager(tmp_path)  # a failed save must not advance the best metric
    with pytest.raises(OSError):
        manager.save(TinyNet(), epoch=1, step=1, metrics={"val/top1_sum": 0.5})
    assert manager.best_metric is None and manager.best_epoch is None


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    # A kill -9 during a write leaves our temp file and MindSpore's own .tmp behind (and older versions' random names).
    stale = [tmp_path / name for name in (".last.7.partial.ckpt", ".last.7.partial.tmp", ".last.0123abcd.partial.ckpt")]
    other = tmp_path / ".best.partial.ckpt"  # another checkpoint's: left to that checkpoint's next save
    for path in (*stale, other):
        path.write_bytes(b"half a checkpoint")
    save_checkpoint({"w": Tensor(np.ones(2, np.float32))}, tmp_path / "last.ckpt", {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.ckpt"]
    manager = CheckpointManager(tmp_path)
    manager.save(TinyNet(), epoch=2, step=2, metrics={"val/top1_sum": 0.5})  # best, then last copied from it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_full_disk_during_a_save_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    # /dev/full fails every write with ENOSPC: a link to it where the copy of best.ckpt to last.ckpt of step 2 writes,
    # planted before the save of step 1 (which leaves it alone).
    manager = CheckpointManager(tmp_path, monitor="epoch")
    os.symlink("/dev/full", tmp_path / ".last.2.partial.ckpt")
    manager.save(TinyNet(), epoch=1, step=1, metrics={"epoch": 1.0})
    kept, dev_full = (tmp_path / "last.ckpt").read_bytes(), os.stat("/dev/full")
    with pytest.raises(OSError) as error:
        manager.save(TinyNet(), epoch=2, step=2, metrics={"epoch": 2.0})
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(tmp_path / "last.ckpt"))
    assert (tmp_path / "last.ckpt").read_bytes() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # the link removed, not followed
    assert os.stat("/dev/full").st_mode == dev_full.st_mode


def test_strict_loading_names_the_mismatched_keys(tmp_path, caplog):
    net = TinyNet()
    save_checkpoint(net, tmp_path / "w.ckpt", {"epoch": 0})
    bigger = TinyNet(extra_layer=True)
    with pytest.raises(KeyError, match=r"missing from the checkpoint \['extra.bias', 'extra.weight'\]"):
        load_weights(tmp_path / "w.ckpt", bigger)
    with pytest.raises(ValueError, match=r"fc1.weight: checkpoint \(8, 4\) vs model \(16, 4\)"):
        load_weights(tmp_path / "w.ckpt", TinyNet(hidden=16), strict=False)
    with caplog.at_level(logging.WARNING):
        load_weights(tmp_path / "w.ckpt", bigger, strict=False)
    assert "extra.weight" in caplog.text
    np.testing.assert_array_equal(bigger.fc1.weight.asnumpy(), net.fc1.weight.asnumpy())

    save_checkpoint(bigger, tmp_path / "big.ckpt")
    unexpected = r"in the checkpoint but not in the model \['extra.bias', 'extra.weight'\]"
    with pytest.raises(KeyError, match=unexpected):
        load_weights(tmp_path / "big.ckpt", TinyNet())
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_weights(tmp_path / "nowhere.ckpt", net)


def test_strict_resume_needs_the_optimizer_state_it_was_asked_for(tmp_path):
    net, opt, _ = make_trainer(seed=0)
    CheckpointManager(tmp_path).save(net, epoch=1, step=1, metrics={"val/top1_sum": 0.1})  # weights only
    missing_state = r"optimizer state from .*19 missing from the checkpoint .*'state_step'"
    with pytest.raises(KeyError, match=missing_state):
        CheckpointManager(tmp_path).load(tmp_path / "last.ckpt", net, opt)
    deep = nn.SequentialCell([nn.Dense(2, 2) for _ in range(12)])
    with pytest.raises(KeyError, match=r"24 missing from the checkpoint \[.*, \.\.\. 4 more\]"):
        load_weights(tmp_path / "last.ckpt", deep)


def test_resume_keeps_best_metric(tmp_path):
    net = TinyNet()
    first = CheckpointManager(tmp_path)
    for epoch, value in enumerate([0.5, 0.8, 0.6], start=1):
        first.save(net, epoch=epoch, step=epoch * 100, metrics={"val/top1_sum": value})

    resumed = CheckpointManager(tmp_path)
    state = resumed.load(resumed.last_path, TinyNet())
    assert (state.epoch, state.step, state.best_metric, state.best_epoch) == (3, 300, 0.8, 2)
    assert (resumed.best_metric, resumed.best_epoch) == (0.8, 2)

    assert "best" not in resumed.save(net, epoch=4, step=400, metrics={"val/top1_sum": 0.7})
    assert read_checkpoint(resumed.best_path)[1]["epoch"] == 2
    assert "best" in resumed.save(net, epoch=5, step=500, metrics={"val/top1_sum": 0.9})
    assert read_checkpoint(resumed.best_path)[1]["epoch"] == 5


def test_a_checkpoint_of_the_experimental_adamw_resumes_into_the_fused_one(tmp_path):
    """Checkpoints written before FusedAdamW carry the unused AMSGrad buffer: it is dropped, the moments load."""
    net, opt, step = make_trainer(seed=0)
    step(*batch(0))
    path = CheckpointManager(tmp_path).save(net, opt, epoch=1, step=1, metrics={"val/top1_sum": 1.0})["last"]
    assert "optimizer.max_exp_avg_sq.fc1.weight" in ms.load_checkpoint(str(path))
    fused = FusedAdamW(net.trainable_params(), lr=1e-2, weight_decay=0.05)
    CheckpointManager(tmp_path / "other").load(path, net, fused)  # strict
    for name, value in optimizer_state(opt, net).items():
        if not name.startswith("max_exp_avg_sq."):
            np.testing.assert_array_equal(optimizer_state(fused, net)[name], value, err_msg=name)
