"""Benchmark: the production loop's traffic held for a while, optionally through a crash.

    python bench/soak.py [--clients 200] [--seconds 60] [--baseline-clients 16] [--kill-after S]
                         [--database-url URL] [--home DIR --model NAME] [--set serve.x=y ...]

Starts `tuneloop serve` on 127.0.0.1 with a trained Banking77 model (trained first into a temporary home,
or --home), then C concurrent clients each loop predict → feedback (the true label as the correction) for
T seconds; both bounded, it stops by itself. With --kill-after S the server gets SIGKILL S seconds in and is
started again at once; the clients keep going. With --database-url the registry and the prediction log are
on that database (PostgreSQL: give it a database only this benchmark uses). Afterwards the server is
stopped cleanly and the database is read back.

One JSON line: requests and req/s, status counts (503s from deliberate overload apart, connections dropped
inside the kill's window apart from any other), p50/p99, feedback acknowledged vs rows found, predictions
acknowledged vs stored (and how long before the kill the lost ones were answered), how long the restarted
server took to answer. Without a kill, the same run at --baseline-clients (16) gives the req/s ratio C vs 16.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import add_result_options, free_port, load_banking77, publish, stop, wait_ready

SERVER_ERRORS = (500, 502, 504)


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter = field(default_factory=Counter)  # "predict 200", "feedback 201", "dropped", ...
    latencies: list[float] = field(default_factory=list)  # seconds, every successful (2xx) request
    predictions: dict[str, float] = field(default_factory=dict)  # acknowledged id → when (monotonic)
    feedback: set[str] = field(default_factory=set)  # prediction ids whose feedback was acknowledged
    drop_times: list[float] = field(default_factory=list)


class Server:
    """`tuneloop serve` in a subprocess; `restart` keeps the port."""

    def __init__(self, overrides: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.overrides = overrides
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until /readyz answers; the seconds that took."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tuneloop", "serve", "--port", str(self.port), *self.overrides],
            stdout=sys.stderr,  # stdout carries only the result line
        )
        wait_ready(self.url, self.process, seconds=300, interval=0.05)
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: nothing of the server's shutdown runs
        self.process.wait()


async def clients_loop(
    url: str, texts: list[tuple[str, str]], clients: int, until: float, budget: int, model: str | None = None
) -> Tally:
    """`clients` users each looping predict → feedback on `texts` until `until` or `budget` requests; `model` names
    the model to predict with where the server serves several."""
    import aiohttp

    tally = Tally()
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:

        async def call(kind: str, path: str, body: dict) -> tuple[int, dict]:
            nonlocal sent
            sent += 1
            started = time.monotonic()
            try:
                async with http.post(path, json=body) as response:
                    answer = await response.json(content_type=None) if response.status < 300 else {}
                    if response.status < 300:  # a fast refusal (503) must not flatter the latency
                        tally.latencies.append(time.monotonic() - started)
                    tally.statuses[f"{kind} {response.status}"] += 1
                    return response.status, answer
            except (aiohttp.ClientError, TimeoutError):
                tally.statuses["dropped"] += 1
                tally.drop_times.append(time.monotonic())
                await asyncio.sleep(0.05)  # the server is away (the kill): do not spin
                return 0, {}

        async def user(number: int) -> None:
            index = number
            while time.monotonic() < until and sent < budget:
                text, label = texts[index % len(texts)]
                index += clients
                body = {"texts": [text], **({"model": model} if model else {})}
                status, answer = await call("predict", "/v1/predict", body)
                if status != 200:
                    continue
                prediction_id = answer["predictions"][0]["prediction_id"]
                tally.predictions[prediction_id] = time.monotonic()
                status, _ = await call(
                    "feedback", "/v1/feedback", {"prediction_id": prediction_id, "corrected_label": label}
                )
                if status == 201:
                    tally.feedback.add(prediction_id)

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tally


async def soak(
    server: Server, texts: list[tuple[str, str]], clients: int, seconds: float, kill_after: float | None, budget: int
) -> tuple[Tally, dict]:
    """Load for `seconds`; with `kill_after`, SIGKILL and restart the server meanwhile."""
    started = time.monotonic()
    load = asyncio.create_task(clients_loop(server.url, texts, clients, started + seconds, budget))
    kill: dict = {"started": started}
    if kill_after is not None:
        await asyncio.sleep(kill_after)
        server.kill()
        kill["at"] = time.monotonic()
        kill["restart_to_ready_s"] = round(await asyncio.to_thread(server.start), 2)
        kill["ready_at"] = time.monotonic()
    tally = await load
    kill["elapsed"] = time.monotonic() - started
    return tally, kill


def stored(database_url: str, tally: Tally) -> dict:
    """How many of the acknowledged predictions and feedback the database holds."""
    from sqlalchemy import select

    from tuneloop.db import open_database
    from tuneloop.db.schema import FeedbackRecord, PredictionRecord

    ids = list(tally.predictions)
    found_predictions: set[str] = set()
    found_feedback: set[str] = set()
    with open_database(database_url).connect() as connection:
        for start in range(0, len(ids), 5000):
            chunk = ids[start : start + 5000]
            found_predictions |= set(
                connection.scalars(select(PredictionRecord.id).where(PredictionRecord.id.in_(chunk)))
            )
            found_feedback |= set(
                connection.scalars(select(FeedbackRecord.prediction_id).where(FeedbackRecord.prediction_id.in_(chunk)))
            )
    return {"predictions": found_predictions, "feedback": found_feedback}


def summary(tally: Tally, kill: dict, found: dict) -> dict:
    latencies = np.array(tally.latencies) * 1000
    answered = sum(n for key, n in tally.statuses.items() if key != "dropped")
    window = (kill["at"], kill["ready_at"] + 1.0) if "at" in kill else None
    in_window = sum(1 for t in tally.drop_times if window and window[0] <= t <= window[1])
    result = {
        "requests": answered,
        # Successful requests per second of the whole run (a kill's downtime included).
        "req_per_s": round(len(tally.latencies) / kill["elapsed"], 1),
        "statuses": dict(sorted(tally.statuses.items())),
        "server_errors": sum(n for key, n in tally.statuses.items() if key.split()[-1] in map(str, SERVER_ERRORS)),
        "overload_503": sum(n for key, n in tally.statuses.items() if key.endswith(" 503")),
        "dropped_outside_kill_window": len(tally.drop_times) - in_window,
        "dropped_in_kill_window": in_window,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "feedback_acknowledged": len(tally.feedback),
        "feedback_found": len(tally.feedback & found["feedback"]),
        "feedback_lost": len(tally.feedback - found["feedback"]),
        "predictions_acknowledged": len(tally.predictions),
        "predictions_stored": len(set(tally.predictions) & found["predictions"]),
        "predictions_lost": len(set(tally.predictions) - found["predictions"]),
    }
    lost = set(tally.predictions) - found["predictions"]
    if "at" in kill:
        ages = [kill["at"] - tally.predictions[p] for p in lost]
        before = [age for age in ages if age >= 0]
        result["kill"] = {
            "after_s": round(kill["at"] - kill["started"], 1),
            "restart_to_ready_s": kill["restart_to_ready_s"],
            "lost_predictions_oldest_ms_before_kill": round(max(before) * 1000, 1) if before else None,
            "lost_predictions_answered_after_the_kill": len(ages) - len(before),  # must be 0: a clean stop
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline-clients", type=int, default=16, help="0: no baseline run.")
    parser.add_argument("--kill-after", type=float, help="SIGKILL the server this many seconds in, then restart it.")
    parser.add_argument("--max-requests", type=int, default=500_000, help="Request budget per run.")
    parser.add_argument("--database-url", help="Registry and log database (default: SQLite in the home).")
    parser.add_argument("--home", type=Path, help="A home to reuse (a model is trained into it if it has none).")
    parser.add_argument("--model", default="banking77")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop serve setting.")
    add_result_options(parser)
    args = parser.parse_args()
    if args.kill_after is not None and not 0 < args.kill_after < args.seconds:
        raise SystemExit("--kill-after must be inside --seconds")
    if args.database_url:
        os.environ["TUNELOOP_DATABASE_URL"] = args.database_url  # this process, the server, the training

    from serve_load import train_quick_model
    from tuneloop.config import RegistryConfig
    from tuneloop.errors import NotFound
    from tuneloop.registry import Registry

    _, test = load_banking77()
    texts = list(zip(test["text"].astype(str), test["label"].astype(str), strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        registry = Registry(RegistryConfig(home=home))
        try:
            version = registry.get(f"{args.model}@production")
        except NotFound:
            version = registry.get(f"{train_quick_model(home)}@production")
        database_url = registry.database_url
        # The clients are many users behind one (anonymous) sender: a sender's feedback limits would turn them
        # away, and this measures durability under load, not the limits.
        unlimited = ["serve.feedback_rate_limit=null", "serve.feedback_daily_quota=null"]
        overrides = [f"registry.home={home}", f"serve.models=[{version.name}]", *unlimited, *args.overrides]
        result: dict = {
            "model": version.ref,
            "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
            "clients": args.clients,
            "seconds": args.seconds,
            "kill_after": args.kill_after,
            "cores": os.cpu_count(),
        }
        runs = [("main", args.clients, args.kill_after)]
        baseline = bool(args.baseline_clients) and args.kill_after is None  # a kill's downtime is no comparison
        if baseline:
            runs.append(("baseline", args.baseline_clients, None))
        for label, clients, kill_after in runs:
            server = Server(overrides)
            first_start = server.start()
            try:
                tally, kill = asyncio.run(soak(server, texts, clients, args.seconds, kill_after, args.max_requests))
            finally:
                assert server.process is not None
                stop(server.process)  # clean: every buffered prediction is written before counting
            outcome = summary(tally, kill, stored(database_url, tally))
            outcome["clean_stop"] = server.process.returncode == 0  # not: stop() had to kill it
            outcome["clients"] = clients
            outcome["start_to_ready_s"] = round(first_start, 2)
            result[label] = outcome
            print(f"{label}: {outcome}", file=sys.stderr)
        if baseline:
            result["ratio_req_per_s"] = round(result["main"]["req_per_s"] / result["baseline"]["req_per_s"], 3)
    name = f"soak-{result['database']}" + ("-kill" if args.kill_after is not None else "")
    publish(args, name, result)


if __name__ == "__main__":
    main()
