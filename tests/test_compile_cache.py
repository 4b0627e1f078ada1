"""MindSpore's compile cache: a second run of a config loads its graphs and trains bit for bit the same, a run that
died while building its cache leaves nothing a later run loads, and the key follows what reaches a graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conformer.models.checkpoint_file import read_checkpoint
from conformer.runtime.compile_cache import cache_key

from .helpers import compose_config, run_py, run_py_to_end, tiny_folder, tiny_overrides, wait_until

LOADING = "compile cache: loading graphs from"
SHAPES = {"head.weight": (10, 64)}


@pytest.mark.slow
def test_a_second_run_loads_its_graphs_and_trains_the_same_and_a_killed_build_is_never_loaded(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path / "compile"
    args = tiny_overrides(tmp_path, tiny_folder(tmp_path_factory.getbasetemp()), "tracking=disabled",
                          "trainer.epochs=2", f"paths.compile_cache_dir={cache}", "model.drop_path_rate=0.1")

    killed = run_py(args, tmp_path)  # dies while its cache is being built
    try:
        wait_until(lambda: any("epoch 1 step 2/6" in log.read_text() for log in tmp_path.glob("outputs/*/*/train.log")),
                   killed, "the first steps")
    finally:
        killed.kill()
        killed.communicate(timeout=30)
    assert [path.name.split(".building-")[0] for path in cache.iterdir()] and \
        all(".building-" in path.name for path in cache.iterdir())

    runs = []
    for _ in range(2):
        result = run_py_to_end(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result.stdout + result.stderr)
    assert LOADING not in runs[0] and LOADING in runs[1]  # the killed build was not loaded, the finished one is
    (complete,) = cache.iterdir()  # the abandoned folder is gone
    assert ".building-" not in complete.name and (complete / "rank_0").is_dir()

    first, second = (read_checkpoint(path)[0] for path in sorted(
        tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-2:])
    assert first.keys() == second.keys()
    for name in first:  # the loaded graphs train exactly like the compiled ones (a bad binding gave NaN)
        np.testing.assert_array_equal(second[name].asnumpy(), first[name].asnumpy(), err_msg=name)


def test_the_key_follows_what_reaches_a_graph_and_nothing_else() -> None:
    base = cache_key(compose_config([]), SHAPES)
    assert base == cache_key(compose_config([]), SHAPES)
    for same in (["trainer.epochs=30"], ["tracking=disabled"], ["optim.schedule.base_lr=5e-4"],
                 ["paths.root=/elsewhere"], ["trainer.resume=auto"]):
        assert cache_key(compose_config(same), SHAPES) == base, same
    for other in (["data.batch_size=32"], ["optim.optimizer.weight_decay=0.01"], ["trainer.clip_grad_norm=5"],
                  ["model.drop_path_rate=0.1"], ["seed=1"]):
        assert cache_key(compose_config(other), SHAPES) != base, other
    assert cache_key(compose_config([]), {"head.weight": (3, 64)}) != base  # another class count


def test_the_key_follows_the_source_of_a_users_own_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "my_losses.py"
    module.write_text("from conformer.train.losses import DualHeadLoss as MyLoss\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(["loss._target_=my_losses.MyLoss"])
    before = cache_key(cfg, SHAPES)
    module.write_text("from conformer.train.losses import DualHeadLoss as MyLoss  # edited: another graph, maybe\n")
    assert cache_key(cfg, SHAPES) != before
