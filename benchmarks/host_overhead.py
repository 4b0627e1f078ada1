"""What the host costs a training step: device-to-host reads per step and host ms per step outside the compiled step,
for this checkout against another one (the previous main), interleaved A B A B in fresh processes.

    git worktree add /tmp/prev <base commit>
    python benchmarks/host_overhead.py --other /tmp/prev --model conformer_nano --image-size 64 --batch-size 32
    python benchmarks/host_overhead.py --other /tmp/prev --model conformer_ti --image-size 224 --batch-size 8 \
        --steps 6 --log-every 5 --rounds 2

Each process runs the product's training (`conformer.app.run`, synthetic data, no tracking) for one epoch of
`--steps` steps and measures, from the end of the first (compiling) step to the end of the last one: the reads
(`Tensor.asnumpy`, `item`, `tolist`, `float()`, `bool()`, `int()` on the training thread), the time spent inside the
compiled step's calls (`conformer.train.step._StepCell`) and the wall time. Host ms per step = (wall - inside) /
steps; on the CPU a step's call returns when it has run, so "inside" is the device's work. Results:
benchmarks/results/host_overhead_<model>_<size>.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
READS = ("asnumpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _measure(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """One training in this process from the checkout at `root`."""
    sys.path.insert(0, str(root))
    from hydra import compose, initialize_config_dir
    from mindspore import Tensor

    import conformer  # noqa: F401  (process defaults: ONEDNN_MAX_CPU_ISA)
    from conformer.app import run
    from conformer.train import step as step_module

    main, depth = threading.main_thread(), threading.local()
    clock = {"reads": 0, "inside": 0.0, "calls": 0, "first_end": None, "last_end": None, "reads_at_first_end": 0}

    def counted(original):
        @functools.wraps(original)
        def wrapper(self, *a, **k):
            outer = not getattr(depth, "n", 0)
            if outer and threading.current_thread() is main:
                clock["reads"] += 1
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, *a, **k)
            finally:
                depth.n -= 1
        return wrapper

    for name in READS:
        if name in vars(Tensor):
            setattr(Tensor, name, counted(vars(Tensor)[name]))
    cell_call = step_module._StepCell.__call__

    def timed_call(self, *a, **k):
        start = time.perf_counter()
        out = cell_call(self, *a, **k)
        end = time.perf_counter()
        clock["calls"] += 1
        if clock["calls"] == 1:
            clock["first_end"], clock["reads_at_first_end"] = end, clock["reads"]
        else:
            clock["inside"] += end - start
            clock["last_end"], clock["reads_at_last_end"] = end, clock["reads"]
        return out

    step_module._StepCell.__call__ = timed_call
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"paths.root={tmp}", "data=synthetic", f"model={args.model}", f"data.image_size={args.image_size}",
                     f"data.batch_size={args.batch_size}", f"data.source.num_train={args.batch_size * args.steps}",
                     f"data.source.num_val={args.batch_size}", "data.source.num_classes=10", "trainer.epochs=1",
                     f"trainer.log_every_n_steps={args.log_every}", "trainer.limit_val_batches=1", "tracking=disabled",
                     "optim.schedule.warmup_epochs=0", f"model.drop_path_rate={args.drop_path}", "compile_cache=false"]
        with initialize_config_dir(str(root / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        run(cfg, Path(tmp) / "run")
    steps = clock["calls"] - 1
    wall = clock["last_end"] - clock["first_end"]
    return {"reads_per_step": (clock["reads_at_last_end"] - clock["reads_at_first_end"]) / steps,
            "host_ms_per_step": 1000 * (wall - clock["inside"]) / steps,
            "step_ms": 1000 * clock["inside"] / steps, "train_img_per_s": args.batch_size * steps / wall}


def _child(root: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(root), "--model", args.model, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--log-every",
               str(args.log_every), "--drop-path", str(args.drop_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", type=Path, help="the checkout to compare with (A); this one is B")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="conformer_nano")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=31, help="steps of the one epoch (the first compiles)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child.resolve(), args)))
        return
    sys.path.insert(0, str(HERE))
    from benchmarks.common import write_result

    checkouts = {"previous": args.other.resolve(), "this": HERE}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for index in range(args.rounds):
        for name, root in checkouts.items():
            rounds[name].append(_child(root, args))
            print(f"round {index + 1} {name}: {rounds[name][-1]}", flush=True)
    medians = {name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
               for name, runs in rounds.items()}
    result = {"benchmark": "host_overhead", "model": args.model, "image_size": args.image_size,
              "batch_size": args.batch_size, "steps": args.steps, "log_every_n_steps": args.log_every,
              "drop_path_rate": args.drop_path, "other": str(args.other), "medians": medians, "rounds": rounds}
    path = write_result(f"host_overhead_{args.model}_{args.image_size}", result)
    print(json.dumps(medians, indent=2), "->", path)


if __name__ == "__main__":
    main()
