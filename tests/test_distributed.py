"""Data-parallel training under msrun with 2 CPU workers (`hardware=cpu_x2`), and the multi-card launch plans.

Equivalence with one process: the Conformer's CNN branch has BatchNorm, which normalises over each device's own
batch, so a 2-worker run only equals a single process that sees the same per-device batches. The sampler deals one
global permutation round-robin (rank r gets perm[r::2]), so with one image per worker, step k trains on perm[2k]
(rank 0) and perm[2k+1] (rank 1): exactly the two micro-batches of one process with batch 1 and
grad_accum_steps=2, whose gradient is their mean, like the all-reduce mean. (A single process with batch 2 sees
the same images per step but normalises them together, so its weights differ.) BatchNorm running statistics are
per rank by design and are left out of the comparison.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from conformer.data.generated import write_image_folder
from conformer.data.module import DataModule
from conformer.data.sources import ImageFolderSource
from conformer.data.transforms import EvalTransform, TrainTransform
from conformer.errors import ConfigError
from conformer.models.checkpoint_file import read_checkpoint
from conformer.runtime.hardware import weights_digest
from conformer.runtime.hardware_checks import check_hardware
from conformer.runtime.launch import RESULT_FILE, kernel_threads, read_result

from .helpers import RUN_PY, clean_env, compose_config, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 32, 8, 4, 2
# Every image used as is (full-image crop, no flip) and one loader thread: the runs differ only in how the
# batches are spread over processes.
DETERMINISTIC = ("data=folder", f"data.image_size={SIZE}", "+model.depth=3", "data.batch_size=1",
                 "data.num_workers=1", "data.train_transform.scale=[1.0,1.0]",
                 "data.train_transform.ratio=[1.0,1.0]", "data.train_transform.hflip=0.0",
                 "data.eval_transform.crop_pct=1.0", "optim.schedule.warmup_epochs=0", "trainer.log_every_n_steps=1")
EPOCH_LINE = re.compile(r"epoch 1/1 +train loss \S+ +val loss (\S+) +top-1 sum (\S+)%")
DIGEST_LINE = re.compile(r"trainable weights sha256 ([0-9a-f]{64}), identical on all 2 ranks")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), num_classes=CLASSES,
                              train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, size=(SIZE, SIZE),
                              ext=".png")


def start(root: Path, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python run.py <args>` with its project root (mlflow.db, outputs/) in `root` and `env` on top of this
    process's environment; output to root/*.txt."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=root, env={**clean_env(root), **(env or {})},
                                stdout=out, stderr=err, start_new_session=True)


def finish(proc: subprocess.Popen, root: Path, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, group=True)
        raise
    return proc.returncode, (root / "stdout.txt").read_text() + (root / "stderr.txt").read_text()


def only_run(root: Path) -> tuple[MlflowClient, Run]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in (root / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def trainable(tensors: dict) -> dict:
    """Network weights without BatchNorm running statistics (those are per rank)."""
    return {k: v for k, v in tensors.items() if not k.startswith(("optimizer.", "ema.")) and "moving_" not in k}


@dataclass
class Trained:
    root: Path
    returncode: int
    output: str


@pytest.fixture(scope="module")
def runs(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """One epoch with 2 workers (1 image each) and, at the same time, 1 process (1 image, 2 accumulation steps). The
    process's CPU kernels get the workers' thread count: the same chunks, so the same summation order."""
    common = [f"data.source.root={images}", *DETERMINISTIC, "trainer.epochs=1"]
    args = {"dp": ["hardware=cpu_x2", *common], "single": ["hardware=cpu", "trainer.grad_accum_steps=2", *common]}
    envs = {"dp": {}, "single": kernel_threads("CPU", 2, bind_core=False)}
    roots = {name: tmp_path_factory.mktemp(name) for name in args}
    procs = {name: start(roots[name], args[name], envs[name]) for name in args}
    return {name: Trained(roots[name], *finish(procs[name], roots[name], timeout=420)) for name in args}


# ---------------------------------------------------------------------------------------------------- dry runs
@pytest.mark.parametrize("hardware, extra, expected", [
    ("ascend8", [], ["--worker_num=8", "--local_worker_num=8", "--node_rank=0", "--master_addr=127.0.0.1",
                     "--cluster_time_out=600", "--bind_core=True", "--tail_worker_log=0", "HCCL_CONNECT_TIMEOUT=600",
                     "Ascend x 8, backend hccl", "RANK_SIZE=8", "RANK_ID=0..7", "DEVICE_ID=0..7"]),
    ("gpu8", [], ["--worker_num=8", "--local_worker_num=8", "--cluster_time_out=300", "--bind_core=True",
                  "GPU x 8, backend nccl", "RANK_SIZE=8", "RANK_ID=0..7"]),
    ("ascend8", ["hardware.nodes=2", "hardware.node_rank=1", "hardware.master_addr=10.1.2.3",
                 "hardware.master_port=8118"],
     ["--worker_num=16", "--local_worker_num=8", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=8118",
      "--tail_worker_log=8", "Ascend x 16, backend hccl", "MS_SCHED_HOST=10.1.2.3", "MS_SCHED_PORT=8118",
      "RANK_SIZE=16", "RANK_ID=8..15", "DEVICE_ID=0..7"]),
    ("cpu_x2", [], ["--worker_num=2", "--local_worker_num=2", "--bind_core=False", "CPU x 2, backend mccl",
                    f"CONFORMER_KERNEL_THREADS={max(1, len(os.sched_getaffinity(0)) // 2)}"]),
])
def test_dry_run_prints_the_msrun_command_and_environment(tmp_path: Path, hardware: str, extra: list[str],
                                                          expected: list[str]) -> None:
    code, output = finish(start(tmp_path, ["model=conformer_ti", f"hardware={hardware}", *extra,
                                           "hardware.dry_run=true"]), tmp_path, timeout=120)
    assert code == 0, output
    run_dir = only_run_dir(tmp_path)
    command = next(line for line in output.splitlines() if "--worker_num=" in line)
    for flag in ["--join=True", f"--log_dir={run_dir}/msrun", f"{RUN_PY} model=conformer_ti hardware={hardware}",
                 f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", *[f for f in expected if f[:2] == "--"]]:
        assert flag in command, (flag, command)
    assert "hardware.dry_run" not in command  # the workers would only print the plan again
    for line in [f"PATH={Path(sys.executable).parent}:$PATH", "PYTHONUNBUFFERED=1",
                 f"CONFORMER_PROJECT_ROOT={tmp_path}", *[f for f in expected if f[:2] != "--"]]:
        assert line in output, (line, output)
    # nothing was started: no logs, no MLflow store
    assert not (run_dir / "msrun").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("target, workers, bind_core, cores, expected", [
    ("CPU", 2, False, 2, "1"), ("CPU", 3, False, 16, "5"), ("CPU", 4, False, 2, "1"),
    ("CPU", 1, False, 2, None),                     # one process: all cores
    ("CPU", 2, True, 16, None), ("CPU", 2, {"device0": ["0-7"]}, 16, None),  # msrun binds each worker to its cores
    ("GPU", 8, False, 64, None),                    # the kernels serve the CPU only
])
def test_cpu_workers_share_the_cores_among_their_kernel_pools(monkeypatch: pytest.MonkeyPatch, target: str,
                                                               workers: int, bind_core: object, cores: int,
                                                               expected: str | None) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    threads = kernel_threads(target, workers, bind_core)
    assert threads == ({} if expected is None else {"CONFORMER_KERNEL_THREADS": expected})


@pytest.mark.parametrize("hardware, from_user, expected", [
    ("ascend8", False, "2"), ("gpu8", False, "2"),  # an accelerator's warnings are what bringing it up needs
    ("ascend8", True, None),  # the user's own GLOG_v reaches the workers as it is
    ("cpu_x2", False, None),  # the package's default (3: errors only) stands on the CPU
])
def test_mindspores_log_level_is_left_to_the_user_and_warns_on_accelerators(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hardware: str, from_user: bool, expected: str | None) -> None:
    from conformer.runtime import process_defaults
    from conformer.runtime.launch import plan_launch

    monkeypatch.setattr(process_defaults, "GLOG_V_FROM_USER", from_user)
    plan = plan_launch(compose_config([f"hardware={hardware}"]).hardware, RUN_PY, [], tmp_path)
    assert plan.env_changes.get("GLOG_v") == expected


@pytest.mark.parametrize("overrides, message", [
    (["hardware=ascend8", "hardware.nodes=2", "hardware.master_addr=10.0.0.1"], "set hardware.master_port"),
    (["hardware=ascend8", "hardware.nodes=2", "hardware.master_port=8118"], "hardware.master_addr=<IP"),
    (["hardware=gpu8", "hardware.nodes=2", "hardware.node_rank=2", "hardware.master_port=8118"],
     "must be below hardware.nodes=2"),
    (["hardware=cpu_x2", "hardware.backend=hccl"], "use hardware.backend=mccl"),
    (["hardware=cpu_x2", "hardware.workers=0"], "hardware.workers=0 must be an integer >= 1"),
    (["hardware=cpu_x2", "hardware.parallel_mode=semi_auto_parallel"], "only data_parallel"),
])
def test_impossible_launches_fail_before_any_process_starts(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_hardware(compose_config(overrides).hardware)


# ---------------------------------------------------------------------------------------------------- sharding
def test_shards_are_disjoint_complete_and_interleave_into_the_single_process_order(images: Path) -> None:
    data = DataModule("folder", ImageFolderSource(images), image_size=SIZE, batch_size=1,
                      train_transform=TrainTransform(SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0),
                      eval_transform=EvalTransform(SIZE, crop_pct=1.0), num_workers=1, seed=42)

    def images_of(loader) -> list[bytes]:
        return [image.asnumpy().tobytes() for image, _ in loader.create_tuple_iterator(num_epochs=1)]

    single = images_of(data.train_loader(0, 1))
    ranks = [images_of(data.train_loader(rank, 2)) for rank in range(2)]
    assert len(set(single)) == len(single) == CLASSES * TRAIN_PER_CLASS
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(single)
    # step k of the 2-worker run = micro-batches 2k, 2k+1 of the single process
    assert [x for pair in zip(*ranks) for x in pair] == single
    val = [images_of(data.val_loader(rank, 2)) for rank in range(2)]
    assert not set(val[0]) & set(val[1])
    assert sorted(val[0] + val[1]) == sorted(images_of(data.val_loader(0, 1)))


# ---------------------------------------------------------------------------------------------------- training
def test_two_workers_train_exactly_like_one_process_with_the_same_per_device_batches(runs: dict[str, Trained]) -> None:
    for trained in runs.values():
        assert trained.returncode == 0, trained.output[-3000:]
    dp_dir, single_dir = (only_run_dir(runs[name].root) for name in ("dp", "single"))
    dp, _ = read_checkpoint(dp_dir / "checkpoints" / "last.ckpt")
    single, _ = read_checkpoint(single_dir / "checkpoints" / "last.ckpt")
    assert set(dp) == set(single)
    weights = trainable(dp)
    assert len(weights) > 100
    for name in weights:  # measured: bit-identical; the tolerance only absorbs summation order
        np.testing.assert_allclose(dp[name].asnumpy(), single[name].asnumpy(), rtol=0, atol=1e-6, err_msg=name)
    moments = [k for k in dp if k.startswith("optimizer.exp_avg.")]
    assert len(moments) == len(weights) and max(np.abs(dp[k].asnumpy()).max() for k in moments) > 1e-4
    for name in moments:
        np.testing.assert_allclose(dp[name].asnumpy(), single[name].asnumpy(), rtol=0, atol=1e-6, err_msg=name)

    # both ranks hold the same weights after the last step: the digests they logged, and the checkpoint's
    digests = [DIGEST_LINE.search((dp_dir / log).read_text()) for log in ("train.log", "worker_1.log")]
    assert all(digests), "a rank did not log its weights digest"
    assert digests[0][1] == digests[1][1] == weights_digest(weights.values())


def test_one_run_dir_and_one_mlflow_run_with_rank0_metrics(runs: dict[str, Trained]) -> None:
    root = runs["dp"].root
    run_dir = only_run_dir(root)  # scheduler and workers shared the parent's run dir
    assert sorted(p.name for p in (run_dir / "msrun").iterdir()) == ["scheduler.log", "worker_0.log", "worker_1.log"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    client, run = only_run(root)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["world_size"], run.data.tags["hardware"]) == ("2", "cpu_x2")
    assert run.data.tags["run_dir"] == str(run_dir)
    metrics = run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == CLASSES * TRAIN_PER_CLASS // 2
    # eval is summed over both shards: rank 1 printed the same numbers that rank 0 logged
    rank1 = EPOCH_LINE.search((run_dir / "worker_1.log").read_text())
    assert rank1, "rank 1 logged no epoch summary"
    assert float(rank1[1]) == pytest.approx(metrics["val/loss"], abs=5e-5)
    assert float(rank1[2]) == pytest.approx(metrics["val/top1_sum"], abs=5e-3)
    # the launcher returned rank 0's objective; rank 0 streamed its log through the launcher
    assert read_result(run_dir) == pytest.approx(metrics["val/top1_sum"])
    assert "epoch 1/1" in runs["dp"].output and f"--log_dir={run_dir}/msrun" in runs["dp"].output


# ---------------------------------------------------------------------------------------------------- failure
def worker_pid(root: Path, rank: int) -> int | None:
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if (env.get("CONFORMER_PROJECT_ROOT"), env.get("MS_ROLE"), env.get("RANK_ID")) == (
                str(root), "MS_WORKER", str(rank)) and str(RUN_PY) in proc.cmdline():
            return proc.pid
    return None


def job_processes(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CONFORMER_PROJECT_ROOT") == str(root) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_killed_worker_fails_the_job_and_its_mlflow_run(images: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "chosen"
    proc = start(tmp_path, ["hardware=cpu_x2", f"data.source.root={images}", *DETERMINISTIC, "trainer.epochs=100",
                            f"hydra.run.dir={run_dir}"])
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "worker_1.log").is_file() or "step 1/" not in (run_dir / "worker_1.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 never started training"
            time.sleep(0.5)
        pid = worker_pid(tmp_path, rank=1)
        assert pid is not None
        psutil.Process(pid).send_signal(signal.SIGKILL)
        code, output = finish(proc, tmp_path, timeout=120)
    finally:
        stop(proc, group=True)
    assert code != 0  # finish() waited at most 120 s: how fast is not a test's business on a busy machine
    assert f"rank 1 (pid {pid}) was killed by SIGKILL" in output, output[-3000:]
    assert f"{run_dir}/msrun" in output
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "rank 1" in run.data.tags["error"]
    assert not job_processes(tmp_path)  # scheduler and rank 0 are gone too
    assert not (run_dir / RESULT_FILE).exists()


def test_a_closed_terminal_stops_the_whole_job_and_marks_its_run_killed(images: Path, tmp_path: Path) -> None:
    """SIGHUP to the launcher (the terminal that started it closed): the launcher stops msrun's scheduler and every
    worker (they run in their own session, where the terminal's SIGHUP does not reach them), exits 129, and the
    MLflow run is KILLED."""
    run_dir = tmp_path / "outputs" / "chosen"
    proc = start(tmp_path, ["hardware=cpu_x2", f"data.source.root={images}", *DETERMINISTIC, "trainer.epochs=100",
                            f"hydra.run.dir={run_dir}"])
    try:
        log = run_dir / "worker_1.log"
        wait_until(lambda: log.is_file() and "step 1/" in log.read_text(), proc, "rank 1 training", timeout=300)
        proc.send_signal(signal.SIGHUP)
        code, output = finish(proc, tmp_path, timeout=120)
    finally:
        stop(proc, group=True)
    assert code == 129, output[-3000:]
    assert "interrupted" in output
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert not job_processes(tmp_path)  # scheduler and both workers are gone
