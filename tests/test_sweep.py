"""Real sweeps through `python run.py`, each trial a tiny training nested under one MLflow parent run:

- a 2x2 grid (`-m`) in which one trial fails its config check: one parent, four children, the best-trial summary
  and counts on the parent, the printed table and `trials.csv` agree with the store, the exit code says a trial
  failed; the real MLflow UI shows the sweep in a headless Chromium;
- an Optuna study (`sweep=optuna_lr`) killed in its second trial and continued by the same command.
"""
from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conformer.sweeps.callback import PARENT_FILE
from conformer.sweeps.report import Trial, best_trial, format_table, objective_figure, parse_overrides, sort_trials
from conformer.tracking.summary import short_labels, short_value

from .helpers import (
    REPO,
    mlflow_server,
    run_py,
    run_py_to_end,
    sqlite_uri,
    stop,
    tiny_folder,
    tiny_overrides,
    wait_until,
)

MONITOR = "val/top1_sum"
# (2, 2) fails: warmup must be < epochs; the lr, one value typed its own way, is spelt one way in every view
GRID = ["-m", "trainer.epochs=1,2", "optim.schedule.warmup_epochs=0,2", "optim.schedule.base_lr=choice(0.0010)"]
BAD = "optim.schedule.warmup_epochs=2 must be below trainer.epochs=2"


def sweep_overrides(root: Path, *extra: str) -> list[str]:
    """Tiny trainings with everything under `root` (run_py's project root), epochs and warmup left to `extra`."""
    drop = ("paths.root=", "optim.schedule.warmup_epochs=")
    overrides = tiny_overrides(root, tiny_folder(root), "tracking.log_checkpoints=false")
    return [o for o in overrides if not o.startswith(drop)] + list(extra)


def test_trials_table_orders_by_the_objective_and_counts_outcomes() -> None:
    keys = ["optim.schedule.base_lr", "model.drop_path_rate"]
    trials = [Trial(0, "a", "FINISHED", 0.5, 10.0, {keys[0]: "0.0006466422717414558", keys[1]: "0.1"}),
              Trial(1, "b", "FAILED", None, 0.2, {keys[0]: "1e-3", keys[1]: "0.0"}),
              Trial(2, "c", "FINISHED", 0.7, 12.5, {keys[0]: "2e-3", keys[1]: "0.0"}),
              Trial(3, "d", "KILLED", 0.9, 3.0, {keys[0]: "3e-3", keys[1]: "0.0"}),  # never ranked: not finished
              Trial(4, "e", "FINISHED", 0.5, 9.0, {keys[0]: "4e-3", keys[1]: "0.1"})]
    ranked = sort_trials(trials, "max")
    assert [t.number for t in ranked] == [2, 0, 4, 1, 3] and best_trial(ranked).run_id == "c"
    assert [t.number for t in sort_trials(trials, "min")][:3] == [0, 4, 2]
    lines = format_table(ranked, "val/top1_sum", short_labels(keys)).splitlines()
    assert lines[0].split() == ["trial", "overrides", "val/top1_sum", "status", "wall", "time"]
    assert lines[3].split() == ["0", "base_lr=6.466e-4", "drop_path_rate=0.1", "0.5000", "FINISHED", "10.0s"]
    assert lines[5].split() == ["1", "base_lr=1e-3", "drop_path_rate=0", "-", "FAILED", "0.2s"]
    assert len({len(line) for line in lines[2:7]}) == 1  # aligned: the wall time column ends every row
    assert lines[-1] == "5 trials: 3 finished, 1 failed, 1 killed"
    assert best_trial(sort_trials([trials[1], trials[3]], "max")) is None


def test_a_swept_value_has_one_short_exact_spelling() -> None:
    """Whichever way a value was typed (or Hydra wrote it back): the shorter of positional and exponent form,
    exact; a search's long draw to 4 significant digits; integers and words as given."""
    spelt = {"2e-3": "2e-3", "0.002": "2e-3", "0.0020": "2e-3", "5e-4": "5e-4", "1.0e-3": "1e-3", "0.1": "0.1",
             "1e-1": "0.1", "5e-2": "0.05", "1.5e-3": "0.0015", "-0.001": "-1e-3", "1e5": "1e5", "0.0": "0",
             "0.0026512259742974293": "0.002651", "0.0006466422717414558": "6.466e-4", "12": "12", "adamw": "adamw",
             "nan": "nan"}
    assert {value: short_value(value) for value in spelt} == spelt


def _panel_trials(key: str, values: list[str]) -> list[Trial]:
    return [Trial(n, f"r{n}", "FINISHED", 50.0 + n, 1.0, {key: value}) for n, value in enumerate(values)]


@pytest.mark.parametrize(("spec", "values", "scale"), [
    ("tag(log, interval(1e-4, 3e-3))", ["0.00021", "0.00033", "0.0004", "0.00052", "0.0006", "0.00071"], "log"),
    ("interval(1e-4, 3e-3)", ["0.00021", "0.00033", "0.0004", "0.00052", "0.0006", "0.00071"], "linear"),
    ("1e-4,1e-3,1e-2", ["1e-4", "1e-3", "1e-2"], "log"),  # a grid over two decades
    ("5e-4,1e-3,2e-3", ["5e-4", "1e-3", "2e-3"], "linear"),  # within one
    (None, ["1e-5", "1e-3"], "log"),  # no space known: the values span more than a decade
])
def test_objective_plot_axis_follows_the_search_space_with_readable_ticks(spec, values, scale) -> None:
    key = "optim.schedule.base_lr"
    fig = objective_figure(_panel_trials(key, values), [key], MONITOR, {key: spec} if spec else None)
    [ax] = fig.axes
    assert ax.get_xscale() == scale
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    labels = [(tick.label1.get_text(), tick.label1.get_window_extent(renderer)) for tick in ax.xaxis.get_major_ticks()
              if tick.label1.get_visible() and tick.label1.get_text() and lo <= tick.get_loc() <= hi]
    assert len(labels) >= 2
    for i, (_, box) in enumerate(labels):  # side by side, none running into the next
        assert not any(box.overlaps(other) for _, other in labels[i + 1:]), [text for text, _ in labels]
    assert all(short_value(text) == text for text, _ in labels)  # spelt like the run names
    if spec and "(" not in spec:  # a grid: a tick at each value tried
        assert [text for text, _ in labels] == [short_value(v) for v in values]
    assert not any(t.label1.get_text() for t in ax.xaxis.get_minor_ticks())


@dataclass(frozen=True)
class Sweep:
    root: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")

    def runs(self) -> list:
        return self.client.search_runs([e.experiment_id for e in self.client.search_experiments()])

    def parents(self) -> list:
        return [run for run in self.runs() if run.data.tags.get("sweep") == "parent"]

    def children(self, parent_id: str) -> dict[int, object]:
        """The runs nested under `parent_id` by trial (job) number."""
        return {int(Path(r.data.tags["run_dir"]).name): r for r in self.runs()
                if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id}

    def best(self, run_id: str) -> float | None:
        values = [m.value for m in self.client.get_metric_history(run_id, MONITOR)]
        return max(values) if values else None


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Sweep:
    """One 2x2 grid sweep, shared by the store checks and the browser test."""
    root = tmp_path_factory.mktemp("grid")
    proc = run_py_to_end([*GRID, *sweep_overrides(root)], root, timeout=900)
    return Sweep(root, proc.returncode, proc.stdout, proc.stderr)


def printed_table(stdout: str) -> list[list[str]]:
    """The rows of the trials table printed when the sweep ended: [trial, overrides, objective, status, time]."""
    lines = stdout[stdout.rindex(f"trials by {MONITOR}"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial ")) + 2  # header, rule
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("---"))
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start:end]]


def test_grid_sweep_with_a_failing_trial_summarised_on_its_parent(grid_sweep: Sweep) -> None:
    sweep = grid_sweep
    # All four trials ran; the one that failed makes the exit code non-zero.
    assert sweep.returncode == 1, sweep.stderr[-3000:]
    assert f"trial 3 failed: {BAD}" in sweep.stderr and "1 trial(s) failed" in sweep.stderr

    [parent] = sweep.parents()
    assert re.fullmatch(r"sweep epochs,warmup_epochs,base_lr \d\d-\d\d \d\d:\d\d:\d\d", parent.info.run_name)
    assert parent.info.status == "FINISHED"  # a trial finished: the sweep has a result (the exit code says 1 failed)
    assert (parent.data.tags["sweeper"], parent.data.tags["sweep.name"]) == (
        "basic", "sweep epochs,warmup_epochs,base_lr")
    # a -m grid's search space, as written on the command line
    assert parent.data.params == {"sweep.trainer.epochs": "1,2", "sweep.optim.schedule.warmup_epochs": "0,2",
                                  "sweep.optim.schedule.base_lr": "choice(0.0010)"}
    children = sweep.children(parent.info.run_id)
    assert sorted(children) == [0, 1, 2, 3]
    swept = {n: parse_overrides(r.data.tags["overrides"]) for n, r in children.items()}
    assert [(swept[n]["trainer.epochs"], swept[n]["optim.schedule.warmup_epochs"]) for n in range(4)] == [
        ("1", "0"), ("1", "2"), ("2", "0"), ("2", "2")]
    assert [children[n].info.status for n in range(4)] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert [children[n].info.run_name for n in range(4)] == [
        f"base_lr=1e-3 epochs={e} warmup_epochs={w}" for e, w in ((1, 0), (1, 2), (2, 0), (2, 2))]
    assert children[3].data.tags["error"].startswith(f"ConfigError: {BAD}")
    # the failed trial has the params of the others, so it sits in the same columns of the runs table
    assert {"trainer.epochs", "optim.schedule.base_lr", "hardware.world_size"} <= set(children[3].data.params) <= \
        set(children[2].data.params)
    assert (children[3].data.params["trainer.epochs"], children[3].data.params["optim.schedule.warmup_epochs"]) == (
        "2", "2")

    # The parent: best trial, its value, its swept values, the counts.
    best_values = {n: sweep.best(r.info.run_id) for n, r in children.items()}
    assert best_values[3] is None and all(best_values[n] is not None for n in range(3))
    winner = min(range(3), key=lambda n: (-best_values[n], n))
    assert parent.data.metrics[f"best/{MONITOR}"] == pytest.approx(best_values[winner])
    # logged at the step at which the winner reached it: on the winner's curve in the charts, not alone at step 0
    winner_history = sweep.client.get_metric_history(children[winner].info.run_id, MONITOR)
    best_step = min(m.step for m in winner_history if m.value == best_values[winner])
    assert [m.step for m in sweep.client.get_metric_history(parent.info.run_id, f"best/{MONITOR}")] == [best_step]
    assert parent.data.tags["best.run_id"] == children[winner].info.run_id
    assert parent.data.tags["best.trial"] == str(winner)
    assert parent.data.tags["best.trainer.epochs"] == swept[winner]["trainer.epochs"]
    assert parent.data.tags["best.optim.schedule.warmup_epochs"] == swept[winner]["optim.schedule.warmup_epochs"]
    assert parent.data.tags["best.optim.schedule.base_lr"] == "1e-3"
    assert {k: parent.data.metrics[k] for k in ("sweep/trials", "sweep/finished", "sweep/failed")} == {
        "sweep/trials": 4, "sweep/finished": 3, "sweep/failed": 1}

    # The printed table is the store's, best first, the failed trial last.
    order = sorted(range(3), key=lambda n: (-best_values[n], n)) + [3]
    labels = {n: f"epochs={v['trainer.epochs']} warmup_epochs={v['optim.schedule.warmup_epochs']} base_lr=1e-3"
              for n, v in swept.items()}
    expected = [[str(n), labels[n], "-" if best_values[n] is None else f"{best_values[n]:.4f}", children[n].info.status]
                for n in order]
    assert [row[:4] for row in printed_table(sweep.stdout)] == expected
    assert "4 trials: 3 finished, 1 failed" in sweep.stdout

    # trials.csv and the plot are artifacts of the parent.
    artifacts = {f.path for f in sweep.client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "objective_vs_params.png"} <= artifacts
    local = Path(sweep.client.download_artifacts(parent.info.run_id, "trials.csv", str(sweep.root / "dl")))
    with local.open() as handle:
        header = next(csv.reader(handle))
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    assert header == ["trainer.epochs", "optim.schedule.warmup_epochs", "optim.schedule.base_lr", MONITOR, "status",
                      "trial", "wall_time_s", "run_id"]  # the swept values first
    assert {row["optim.schedule.base_lr"] for row in rows} == {"1e-3"}
    assert [row["run_id"] for row in rows] == [children[n].info.run_id for n in order]
    assert [row["status"] for row in rows] == [children[n].info.status for n in order]
    assert [float(row[MONITOR]) for row in rows[:3]] == pytest.approx([best_values[n] for n in order[:3]])
    assert rows[3][MONITOR] == "" and all(float(row["wall_time_s"]) > 0 for row in rows)
    png = Path(sweep.client.download_artifacts(parent.info.run_id, "objective_vs_params.png", str(sweep.root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One run dir per trial under one sweep dir; the failed trial trained nothing.
    trial_dirs = sorted((sweep.root / "outputs" / "multirun").glob("*/*/[0-9]"))
    assert [d.name for d in trial_dirs] == ["0", "1", "2", "3"]
    assert all((d / "checkpoints" / "last.ckpt").is_file() for d in trial_dirs[:3])
    assert not (trial_dirs[3] / "checkpoints").exists()


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
SCREENSHOT_DIR = REPO / "outputs" / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() == "true"


def browser_or_skip():
    """Playwright's sync API with a Chromium to drive; without either the test skips, but under CI=true it fails
    (`.ci/run` installs Debian's chromium and the dev extra's playwright)."""
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    missing = ("no Chromium on PATH (Debian: apt-get install chromium)" if CHROMIUM is None else
               "playwright (the dev extra) is not installed" if sync_api is None else None)
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(f"the headless-browser test cannot run: {missing}")
    return sync_api


def test_mlflow_ui_shows_the_sweep_with_its_objective(grid_sweep: Sweep, tmp_path: Path) -> None:
    """The link the sweep printed, opened in a fresh headless Chromium on the real MLflow UI: the runs table in
    model-training mode (not the GenAI page), the trials grouped under their sweep's parent, best first, with the
    swept params and the objective as columns; the screenshot is kept as a test artifact."""
    sync_api = browser_or_skip()
    [parent] = grid_sweep.parents()
    children = grid_sweep.children(parent.info.run_id)
    objective = f"best/{MONITOR}"
    link = re.search(r"compare them in the MLflow UI: \S+?/(#/experiments/\S+)", grid_sweep.stdout)
    assert link and "workflowType=machine_learning" in link.group(1), grid_sweep.stdout[-2000:]
    with mlflow_server(tmp_path, store=sqlite_uri(grid_sweep.root / "mlflow.db")) as server, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 800})
            page.goto(f"{server.url}/{link.group(1)}")
            expect = sync_api.expect
            # the runs table (the GenAI page has no run rows), the group of this sweep expanded
            expect(page.get_by_text(f"Group: {parent.info.run_name}").first).to_be_visible(timeout=60_000)
            for key in ("trainer.epochs", "optim.schedule.warmup_epochs"):  # swept params: columns
                expect(page.locator(f"[role=columnheader][col-id='params.`{key}`']").first).to_be_visible()
            expect(page.locator(f"[role=columnheader][col-id='metrics.`{objective}`']").first).to_be_visible()

            group = f"tag.sweep.parent.{parent.info.run_name}"  # the UI's row ids: <group>.<run id>

            def row(run_id: str | None):
                return page.locator(f"[role=row][row-id='{group}{'.' + run_id if run_id else ''}']").first

            def cell(run_id: str, column: str) -> str:
                return page.locator(f"[role=row][row-id='{group}.{run_id}'] [col-id='{column}']").first.inner_text()

            for run in children.values():
                expect(row(run.info.run_id)).to_be_visible()
                assert cell(run.info.run_id, "params.`trainer.epochs`") == run.data.params["trainer.epochs"]
            # nested: the group's row first, its four trials right below it, best first, the failed one (no value)
            # last; the parent's own row is not among them
            order = sorted(children.values(), key=lambda r: -r.data.metrics.get(objective, -math.inf))
            index = int(row(None).get_attribute("row-index"))
            assert [int(row(r.info.run_id).get_attribute("row-index")) for r in order] == list(range(index + 1,
                                                                                                     index + 5))
            for run in order[:3]:
                assert float(cell(run.info.run_id, f"metrics.`{objective}`")) == pytest.approx(
                    run.data.metrics[objective], abs=1e-3)
            assert cell(order[3].info.run_id, f"metrics.`{objective}`") == "-"
            expect(page.locator(f"[role=row][row-id$='.{parent.info.run_id}']")).to_have_count(0)
            shot = page.screenshot(path=str(tmp_path / "mlflow-ui-sweep.png"))
        finally:
            browser.close()
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    (SCREENSHOT_DIR / "mlflow-ui-sweep.png").write_bytes(shot)
    print(f"screenshot: {SCREENSHOT_DIR / 'mlflow-ui-sweep.png'}")


@pytest.mark.parametrize("group", ["sweep=lr_grid", "+sweep=optuna_lr"])
def test_a_named_sweep_turns_on_multirun_by_itself(group: str, tmp_path: Path) -> None:
    proc = run_py_to_end([group, "--cfg", "hydra"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  mode: MULTIRUN$", proc.stdout, re.M)
    if "optuna" in group:  # the study: stored next to the MLflow store, named after the sweep
        assert "storage: sqlite:///${paths.root}/optuna.db" in proc.stdout and "study_name: optuna_lr" in proc.stdout


def study_trials(root: Path) -> list[tuple[int, str]]:
    """(number, state) of the optuna_lr study's trials, read from the SQLite file itself."""
    with sqlite3.connect(root / "optuna.db") as db:
        return db.execute("SELECT t.number, t.state FROM trials t JOIN studies s ON t.study_id = s.study_id "
                          "WHERE s.study_name = 'optuna_lr' ORDER BY t.number").fetchall()


def test_optuna_study_killed_and_continued_by_the_same_command(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="the [sweep] extra (optuna) is not installed")
    from conformer.sweeps.optuna_store import load_study

    args = sweep_overrides(tmp_path, "trainer.epochs=1", "optim.schedule.warmup_epochs=0", "hydra.sweeper.n_trials=2")
    sweep = Sweep(tmp_path, 0, "", "")

    # `+sweep=` runs the sweep too (no -m). Kill it hard once its second trial's run exists.
    proc = run_py(["+sweep=optuna_lr", *args], tmp_path)
    try:
        # The parent id file first: the store is not touched from here while the sweep creates it.
        wait_until(lambda: any((tmp_path / "outputs" / "multirun").glob(f"*/*/{PARENT_FILE}")), proc, "the parent")
        wait_until(lambda: any(r.data.tags.get("run_dir", "").endswith("/1") for r in sweep.runs()), proc,
                   "trial 1's run", 600)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert study_trials(tmp_path) == [(0, "COMPLETE"), (1, "RUNNING")]
    [parent] = sweep.parents()
    assert parent.info.status == "RUNNING"  # nobody ended it

    again = run_py_to_end(["sweep=optuna_lr", *args], tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]  # the trial that failed was an earlier run's
    # The study continued: the killed trial failed, the next number ran, n_trials counts the whole study.
    assert study_trials(tmp_path) == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}", "optuna_lr")
    # The same parent, continued and finished, holds all three trials.
    [same] = sweep.parents()
    assert same.info.run_id == parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert re.fullmatch(r"optuna_lr \d\d-\d\d \d\d:\d\d:\d\d", same.info.run_name)
    # its search space, as the sweep config writes it; each trial tagged with its sweep and named short
    assert same.data.params["sweep.optim.schedule.base_lr"] == "tag(log, interval(1e-4, 3e-3))"
    assert (same.info.status, same.data.tags["sweeper"], same.data.tags["resumed"]) == ("FINISHED", "optuna", "true")
    children = sweep.children(same.info.run_id)
    assert [children[n].info.status for n in (0, 1, 2)] == ["FINISHED", "FAILED", "FINISHED"]
    for child in children.values():
        assert (child.data.tags["sweep.parent_id"], child.data.tags["sweep.name"]) == (same.info.run_id, "optuna_lr")
        assert re.fullmatch(r"base_lr=\S{1,9} drop_path_rate=\S+ weight_decay=\S{1,9}", child.info.run_name)
    assert Path(children[2].data.tags["run_dir"]).parent != Path(children[0].data.tags["run_dir"]).parent
    # MLflow and Optuna agree on trial 2, and the continued sampler did not draw trial 0 again.
    params = {t.number: t.params for t in study.trials}
    swept = parse_overrides(children[2].data.tags["overrides"])
    assert float(swept["optim.schedule.base_lr"]) == pytest.approx(params[2]["optim.schedule.base_lr"])
    assert params[2]["optim.schedule.base_lr"] != pytest.approx(params[0]["optim.schedule.base_lr"])
    best = max((0, 2), key=lambda n: sweep.best(children[n].info.run_id))
    assert same.data.metrics[f"best/{MONITOR}"] == pytest.approx(sweep.best(children[best].info.run_id))
    assert same.data.tags["best.run_id"] == children[best].info.run_id
    # the winner's drawn lr spelt alike in its run name and the parent's tag
    assert f"base_lr={same.data.tags['best.optim.schedule.base_lr']}" in children[best].info.run_name.split()
    assert {k: same.data.metrics[k] for k in ("sweep/trials", "sweep/finished", "sweep/failed")} == {
        "sweep/trials": 3, "sweep/finished": 2, "sweep/failed": 1}
    assert [row[0] for row in printed_table(again.stdout)] == [str(best), str(2 - best), "1"]
    assert "optimization_results.yaml" in {f.path for f in sweep.client.list_artifacts(same.info.run_id)}
