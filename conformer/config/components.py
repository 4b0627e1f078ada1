"""The check of each configurable component, by the `_target_` that builds it: `validate_config` runs it on the
component's config node, so a bad value is one `config error:` line before MindSpore, a run dir or a compile.
The checks live beside their components (plain Python modules, without MindSpore); this is only their index."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conformer.data.arguments import check_data_module, check_eval_transform, check_train_transform
from conformer.data.generated import check_digits, check_synthetic
from conformer.data.mixup import check_mixup
from conformer.data.sources import check_image_folder
from conformer.train.arguments import check_loss, check_optimizer, check_trainer
from conformer.train.schedules import check_schedule

# The check of each component, by the `_target_` that builds it.
CHECKS: dict[str, Callable[..., Any]] = {
    "conformer.train.losses.DualHeadLoss": check_loss,
    "conformer.train.trainer.Trainer": check_trainer,
    "conformer.train.optim.build_optimizer": check_optimizer,
    "conformer.train.schedules.WarmupCosineSchedule": check_schedule,
    "conformer.data.module.DataModule": check_data_module,
    "conformer.data.transforms.TrainTransform": check_train_transform,
    "conformer.data.transforms.EvalTransform": check_eval_transform,
    "conformer.data.mixup.Mixup": check_mixup,
    "conformer.data.generated.DigitsSource": check_digits,
    "conformer.data.sources.ImageFolderSource": check_image_folder,
    "conformer.data.generated.SyntheticSource": check_synthetic,
}
