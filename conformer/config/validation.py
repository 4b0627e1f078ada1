"""Config checks that run before anything is built or compiled: one clear line per problem.

`validate_config` walks the composed config and asks each part's own check: the model's architecture (the
registry), each component's arguments (`conformer.config.components`), the hardware (`runtime.hardware_checks`),
the weights files and the task's settings. It imports no MindSpore: it runs before any device or graph work.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from conformer.checks import require_bool, require_choice, require_int, require_number
from conformer.data.inputs import class_names_file, image_inputs
from conformer.errors import STORE_WAYS_OUT, ConfigError
from conformer.models.registry import (
    architecture_problem,
    is_conformer,
    model_arguments,
    nearest_image_size,
    valid_image_size,
)
from conformer.runtime.hardware import world_size
from conformer.runtime.hardware_checks import check_hardware
from conformer.train.schedules import fitting_warmup
from conformer.vocabulary import (
    BAD_IMAGE_POLICIES,
    CHECKPOINT_SUFFIXES,
    EPOCH_METRICS,
    EXPORT_OUTPUTS,
    EXPORT_SUFFIXES,
    LOSS_SCALES,
    MLFLOW_PREFIX,
    MODEL_CONFIG_KEYS,
    MONITOR_MODES,
    OFFICIAL_SUFFIXES,
    PROGRESS_BAR_SETTINGS,
    TAG_NAME,
    TASKS,
)


def component_error(err: Exception) -> ConfigError:
    """A component that refused its config values when it was built (Hydra's InstantiationException), as one line
    naming the config node: `loss: DualHeadLoss: label_smoothing must be in [0, 1), got 2.0`."""
    key = re.search(r"full_key: (\S+)", str(err))
    cause = err.__cause__ or err
    return ConfigError(f"{key[1] + ': ' if key else ''}{cause}".splitlines()[0])


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # MissingMandatoryValue, interpolation errors
        raise ConfigError(f"{key}: {err}".splitlines()[0]) from err


# ---------------------------------------------------------------------------------------------------- config
def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first impossible value (types, ranges, geometry, files, hardware)."""
    task = require_choice(_get(cfg, "task.name"), "task.name", tuple(TASKS))
    require_int(_get(cfg, "seed"), "seed", minimum=0)
    require_bool(cfg.get("compile_cache", False), "compile_cache")
    _check_model_and_data(cfg)
    _check_optim(cfg)
    _check_trainer(cfg)
    _check_tracking(cfg)
    check_hardware(cfg.hardware)
    _check_components(cfg)
    if task == "train":
        require_number(_get(cfg, "task.free_space_margin_mb"), "task.free_space_margin_mb",
                       hint="MB kept free beyond two checkpoints")
        if is_conformer(cfg.model):
            check_weights(cfg, "model.pretrained")
        if _get(cfg, "trainer.resume") != "auto":
            check_weights(cfg, "trainer.resume", checkpoint_only=True)
    elif task == "preflight":
        require_int(_get(cfg, "task.steps"), "task.steps", hint="timed training steps")
        require_int(_get(cfg, "task.pipeline_batches"), "task.pipeline_batches", hint="timed pipeline batches")
    else:
        _check_inference_task(cfg, task)


def model_config_arguments(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The network's constructor arguments for a model config: a Conformer variant's, with the config's overrides;
    a custom `_target_`'s own keys."""
    overrides = {key: value for key, value in model_cfg.items() if key not in MODEL_CONFIG_KEYS}
    if not is_conformer(model_cfg):
        return overrides
    try:
        return model_arguments(model_cfg["name"], overrides)
    except ValueError as err:
        raise ConfigError(f"{err} (model.name={model_cfg['name']!r})") from err


def _check_model_and_data(cfg: DictConfig) -> None:
    size = require_int(_get(cfg, "data.image_size"), "data.image_size")
    require_int(_get(cfg, "data.batch_size"), "data.batch_size")
    if _get(cfg, "data.num_classes") is not None:
        require_int(_get(cfg, "data.num_classes"), "data.num_classes", hint="or null to infer it")
    # absent where no files are read (data=synthetic): the DataModule's default, skip
    policy = OmegaConf.select(cfg, "data.on_bad_image", default="skip")
    require_choice(policy, "data.on_bad_image", BAD_IMAGE_POLICIES)
    model = OmegaConf.to_container(_get(cfg, "model"), resolve=True)
    if not isinstance(model.get("_target_"), str) or "." not in model["_target_"]:
        raise ConfigError(f"model._target_={model.get('_target_')!r} must name the network's class or factory, "
                          "e.g. conformer.models.create_model or mypkg.MyNet")
    if not is_conformer(model):
        return  # the user's own network: its constructor checks its arguments (a refusal is one line, app.py)
    arguments = model_config_arguments(model)
    patch = arguments["patch_size"]
    problem = architecture_problem(**{**arguments, "img_size": None})
    if problem:
        name, what = problem
        raise ConfigError(f"model.{name}={arguments[name]!r} must be {what}")
    if not valid_image_size(size, patch):
        raise ConfigError(f"data.image_size={size} must be a multiple of the patch size {patch} (model.patch_size), "
                          f"e.g. data.image_size={nearest_image_size(size, patch)}")


def _check_optim(cfg: DictConfig) -> None:
    for key in ("optim.schedule.warmup_lr", "optim.schedule.min_lr", "optim.optimizer.weight_decay"):
        require_number(_get(cfg, key), key)
    require_number(_get(cfg, "optim.schedule.base_lr"), "optim.schedule.base_lr", strict=True, hint="a learning rate")
    require_number(_get(cfg, "optim.schedule.warmup_epochs"), "optim.schedule.warmup_epochs")


def _check_trainer(cfg: DictConfig) -> None:
    epochs = require_int(_get(cfg, "trainer.epochs"), "trainer.epochs")
    require_int(_get(cfg, "trainer.grad_accum_steps"), "trainer.grad_accum_steps")
    require_int(_get(cfg, "trainer.log_every_n_steps"), "trainer.log_every_n_steps")
    if _get(cfg, "trainer.clip_grad_norm") is not None:
        require_number(_get(cfg, "trainer.clip_grad_norm"), "trainer.clip_grad_norm", strict=True,
                       hint="or null for no clipping")
    require_choice(_get(cfg, "trainer.loss_scale"), "trainer.loss_scale", LOSS_SCALES)
    require_number(_get(cfg, "trainer.init_loss_scale"), "trainer.init_loss_scale", minimum=1)
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches", "profile_steps", "save_every_n_steps"):
        if OmegaConf.select(cfg, f"trainer.{key}") is not None:
            require_int(_get(cfg, f"trainer.{key}"), f"trainer.{key}", hint="or null for off")
    progress = OmegaConf.select(cfg, "trainer.progress_bar", default="auto")
    if progress not in PROGRESS_BAR_SETTINGS:
        raise ConfigError(f"trainer.progress_bar={progress!r} must be auto, true or false")
    require_choice(_get(cfg, "trainer.monitor"), "trainer.monitor", EPOCH_METRICS)
    require_choice(_get(cfg, "trainer.monitor_mode"), "trainer.monitor_mode", MONITOR_MODES)
    require_int(OmegaConf.select(cfg, "trainer.keep_top_k", default=1), "trainer.keep_top_k",
                hint="1 keeps best.ckpt only")
    try:
        fitting_warmup(_get(cfg, "optim.schedule.warmup_epochs"), epochs)
    except ValueError as err:
        raise ConfigError(str(err)) from err


COMPONENT_GROUPS = ("model", "data", "optim", "loss", "trainer")  # the config groups that build components


def _component_nodes(node: Any, key: str) -> list[tuple[str, dict]]:
    """`(key, node)` of every mapping with a `_target_` in a resolved config tree, outermost first."""
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((key, node))
        for name, child in node.items():
            found += _component_nodes(child, f"{key}.{name}")
    return found


def _check_components(cfg: DictConfig) -> None:
    """Each component's own argument check (`conformer.config.components.CHECKS`) on its config node, before any
    build."""
    from conformer.config.components import CHECKS  # the data and training components' checks

    global_batch = _get(cfg, "data.batch_size") * world_size(cfg.hardware) * _get(cfg, "trainer.grad_accum_steps")
    supplied = {"optim.schedule": {"global_batch": global_batch},  # what the trainer passes the partial schedule
                "trainer": {"device_target": _get(cfg, "hardware.device_target")}}
    for group in COMPONENT_GROUPS:
        if group not in cfg:
            continue
        tree = OmegaConf.to_container(cfg[group], resolve=True)
        for key, node in _component_nodes(tree, group):
            check = CHECKS.get(node["_target_"])
            if check is None:
                continue
            arguments = {name: value for name, value in node.items() if not name.startswith("_")}
            try:
                check(**arguments, **supplied.get(key, {}))
            except (ValueError, TypeError, OSError) as err:
                raise ConfigError(f"{key}: {err}") from err


def _check_tracking(cfg: DictConfig) -> None:
    """`tags` (a list of names or a mapping) and `tracking.system_metrics` (a bool or seconds)."""
    tags = OmegaConf.to_container(cfg.tags, resolve=True) if isinstance(cfg.get("tags"), (ListConfig, DictConfig)) \
        else cfg.get("tags")
    if tags and not isinstance(tags, (list, dict, str)):
        raise ConfigError(f"tags={tags!r} must be a list (tags=[baseline,ablation]) or a mapping (tags={{owner:ana}})")
    names = list(tags) if isinstance(tags, (list, dict)) else [tags] if tags else []
    values = list(tags.values()) if isinstance(tags, dict) else []
    for name in names:
        if not isinstance(name, (str, int, float)) or not re.fullmatch(TAG_NAME, str(name)) or \
                str(name).startswith("mlflow."):
            raise ConfigError(f"tags: {name!r} is not a tag name: letters, digits, '_', '-', '.', '/' and spaces, "
                              "not starting with 'mlflow.'")
    if any(isinstance(value, (list, dict)) for value in values):
        raise ConfigError(f"tags={tags!r}: tag values must be single values, not lists or mappings")
    system_metrics = OmegaConf.select(cfg, "tracking.system_metrics", default=False)
    if not isinstance(system_metrics, bool):
        require_number(system_metrics, "tracking.system_metrics", strict=True,
                       hint="true, false or a sampling interval in seconds")


# ---------------------------------------------------------------------------------------------------- weights
def weights_problem(spec: str, checkpoint_only: bool = False) -> str | None:
    """What is wrong with a weights file spec (no such file, unknown format), or None."""
    spec = str(spec)
    if spec.startswith(MLFLOW_PREFIX):
        return None if spec[len(MLFLOW_PREFIX):].strip() else "give the run id after 'mlflow:'"
    path = Path(spec).expanduser()
    if not path.is_file():
        return "no such file"
    allowed = CHECKPOINT_SUFFIXES if checkpoint_only else CHECKPOINT_SUFFIXES + OFFICIAL_SUFFIXES
    if path.suffix not in allowed:
        return f"unknown weights format {path.suffix!r}; use one of {', '.join(allowed)}"
    return None


def check_weights(cfg: DictConfig, key: str, checkpoint_only: bool = False) -> None:
    """The weights spec at `key` (if set) names a readable file of a known format, or an existing MLflow run."""
    spec = _get(cfg, key)
    if not spec:
        return
    problem = weights_problem(spec, checkpoint_only)
    if problem:
        raise ConfigError(f"{key}={spec}: {problem}")
    if str(spec).startswith(MLFLOW_PREFIX):
        from conformer.tracking import run_checkpoint  # imports mlflow: only for mlflow: specs

        name = "last.ckpt" if key == "trainer.resume" else "best.ckpt"
        try:
            run_checkpoint(cfg.tracking, Path(cfg.paths.root), str(spec)[len(MLFLOW_PREFIX):], name)
        except LookupError as err:
            raise ConfigError(f"{key}={spec}: {err}") from err


def _check_inference_task(cfg: DictConfig, task: str) -> None:
    if OmegaConf.select(cfg, "model.pretrained", default=None):
        raise ConfigError(f"model.pretrained is where a training starts; task={task} takes its weights from "
                          f"task.checkpoint=<file or mlflow:<run_id>>: use that instead")
    spec = _get(cfg, "task.checkpoint")
    if not spec:
        raise ConfigError(f"task={task} needs weights: set task.checkpoint=<run dir>/checkpoints/best.ckpt (ours), "
                          "official weights (.pth/.npz) or mlflow:<run_id>")
    check_weights(cfg, "task.checkpoint")
    if _get(cfg, "task.ema") and Path(str(spec)).suffix in OFFICIAL_SUFFIXES:
        raise ConfigError(f"task.ema=true needs a .ckpt written by training with trainer.ema_decay set; "
                          f"{Path(str(spec)).name} holds no EMA copy: drop task.ema")
    if task == "export":
        _check_export(cfg)
    elif task == "predict":
        require_int(_get(cfg, "task.topk"), "task.topk")
        require_int(_get(cfg, "task.batch_size"), "task.batch_size")
        image_inputs(_get(cfg, "task.inputs"))
        if _get(cfg, "task.classes"):
            class_names_file(_get(cfg, "task.classes"))


def _check_export(cfg: DictConfig) -> None:
    fmt = str(_get(cfg, "task.format")).upper()
    require_choice(fmt, "task.format", tuple(EXPORT_SUFFIXES))
    if fmt == "AIR" and cfg.hardware.device_target != "Ascend":
        raise ConfigError(f"task.format=AIR needs an Ascend device (hardware=ascend), this run uses "
                          f"{cfg.hardware.device_target}: export MINDIR or ONNX instead")
    require_int(_get(cfg, "task.batch_size"), "task.batch_size", hint="the exported input's batch")
    if _get(cfg, "task.output") not in EXPORT_OUTPUTS:
        raise ConfigError(f"task.output={_get(cfg, 'task.output')!r}; choose sum (the prediction) or both "
                          "(the two heads)")
    _check_logged_model(cfg, fmt)


def registered_model_name_problem(name: Any) -> str | None:
    """Why `name` cannot name a model in the MLflow Model Registry (MLflow's own rules), or None."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty name, e.g. conformer-digits"
    if "/" in name or ":" in name:
        return "must not contain '/' or ':' (they separate the parts of models:/<name>/<version>)"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    return None


def _check_logged_model(cfg: DictConfig, fmt: str) -> None:
    """task.log_model / task.register: a MINDIR export (the served model runs it) logged to a tracked run."""
    log_model, register = cfg.task.get("log_model", False), cfg.task.get("register")
    require_bool(log_model, "task.log_model")
    if register is not None:
        problem = registered_model_name_problem(register)
        if problem:
            raise ConfigError(f"task.register={register!r} {problem}")
    if not (log_model or register):
        return
    key = f"task.register={register}" if register is not None else "task.log_model=true"
    if fmt != "MINDIR":
        raise ConfigError(f"{key} logs a model that runs the MINDIR export with MindSpore, not {fmt}: set "
                          "task.format=MINDIR (export other formats in a run of their own)")
    if not _get(cfg, "tracking.enabled"):
        raise ConfigError(f"{key} logs the model to the export's MLflow run, and tracking is disabled: drop "
                          "tracking=disabled / tracking.enabled=false")


def check_tracking_store(cfg: DictConfig) -> None:
    """An HTTP(S) MLflow store answers within seconds (unless the run may fall back to the local store)."""
    tracking = cfg.tracking
    uri = tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not tracking.enabled or tracking.get("fallback_to_local") or not uri.startswith(("http://", "https://")):
        return
    from conformer.tracking.store import unreachable  # imports mlflow: only for server stores

    reason = unreachable(uri)
    if reason:
        raise ConfigError(f"the MLflow store {uri} is unreachable ({reason}): {STORE_WAYS_OUT}")
