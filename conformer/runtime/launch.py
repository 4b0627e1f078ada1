"""Multi-worker jobs: build the msrun command line and environment, run msrun, supervise it, report rank 0.

`python run.py hardware=ascend8` lands here (the parent): the script re-runs itself under msrun with the same
overrides and one fixed run dir. msrun starts the scheduler and this node's workers; its `--join` loop kills
the other workers when one of them exits with an error. The parent streams rank 0's log, kills whatever is
left when msrun is done (or stuck, or interrupted), ends the MLflow run that a killed rank 0 left RUNNING,
and returns rank 0's objective (written to `RESULT_FILE` in the run dir) or raises `LaunchError`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from conformer.errors import LaunchError
from conformer.runtime.hardware import SCHEDULER_ROLE, WORKER_ROLE, mindspore_log_level, world_size
from conformer.runtime.paths import PROJECT_ROOT_ENV
from conformer.runtime.signals import interruptible, signals_ignored
from conformer.vocabulary import BACKENDS

log = logging.getLogger(__name__)

RESULT_FILE = "worker_result.json"
DEFAULT_LOG_DIR = "msrun"
# After msrun reports a dead worker it kills the others, then waits for the scheduler; past this, we kill it.
FAILURE_GRACE_S = 5.0
TERMINATE_GRACE_S = 5.0
POLL_S = 0.5
INHERITED_ENV = (PROJECT_ROOT_ENV, "ONEDNN_MAX_CPU_ISA", "GLOG_v", "MLFLOW_TRACKING_URI")
_WORKER_EXIT = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LaunchPlan:
    """One node's msrun invocation: what to run, with which environment, where the logs go."""

    command: tuple[str, ...]
    env_changes: Mapping[str, str]  # set on top of the parent's environment ("PATH" is a prefix)
    run_dir: Path
    log_dir: Path
    workers: int  # on this node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    cluster_time_out: int
    summary: str = ""  # device, backend and parallel mode, for people
    script: str = ""  # the script msrun runs (how its workers are recognised)
    python_shim: Path | None = None  # a `python` link to be created when the interpreter's dir has none

    @property
    def world_size(self) -> int:
        return self.workers * self.nodes

    @property
    def ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.workers, (self.node_rank + 1) * self.workers)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key, value in self.env_changes.items():
            env[key] = value + os.pathsep + env.get("PATH", "") if key == "PATH" else value
        return env

    def worker_log(self, rank: int) -> Path:
        return self.log_dir / f"worker_{rank}.log"

    def describe(self, base_env: Mapping[str, str] | None = None) -> str:
        """The dry-run text: command line, environment, and what msrun sets in each process."""
        base_env = os.environ if base_env is None else base_env
        first, last = self.ranks[0], self.ranks[-1]
        lines = [f"msrun launch plan: {self.world_size} workers = {self.nodes} node(s) x {self.workers}; "
                 f"this node: node_rank {self.node_rank}, global ranks {first}..{last}",
                 *([self.summary] if self.summary else []), f"run dir: {self.run_dir}",
                 "command:", "  " + shlex.join(self.command), "environment set by the launcher:"]
        lines += [f"  {k}={v}{os.pathsep}$PATH" if k == "PATH" else f"  {k}={v}"
                  for k, v in self.env_changes.items()]
        inherited = [f"  {k}={base_env[k]}" for k in INHERITED_ENV if k in base_env]
        if inherited:
            lines += ["environment inherited:", *inherited]
        roles = f"MS_ROLE={SCHEDULER_ROLE} (scheduler, node 0 only) | {WORKER_ROLE}"
        lines += ["environment set by msrun in each process:",
                  f"  {roles}", f"  MS_SCHED_HOST={self.master_addr}", f"  MS_SCHED_PORT={self.master_port}",
                  f"  MS_WORKER_NUM={self.world_size}", f"  MS_TOPO_TIMEOUT={self.cluster_time_out}",
                  f"  RANK_SIZE={self.world_size}", f"  RANK_ID={first}..{last}",
                  f"  DEVICE_ID=0..{self.workers - 1}",
                  f"logs: {self.log_dir}/worker_<rank>.log" + (", scheduler.log" if self.node_rank == 0 else "")]
        return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for single-node jobs with master_port=null)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _python_dir(executable: str) -> Path | None:
    """The interpreter's folder when its `python` is this interpreter (msrun runs the first `python` on PATH)."""
    folder = Path(executable).parent
    candidate = folder / "python"
    try:
        return folder if candidate.is_file() and os.path.samefile(candidate, executable) else None
    except OSError:
        return None


def _msrun_command(executable: str) -> list[str]:
    script = Path(executable).parent / "msrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [executable, "-c", "import sys; from mindspore.parallel.cluster.run import main; sys.exit(main())"]


def _bind_flag(value: Any) -> str:
    """msrun's --bind_core takes True/False or a JSON dict {"device0": ["0-23"], ...}."""
    if isinstance(value, Mapping):
        return json.dumps({str(k): [str(c) for c in v] for k, v in value.items()})
    return str(bool(value))


def log_dir_for(hardware: Mapping[str, Any], run_dir: Path) -> Path:
    """`hardware.msrun.log_dir` (relative to the run dir), default `<run_dir>/msrun`."""
    configured = (hardware.get("msrun") or {}).get("log_dir") or DEFAULT_LOG_DIR
    return (Path(run_dir) / Path(configured).expanduser()).resolve()


def kernel_threads(target: str, workers: int, bind_core: Any) -> dict[str, str]:
    """The project's CPU kernels' thread count for each of `workers` processes sharing this machine's cores: the
    cores divided among them (each kernel pool would otherwise take every core, and the pools' threads spin). msrun's
    core binding, or another device than the CPU, needs nothing: a bound worker's pool sees its own cores."""
    if target != "CPU" or workers < 2 or bind_core:
        return {}
    return {"CONFORMER_KERNEL_THREADS": str(max(1, len(os.sched_getaffinity(0)) // workers))}


def plan_launch(hardware: Mapping[str, Any], script: Path, script_args: Sequence[str], run_dir: Path, *,
                executable: str | None = None) -> LaunchPlan:
    """The msrun invocation for `hardware` (a checked hardware config) re-running `script script_args`."""
    executable = executable or sys.executable
    run_dir = Path(run_dir).resolve()
    msrun = hardware.get("msrun") or {}
    workers, nodes = int(hardware["workers"]), int(hardware.get("nodes", 1))
    node_rank = int(hardware.get("node_rank", 0))
    addr = str(hardware.get("master_addr") or "127.0.0.1")
    port = hardware.get("master_port") or free_port()
    timeout = int(msrun["cluster_time_out"])
    log_dir = log_dir_for(hardware, run_dir)
    python_dir = _python_dir(executable)
    shim = None if python_dir is not None else log_dir / "bin" / "python"
    script = str(Path(script).resolve())
    command = [*_msrun_command(executable),
               f"--worker_num={world_size(hardware)}", f"--local_worker_num={workers}",
               f"--master_addr={addr}", f"--master_port={port}", f"--node_rank={node_rank}",
               f"--log_dir={log_dir}", "--join=True", f"--cluster_time_out={timeout}",
               f"--bind_core={_bind_flag(msrun.get('bind_core', False))}",
               f"--tail_worker_log={node_rank * workers}",  # stream this node's first rank (rank 0 on node 0)
               script, *script_args]
    target = hardware.get("device_target", "CPU")
    summary = (f"{target} x {world_size(hardware)}, backend {hardware.get('backend') or BACKENDS[target]}, "
               f"{hardware.get('parallel_mode', 'data_parallel')} (gradients "
               f"{'mean' if hardware.get('gradients_mean', True) else 'sum'} over ranks), "
               f"AMP {hardware.get('amp_level', 'O0')}")
    env_changes = {"PATH": str(python_dir or shim.parent), "PYTHONUNBUFFERED": "1",
                   **kernel_threads(target, workers, msrun.get("bind_core", False)), **mindspore_log_level(target),
                   **{str(k): str(v) for k, v in (hardware.get("env") or {}).items()}}
    return LaunchPlan(command=tuple(command), env_changes=env_changes, run_dir=run_dir, log_dir=log_dir,
                      workers=workers, nodes=nodes, node_rank=node_rank, master_addr=addr, master_port=int(port),
                      cluster_time_out=timeout, summary=summary, script=script, python_shim=shim)


# ---------------------------------------------------------------------------------------------------- results
def write_result(run_dir: Path, objective: float | None) -> Path:
    """Rank 0's objective for the launcher (atomic write)."""
    path = Path(run_dir) / RESULT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"objective": objective}))
    os.replace(tmp, path)
    return path


def read_result(run_dir: Path) -> float | None:
    """Rank 0's objective; FileNotFoundError when rank 0 did not finish."""
    value = json.loads((Path(run_dir) / RESULT_FILE).read_text())["objective"]
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------- supervise
@dataclass(frozen=True)
class WorkerExit:
    pid: int
    code: int
    rank: int | None

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "a worker"
        if self.code < 0:
            try:
                how = f"was killed by {signal.Signals(-self.code).name}"
            except ValueError:
                how = f"was killed by signal {-self.code}"
        else:
            how = f"exited with code {self.code}"
        return f"{who} (pid {self.pid}) {how}"


@dataclass
class Outcome:
    """How msrun ended: its exit code, the worker exits it reported, whether we were interrupted."""

    returncode: int
    failures: list[WorkerExit] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the launcher (SIGINT, SIGTERM), 0 if none
    stuck: bool = False


class _ProcessTree:
    """msrun's descendants (scheduler, workers, tail), remembered while msrun lives: they outlive it as orphans.

    `ranks` maps worker pids to their RANK_ID, read from /proc once the worker runs `script` (a fresh fork still
    shows msrun's environment).
    """

    def __init__(self, root_pid: int, script: str) -> None:
        self.root_pid, self.script = root_pid, script
        self.procs: dict[int, psutil.Process] = {}
        self.ranks: dict[int, int] = {}
        self._known: set[int] = set()  # classified: a worker with its rank, or anything that is not a worker

    def refresh(self) -> None:
        try:
            self.procs.update((p.pid, p) for p in psutil.Process(self.root_pid).children(recursive=True)
                              if p.pid not in self.procs)
        except psutil.NoSuchProcess:
            return
        for pid in set(self.procs) - self._known:
            try:
                cmdline, env = self.procs[pid].cmdline(), self.procs[pid].environ()
            except (psutil.Error, OSError):
                continue
            if self.script not in cmdline:
                if cmdline and "python" not in Path(cmdline[0]).name:  # e.g. msrun's `tail -f`
                    self._known.add(pid)
                continue
            role = env.get("MS_ROLE")
            if role == WORKER_ROLE and env.get("RANK_ID", "").isdigit():
                self.ranks[pid] = int(env["RANK_ID"])
            if role:  # else a fork of msrun (its command line names the script too) before it runs the worker
                self._known.add(pid)

    def alive(self) -> list[psutil.Process]:
        alive = []
        for proc in self.procs.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """SIGTERM everything left (rank 0 may still end its MLflow run), SIGKILL what survives `grace_s`."""
        procs = self._signal(self.alive(), signal.SIGTERM)
        _, survivors = psutil.wait_procs(procs, timeout=grace_s)
        self._signal(survivors, signal.SIGKILL)
        psutil.wait_procs(survivors, timeout=grace_s)

    @staticmethod
    def _signal(procs: Iterable[psutil.Process], sig: signal.Signals) -> list[psutil.Process]:
        sent = []
        for proc in procs:
            try:
                proc.send_signal(sig)
                sent.append(proc)
            except psutil.NoSuchProcess:
                pass
        return sent


class _Echo(threading.Thread):
    """Copies msrun's output (with rank 0's tailed log) to `out` and collects the worker exits it reports."""

    def __init__(self, source: IO[str], out: IO[str]) -> None:
        super().__init__(daemon=True)
        self.source, self.out = source, out
        self.exits: list[tuple[int, int]] = []

    def run(self) -> None:
        for line in self.source:
            match = _WORKER_EXIT.search(line)
            if match:
                self.exits.append((int(match[1]), int(match[2])))
            self.out.write(line)
            self.out.flush()


def supervise(plan: LaunchPlan, out: IO[str] | None = None) -> Outcome:
    """Run msrun for `plan` until it exits; never leaves a worker or the scheduler behind."""
    out = out or sys.stdout
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    if plan.python_shim is not None and not plan.python_shim.exists():
        plan.python_shim.parent.mkdir(parents=True, exist_ok=True)
        plan.python_shim.symlink_to(sys.executable)
    # own session: a Ctrl-C in the terminal reaches only us, and we stop the job in order
    proc = subprocess.Popen(plan.command, env=plan.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    echo = _Echo(proc.stdout, out)
    echo.start()
    tree = _ProcessTree(proc.pid, plan.script)
    outcome = Outcome(returncode=0)
    try:
        with interruptible():  # SIGTERM (scancel, kill) stops the job like Ctrl-C
            failed_at = None
            while proc.poll() is None:
                tree.refresh()
                if echo.exits and failed_at is None:
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                    log.warning("msrun still runs %.0f s after a worker failed: stopping the scheduler and any "
                                "worker left", FAILURE_GRACE_S)
                    outcome.stuck = True
                    break
                time.sleep(POLL_S)
    except KeyboardInterrupt as err:
        outcome.interrupted = getattr(err, "signum", signal.SIGINT)
        log.warning("interrupted: stopping the %d workers", plan.workers)
    finally:
        with signals_ignored():  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            tree.stop()
            if proc.poll() is None:
                proc.kill()
            outcome.returncode = proc.wait()
            echo.join(timeout=10)
    outcome.failures = [WorkerExit(pid, code, tree.ranks.get(pid)) for pid, code in echo.exits]
    return outcome


# ---------------------------------------------------------------------------------------------------- launch
def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _failure_message(plan: LaunchPlan, outcome: Outcome) -> str:
    if outcome.interrupted:
        return f"the {plan.world_size}-worker job was interrupted; logs in {plan.log_dir}"
    if outcome.failures:
        first = outcome.failures[0]
        message = (f"the {plan.world_size}-worker job failed: {first.describe()}, so the other workers were "
                   f"stopped. Logs: {plan.log_dir}")
        if first.rank is not None:
            tail = _tail(plan.worker_log(first.rank))
            message += f"\nlast lines of {plan.worker_log(first.rank)}:\n{tail}" if tail else ""
        return message
    return (f"the {plan.world_size}-worker job failed: msrun exited with code {outcome.returncode} and rank 0 "
            f"reported no result{' (msrun hung after the failure)' if outcome.stuck else ''}. "
            f"Logs: {plan.log_dir} (scheduler.log, worker_<rank>.log)")


def launch(plan: LaunchPlan, end_runs: Callable[[str, str], list[str]] | None = None,
           out: IO[str] | None = None) -> float | None:
    """Run `plan` and return rank 0's objective, or raise LaunchError.

    `end_runs(status, reason)` ends the MLflow runs that the job left RUNNING (rank 0 killed mid-collective).
    """
    result = plan.run_dir / RESULT_FILE
    is_main_node = plan.node_rank == 0
    if is_main_node:
        result.unlink(missing_ok=True)
    log.info("launching %d workers with msrun (logs in %s):\n  %s", plan.world_size, plan.log_dir,
             shlex.join(plan.command))
    outcome = supervise(plan, out)
    succeeded = outcome.returncode == 0 and not outcome.interrupted
    if succeeded and not is_main_node:  # rank 0, on node 0, reports the result (and may still be finishing)
        return None
    if succeeded and result.is_file():
        if end_runs is not None:
            end_runs("FAILED", "rank 0 exited without ending its MLflow run")
        return read_result(plan.run_dir)
    message = _failure_message(plan, outcome)
    if end_runs is not None:
        ended = end_runs("KILLED" if outcome.interrupted else "FAILED", message.splitlines()[0])
        if ended:
            message += f"\nMLflow run {', '.join(ended)} marked {'KILLED' if outcome.interrupted else 'FAILED'}"
    rank0 = next((f for f in outcome.failures if f.rank == 0 and f.code > 0), None)
    raise LaunchError(message, exit_code=128 + outcome.interrupted if outcome.interrupted else
                      rank0.code if rank0 else 1)
