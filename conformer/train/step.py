"""The compiled training step: loss scaling, data-parallel gradient mean, accumulation, clipping, update."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.experimental import optim

from conformer.kernels.cells import KERNEL_CELLS, GlobalNorm
from conformer.models.checkpoint_file import assign_in_place
from conformer.models.conformer_net import drop_path_masks
from conformer.vocabulary import AMP_LEVELS, LOSS_SCALES

if TYPE_CHECKING:
    from conformer.train.ema import ModelEma


# The first loss scale of `loss_scale=dynamic` (and of static): Conformer-Ti at 224 px under AMP O1 overflows
# float16 at its first step from 2^15 up (benchmarks/loss_scale.py), so 2^12 lets the recipe's first steps apply
# their updates with 4x to spare; the scale then doubles every `scale_window` finite updates.
DEFAULT_INIT_LOSS_SCALE = 2.0**12
_mul_by = ops.MultitypeFuncGraph("mul_by")
_div_by = ops.MultitypeFuncGraph("div_by")
_add = ops.MultitypeFuncGraph("add")
_store = ops.MultitypeFuncGraph("store")
RECORD_FIELDS = 4  # a step's record on the device: loss, grad norm, finite (1.0 / 0.0), loss scale


@_mul_by.register("Tensor", "Tensor")
def _mul_by_tensor(factor: Tensor, grad: Tensor) -> Tensor:
    return grad * factor.astype(grad.dtype)


@_div_by.register("Tensor", "Tensor")
def _div_by_tensor(divisor: Tensor, grad: Tensor) -> Tensor:
    # a true division: multiplying by 1/scale flushes to zero once the scale passes ~1e38
    return grad / divisor.astype(grad.dtype)


@_add.register("Tensor", "Tensor")
def _add_tensor(left: Tensor, right: Tensor) -> Tensor:
    return left + right


@_store.register("Tensor", "Tensor")
def _store_tensor(target: Parameter, value: Tensor) -> Tensor:
    return ops.assign(target, value)


@dataclass(frozen=True)
class StepResult:
    """What one call of `TrainStep` did.

    `loss` is this rank's micro-batch loss; `grad_norm` the global norm of the (accumulated, unscaled,
    all-reduced) gradients before clipping; `applied` is False for accumulation micro-steps and overflows.
    """

    loss: float
    grad_norm: float
    overflow: bool
    loss_scale: float
    applied: bool


def apply_amp(network: nn.Cell, level: str = "O0", workdir: str | Path | None = None) -> nn.Cell:
    """Mixed precision 'O0' (none) .. 'O3' (all fp16) for the network only.

    The loss stays a separate fp32 cell (logits are cast to fp32 before log-softmax). AMP runs on MindSpore's ops: the
    network must be built on that path (`conformer.kernels.select("mindspore")`; `hardware.kernels=auto` picks it for
    any level but O0), as the project's kernels are float32 and O1's rewrite cannot rewrite their cells. O1 rewrites
    the network's source into `./rewritten_network/`, which graph compilation reads later: `workdir` (e.g. the run
    dir) keeps it out of the current directory. O2 keeps BatchNorm and LayerNorm in float32; O3 casts everything.
    """
    if level not in AMP_LEVELS:
        raise ValueError(f"amp level {level!r} is unknown; choose one of {AMP_LEVELS}.")
    if level == "O0":
        return network
    ours = sorted({type(cell).__name__ for _, cell in network.cells_and_names()
                   if isinstance(cell, KERNEL_CELLS) and cell.kernel is not None})
    if ours:
        raise ValueError(f"AMP {level} runs on MindSpore's ops; this network was built on the project's CPU kernels "
                         f"({', '.join(ours)}): build it after conformer.kernels.select('mindspore') "
                         "(hardware.kernels=mindspore, or auto)")
    previous = os.getcwd()
    os.chdir(workdir or previous)
    try:
        return ms.amp.auto_mixed_precision(network, level)
    finally:
        os.chdir(previous)


class FiniteOnEveryRank(nn.Cell):
    """The update decision all ranks take together: finite only where no rank saw an overflow. On Ascend the overflow
    check reads each device's own status register, so ranks may disagree on all-reduced gradients: one would skip an
    update another applies, and their loss scales drift apart (MindSpore's loss-scale cell all-reduces it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, finite: Tensor) -> Tensor:
        overflows = self.all_reduce(ops.logical_not(finite).astype(ms.float32).reshape((1,)))
        return ops.equal(overflows, 0.0).reshape(())


def data_parallel_reducer(weights: tuple[Parameter, ...]) -> nn.Cell | None:
    """A mean all-reduce over ranks when the context is DATA_PARALLEL, else None (single process)."""
    if ms.get_auto_parallel_context("parallel_mode") != ms.ParallelMode.DATA_PARALLEL:
        return None
    from mindspore.communication import get_group_size

    return nn.DistributedGradReducer(weights, mean=True, degree=get_group_size())


class _StepCell(nn.Cell):
    """One jit graph: forward + backward, unscale, accumulate, all-reduce, overflow check, clip, update.

    `apply` is a Python bool and therefore a compile-time constant: the micro-step (accumulate only) and the
    update step compile to two graphs when grad_accum_steps > 1.
    """

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell, optimizer: optim.Optimizer,
                 clip_grad_norm: float | None, scaler: ms.amp.LossScaler | None,
                 grad_accum_steps: int, window: int = 1, scheduled: bool = False) -> None:
        super().__init__(auto_prefix=False)
        self.network, self.loss_fn, self.optimizer = network, loss_fn, optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ops.value_and_grad(self.forward, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        # one kernel for the norm of all gradients (fp32 ones: the weights' dtype) in place of two ops per parameter
        self.global_norm = GlobalNorm(float32=all(weight.dtype == ms.float32 for weight in self.weights))
        self.scaler = scaler
        self.use_scale = scaler is not None
        self.dynamic = isinstance(scaler, ms.amp.DynamicLossScaler)
        self.clip = clip_grad_norm is not None
        self.clip_grad_norm = float(clip_grad_norm) if self.clip else 0.0
        self.grad_accum_steps = grad_accum_steps
        self.accumulate = grad_accum_steps > 1
        if self.accumulate:
            self.accum_grads = self.weights.clone(prefix="grad_accum", init="zeros")
        self.reducer = data_parallel_reducer(self.weights)
        self.reduce = self.reducer is not None
        self.finite_on_every_rank = FiniteOnEveryRank() if self.reduce else None
        # the device-side bookkeeping: micro-steps so far, and the records of the last `window` of them
        self.window = int(window)
        self.counter = Parameter(Tensor(0, ms.int32), "train_step.counter", requires_grad=False)
        self.records = Parameter(Tensor(np.zeros((self.window, RECORD_FIELDS), np.float32)), "train_step.records",
                                 requires_grad=False)
        # the lr of each micro-step of the window, uploaded with its masks: a shape that the run's length leaves alone
        self.scheduled = scheduled
        if scheduled:
            self.lr_table = Parameter(Tensor(np.zeros(self.window, np.float32)), "train_step.lr_table",
                                      requires_grad=False)
        self.host_masks = False

    def hold_masks(self, layers: int, batch: int) -> None:
        """A window of drop-path masks [window, layers, batch] that the host uploads and each step picks its row of
        (before the first call compiles the graph)."""
        self.mask_table = Parameter(Tensor(np.ones((self.window, layers, batch), np.float32)), "train_step.masks",
                                    requires_grad=False)
        self.host_masks = True

    def forward(self, images: Tensor, targets: Tensor, masks: Tensor | None, scale: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.network(images) if masks is None else self.network(images, masks)
        loss = self.loss_fn(logits, targets)
        # Differentiated output first (scaled, averaged over micro-steps); the plain loss rides along as aux.
        return loss * scale / self.grad_accum_steps, loss

    def all_finite(self, grads: tuple[Tensor, ...], norm: Tensor) -> Tensor:
        # Without loss scaling one isfinite on the global norm (inf/nan anywhere makes it non-finite) replaces a
        # check per tensor; with scaling keep the per-tensor check, which Ascend fuses with its overflow status.
        if self.use_scale:
            return ms.amp.all_finite(grads)
        return ops.isfinite(norm)

    def loss_scale(self) -> Tensor:
        if self.use_scale:
            return self.scaler.scale_value.value()
        return Tensor(1.0, ms.float32)

    @ms.jit
    def construct(self, images: Tensor, targets: Tensor, apply: bool) -> tuple[Tensor, ...]:
        """One micro-step with its bookkeeping on the device: the lr of this update from the table, this step's
        drop-path masks from the uploaded window, and (loss, norm, finite, scale) into the ring of records."""
        slot = self.counter % self.window
        if self.scheduled:
            lr = self.lr_table[slot]
            for group_lr in self.optimizer.lrs:
                ops.assign(group_lr, lr)
        masks = self.mask_table[slot] if self.host_masks else None
        loss, norm, finite, scale = self.update(images, targets, masks, apply)
        record = ops.stack([loss, norm, finite.astype(ms.float32), scale]).reshape((1, RECORD_FIELDS))
        ops.scatter_update(self.records, slot.reshape((1,)), record)
        ops.assign_add(self.counter, Tensor(1, ms.int32))
        return loss, norm, finite, scale

    def update(self, images: Tensor, targets: Tensor, masks: Tensor | None, apply: bool) -> tuple[Tensor, ...]:
        scale = self.loss_scale()
        (_, loss), grads = self.grad_fn(images, targets, masks, scale)
        if self.use_scale:
            grads = self.hyper_map(ops.partial(_div_by, scale), grads)
        if self.accumulate:
            grads = self.hyper_map(_add, self.accum_grads, grads)
            if not apply:
                self.hyper_map(_store, self.accum_grads, grads)
                norm = self.global_norm(grads)
                return loss, norm, self.all_finite(grads, norm), scale
            self.hyper_map(_store, self.accum_grads, self.hyper_map(ops.zeros_like, grads))
        if self.reduce:
            grads = self.reducer(grads)
        norm = self.global_norm(grads)
        finite = self.all_finite(grads, norm)
        if self.reduce:
            finite = self.finite_on_every_rank(finite)
        if self.dynamic:
            self.scaler.adjust(finite)
        if finite:
            if self.clip:
                coef = ops.minimum(self.clip_grad_norm / (norm + 1e-6), 1.0)
                grads = self.hyper_map(ops.partial(_mul_by, coef), grads)
            self.optimizer(grads)
        return loss, norm, finite, self.loss_scale()


class _SunkStep(nn.Cell):
    """A whole update (and the EMA's) as one function of a batch, for `ms.data_sink` to run `sink_size` times."""

    def __init__(self, step: _StepCell, ema_update: nn.Cell | None) -> None:
        super().__init__(auto_prefix=False)
        self.step, self.ema_update = step, ema_update

    def construct(self, images: Tensor, targets: Tensor) -> Tensor:
        loss, _, finite, _ = self.step(images, targets, True)
        if self.ema_update is not None:
            self.ema_update(finite)
        return loss


class TrainStep:
    """Callable compiled training step over `optimizer.parameters` (the network's trainable params).

    loss_scale: "none", "static" (fixed `init_loss_scale`) or "dynamic" (`DynamicLossScaler`: an overflow
    divides the scale by `scale_factor`, `scale_window` finite updates multiply it). Non-finite gradients
    always skip the update. Gradients are mean-all-reduced when the parallel context is DATA_PARALLEL,
    accumulated over `grad_accum_steps` calls (the update happens on every k-th call), clipped to
    `clip_grad_norm` (global norm) and applied; `ema.update()` runs after every applied update (in its graph, on
    the step's finite flag).

    Between two reads the host touches nothing on the device: `launch` queues a step, whose loss, norm, finite flag
    and loss scale go to a ring of `window` records on the device, and `results()` reads them all at once. With
    `lr_values` (one lr per optimizer update) the graph sets micro-step s's lr, that of update s // grad_accum_steps
    (past the end: the last one), itself; with `mask_seed` (e.g. seed, rank) its drop-path masks are
    `drop_path_masks(rates, batch, (*mask_seed, s))`, else the graph draws them. Both come from the host in one
    upload per `window` micro-steps.
    """

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell, optimizer: optim.Optimizer, *,
                 clip_grad_norm: float | None = None, loss_scale: str = "none",
                 init_loss_scale: float = DEFAULT_INIT_LOSS_SCALE, scale_factor: int = 2, scale_window: int = 2000,
                 grad_accum_steps: int = 1, ema: ModelEma | None = None, window: int = 1,
                 lr_values: Sequence[float] | np.ndarray | None = None,
                 mask_seed: Sequence[int] | None = None) -> None:
        if not isinstance(optimizer, optim.Optimizer):
            raise TypeError(f"TrainStep needs a mindspore.experimental.optim optimizer (conformer.train.optim."
                            f"build_optimizer), got {type(optimizer)}.")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None (no clipping), got {clip_grad_norm}.")
        if int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an integer >= 1, got {grad_accum_steps}.")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}.")
        if lr_values is not None and (len(lr_values) == 0 or not np.all(np.asarray(lr_values) >= 0)):
            raise ValueError("lr_values must be a non-empty sequence of learning rates >= 0.")
        network_params = {id(param) for param in network.get_parameters()}
        foreign = [param.name for param in optimizer.parameters if id(param) not in network_params]
        if foreign:
            raise ValueError(f"the optimizer holds parameters that are not in the network ({foreign[:3]}): "
                             "build the optimizer from this network.")
        self.network, self.optimizer, self.ema = network, optimizer, ema
        self.grad_accum_steps, self.window = int(grad_accum_steps), int(window)
        self.mask_seed = None if mask_seed is None else tuple(int(k) for k in mask_seed)
        self._micro_step = 0
        self._counter = 0  # the device counter's value, mirrored: no read needed
        self._pending: list[tuple[int, bool]] = []  # (micro-step, update due) of the steps launched since a read
        self._window_from: int | None = None  # the first micro-step of the uploaded window of lrs and masks
        self._sink: tuple[ds.Dataset, Callable[[], Tensor]] | None = None  # the dataset sunk and its sink function
        network.set_train(True)
        self._cell = _StepCell(network, loss_fn, optimizer, clip_grad_norm,
                               _make_scaler(loss_scale, init_loss_scale, scale_factor, scale_window),
                               self.grad_accum_steps, self.window, lr_values is not None)
        # float32 as `set_lr` writes them: the same bits
        self.lr_values = None if lr_values is None else np.asarray(lr_values, np.float64).astype(np.float32)
        self._cell.set_train(True)

    def __call__(self, images: Tensor, targets: Tensor) -> StepResult:
        """One micro-step, read back at once (tests, preflight); the trainer launches and reads per log window."""
        self.launch(images, targets)
        return self.results()[-1]

    def launch(self, images: Tensor, targets: Tensor) -> None:
        """Queue one micro-step; nothing comes back to the host."""
        if len(self._pending) == self.window:
            raise RuntimeError(f"{self.window} steps are waiting to be read: call results() at least every window")
        if not self.network.training:  # the trainer's eval switched it off; BN must use batch stats again
            self.network.set_train(True)
        apply = self._micro_step + 1 == self.grad_accum_steps
        self._upload_window(images.shape[0])
        _, _, finite, _ = self._cell(images, targets, apply)
        if apply and self.ema is not None:
            self.ema.update(finite)
        self._pending.append((self._counter, apply))
        self._counter += 1
        self._micro_step = 0 if apply else self._micro_step + 1

    def sink(self, dataset: ds.Dataset, steps: int) -> None:
        """Queue `steps` updates whose batches the device reads from `dataset` itself (`ms.data_sink`, GPU and
        Ascend only: `trainer.sink_size`): the same step graph, its records read back like those of `launch`."""
        if self.grad_accum_steps != 1:
            raise ValueError("data sinking runs whole updates: grad_accum_steps must be 1")
        if len(self._pending) + steps > self.window:
            raise RuntimeError(f"{steps} sunk steps do not fit the {self.window} records left unread")
        if not self.network.training:
            self.network.set_train(True)
        if self._sink is None or self._sink[0] is not dataset:
            ema_update = None if self.ema is None else self.ema.update_cell
            self._sink = dataset, ms.data_sink(_SunkStep(self._cell, ema_update), dataset, sink_size=steps)
        self._upload_window(dataset.get_batch_size(), steps)
        self._sink[1]()
        self._pending += [(counter, True) for counter in range(self._counter, self._counter + steps)]
        self._counter += steps

    def results(self) -> list[StepResult]:
        """The steps launched since the last read, in order: one device-to-host read of the records ring."""
        if not self._pending:
            return []
        records = self._cell.records.asnumpy()
        results = []
        for counter, apply in self._pending:
            loss, norm, finite, scale = (float(value) for value in records[counter % self.window])
            overflow = finite == 0.0
            results.append(StepResult(loss=loss, grad_norm=norm, overflow=overflow, loss_scale=scale,
                                      applied=apply and not overflow))
        self._pending = []
        return results

    def seek(self, counter: int) -> None:
        """Set the micro-step counter (a resumed run's global step): the lr index and the masks' key follow it."""
        if self._pending:
            raise RuntimeError("seek with steps not yet read")
        self._counter = int(counter)
        assign_in_place(self._cell.counter, np.array(self._counter, np.int32))
        self._window_from = None

    def _upload_window(self, batch: int, steps: int = 1) -> None:
        """The lrs and drop-path masks of the next `window` micro-steps, in one upload each, when those of the next
        `steps` are not all on the device yet."""
        rates = getattr(self.network, "drop_path_rates", ())
        masks = bool(rates) and self.mask_seed is not None
        cell = self._cell
        if masks and not cell.host_masks:
            cell.hold_masks(len(rates), batch)
        if masks and tuple(cell.mask_table.shape[1:]) != (len(rates), batch):
            raise ValueError(f"the batch size changed from {cell.mask_table.shape[2]} to {batch}: drop-path masks "
                             "are drawn for one batch size")
        start = self._window_from
        if (start is not None and start <= self._counter and self._counter + steps <= start + self.window) \
                or not (masks or cell.scheduled):
            return
        steps = range(self._counter, self._counter + self.window)
        slots = [step % self.window for step in steps]
        if cell.scheduled:
            lrs = np.empty(self.window, np.float32)
            updates = [min(step // self.grad_accum_steps, len(self.lr_values) - 1) for step in steps]
            lrs[slots] = self.lr_values[updates]
            assign_in_place(cell.lr_table, lrs)
        if masks:
            table = np.empty((self.window, len(rates), batch), np.float32)
            for slot, step in zip(slots, steps):
                table[slot] = drop_path_masks(rates, batch, (*self.mask_seed, step))
            assign_in_place(cell.mask_table, table)
        self._window_from = self._counter

    @property
    def micro_step(self) -> int:
        """Calls since the last update (0 when no accumulation is pending)."""
        return self._micro_step

    def parameters_dict(self) -> dict[str, Parameter]:
        """Loss-scaler state for checkpoints: 'loss_scale.value' (+ 'loss_scale.counter' when dynamic)."""
        scaler = self._cell.scaler
        if scaler is None:
            return {}
        state = {"loss_scale.value": scaler.scale_value}
        if isinstance(scaler, ms.amp.DynamicLossScaler):
            state["loss_scale.counter"] = scaler.counter
        return state

    def load_parameters_dict(self, values: Mapping[str, Tensor]) -> None:
        """Restore the loss-scaler state saved by `parameters_dict` (names absent from `values` are kept)."""
        for name, param in self.parameters_dict().items():
            if name in values:
                assign_in_place(param, values[name])


def _make_scaler(mode: str, init_scale: float, factor: int, window: int) -> ms.amp.LossScaler | None:
    if mode not in LOSS_SCALES:
        raise ValueError(f"loss_scale {mode!r} is unknown; choose one of {LOSS_SCALES}.")
    if mode == "none":
        return None
    if not init_scale >= 1:
        raise ValueError(f"init_loss_scale must be >= 1, got {init_scale}.")
    if mode == "static":
        scaler = ms.amp.StaticLossScaler(float(init_scale))
    else:
        scaler = ms.amp.DynamicLossScaler(float(init_scale), int(factor), int(window))
        scaler.counter.name = "loss_scale.counter"
    scaler.scale_value.name = "loss_scale.value"
    return scaler
