"""Config checks that run before anything is built or compiled: one clear line per problem.

The only module that raises `ConfigError`, and the home of the choices several modules share. It imports no
MindSpore: `validate_config` runs before any device or graph work.
"""
from __future__ import annotations

import glob
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from conformer.kernels import KERNEL_PATHS, kernel_path_problem
from conformer.models.registry import architecture_problem, model_arguments, nearest_image_size, valid_image_size

TASKS = ("train", "eval", "export", "predict", "preflight")
AMP_LEVELS = ("O0", "O1", "O2", "O3")
PROGRESS_BAR_SETTINGS = ("auto", True, False)
LOSS_SCALES = ("none", "static", "dynamic")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
BACKENDS = {"CPU": "mccl", "GPU": "nccl", "Ascend": "hccl"}  # MindSpore's collective library per device
PARALLEL_MODES = ("data_parallel",)
# hardware.jit_level per device (null: MindSpore's default): O2 is CANN's GraphEngine, Ascend only
JIT_LEVELS = {"CPU": ("O0", "O1"), "GPU": ("O0", "O1"), "Ascend": ("O0", "O1", "O2")}
ASCEND_PRECISION_MODES = ("force_fp16", "allow_fp32_to_fp16", "allow_mix_precision", "must_keep_origin_dtype",
                          "force_fp32", "allow_fp32_to_bf16", "allow_mix_precision_fp16", "allow_mix_precision_bf16",
                          "force_lowerprecision")
ASCEND_OVERFLOW_MODES = ("INFNAN_MODE", "SATURATION_MODE")
EXPORT_SUFFIXES = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
EXPORT_OUTPUTS = ("sum", "both")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BAD_IMAGE_POLICIES = ("skip", "error")  # data.on_bad_image: what a corrupt or truncated image file does
CHECKPOINT_SUFFIXES = (".ckpt",)
OFFICIAL_SUFFIXES = (".pth", ".pt", ".tar", ".npz")  # official PyTorch weights, converted on load
MLFLOW_PREFIX = "mlflow:"
HEADS = ("conv", "trans", "sum")  # the two classifier heads and their sum (the prediction)
# What a training logs once per epoch, and so what trainer.monitor may name.
EPOCH_METRICS = ("val/loss", *(f"val/top{k}_{head}" for k in (1, 5) for head in HEADS), "train/epoch_loss", "epoch",
                 "epoch_time_s")
MONITOR_MODES = ("max", "min")
TAG_NAME = r"[\w./ -]+"  # what MLflow accepts as a tag key
# Keys of a model config that are not constructor arguments of the network.
MODEL_CONFIG_KEYS = ("_target_", "name", "pretrained", "pretrained_strict")


class ConfigError(ValueError):
    """The composed config cannot work; the message says which key and how to fix it."""


# ---------------------------------------------------------------------------------------------------- checkers
def require_int(value: Any, key: str, minimum: int = 1, hint: str = "") -> int:
    """`value` as an integer >= `minimum`, or a ConfigError naming `key` (the project's one integer check)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}" + (f" ({hint})" if hint else ""))
    return value


def require_number(value: Any, key: str, minimum: float = 0.0, strict: bool = False, hint: str = "") -> float:
    """`value` as a number >= `minimum` (> when `strict`), or a ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (value <= minimum if strict else value < minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ConfigError(f"{key}={value!r} must be a number {bound}" + (f" ({hint})" if hint else ""))
    return float(value)


def require_choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(choices)}")
    return value


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
    task = require_choice(_get(cfg, "task.name"), "task.name", TASKS)
    require_int(_get(cfg, "seed"), "seed", minimum=0)
    if not isinstance(cfg.get("compile_cache", False), bool):
        raise ConfigError(f"compile_cache={cfg.get('compile_cache')!r} must be true or false")
    _check_model_and_data(cfg)
    _check_optim(cfg)
    _check_trainer(cfg)
    _check_tracking(cfg)
    check_hardware(cfg.hardware)
    _check_components(cfg)
    if task == "train":
        require_number(_get(cfg, "task.free_space_margin_mb"), "task.free_space_margin_mb",
                       hint="MB kept free beyond two checkpoints")
        check_weights(cfg, "model.pretrained")
        if _get(cfg, "trainer.resume") != "auto":
            check_weights(cfg, "trainer.resume", checkpoint_only=True)
    elif task == "preflight":
        require_int(_get(cfg, "task.steps"), "task.steps", hint="timed training steps")
        require_int(_get(cfg, "task.pipeline_batches"), "task.pipeline_batches", hint="timed pipeline batches")
    else:
        _check_inference_task(cfg, task)


def model_config_arguments(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The network's constructor arguments for a model config: the variant's, with the config's overrides."""
    overrides = {key: value for key, value in model_cfg.items() if key not in MODEL_CONFIG_KEYS}
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
    arguments = model_config_arguments(OmegaConf.to_container(_get(cfg, "model"), resolve=True))
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
    warmup = _get(cfg, "optim.schedule.warmup_epochs")
    if warmup >= epochs > 1:
        raise ConfigError(f"optim.schedule.warmup_epochs={warmup} must be below trainer.epochs={epochs}: set "
                          f"optim.schedule.warmup_epochs={max(0, epochs - 1) if epochs <= 5 else 5} or train longer")


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
    """Each component's own argument check (`conformer.arguments.CHECKS`) on its config node, before any build."""
    from conformer.arguments import CHECKS  # imports the data modules, which import this one

    global_batch = _get(cfg, "data.batch_size") * (cfg.hardware.get("workers", 1) * cfg.hardware.get("nodes", 1)) * \
        _get(cfg, "trainer.grad_accum_steps")
    supplied = {"optim.schedule": {"global_batch": global_batch}}  # what the trainer passes the partial schedule
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
    if _get(cfg, "model.pretrained"):
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
    if not isinstance(log_model, bool):
        raise ConfigError(f"task.log_model={log_model!r} must be true or false")
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


# ---------------------------------------------------------------------------------------------------- predict
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_inputs(inputs: str | Sequence[str] | None) -> list[Path]:
    """Image files named by `task.inputs`: files, folders (recursive) or globs, in order, without duplicates."""
    if not inputs:
        raise ConfigError("task.inputs is required: an image file, a folder or a glob, e.g. "
                          "task.inputs=photos/cat.jpg or task.inputs='photos/**/*.png'")
    if isinstance(inputs, ListConfig):
        inputs = OmegaConf.to_container(inputs)
    specs = [inputs] if isinstance(inputs, str) else [str(spec) for spec in inputs]
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image(p))
        else:
            files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image(p))
        if not files:
            kind = "folder" if path.is_dir() else "glob" if glob.has_magic(spec) else "path"
            raise ConfigError(f"task.inputs: the {kind} {spec!r} matches no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); check the path (relative to {Path.cwd()})")
        found.update(dict.fromkeys(files))
    return list(found)


def class_names_file(spec: str) -> list[str]:
    """The class names of `task.classes`: a text file, one name per line."""
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.classes={spec}: no such file (one class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"task.classes={path} holds no class names (one per line)")
    return names


def check_class_count(names: int, num_classes: int, origin: str) -> None:
    """Class names must match the weights' classifier."""
    if names != num_classes:
        raise ConfigError(f"the weights have {num_classes} classes but {names} class names came from {origin}: "
                          "choose the data config the weights were trained on, or set task.classes=<file with one "
                          "name per line>")


# ---------------------------------------------------------------------------------------------------- hardware
def check_hardware(hardware: Mapping[str, Any]) -> None:
    """Raise ConfigError for a hardware config that cannot launch, before any process is started."""
    target = require_choice(hardware.get("device_target", "CPU"), "hardware.device_target", DEVICE_TARGETS)
    require_choice(hardware.get("mode", "graph"), "hardware.mode", MODES)
    if hardware.get("runtime_num_threads") is not None:
        require_int(hardware.get("runtime_num_threads"), "hardware.runtime_num_threads", hint="or null: the default")
    if not isinstance(hardware.get("cpu_affinity", False), bool):
        raise ConfigError(f"hardware.cpu_affinity={hardware.get('cpu_affinity')!r} must be true or false")
    _check_device_settings(hardware, target)
    workers = require_int(hardware.get("workers"), "hardware.workers", hint="processes per node, one per device")
    nodes = require_int(hardware.get("nodes", 1), "hardware.nodes", hint="machines in the job")
    if workers * nodes == 1:
        return
    backend = hardware.get("backend")
    if backend not in (None, BACKENDS[target]):
        raise ConfigError(f"hardware.backend={backend!r} does not work on {target}: use "
                          f"hardware.backend={BACKENDS[target]} (or null to let MindSpore pick it)")
    mode = hardware.get("parallel_mode", "data_parallel")
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"hardware.parallel_mode={mode!r}; only {', '.join(PARALLEL_MODES)} is supported")
    node_rank = require_int(hardware.get("node_rank"), "hardware.node_rank", minimum=0,
                            hint="this machine's index in the job")
    if node_rank >= nodes:
        raise ConfigError(f"hardware.node_rank={node_rank} must be below hardware.nodes={nodes}")
    port = hardware.get("master_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535):
        raise ConfigError(f"hardware.master_port={port!r} must be a port in [1024, 65535], or null for a free one")
    if nodes > 1:
        if port is None:
            raise ConfigError(f"hardware.nodes={nodes} needs one fixed port on every node: set "
                              "hardware.master_port (e.g. 8118)")
        if _is_loopback(str(hardware.get("master_addr"))):
            raise ConfigError(f"hardware.nodes={nodes} needs hardware.master_addr=<IP or host name of node 0>, "
                              f"got {hardware.get('master_addr')!r} (a loopback address)")
    timeout = (hardware.get("msrun") or {}).get("cluster_time_out")
    require_int(timeout, "hardware.msrun.cluster_time_out",
                hint="seconds msrun waits for missing workers before it fails")


def _check_device_settings(hardware: Mapping[str, Any], target: str) -> None:
    """The kernel path, jit level, memory cap, determinism and Ascend options of a hardware config."""
    amp = require_choice(hardware.get("amp_level", "O0"), "hardware.amp_level", AMP_LEVELS)
    kernels = require_choice(hardware.get("kernels", "auto"), "hardware.kernels", KERNEL_PATHS)
    problem = kernel_path_problem(kernels, target, amp)
    if problem:
        raise ConfigError(f"hardware.kernels={kernels} with hardware.amp_level={amp} on {target}: {problem}")
    jit_level = hardware.get("jit_level")
    if jit_level is not None and jit_level not in JIT_LEVELS[target]:
        raise ConfigError(f"hardware.jit_level={jit_level!r} does not run on {target}: choose one of "
                          f"{', '.join(JIT_LEVELS[target])} or null (MindSpore's default; O2 is Ascend's GraphEngine)")
    memory = hardware.get("device_memory")
    if memory is not None and not (isinstance(memory, str) and re.fullmatch(r"\d+(\.\d+)?GB", memory)):
        raise ConfigError(f"hardware.device_memory={memory!r} must be a size in GB such as 29GB, or null")
    if not isinstance(hardware.get("deterministic", False), bool):
        raise ConfigError(f"hardware.deterministic={hardware.get('deterministic')!r} must be true or false")
    ascend = {key: value for key, value in (hardware.get("ascend") or {}).items() if value is not None}
    if ascend and target != "Ascend":
        raise ConfigError(f"hardware.ascend sets Ascend options, and this config runs on {target}: drop them")
    if ascend.get("precision_mode") is not None:
        require_choice(ascend["precision_mode"], "hardware.ascend.precision_mode", ASCEND_PRECISION_MODES)
    if ascend.get("overflow_mode") is not None:
        require_choice(ascend["overflow_mode"], "hardware.ascend.overflow_mode", ASCEND_OVERFLOW_MODES)


def check_run_dir(run_dir: Path) -> None:
    """The run dir (and its checkpoints/) can be written: found now, not after the first epoch."""
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run dir {run_dir}: {existing} is not a writable folder; set "
                          "hydra.run.dir (or paths.root) to a folder you can write")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not (checkpoints.is_dir() and os.access(checkpoints, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot write checkpoints to {checkpoints}: make it a writable folder")


def check_tracking_store(cfg: DictConfig) -> None:
    """An HTTP(S) MLflow store answers within seconds (unless the run may fall back to the local store)."""
    tracking = cfg.tracking
    uri = tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not tracking.enabled or tracking.get("fallback_to_local") or not uri.startswith(("http://", "https://")):
        return
    from conformer.tracking.store import unreachable  # imports mlflow: only for server stores

    reason = unreachable(uri)
    if reason:
        raise ConfigError(f"the MLflow store {uri} is unreachable ({reason}): start it, point tracking.uri (or "
                          "MLFLOW_TRACKING_URI) at one that answers, set tracking.fallback_to_local=true, or run "
                          "with tracking=disabled")


def check_devices(hardware: Mapping[str, Any]) -> None:
    """This machine has the configured device (dry runs plan for other machines and skip this)."""
    target = hardware.get("device_target", "CPU")
    if hardware.get("dry_run") or devices_present(target):
        return
    raise ConfigError(f"hardware={hardware.get('name')} needs {target} devices, and this machine has none "
                      f"({DEVICE_FILES[target]} not found): use hardware=cpu, or hardware.dry_run=true to only "
                      "print the launch plan")


DEVICE_FILES = {"CPU": "", "GPU": "/dev/nvidia*", "Ascend": "/dev/davinci*"}


def devices_present(target: str) -> bool:
    """Whether the device nodes of `target` exist (the CPU always does)."""
    return target == "CPU" or bool(glob.glob(DEVICE_FILES[target]))


def _is_loopback(address: str) -> bool:
    if address in ("localhost", "None", ""):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False
