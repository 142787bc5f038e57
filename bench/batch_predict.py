"""Benchmark: batch prediction of a large file with `tuneloop predict --input … --output …`.

    python bench/batch_predict.py [--rows 1000000] [--small-rows 100000] [--runtime onnx] [--chunk-rows 10000]

A Banking77 intent model (all-MiniLM-L6-v2, one epoch: the figure measured is prediction, not accuracy) is
trained and registered; `--rows` short texts are drawn with replacement from the Banking77 and SST-2 texts
into a parquet file; the command predicts it into parquet in its own process (after a tiny first run that
exports the encoder to ONNX). Also on `--small-rows` rows, to show that peak memory does not grow with the
file. Prints one JSON line: rows per second and the predicting process's peak resident memory for each size,
plus the input's size; also written to bench/results/batch_predict.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import add_result_options, load_banking77, load_sst2, publish, run_with_peak_memory


def run_predict(model: str, home: Path, source: Path, output: Path, runtime: str, chunk_rows: int) -> dict:
    """`tuneloop predict` over the file in a child process: its wall time and its own peak memory."""
    command = [
        *(sys.executable, "-m", "tuneloop", "predict", "-m", model, "--input", str(source), "--output", str(output)),
        *("--runtime", runtime, "--chunk-rows", str(chunk_rows), f"registry.home={home}"),
    ]
    started = time.perf_counter()
    peak_mib = run_with_peak_memory(command)
    seconds = time.perf_counter() - started
    rows = len(pd.read_parquet(output, columns=["label"]))
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds, 1),
        "peak_memory_mib": peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--runtime", default="onnx", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.config import load_config
    from tuneloop.training import classification

    train, test = load_banking77()
    sst_train, _ = load_sst2()
    pool = pd.concat([train["text"], test["text"], sst_train["text"]], ignore_index=True).astype(str)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        train.to_csv(work / "train.csv", index=False)
        recipe = load_config(
            None, [f"data.path={work / 'train.csv'}", f"registry.home={home}", "name=banking77", "train.epochs=1"]
        )
        version = classification.run(recipe, show_progress=False).version

        # A first, tiny run exports the encoder to ONNX (kept with the version): what is measured is prediction.
        warm = work / "warm.parquet"
        pool.head(100).to_frame("text").to_parquet(warm, index=False)
        run_predict(version.ref, home, warm, work / "warm-out.parquet", args.runtime, args.chunk_rows)
        runs = {}
        for name, rows in (("small", args.small_rows), ("large", args.rows)):
            source = work / f"{name}.parquet"
            pool.sample(rows, replace=True, random_state=args.seed).to_frame("text").to_parquet(source, index=False)
            result = run_predict(version.ref, home, source, work / f"{name}-out.parquet", args.runtime, args.chunk_rows)
            runs[name] = {**result, "input_mib": round(source.stat().st_size / 2**20, 1)}

    publish(
        args,
        "batch_predict",
        {
            "model": "banking77, all-MiniLM-L6-v2, one epoch",
            "runtime": args.runtime,
            "chunk_rows": args.chunk_rows,
            "mean_words": round(float(pool.str.split().str.len().mean()), 1),
            "runs": runs,
            "peak_memory_ratio_large_to_small": round(
                runs["large"]["peak_memory_mib"] / runs["small"]["peak_memory_mib"], 2
            ),
            "cores": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
