"""GPU smoke run: the whole path on a CUDA GPU, in one short bounded script for a machine that has one.

    python bench/gpu_smoke.py [--clients 16] [--seconds 30] [--rows 100000]

Trains all-MiniLM-L6-v2 on Banking77 for one epoch with train.device=cuda (bf16 or fp16 autocast, as the GPU
allows), serves the version over HTTP with ONNX Runtime's CUDA provider (the `gpu` extra: onnxruntime-gpu in
place of onnxruntime) under --clients concurrent clients for --seconds, and batch-predicts --rows texts with
`tuneloop predict`. Prints one JSON line: training time and test accuracy, peak GPU memory, where the server ran
the model, req/s and p99 latency, batch rows per second. About 5 minutes on one recent GPU; every stage is
bounded (training one epoch, the load by time and count, the batch by rows).

On a machine without a CUDA GPU it prints a line saying so and exits 0. Needs a CUDA build of torch
(pip install torch, not the CPU wheel) and `pip install -e '.[gpu,bench]'` after `pip uninstall onnxruntime`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import torch

from _common import add_result_options, free_port, load_banking77, publish, stop, wait_ready
from serve_load import load


def train(home: Path, work: Path) -> tuple[dict, str]:
    """One epoch of Banking77 on the GPU; its figures and the registered version."""
    from tuneloop.config import load_config
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    train_rows, test_rows = load_banking77()
    train_rows.to_csv(work / "train.csv", index=False)
    test_rows.to_csv(work / "test.csv", index=False)
    recipe = load_config(
        None,
        [
            f"data.path={work / 'train.csv'}",
            f"data.test_path={work / 'test.csv'}",
            f"registry.home={home}",
            "name=bank",
            "train.epochs=1",
            "train.device=cuda",
            "serving.runtime=onnx",  # int8 is a CPU kernel: on a GPU fp32 serves
            "eval.explanations=0",
        ],
    )
    torch.cuda.reset_peak_memory_stats()
    outcome = classification.run(recipe, show_progress=False)
    assert outcome.report is not None and outcome.version is not None
    Registry(recipe.registry).promote(outcome.version.ref)
    return {
        "device": outcome.train.device,
        "train_seconds": round(outcome.train.train_seconds, 1),
        "test_accuracy": round(outcome.report.test.accuracy, 4),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }, outcome.version.ref


def serve(home: Path, texts: list[str], clients: int, seconds: float) -> dict:
    """The server on loopback with the promoted version, and `clients` concurrent clients for `seconds`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tuneloop", "serve", "--port", str(port), f"registry.home={home}"]
    server = subprocess.Popen([*command, "serve.models=[bank]"], stdout=sys.stderr)  # stdout: the result line only
    try:
        wait_ready(url, server)
        (model,) = httpx.get(url + "/v1/models").json()["models"]
        figures = asyncio.run(load(url, "/v1/predict", lambda t: {"texts": [t]}, texts, clients, seconds, 200_000, 3.0))
        return {"served_on": model["device"], "runtime": model["runtime"], **figures}
    finally:
        stop(server)


def batch(home: Path, work: Path, texts: list[str], rows: int) -> dict:
    source = work / "batch.parquet"
    pd.DataFrame({"text": [texts[i % len(texts)] for i in range(rows)]}).to_parquet(source)
    command = [sys.executable, "-m", "tuneloop", "predict", "-m", "bank", "--input", str(source)]
    started = time.perf_counter()
    subprocess.run(
        [*command, "--output", str(work / "out.parquet"), "--runtime", "onnx", f"registry.home={home}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 1), "rows_per_second": round(rows / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rows", type=int, default=100_000)
    add_result_options(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        publish(args, "gpu_smoke", {"gpu": None, "skipped": "no CUDA GPU on this machine (torch.cuda.is_available())"})
        return
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    _, test = load_banking77()
    texts = test["text"].astype(str).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        work, home = Path(tmp), Path(tmp) / "home"
        result["training"], _ = train(home, work)
        result["serving"] = serve(home, texts, args.clients, args.seconds)
        result["batch_predict"] = batch(home, work, texts, args.rows)
    publish(args, "gpu_smoke", result)


if __name__ == "__main__":
    main()
