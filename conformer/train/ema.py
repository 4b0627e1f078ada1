"""Exponential moving average of all network parameters and buffers (timm ModelEmaV2 semantics)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from conformer.models.checkpoint_file import assign_in_place
from conformer.train.arguments import check_ema_decay

_lerp = ops.MultitypeFuncGraph("ema_lerp")
_copy = ops.MultitypeFuncGraph("ema_copy")


@_lerp.register("Number", "Tensor", "Tensor", "Tensor")
def _lerp_tensor(decay: float, applied: Tensor, shadow: Parameter, live: Parameter) -> Tensor:
    # a select, not a branch: the shadow keeps its bits where the step was skipped
    return ops.assign(shadow, ops.select(applied, shadow * decay + live * (1.0 - decay), shadow))


@_copy.register("Tensor", "Tensor")
def _copy_tensor(target: Parameter, source: Parameter) -> Tensor:
    return ops.assign(target, source)


class _Update(nn.Cell):
    def __init__(self, shadow: ParameterTuple, live: ParameterTuple, decay: float) -> None:
        super().__init__(auto_prefix=False)
        self.shadow, self.live, self.decay = shadow, live, decay
        self.hyper_map = ops.HyperMap()

    @ms.jit
    def construct(self, applied: Tensor) -> Tensor:
        self.hyper_map(ops.partial(_lerp, self.decay, applied), self.shadow, self.live)
        return applied


class _Copy(nn.Cell):
    """target[i] <- source[i]; one small graph per (target, source) pair, so reads never race writes."""

    def __init__(self, target: ParameterTuple, source: ParameterTuple) -> None:
        super().__init__(auto_prefix=False)
        self.target, self.source = target, source
        self.hyper_map = ops.HyperMap()

    @ms.jit
    def construct(self) -> Tensor:
        self.hyper_map(_copy, self.target, self.source)
        return Tensor(True)


class ModelEma:
    """Shadow copy of every parameter of `network` (trainable ones and BN moving statistics).

    `update()` after each applied optimizer step sets shadow = decay * shadow + (1 - decay) * live;
    `with ema.swapped(): evaluate(network)` runs the network with the EMA weights and restores the live ones.
    """

    def __init__(self, network: nn.Cell, decay: float = 0.9998) -> None:
        decay = check_ema_decay(decay)
        live = list(network.get_parameters())
        not_float = [param.name for param in live if param.dtype not in ms.dtype.float_type]
        if not_float:
            raise ValueError(f"ModelEma averages floating-point parameters only; got {not_float}.")
        self.decay = float(decay)
        self._network_ids = {id(param) for param in live}
        self._names = [param.name for param in live]
        self._live = ParameterTuple(live)
        self._shadow = self._live.clone(prefix="ema", init="same")
        for param in self._shadow:
            param.requires_grad = False
        self._update = _Update(self._shadow, self._live, self.decay)
        self._backup: ParameterTuple | None = None

    def update(self, applied: Tensor | None = None) -> None:
        """Move the shadow weights towards the live ones; with `applied` (a bool on the device, the train step's
        finite flag) only where it holds, so that the host need not read it."""
        self._update(Tensor(True) if applied is None else applied)

    @property
    def update_cell(self) -> nn.Cell:
        """The update as a cell of the step's finite flag, for a graph that runs it itself (data sinking)."""
        return self._update

    @contextmanager
    def swapped(self, network: nn.Cell | None = None) -> Iterator[None]:
        """Temporarily load the EMA weights into the network; the live ones come back on exit."""
        if network is not None and {id(param) for param in network.get_parameters()} != self._network_ids:
            raise ValueError("ModelEma.swapped: this is not the network the EMA was created for.")
        if self._backup is None:  # allocated on first use: training alone never pays for it
            self._backup = self._live.clone(prefix="ema_backup", init="same")
            self._save_live = _Copy(self._backup, self._live)
            self._load_shadow = _Copy(self._live, self._shadow)
            self._restore_live = _Copy(self._live, self._backup)
        self._save_live()
        self._load_shadow()
        try:
            yield
        finally:
            self._restore_live()

    def parameters_dict(self) -> dict[str, Parameter]:
        """EMA weights keyed by the network's parameter names (load them into the network to evaluate)."""
        return dict(zip(self._names, self._shadow))

    def load_parameters_dict(self, values: Mapping[str, Tensor]) -> None:
        """Restore the EMA weights (e.g. on resume) from a mapping with the network's parameter names."""
        missing = [name for name in self._names if name not in values]
        if missing:
            raise KeyError(f"ModelEma: missing EMA values for {missing[:5]} ({len(missing)} in all).")
        for name, shadow in zip(self._names, self._shadow):
            assign_in_place(shadow, values[name])
