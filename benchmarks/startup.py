"""How fast `python run.py` answers when it must stop early: the timing goals the tests no longer assert (a busy
machine must not fail a test). Each case runs `rounds` times in a fresh project root; the median and the range of
wall seconds go to benchmarks/results/startup_errors.json.

    python benchmarks/startup.py [--rounds 3]

Goals: a config error and an unreachable tracking store answer within ~10 s on a 2-core laptop (before MindSpore
is imported: ~0.4 s of checks after Python's and Hydra's start-up).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cases() -> dict[str, list[str]]:
    return {"config_error": ["data.batch_size=0"],
            "unreachable_tracking_store": [f"tracking.uri=http://127.0.0.1:{_free_port()}"]}


def time_case(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "CONFORMER_PROJECT_ROOT": root}
        env.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(RUN_PY), *args], cwd=root, env=env, capture_output=True,
                                text=True, timeout=300)
        elapsed = time.perf_counter() - start
    if result.returncode != 2:
        raise RuntimeError(f"{args}: expected a config error (exit 2), got {result.returncode}: {result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    results = {}
    for name, args in cases().items():
        times = [time_case(args) for _ in range(rounds)]
        results[name] = {"median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
                         "max_s": round(max(times), 2), "rounds": rounds}
        print(f"{name}: {results[name]}")
    print(f"-> {write_result('startup_errors', results)}")


if __name__ == "__main__":
    main()
