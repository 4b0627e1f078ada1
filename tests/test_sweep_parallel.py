"""Sweeps whose trials run in parallel, each in a process of its own (hydra/launcher=joblib, submitit_local):

- how a trial's share of the machine is computed (cores, devices) and refused (more jobs than devices);
- a 2x2 grid on two joblib workers in which one trial fails its config check and one trial process is killed:
  one parent, every child nested from its own process, running at the same time, the killed one FAILED, the summary
  right although the trials finished out of order;
- Ctrl-C on a parallel sweep stops every trial process;
- submitit's local executor runs a 2-trial grid through the same code path.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conformer.errors import ConfigError
from conformer.sweeps.callback import PARENT_FILE
from conformer.sweeps.launch import (
    TRIAL_ENV,
    TrialSlot,
    check_parallel_devices,
    concurrent_jobs,
    trial_resources,
)

from .helpers import REPO, compose_config, postgres_bin, postgres_server, run_py, run_py_to_end, stop, wait_until
from .test_sweep import GRID, MONITOR, Sweep, printed_table, sweep_overrides

CORES = len(os.sched_getaffinity(0))
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def test_trials_share_the_cores_and_spread_over_the_devices() -> None:
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    assert [concurrent_jobs({**joblib, "n_jobs": n}) for n in (3, -1, -2)] == [3, CORES, max(1, CORES - 1)]
    assert concurrent_jobs({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}) == 1

    cpu = compose_config(["hardware=cpu"]).hardware
    threads = max(1, CORES // 3)
    overrides, env = trial_resources(cpu, TrialSlot(number=4, launcher="joblib", jobs=3, threads=threads))
    assert overrides == []
    if "CONFORMER_KERNEL_THREADS" not in os.environ:  # the user's own setting wins
        assert env == {"CONFORMER_KERNEL_THREADS": str(threads)}

    gpu = compose_config(["hardware=gpu", "hardware.devices=3"]).hardware
    cards = [trial_resources(gpu, TrialSlot(k, "joblib", 3, None))[0] for k in range(5)]
    assert cards == [[f"hardware.device_id={k % 3}"] for k in range(5)]
    assert trial_resources(gpu, TrialSlot(1, "submitit", 1, None))[0] == []  # SLURM's allocation decides

    with pytest.raises(ConfigError, match=r"n_jobs=4 runs 4 trials at once on 3 GPU device\(s\).*share_devices"):
        check_parallel_devices(gpu, 4)
    check_parallel_devices(compose_config(["hardware=gpu", "hardware.devices=3", "hardware.share_devices=true"])
                           .hardware, 4)
    with pytest.raises(ConfigError, match="hardware.device_id=-1 must be an integer >= 0"):
        from conformer.runtime.hardware_checks import check_hardware

        check_hardware(compose_config(["hardware=gpu", "hardware.device_id=-1"]).hardware)


def test_more_parallel_trials_than_devices_is_one_config_line_before_the_sweep(tmp_path: Path) -> None:
    proc = run_py_to_end(["-m", "optim.schedule.base_lr=1e-3,2e-3", *JOBLIB, "hydra.launcher.n_jobs=3",
                          "hardware=gpu", "hardware.devices=2", f"paths.root={tmp_path}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: hydra.launcher.n_jobs=3 runs 3 trials at once on 2 GPU device(s): lower n_jobs to 2, set "
        "hardware.devices, or let trials share devices with hardware.share_devices=true")
    assert not (tmp_path / "mlflow.db").exists()  # no parent run was opened


def trial_process(sweep: Sweep, number: int) -> psutil.Process | None:
    """The process of trial `number`, once its MLflow run exists (its `pid` tag)."""
    if not any((sweep.root / "outputs" / "multirun").glob(f"*/*/{PARENT_FILE}")):
        return None  # the store is not touched from here while the sweep creates it
    for run in sweep.runs():
        if run.data.tags.get("run_dir", "").endswith(f"/{number}") and run.info.status == "RUNNING":
            return psutil.Process(int(run.data.tags["pid"]))
    return None


def test_parallel_grid_with_a_failing_and_a_killed_trial(tmp_path: Path) -> None:
    """Trials 0 and 1 train at once; trial 3 fails its config check; trial 2's process is killed mid-run."""
    sweep = Sweep(tmp_path, 0, "", "")
    proc = run_py([*GRID, *JOBLIB, *sweep_overrides(tmp_path)], tmp_path)
    try:
        wait_until(lambda: trial_process(sweep, 2) is not None, proc, "trial 2's run", 600)
        victim = trial_process(sweep, 2)
        assert victim.pid != proc.pid and victim.environ()[TRIAL_ENV] == "2"
        if "CONFORMER_KERNEL_THREADS" not in os.environ:  # two trials at once: half the cores each
            assert victim.environ()["CONFORMER_KERNEL_THREADS"] == str(max(1, CORES // 2))
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        stop(proc)
    assert proc.returncode == 1, err[-3000:]
    assert "2 trial(s) failed" in err
    assert f"trial 2 failed: trial process (pid {victim.pid}) was killed by SIGKILL" in err

    [parent] = Sweep(tmp_path, 0, out, err).parents()
    assert parent.info.status == "FINISHED"
    children = sweep.children(parent.info.run_id)
    assert sorted(children) == [0, 1, 2, 3]
    assert all(run.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id for run in children.values())
    assert [children[n].info.status for n in range(4)] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert children[2].data.tags["error"] == f"trial process (pid {victim.pid}) was killed by SIGKILL"
    assert children[3].data.tags["error"].startswith("ConfigError: optim.schedule.warmup_epochs=2")
    # trials 0 and 1 ran at the same time, each in a process of its own
    first, second = children[0].info, children[1].info
    assert first.start_time < second.end_time and second.start_time < first.end_time
    pids = {int(children[n].data.tags["pid"]) for n in range(3)}
    assert len(pids) == 3 and proc.pid not in pids
    # the summary: best of the finished trials, counts, the table
    best = {n: sweep.best(children[n].info.run_id) for n in (0, 1)}
    winner = min(best, key=lambda n: (-best[n], n))
    assert parent.data.tags["best.trial"] == str(winner)
    assert parent.data.metrics[f"best/{MONITOR}"] == pytest.approx(best[winner])
    assert {k: parent.data.metrics[k] for k in ("sweep/trials", "sweep/finished", "sweep/failed")} == {
        "sweep/trials": 4, "sweep/finished": 2, "sweep/failed": 2}
    assert [row[0] for row in printed_table(out)] == [str(winner), str(1 - winner), "2", "3"]
    # one run dir per trial; the killed trial's checkpoints are its own
    run_dirs = {Path(children[n].data.tags["run_dir"]) for n in range(4)}
    assert len(run_dirs) == 4 and len({d.parent for d in run_dirs}) == 1
    assert all((Path(children[n].data.tags["run_dir"]) / "checkpoints" / "last.ckpt").is_file() for n in (0, 1))


def descendants_of(root: Path) -> list[psutil.Process]:
    """Processes that run for the project root `root` (run_py gives each its CONFORMER_PROJECT_ROOT)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CONFORMER_PROJECT_ROOT") == str(root):
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def test_ctrl_c_stops_every_trial_process(tmp_path: Path) -> None:
    sweep = Sweep(tmp_path, 0, "", "")
    args = ["-m", "optim.schedule.base_lr=1e-3,2e-3", *JOBLIB, *sweep_overrides(tmp_path, "trainer.epochs=3",
                                                                         "optim.schedule.warmup_epochs=0")]
    proc = run_py(args, tmp_path, start_new_session=True)  # its own process group, as a terminal's job
    try:
        wait_until(lambda: trial_process(sweep, 0) is not None and trial_process(sweep, 1) is not None, proc,
                   "both trials' runs", 600)
        trials = [trial_process(sweep, 0), trial_process(sweep, 1)]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        proc.communicate(timeout=300)
    finally:
        stop(proc, group=True)
    assert proc.returncode != 0
    assert not any(trial.is_running() and trial.status() != psutil.STATUS_ZOMBIE for trial in trials)
    assert descendants_of(tmp_path) == []  # no loky worker, no trial, no helper left
    [parent] = sweep.parents()
    assert parent.info.status in ("KILLED", "FAILED")
    assert all(run.info.status != "RUNNING" for run in sweep.children(parent.info.run_id).values())


def test_submitit_local_runs_a_two_trial_grid(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    proc = run_py_to_end(["-m", "optim.schedule.base_lr=1e-3,2e-3", "hydra/launcher=submitit_local",
                          "hydra.launcher.timeout_min=30", *sweep_overrides(tmp_path, "trainer.epochs=1",
                                                                              "optim.schedule.warmup_epochs=0")],
                         tmp_path, timeout=600, env={"PYTHONPATH": str(REPO)})  # submitit's job imports conformer
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = Sweep(tmp_path, 0, proc.stdout, proc.stderr)
    [parent] = sweep.parents()
    children = sweep.children(parent.info.run_id)
    assert sorted(children) == [0, 1] and all(r.info.status == "FINISHED" for r in children.values())
    assert parent.data.metrics["sweep/finished"] == 2
    assert len({r.data.tags["pid"] for r in children.values()}) == 2
    sweep_dir = Path(parent.data.tags["run_dir"])
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's own job folders



IN_CI = os.environ.get("CI", "").lower() == "true"


def postgres_or_skip() -> None:
    """The PostgreSQL test needs the server programs and psycopg2: it skips without them, and fails under CI=true
    (`.ci/run` installs Debian's postgresql and the dev extra's psycopg2-binary)."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing = "psycopg2 (the dev extra) is not installed"
    else:
        missing = None if postgres_bin() is not None else "no PostgreSQL server programs (apt-get install postgresql)"
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(f"the PostgreSQL test cannot run: {missing}")


def test_two_optuna_workers_share_one_study_in_postgresql(tmp_path: Path) -> None:
    """Worker A runs batches of 2 trials at once (the sweeper's n_jobs on joblib), worker B (basic launcher) joins
    the study once A has opened its parent run: 3 trials between them, distinct numbers, one parent, one best."""
    pytest.importorskip("optuna", reason="the [sweep] extra (optuna) is not installed")
    postgres_or_skip()
    from conformer.sweeps.optuna_store import PARENT_ATTR, WORKER_ATTR, load_study

    password = "pg-Secret-29"
    with postgres_server(password) as url:
        common = ["sweep=optuna_lr", f"hydra.sweeper.storage='{url}'", "hydra.sweeper.n_trials=3",
                  *sweep_overrides(tmp_path, "trainer.epochs=1", "optim.schedule.warmup_epochs=0")]
        first = run_py([*common, "hydra.sweeper.n_jobs=2", *JOBLIB], tmp_path)
        second = None
        try:
            def has_parent() -> bool:
                study = load_study(url, "optuna_lr")
                return study is not None and PARENT_ATTR in study.user_attrs

            wait_until(has_parent, first, "the study's parent run")
            second = run_py(common, tmp_path)
            outputs = [proc.communicate(timeout=900) for proc in (first, second)]
        finally:
            for proc in (first, second):
                if proc is not None:
                    stop(proc)
        assert (first.returncode, second.returncode) == (0, 0), outputs[0][1][-2000:] + outputs[1][1][-2000:]
        study = load_study(url, "optuna_lr")
        trials = study.get_trials(deepcopy=False)
        assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
        workers = [t.system_attrs[WORKER_ATTR].split()[1] for t in trials]
        assert sorted(map(int, workers)) == sorted([first.pid, first.pid, second.pid])
        parent_id, best_value = study.user_attrs[PARENT_ATTR], study.best_value

    sweep = Sweep(tmp_path, 0, "", "")
    [parent] = sweep.parents()
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    children = sweep.children(parent.info.run_id)  # by run dir name: the study's trial numbers
    assert sorted(children) == [0, 1, 2] and all(r.info.status == "FINISHED" for r in children.values())
    assert len({r.data.tags["run_dir"] for r in children.values()}) == 3
    # MLflow and Optuna agree on every trial's objective, and on the best
    for trial in trials:
        assert sweep.best(children[trial.number].info.run_id) == pytest.approx(trial.value)
    assert parent.data.metrics[f"best/{MONITOR}"] == pytest.approx(best_value)
    values = {children[t.number].info.run_id: t.value for t in trials}
    assert values[parent.data.tags["best.run_id"]] == best_value  # a tie may name another trial than Optuna's
    assert {k: parent.data.metrics[k] for k in ("sweep/trials", "sweep/finished", "sweep/failed")} == {
        "sweep/trials": 3, "sweep/finished": 3, "sweep/failed": 0}
    # the storage's password is in no console line, log, Hydra file or MLflow value
    assert not any(password in text for pair in outputs for text in pair)
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file() and p.suffix in (".yaml", ".log", ".txt")]
    assert files and not [p for p in files if password in p.read_text(errors="replace")]
    assert password not in str(parent.data.params) + str(parent.data.tags)


def test_the_slurm_launcher_config_is_submitits_with_the_settings_a_user_edits() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    from hydra import compose, initialize_config_dir

    from .helpers import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.gres=gpu:1"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gres, launcher.timeout_min, launcher.nodes) == ("gpu", "gpu:1", 240, 1)
    assert concurrent_jobs(launcher) == 1  # each trial has its own allocation
