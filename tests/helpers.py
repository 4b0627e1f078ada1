"""Shared by the integration tests: tiny datasets, tiny run configs, `python run.py`, a real `mlflow server`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from conformer.runtime.launch import free_port

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
RUN_PY = REPO / "run.py"

# conformer_nano cut to one stage (depth 3) at 16 px: the train step compiles in ~15 s on 2 cores.
TINY_OVERRIDES = ("+model.depth=3", "data.image_size=16", "trainer.log_every_n_steps=2",
                  "optim.schedule.warmup_epochs=1")
TINY_TRAIN, TINY_VAL, TINY_CLASSES, TINY_BATCH = 32, 8, 3, 16  # per class: 6 steps/epoch, 24 val images


def tiny_folder(base: Path) -> Path:
    """An ImageFolder of 3 classes x (32 train + 8 val) 16x16 PNGs under `base`, written once per base dir."""
    from conformer.data.generated import write_image_folder

    root = base / "tiny-folder"
    done = root / ".complete"
    if not done.is_file():
        write_image_folder(root, num_classes=TINY_CLASSES, train_per_class=TINY_TRAIN, val_per_class=TINY_VAL,
                           size=(16, 16), ext=".png")
        done.touch()
    return root


def tiny_overrides(root: Path, data_root: Path, *extra: str) -> list[str]:
    """Overrides for a ~30 s training of conformer_nano on `tiny_folder` data with everything under `root`."""
    return [f"paths.root={root}", "data=folder", f"data.source.root={data_root}", f"data.batch_size={TINY_BATCH}",
            *TINY_OVERRIDES, *extra]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python run.py <overrides>` would run with (without the hydra node)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def store_uri(root: Path) -> str:
    """The SQLite store `train_in_process` tracks to."""
    return sqlite_uri(root / "store.db")


def train_in_process(root: Path, data_root: Path, *extra: str, run_name: str = "run"
                     ) -> tuple[DictConfig, Path, float | None]:
    """`conformer.app.run` on a tiny composed config into `<root>/outputs/<run_name>`, tracked to `store_uri`.

    Returns (config, run dir, objective).
    """
    from conformer.app import run

    cfg = compose_config(tiny_overrides(root, data_root, f"tracking.uri={store_uri(root)}", *extra))
    run_dir = root / "outputs" / run_name
    return cfg, run_dir, run(cfg, run_dir)


def clean_env(project_root: Path) -> dict[str, str]:
    """Environment for a subprocess: this project root, no store inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "CONFORMER_PROJECT_ROOT": str(project_root)}


def run_py(args: Sequence[str], project_root: Path, env: dict[str, str] | None = None,
           **popen) -> subprocess.Popen:
    """Start `python run.py <args>` in `project_root` (so MindSpore's stray dirs land there, not in the repo), with
    `env` on top of `clean_env`."""
    return subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=project_root,
                            env={**clean_env(project_root), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_py_to_end(args: Sequence[str], project_root: Path, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_py(args, project_root, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False) -> None:
    """Signal `proc` (or its process group), then kill it if it does not exit within 20 s."""
    if proc.poll() is not None:
        return

    def send(signum: int) -> None:
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)

    send(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120.0,
               poll: float = 0.2) -> None:
    """Poll `ready()` every `poll` seconds while `proc` runs; fail early with its stderr when it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if ready():
            return
        time.sleep(poll)
    raise TimeoutError(f"no {what} after {timeout} s")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout} s")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, on one fixed port with its store and artifacts in `workdir` (or serving
    the existing `store`): killed and started again, it serves the same runs at the same URL."""

    def __init__(self, workdir: Path, store: str | None = None, proxy_artifacts: bool = False) -> None:
        self.workdir = workdir
        # proxied: clients see `mlflow-artifacts:` URIs and move every artifact over HTTP, as from another machine
        self.proxy_artifacts = proxy_artifacts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = store or sqlite_uri(workdir / "server.db")  # readable while the server is down
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.store,
             *(("--artifacts-destination", str(self.workdir / "server-artifacts")) if self.proxy_artifacts else
               ("--default-artifact-root", str(self.workdir / "server-artifacts"))), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.workdir, start_new_session=True,
            # No background job runner: it costs a process and leaves a directory in /dev/shm.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_healthy(self.url, self.proc)

    def kill(self) -> None:
        """SIGKILL the server and its workers (its own process group): no shutdown, connections refused."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop(self.proc, sig=signal.SIGKILL, group=True)
        self.proc.stderr.close()


@contextmanager
def mlflow_server(workdir: Path, store: str | None = None, proxy_artifacts: bool = False) -> Iterator[MlflowServer]:
    """A started `MlflowServer` in `workdir` (serving `store` if given), killed at the end."""
    server = MlflowServer(workdir, store, proxy_artifacts)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): on PATH, else Debian's /usr/lib/postgresql."""
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@contextmanager
def postgres_server(password: str, database: str = "optuna") -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 (a fresh cluster in a temp dir, password auth over TCP, no Unix
    socket) with an empty `database`: its URL. As root the server runs as `nobody` (PostgreSQL refuses root)."""
    import shutil
    import tempfile

    bin_dir = postgres_bin()
    assert bin_dir is not None, "no PostgreSQL server programs (Debian: apt-get install postgresql)"
    base = Path(tempfile.mkdtemp(prefix="pg-"))  # not under pytest's 0700 tmp: the server user must reach it
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    (base / "pw").write_text(password + "\n")
    if as_user:
        shutil.chown(base, "nobody")
        shutil.chown(base / "pw", "nobody")
    data, port = base / "data", free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={base / 'pw'}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"], check=True,
                   capture_output=True, text=True)
    ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*ctl, "-l", str(base / "server.log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''", "start"],
                   check=True, capture_output=True, text=True)
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                      dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {database}")
        connection.close()
        yield f"postgresql://postgres:{password}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
