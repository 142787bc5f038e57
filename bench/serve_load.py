"""Benchmark: tuneloop's server under concurrent load, against the naive way of serving the same model.

    python bench/serve_load.py [--clients 16] [--seconds 20] [--baseline naive] [--home DIR --model NAME]

Starts `tuneloop serve` on 127.0.0.1 in a subprocess and runs N concurrent clients, each sending one
Banking77 test text per request, for a bounded time and a bounded number of requests; prints one JSON
line with req/s, p50/p95/p99 latency, the mean batch size (from the server's /metrics), the load
generator's own CPU time per request (it runs on the same cores), and the share of the fp32 compute
ceiling reached: texts/s of the version's fp32 ONNX encoder run in-process on full batches of the same
texts (no HTTP, no queue). With --baseline naive it also starts, in a second subprocess, a FastAPI app
whose endpoint calls a transformers feature-extraction pipeline per request and applies the same pooling
and head, loads it the same way, and prints the ratio; the two servers' labels are compared on every test
text (one request each) and both accuracies given.

Without --home, a model is trained first into a temporary home: all-MiniLM-L6-v2 on Banking77 with the
default recipe, so the server runs what the version's end-of-training check chose. --set takes
`tuneloop serve` settings (serve.*, registry.*). The result is also written to
bench/results/serve_load-RUNTIME.json, RUNTIME being what served (torch, onnx or onnx-int8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel

from _common import add_result_options, free_port, load_banking77, publish, serve_process, stop, wait_ready


async def load(
    url: str, path: str, body_of, texts: list[str], clients: int, seconds: float, max_requests: int, warmup: float
) -> dict:
    """`clients` concurrent loops posting one text per request until the time or request budget is spent.

    The load generator shares the server's two cores, so it must be light: aiohttp costs ~0.5 ms of CPU
    per request here where httpx's async client cost ~4.5 ms, which was a fifth of the machine at 90 req/s.
    The client's CPU per request is reported so that cost stays visible.
    """
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def user(number: int, until: float, record: bool) -> None:
            nonlocal errors, sent
            index = number
            while time.perf_counter() < until and sent < max_requests:
                text = texts[index % len(texts)]
                index += clients
                started = time.perf_counter()
                try:
                    async with http.post(path, json=body_of(text)) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if record:
                    sent += 1
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

        await asyncio.gather(*(user(i, time.perf_counter() + warmup, False) for i in range(clients)))
        started, cpu_before = time.perf_counter(), time.process_time()
        await asyncio.gather(*(user(i, started + seconds, True) for i in range(clients)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "client_cpu_ms_per_request": round(1000 * cpu / max(sent, 1), 2),
    }


def batch_stats(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("tuneloop_batch_size_sum") or line.startswith("tuneloop_batch_size_count"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    count = values.get("tuneloop_batch_size_count", 0)
    return {
        "batches": int(count),
        "mean_batch_size": round(values["tuneloop_batch_size_sum"] / count, 2) if count else None,
    }


def labels_from(url: str, path: str, body_of, parse, texts: list[str]) -> list[str]:
    with httpx.Client(base_url=url, timeout=60) as http:
        return [parse(http.post(path, json=body_of(t)).json()) for t in texts]


def share_equal(labels: list[str], others: list[str]) -> float:
    """The share of positions where two label lists agree: accuracy against the truth, or agreement."""
    return round(float(np.mean([a == b for a, b in zip(labels, others, strict=True)])), 4)


def fp32_ceiling(registry, version, texts: list[str], threads: int, batch_size: int = 32) -> float:
    """Texts per second of the version's fp32 ONNX encoder and head on full batches, in this process: the
    most any server could answer with this model on these cores, one text per request, in fp32."""
    from tuneloop.models.predictor import load_model

    predictor = load_model(version, registry, runtime="onnx", threads=threads)
    sample = texts[:1024]
    predictor.logits(sample[:batch_size], batch_size=batch_size)  # warm up
    started = time.perf_counter()
    predictor.logits(sample, batch_size=batch_size)
    return round(len(sample) / (time.perf_counter() - started), 1)


class NaiveRequest(BaseModel):
    text: str


def naive_server(folder: Path, port: int, threads: int) -> None:
    """The way a quick prototype serves a model: a pipeline call per request, no batching."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from safetensors.torch import load_file
    from transformers import pipeline

    torch.set_num_threads(threads)
    spec = json.loads((folder / "classifier.json").read_text())
    head = torch.nn.functional.normalize(load_file(folder / "head.safetensors")["weight"], dim=-1)
    extractor = pipeline("feature-extraction", model=str(folder), tokenizer=str(folder), device="cpu")
    app = FastAPI()

    @app.post("/predict")
    def predict(body: NaiveRequest) -> dict:  # a plain def: FastAPI runs each request on its thread pool
        hidden = extractor(
            spec["text_prefix"] + body.text,
            return_tensors=True,
            tokenize_kwargs={"truncation": True, "max_length": spec["max_length"]},
        )
        pooled = hidden[0].mean(0) if spec["pooling"] == "mean" else hidden[0][0]
        scores = torch.softmax(spec["cosine_scale"] * torch.nn.functional.normalize(pooled, dim=-1) @ head.T, -1)
        best = int(scores.argmax())
        return {"label": spec["labels"][best], "score": float(scores[best])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def train_quick_model(home: Path) -> str:
    from tuneloop.config import load_config
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    train, _ = load_banking77()
    path = home / "banking77-train.csv"
    home.mkdir(parents=True, exist_ok=True)
    train.to_csv(path, index=False)
    recipe = load_config(None, [f"data.path={path}", f"registry.home={home}", "name=banking77"])
    outcome = classification.run(recipe, show_progress=False)
    Registry(recipe.registry).promote(outcome.version.ref)
    return "banking77"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="Measured time per server.")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-requests", type=int, default=50_000, help="Request budget per server.")
    parser.add_argument("--baseline", choices=["naive"])
    parser.add_argument("--home", type=Path, help="A tuneloop home with a production version to serve.")
    parser.add_argument("--model", default=None, help="Model name in --home.")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="tuneloop serve setting (serve.*, registry.*)."
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--naive-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_result_options(parser)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, args.port, args.threads)
        return

    from tuneloop.config import RegistryConfig, ServerSettings, load_config
    from tuneloop.errors import TuneloopError

    # The server's settings, checked before a model is trained for it: a typo fails now, not minutes later.
    try:
        runtime = load_config(None, args.overrides, ServerSettings).serve.runtime
    except TuneloopError as exc:
        raise SystemExit(f"--set: {exc}") from None
    _, test = load_banking77()
    texts, truth = test["text"].astype(str).tolist(), test["label"].astype(str).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        name = args.model or (train_quick_model(home) if args.home is None else None)
        from tuneloop.registry import Registry

        registry = Registry(RegistryConfig(home=home))
        version = (
            registry.get(f"{name}@production")
            if name
            else next(v for v in registry.versions() if v.stage == "production")
        )
        result = {
            "model": version.ref,
            "serve.runtime": runtime,
            "clients": args.clients,
            "seconds": args.seconds,
            "cores": os.cpu_count(),
        }

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = serve_process(
            port,
            [
                f"registry.home={home}",
                f"serve.models=[{version.name}]",
                f"serve.threads={args.threads}",
                *args.overrides,
            ],
        )
        try:
            wait_ready(url, server)
            ours = asyncio.run(
                load(
                    url,
                    "/v1/predict",
                    lambda t: {"texts": [t]},
                    texts,
                    args.clients,
                    args.seconds,
                    args.max_requests,
                    args.warmup,
                )
            )
            ours.update(batch_stats(url))
            served = httpx.get(url + "/v1/models").json()["models"][0]
            result["runtime"] = served["runtime"]
            our_labels = labels_from(
                url, "/v1/predict", lambda t: {"texts": [t]}, lambda r: r["predictions"][0]["label"], texts
            )
        finally:
            stop(server)
        ours["accuracy"] = share_equal(our_labels, truth)
        serving = registry.folder(version).serving
        if serving.is_file():  # what the version's end-of-training check chose, and why
            result["serving"] = {k: v for k, v in json.loads(serving.read_text()).items() if k != "int8_tried"}
        result["tuneloop"] = ours
        result["fp32_ceiling_texts_per_s"] = fp32_ceiling(registry, version, texts, args.threads)
        result["share_of_fp32_ceiling"] = round(ours["req_per_s"] / result["fp32_ceiling_texts_per_s"], 3)

        if args.baseline == "naive":
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            naive = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--naive-server",
                    str(registry.folder(version).model),
                    "--port",
                    str(port),
                    "--threads",
                    str(args.threads),
                ]
            )
            try:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        httpx.post(url + "/predict", json={"text": "warm up"}, timeout=10)
                        break
                    except httpx.HTTPError:
                        if naive.poll() is not None or time.monotonic() > deadline:
                            raise SystemExit("naive server did not start") from None
                        time.sleep(0.5)
                theirs = asyncio.run(
                    load(
                        url,
                        "/predict",
                        lambda t: {"text": t},
                        texts,
                        args.clients,
                        args.seconds,
                        args.max_requests,
                        args.warmup,
                    )
                )
                their_labels = labels_from(url, "/predict", lambda t: {"text": t}, lambda r: r["label"], texts)
            finally:
                stop(naive)
            theirs["accuracy"] = share_equal(their_labels, truth)
            result["naive"] = theirs
            result["same_predictions"] = share_equal(our_labels, their_labels)
            result["ratio_req_per_s"] = round(ours["req_per_s"] / theirs["req_per_s"], 2)
            result["ratio_p95_latency"] = round(ours["p95_ms"] / theirs["p95_ms"], 3)
    publish(args, f"serve_load-{result['runtime']}", result)


if __name__ == "__main__":
    main()
