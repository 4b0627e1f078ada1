"""The composed config: every group option composes and validates, bad values are one-line errors, and
`python run.py` refuses unknown names and bad values before anything is built or compiled."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from conformer.config.validation import validate_config
from conformer.errors import ConfigError
from conformer.runtime.hardware_checks import devices_present
from conformer.runtime.launch import free_port
from conformer.tasks.common import build_network

from .helpers import CONF_DIR, compose_config, run_py_to_end

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def _targets(node) -> list[str]:
    """Every `_target_` in a config tree."""
    if isinstance(node, DictConfig):
        found = [node._target_] if "_target_" in node else []
        return found + [t for key in node if key != "_target_" for t in _targets(node._get_node(key))]
    if isinstance(node, ListConfig):
        return [t for item in node for t in _targets(item)]
    return []


def test_config_groups_are_the_documented_ones() -> None:
    assert {"model", "data", "optim", "loss", "trainer", "hardware", "tracking", "task"} <= set(GROUPS)
    defaults = compose_config()
    assert (defaults.model.name, defaults.data.name, defaults.hardware.name, defaults.task.name) == (
        "conformer_nano", "digits", "cpu", "train")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_resolves_and_validates(group: str, option: str, tmp_path: Path) -> None:
    needs = []  # what the option itself requires: the weights of an inference task, predict's images
    if group == "task" and option not in ("train", "preflight"):
        needs.append(f"task.checkpoint={REFERENCE / 'tiny_state.npz'}")
    if (group, option) in (("data", "folder"), ("data", "imagenet"), ("experiment", "conformer_ti_imagenet")):
        for split in ("train", "val"):
            (tmp_path / "images" / split).mkdir(parents=True)
        needs.append(f"data.source.root={tmp_path / 'images'}")
    if (group, option) == ("task", "predict"):
        Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
        needs.append(f"task.inputs={tmp_path / 'cat.png'}")
    cfg = compose_config([f"{group}={option}", f"paths.root={tmp_path}", *needs])
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert plain["paths"]["root"] == str(tmp_path)
    validate_config(cfg)
    for target in _targets(cfg):
        assert callable(get_method(target)), f"{group}={option}: {target} is not importable"


def test_conformer_ti_config_builds_the_official_parameter_count() -> None:
    cfg = compose_config(["model=conformer_ti", "data=imagenet"])
    network = build_network(cfg, cfg.data.num_classes)
    expected = json.loads((REFERENCE / "param_counts.json").read_text())["Conformer_tiny_patch16"]["params"]
    assert sum(int(np.prod(p.shape)) for p in network.trainable_params()) == expected == 23_524_704
    assert network.conv_cls_head.weight.shape[0] == 1000


@pytest.mark.parametrize(("override", "message"), [
    ("optim.schedule.base_lr=-0.001", "optim.schedule.base_lr=-0.001 must be a number > 0 (a learning rate)"),
    ("data.image_size=50", "data.image_size=50 must be a multiple of the patch size 16 (model.patch_size), "
                           "e.g. data.image_size=48"),
    ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    ("trainer.epochs=ten", "trainer.epochs='ten' must be an integer >= 1"),
    ("+model.depth=7", "model.depth=7 must be a positive multiple of 3"),
    ("trainer.monitor=val/top1", "trainer.monitor='val/top1'; choose one of val/loss, val/top1_conv, val/top1_trans, "
                                 "val/top1_sum, val/top5_conv, val/top5_trans, val/top5_sum, train/loss_epoch, "
                                 "train/epoch, time/epoch_s"),
    ("trainer.epochs=3", "optim.schedule.warmup_epochs=5 must be below trainer.epochs=3: set "
                         "optim.schedule.warmup_epochs=2 or train longer"),
    ("hardware.runtime_num_threads=0", "hardware.runtime_num_threads=0 must be an integer >= 1 (or null: the default)"),
    ("hardware.cpu_affinity=maybe", "hardware.cpu_affinity='maybe' must be true or false"),
    ("hardware.kernels=fast", "hardware.kernels='fast'; choose one of auto, project, mindspore"),
    ("hardware.jit_level=O2", "hardware.jit_level='O2' does not run on CPU: choose one of O0, O1 or null (MindSpore's "
                              "default; O2 is Ascend's GraphEngine)"),
    ("hardware.device_memory=lots", "hardware.device_memory='lots' must be a size in GB such as 29GB, or null"),
    ("+model.width=7", "model.width is not a Conformer argument; choose from patch_size, in_chans, num_classes, "
                       "base_channel, channel_ratio, num_med_block, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, "
                       "qk_scale, drop_rate, attn_drop_rate, drop_path_rate, img_size (model.name='conformer_nano')"),
])
def test_bad_values_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config([override]))
    assert str(info.value) == message


@pytest.mark.parametrize(("overrides", "message"), [
    (["hardware.kernels=project", "hardware.amp_level=O2"],
     "hardware.kernels=project with hardware.amp_level=O2 on CPU: the project's kernels compute in float32 and "
     "MindSpore's mixed-precision rewrite cannot rewrite their cells, so AMP O2 needs MindSpore's ops: use auto or "
     "mindspore (or amp_level O0)"),
    (["hardware=gpu", "hardware.kernels=project"],
     "hardware.kernels=project with hardware.amp_level=O1 on GPU: the project's kernels run on the CPU only, not on "
     "GPU: use auto or mindspore"),
    (["hardware=ascend8", "hardware.ascend.precision_mode=fp8"],
     "hardware.ascend.precision_mode='fp8'; choose one of force_fp16, allow_fp32_to_fp16, allow_mix_precision, "
     "must_keep_origin_dtype, force_fp32, allow_fp32_to_bf16, allow_mix_precision_fp16, allow_mix_precision_bf16, "
     "force_lowerprecision"),
    (["hardware=ascend", "hardware.ascend.overflow_mode=wrap"],
     "hardware.ascend.overflow_mode='wrap'; choose one of INFNAN_MODE, SATURATION_MODE"),
    (["hardware=gpu", "+hardware.ascend.overflow_mode=INFNAN_MODE"],
     "hardware.ascend sets Ascend options, and this config runs on GPU: drop them"),
])
def test_device_settings_that_cannot_run_are_one_line_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(overrides))
    assert str(info.value) == message


def test_the_ascend_configs_validate_with_every_device_setting() -> None:
    validate_config(compose_config(["hardware=ascend8", "hardware.jit_level=O2", "hardware.device_memory=29GB",
                                    "hardware.deterministic=true", "hardware.ascend.precision_mode=allow_fp32_to_fp16",
                                    "hardware.ascend.overflow_mode=INFNAN_MODE", "hardware.kernels=mindspore"]))


def test_the_cpu_runtime_settings_reach_mindspore() -> None:
    script = ("import mindspore as ms\n"
              "from conformer.runtime.hardware import configure_device\n"
              "configure_device({'device_target': 'CPU', 'runtime_num_threads': 1, 'workers': 1})\n"
              "print(ms.get_context('runtime_num_threads'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split()[-1] == "1"


@pytest.fixture(scope="module")
def image_folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The split folders an ImageFolderSource config needs to pass its own check."""
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        (root / split).mkdir()
    return root


# One bad value per component check, with the line the user sees (after "config error: ").
COMPONENT_ERRORS = [
    (["loss.label_smoothing=2"], "loss: DualHeadLoss: label_smoothing must be in [0, 1), got 2."),
    (["optim.optimizer.name=lamb"], "optim.optimizer: optimizer 'lamb' is unknown; choose one of ('adamw', 'sgd')."),
    (["optim.optimizer.betas=[0.9,1.5]"], "optim.optimizer: AdamW betas must lie in [0, 1), got (0.9, 1.5)."),
    (["optim.optimizer.eps=0"], "optim.optimizer: AdamW eps must be > 0, got 0."),
    (["optim=sgd", "optim.optimizer.momentum=-1"], "optim.optimizer: SGD momentum must be >= 0, got -1."),
    (["optim.schedule.interval=epochs"], "optim.schedule: WarmupCosineSchedule: interval 'epochs' is unknown; "
                                         "choose one of ('step', 'epoch')."),
    (["optim.schedule.lr_scaling=linear", "optim.schedule.min_lr=1e-4"],
     "optim.schedule: WarmupCosineSchedule: min_lr (0.0001) must not exceed base_lr (6.25e-05, scaled from 0.001 "
     "by linear)."),
    (["data.train_transform.hflip=2"], "data.train_transform: hflip=2 is a probability: use a value in [0, 1]"),
    (["data.train_transform.auto_augment=rand-m9-p2"],
     "data.train_transform: RandAugment spec 'rand-m9-p2': p must be in [0, 1], got 2.0"),
    (["data.train_transform.re_prob=0.25", "+data.train_transform.re_mode=blur"],
     "data.train_transform: random erasing mode='blur' is unknown: use one of ['const', 'rand', 'pixel']"),
    (["data.eval_transform.interpolation=lanczos"],
     "data.eval_transform: interpolation='lanczos' is not supported: use one of ['bicubic', 'bilinear', 'nearest']"),
    (["data.eval_transform.std=[0.5,0,0.5]"], "data.eval_transform: std=(0.5, 0.0, 0.5) must be positive"),
    (["data.eval_transform.image_size=48"],
     "data: data.eval_transform.image_size=48 differs from data.image_size=32: set it to ${data.image_size}"),
    (["data=synthetic", "data.source.num_val=0"], "data.source: SyntheticSource num_val=0 must be a positive integer"),
    (["data.source.val_fraction=1.5"], "data.source: val_fraction=1.5 must be in (0, 1), e.g. 0.2"),
    (["data=folder", "data.source.root=/nonexistent"],
     "data.source: dataset root /nonexistent does not exist or is not a folder: set data.source.root to a folder "
     "holding train/<class>/<images> and val/<class>/<images>"),
    (["data=imagenet", "data.source.root={root}", "data.mixup.switch_prob=1.5"],
     "data.mixup: mixup switch_prob=1.5 must be in [0, 1]"),
    (["data=imagenet", "data.source.root={root}", "data.batch_size=7"],
     "data: Mixup/CutMix in batch mode needs full even batches: got batch_size=7, drop_last=True; use an even batch "
     "size and drop_last=true, or data.mixup=null"),
    (["trainer.ema_decay=1.5"], "trainer: ModelEma: decay must be in [0, 1], got 1.5."),
    (["trainer.sink_size=5"], "trainer: trainer.sink_size=5: data sinking runs on GPU and Ascend, this run is on the "
     "CPU: set trainer.sink_size=null"),
    (["hardware=gpu", "trainer.sink_size=4"], "trainer: trainer.log_every_n_steps=10 must be a multiple of "
     "trainer.sink_size=4: the host sees the steps once per sink call"),
    (["hardware=ascend", "trainer.sink_size=5", "trainer.grad_accum_steps=2"], "trainer: trainer.sink_size=5 sinks "
     "whole updates of fresh batches: it needs trainer.grad_accum_steps=1 and no trainer.overfit_batches"),
    (["hardware=gpu", "trainer.sink_size=0"], "trainer: trainer.sink_size=0 must be an integer >= 1, or null for off"),
]


@pytest.mark.parametrize(("overrides", "message"), COMPONENT_ERRORS, ids=[" ".join(o) for o, _ in COMPONENT_ERRORS])
def test_a_value_a_component_would_refuse_is_a_config_error_before_it_is_built(
        overrides: list[str], message: str, image_folder_root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config([o.format(root=image_folder_root) for o in overrides]))
    assert str(info.value) == message


def test_data_sinking_validates_on_gpu_and_ascend() -> None:
    for hardware in ("gpu", "ascend"):
        validate_config(compose_config([f"hardware={hardware}", "trainer.sink_size=5",
                                        "trainer.save_every_n_steps=50"]))


def test_every_component_the_configs_build_has_an_up_front_check() -> None:
    from conformer.config.components import CHECKS

    checked_elsewhere = {"conformer.models.create_model"}  # validate_config checks the architecture itself
    groups = ("model", "data", "optim", "loss", "trainer")
    targets = {t for group in groups for path in (CONF_DIR / group).glob("*.yaml")
               for t in _targets(OmegaConf.load(path))}
    assert targets - checked_elsewhere <= set(CHECKS), f"no up-front check: {targets - set(CHECKS)}"


def test_the_component_checks_run_without_importing_mindspore(image_folder_root: Path) -> None:
    """What makes them fast: every check of COMPONENT_ERRORS answers in a process that never imports MindSpore."""
    script = (
        "import json, sys\n"
        "from tests.helpers import compose_config\n"
        "from conformer.config.validation import validate_config\nfrom conformer.errors import ConfigError\n"
        "answers = []\n"
        f"for overrides in {[o for o, _ in COMPONENT_ERRORS]!r}:\n"
        "    try:\n"
        f"        validate_config(compose_config([o.format(root={str(image_folder_root)!r}) for o in overrides]))\n"
        "    except ConfigError as err:\n"
        "        answers.append(str(err))\n"
        "print(json.dumps({'answers': answers, 'mindspore': sorted(m for m in sys.modules if 'mindspore' in m)}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=CONF_DIR.parent, capture_output=True, text=True,
                          timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answers"] == [message for _, message in COMPONENT_ERRORS]
    assert result["mindspore"] == []


@pytest.mark.slow
@pytest.mark.parametrize(("group", "listed"), [
    ("model", ["conformer_b", "conformer_nano", "conformer_s", "conformer_s32", "conformer_ti"]),
    ("data", ["digits", "folder", "imagenet", "synthetic"]),
    ("hardware", ["ascend", "cpu", "gpu"]),
])
def test_unknown_group_option_lists_the_choices(group: str, listed: list[str], tmp_path: Path) -> None:
    result = run_py_to_end([f"{group}=nope"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert f"Could not find '{group}/nope'" in result.stderr
    for name in listed:
        assert f"\t{name}\n" in result.stderr, f"{name} missing from: {result.stderr}"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_cli_rejects_a_bad_value_before_building_anything(tmp_path: Path) -> None:
    """How fast is benchmarks/startup.py's business (a busy machine must not fail a test): here, that nothing ran."""
    result = run_py_to_end(["data.batch_size=0"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "config error: data.batch_size=0 must be an integer >= 1"
    assert "Traceback" not in result.stderr
    # nothing ran: no data written, no MLflow store, and the run dir Hydra made is gone again
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "mlflow.db").exists()
    assert not list((tmp_path / "outputs").glob("*/*"))
    assert "composed config" not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(devices_present("Ascend"), reason="this machine has Ascend devices")
def test_a_missing_device_is_one_line_before_any_process_starts(tmp_path: Path) -> None:
    result = run_py_to_end(["hardware=ascend8"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: hardware=ascend8 needs Ascend devices, and this machine has none (/dev/davinci* not found): "
        "use hardware=cpu, or hardware.dry_run=true to only print the launch plan")
    assert not list((tmp_path / "outputs").rglob("msrun")) and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_an_unwritable_checkpoint_dir_is_found_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoints folder belongs")
    result = run_py_to_end([f"hydra.run.dir={run_dir}"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"config error: cannot write checkpoints to {run_dir / 'checkpoints'}: make it a writable folder")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".cache").exists()


@pytest.mark.slow
def test_a_value_a_component_refuses_is_one_line_naming_the_config_node(tmp_path: Path) -> None:
    result = run_py_to_end(["loss.label_smoothing=2", "tracking=disabled"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: loss: DualHeadLoss: label_smoothing must be in [0, 1), got 2.")
    assert "Traceback" not in result.stderr and "composed config" not in result.stdout
    assert not list((tmp_path / "outputs").glob("*/*")), "the run dir of a refused config is left behind"


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_naming_it_without_its_password(tmp_path: Path) -> None:
    """Connection refused, one line, nothing built; the URI's user info (a password) is not printed nor left in a
    file. (How fast it answers is benchmarks/startup.py's: a busy machine must not fail a test.)"""
    port = free_port()  # nobody listens there
    result = run_py_to_end([f"tracking.uri=http://alice:pw-s3cret@127.0.0.1:{port}"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: the MLflow store http://***@127.0.0.1:{port} is unreachable (GET "
                           f"http://127.0.0.1:{port}/health: [Errno 111] Connection refused)"), last
    assert "tracking=disabled" in last
    assert "pw-s3cret" not in result.stderr + result.stdout
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"pw-s3cret" in p.read_bytes()]
    assert "Traceback" not in result.stderr and not (tmp_path / ".cache").exists()


def test_named_sweeps_are_found_in_the_top_level_sweeps_folder() -> None:
    """`sweep=<name>` composes `sweeps/<name>.yaml` through the project's search path; conf/ has no sweep group."""
    from hydra import compose, initialize_config_dir

    repo = Path(__file__).resolve().parents[1]
    assert sorted(p.stem for p in (repo / "sweeps").glob("*.yaml")) == ["lr_grid", "optuna_lr"]
    assert not (repo / "conf" / "sweep").exists()
    with initialize_config_dir(str(repo / "conf"), version_base="1.3"):
        hydra_cfg = compose("config", overrides=["sweep=lr_grid"], return_hydra_config=True).hydra
    assert hydra_cfg.mode.name == "MULTIRUN"
    assert dict(hydra_cfg.sweeper.params) == {"optim.schedule.base_lr": "5e-4,1e-3,2e-3",
                                              "optim.optimizer.weight_decay": "0.05,0.1"}
    assert [source.path for source in hydra_cfg.runtime.config_sources if source.schema == "sweeps"] == \
        [str(repo / "sweeps")]


def test_the_one_list_of_tasks_matches_the_task_configs_and_runs_functions() -> None:
    """`conformer.vocabulary.TASKS` names every `conf/task/*.yaml` (and nothing else), each with its function."""
    from conformer.app import task_function
    from conformer.vocabulary import TASKS

    repo = Path(__file__).resolve().parents[1]
    assert sorted(TASKS) == sorted(p.stem for p in (repo / "conf" / "task").glob("*.yaml"))
    for name in TASKS:
        assert callable(task_function(name)) and compose_config([f"task={name}"]).task.name == name
