"""Benchmark: data-parallel training on one machine's CPU cores, against one process using them all.

    python bench/ddp.py [--processes 2] [--set train.epochs=2 ...] [--against REV]

Banking77 with all-MiniLM-L6-v2 is trained three times with the same recipe (global batch, epochs, seed):
`tuneloop train` in one process with `--processes` threads; `torchrun --standalone --nproc-per-node N -m
tuneloop train` with one thread per process (gloo), replicating the model (train.strategy=ddp); and the same
launch sharding it (train.strategy=fsdp). On one machine's cores no speed-up is expected — the point is the same
result through a working launch. Prints one JSON line: test accuracy and macro-F1 of each, the difference in
points, training and wall seconds, and the peak resident memory of the largest process of each run; also
written to bench/results/ddp.json. With --against REV the same command first runs with the code of commit REV,
and the result gives both (bench/results/ddp-against.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import add_result_options, load_banking77, publish, result_at_commit, run_with_peak_memory


def train(command: list[str], overrides: list[str], home: Path, threads: int) -> dict:
    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    started = time.perf_counter()
    peak_mib = run_with_peak_memory(
        [*command, "train", *overrides, f"registry.home={home}", f"train.threads={threads}"],
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    wall = time.perf_counter() - started
    (version,) = Registry(load_config(None, [f"registry.home={home}"]).registry).versions("banking77")
    return {
        "accuracy": round(version.metrics["accuracy"], 4),
        "macro_f1": round(version.metrics["macro_f1"], 4),
        "train_seconds": round(version.metrics["train_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "peak_memory_mib": peak_mib,
    }


RUNS = ("one_process", "data_parallel", "sharded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override")
    parser.add_argument(
        "--against", metavar="REV", help="Run the same command with the code of this commit first, for comparison."
    )
    add_result_options(parser)
    args = parser.parse_args()
    before = None
    if args.against:
        again = [a for a in sys.argv[1:] if a not in ("--against", args.against) and not a.startswith("--against=")]
        before = result_at_commit(args.against, "ddp.py", again)

    train_rows, test_rows = load_banking77()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_rows.to_csv(work / "train.csv", index=False)
        test_rows.to_csv(work / "test.csv", index=False)
        recipe = [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            "name=banking77",
            *args.overrides,
        ]
        one = train([sys.executable, "-m", "tuneloop"], recipe, work / "one", threads=args.processes)
        torchrun = Path(sys.executable).with_name("torchrun")
        launch = [str(torchrun), "--standalone", "--nproc-per-node", str(args.processes), "-m", "tuneloop"]
        many = train(launch, recipe, work / "many", threads=1)
        sharded = train(launch, [*recipe, "train.strategy=fsdp"], work / "sharded", threads=1)

    result = {
        "dataset": "banking77",
        "encoder": "all-MiniLM-L6-v2",
        "overrides": args.overrides,
        "one_process": {"threads": args.processes, **one},
        "data_parallel": {"processes": args.processes, "threads_each": 1, "backend": "gloo", **many},
        "sharded": {"processes": args.processes, "threads_each": 1, "strategy": "fsdp", **sharded},
        "accuracy_difference_points": round(100 * (many["accuracy"] - one["accuracy"]), 2),
        "sharded_accuracy_difference_points": round(100 * (sharded["accuracy"] - one["accuracy"]), 2),
        "time_ratio": round(many["train_seconds"] / one["train_seconds"], 2),
        "sharded_time_ratio": round(sharded["train_seconds"] / one["train_seconds"], 2),
        "cores": os.cpu_count(),
    }
    if before:
        result["against"] = {"commit": before["commit"], **{k: before["result"][k] for k in RUNS}}
        result["against_ratios"] = {
            run: {
                "accuracy_delta_points": round(100 * (result[run]["accuracy"] - before["result"][run]["accuracy"]), 2),
                "train_seconds": round(result[run]["train_seconds"] / before["result"][run]["train_seconds"], 3),
            }
            for run in RUNS
        }
    publish(args, "ddp-against" if before else "ddp", result)


if __name__ == "__main__":
    main()
