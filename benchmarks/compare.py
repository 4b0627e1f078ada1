"""Two checkouts or two settings, interleaved A B A B: the ratio of medians of `benchmarks/model.py` figures.

    git worktree add /tmp/base main~1
    python benchmarks/compare.py --a /tmp/base --b . -- --model conformer_nano --image-size 64 --batch-size 32
    python benchmarks/compare.py --b-arg=--runtime=affinity -- --model conformer_nano --image-size 64

Each round runs A's then B's own `benchmarks/model.py` in a fresh process (its compile included), so slow drift of
the machine hits both sides alike. Reports, per figure, the medians, the ratio B/A (> 1: B is faster; for seconds
A/B, so > 1 still means B is better) and the spread of the per-round ratios. Writes
benchmarks/results/compare_<name>.json and, with --mlflow-uri, a run in the MLflow experiment `benchmarks`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log_to_mlflow, write_result  # noqa: E402
from conformer.runtime.paths import git_commit  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
FIGURES = ("train_img_per_s", "eval_img_per_s", "train_first_call_s", "eval_first_call_s")


def run_side(checkout: Path, env: dict[str, str], model_args: list[str]) -> dict:
    """One fresh `benchmarks/model.py` process in `checkout`; returns the JSON result it wrote (the checkout's own
    results files are put back as they were: a comparison is not a single-run result)."""
    results = checkout / "benchmarks" / "results"
    kept = {path: path.read_bytes() for path in results.glob("*.json")}
    environment = {**os.environ, "PYTHONPATH": str(checkout), **env}
    done = subprocess.run([sys.executable, str(checkout / "benchmarks" / "model.py"), *model_args], cwd=checkout,
                          env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark in {checkout} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result_path = Path(done.stdout.strip().splitlines()[-1].rsplit("-> ", 1)[-1])
    result = json.loads(result_path.read_text())
    if result_path in kept:
        result_path.write_bytes(kept[result_path])
    else:
        result_path.unlink()
    return result


def ratio(figure: str, a: float, b: float) -> float:
    """> 1 when B is better: more images/s, or fewer seconds."""
    return a / b if figure.endswith("_s") and not figure.endswith("per_s") else b / a


def summarise(sides: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    summary = {}
    for figure in FIGURES:
        a = [run[figure] for run in sides["a"] if figure in run]
        b = [run[figure] for run in sides["b"] if figure in run]
        if not a or len(a) != len(b):
            continue
        per_round = [ratio(figure, x, y) for x, y in zip(a, b)]
        summary[figure] = {"a_median": statistics.median(a), "b_median": statistics.median(b),
                           "ratio": round(ratio(figure, statistics.median(a), statistics.median(b)), 3),
                           "ratio_min": round(min(per_round), 3), "ratio_max": round(max(per_round), 3)}
    return summary


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--a-env/--b-env take KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, default=HERE, help="checkout A (default: this one)")
    parser.add_argument("--b", type=Path, default=HERE, help="checkout B (default: this one)")
    parser.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--a-arg", action="append", default=[], help="one more benchmarks/model.py argument for A")
    parser.add_argument("--b-arg", action="append", default=[], help="one more benchmarks/model.py argument for B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default=None, help="result name (default: from the model arguments)")
    parser.add_argument("--mlflow-uri", default=None, help="also log the comparison to this tracking store")
    parser.add_argument("model_args", nargs=argparse.REMAINDER, help="-- then arguments for benchmarks/model.py")
    args = parser.parse_args()
    model_args = [arg for arg in args.model_args if arg != "--"]
    checkouts = {"a": args.a.resolve(), "b": args.b.resolve()}
    envs = {"a": parse_env(args.a_env), "b": parse_env(args.b_env)}
    extras = {"a": args.a_arg, "b": args.b_arg}
    sides: dict[str, list[dict]] = {"a": [], "b": []}
    for round_index in range(args.rounds):
        for side in ("a", "b"):
            sides[side].append(run_side(checkouts[side], envs[side], model_args + extras[side]))
            print(f"round {round_index + 1}/{args.rounds} {side.upper()}: " + ", ".join(
                f"{figure} {sides[side][-1][figure]}" for figure in FIGURES if figure in sides[side][-1]))
    summary = summarise(sides)
    for figure, row in summary.items():
        print(f"{figure:>20}: A {row['a_median']:8.2f}  B {row['b_median']:8.2f}  B vs A x{row['ratio']:.3f} "
              f"(rounds x{row['ratio_min']:.3f}..x{row['ratio_max']:.3f})")
    name = args.name or "_".join(arg.lstrip("-").replace("_", "-") for arg in model_args) or "default"
    # the commit names what was compared: a worktree's path says nothing once it is gone
    commits = {side: git_commit(checkout) for side, checkout in checkouts.items()}
    described = {side: {"checkout": str(checkouts[side]), "commit": commits[side], "env": envs[side],
                        "args": extras[side]} for side in checkouts}
    result = {"benchmark": "compare", **described, "model_args": model_args, "rounds": args.rounds,
              "summary": summary, "runs": sides}
    path = write_result(f"compare_{name}", result)
    print(f"-> {path}")
    if args.mlflow_uri:
        log_to_mlflow(args.mlflow_uri, f"compare {name}", {"model_args": " ".join(model_args), **{
            f"{side}.commit": commits[side] or checkouts[side].name for side in checkouts}},
            {f"{figure}.ratio": row["ratio"] for figure, row in summary.items()})
    return result


if __name__ == "__main__":
    main()
