"""Benchmark: a burst against one server: chat turns with the local generator and predict/feedback clients at
once, while a separate process times /readyz.

    python bench/burst.py [--chat-clients 60] [--clients 200] [--seconds 45] [--home DIR] [--set serve.x=y ...]

Starts `tuneloop serve` on 127.0.0.1 with the demo's support assistant (intent and sentiment trained by
`tuneloop demo` into a temporary home, or --home) and its replies written by the packaged SmolLM2
(`generator.kind: local`, --max-new-tokens per reply). For --seconds it then runs, from this process:

- --chat-clients users each sending chat turns one after another (every other one streamed); a turn refused with
  503 (all `serve.max_streams` slots busy) waits the Retry-After it was given and tries again;
- --clients users each looping predict → feedback on the demo's labelled messages, as bench/soak.py's do (the
  feedback limits are off: many users behind one address would be refused by them, and this measures the server
  under load, not the limits);
- and, from a process of its own (so the load generator's busy event loop cannot slow the measurement), GET
  /readyz every --probe-ms, timed. The same probe for 5 s before the burst, against the idle server, is the
  baseline.

Bounded and stopping by itself: clients stop sending at --seconds and the server is then stopped cleanly. One
JSON line: every status per route (503s where a bound refused work apart from server errors: any 5xx that is not
a 503, and dropped connections), the accepted chat turns' p50/p99, and /readyz p50/p99/max idle and during the
burst (the review asked for a p99 of 100 ms or less during it).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from _common import add_result_options, publish, stop
from soak import SERVER_ERRORS, Server, clients_loop

CHAT_MESSAGES = [
    "where is my parcel? it was supposed to arrive yesterday",
    "I want my money back for the broken headphones",
    "can I use two coupon codes on one order?",
    "how do I change the delivery address of my order",
    "我的快递怎么还没到啊",
    "忘记密码了，登录不上去",
]


def probe(port: int, seconds: float, interval: float, out: multiprocessing.Queue) -> None:
    """GET /readyz every `interval` seconds for `seconds` on one kept-alive connection: (latencies in ms, statuses)."""
    latencies, statuses = [], Counter[str]()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            connection.request("GET", "/readyz")
            response = connection.getresponse()
            response.read()
            statuses[str(response.status)] += 1
            latencies.append((time.monotonic() - started) * 1000)
        except (OSError, http.client.HTTPException):
            statuses["dropped"] += 1
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    out.put((latencies, dict(statuses)))


def probing(port: int, seconds: float, interval: float) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    """The probe, started in a process of its own, and where its result will come."""
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    process = spawn.Process(target=probe, args=(port, seconds, interval, queue))
    process.start()
    return process, queue


def probe_result(process: multiprocessing.Process, queue: multiprocessing.Queue) -> dict[str, Any]:
    latencies, statuses = queue.get()
    process.join()
    return readyz_summary(latencies, statuses)


def readyz_summary(latencies: list[float], statuses: dict[str, int]) -> dict[str, Any]:
    times = np.array(latencies)
    return {
        "requests": int(sum(statuses.values())),
        "statuses": statuses,
        "p50_ms": round(float(np.percentile(times, 50)), 1),
        "p99_ms": round(float(np.percentile(times, 99)), 1),
        "max_ms": round(float(times.max()), 1),
    }


async def chat_loop(url: str, clients: int, until: float) -> dict[str, Any]:
    """Chat users, one turn after another each; a 503 waits its Retry-After."""
    import aiohttp

    statuses, latencies = Counter[str](), []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as http:

        async def user(number: int) -> None:
            streamed = number % 2 == 1
            path, kind = ("/v1/chat?stream=true", "chat streamed") if streamed else ("/v1/chat", "chat")
            turn = number
            while time.monotonic() < until:
                message = CHAT_MESSAGES[turn % len(CHAT_MESSAGES)]
                turn += 1
                started = time.monotonic()
                try:
                    async with http.post(path, json={"message": message}) as r:
                        await r.read()
                        statuses[f"{kind} {r.status}"] += 1
                        if r.status == 200:
                            latencies.append(time.monotonic() - started)
                        elif r.status == 503:
                            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                except (aiohttp.ClientError, TimeoutError):
                    statuses[f"{kind} dropped"] += 1
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(user(i) for i in range(clients)))
    times = np.array(latencies) * 1000
    return {
        "statuses": dict(sorted(statuses.items())),
        "answered": len(latencies),
        "p50_ms": round(float(np.percentile(times, 50)), 1) if len(times) else None,
        "p99_ms": round(float(np.percentile(times, 99)), 1) if len(times) else None,
    }


async def burst(url: str, texts: list[tuple[str, str]], args: argparse.Namespace) -> tuple[dict, Any]:
    until = time.monotonic() + args.seconds
    chat, predict = await asyncio.gather(
        chat_loop(url, args.chat_clients, until),
        # The demo serves intents and sentiment: a predict request names its model.
        clients_loop(url, texts, args.clients, until, args.max_requests, model="support-intents"),
    )
    return chat, predict


def assistant_file(folder: Path, max_new_tokens: int) -> Path:
    """The demo assistant with its replies written by the packaged SmolLM2."""
    from tuneloop.demo import demo_assistant

    shipped = demo_assistant()
    definition = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    for key in ("faq", "out_of_scope_examples"):
        definition[key] = str((shipped.parent / definition[key]).resolve())
    definition["generator"] = {"kind": "local", "model": "SmolLM2-135M-Instruct", "max_new_tokens": max_new_tokens}
    path = folder / "assistant.yaml"
    path.write_text(yaml.safe_dump(definition, allow_unicode=True), encoding="utf-8")
    return path


def demo_home(home: Path) -> None:
    """The demo's intent and sentiment models in `home`, trained unless it already has them."""
    from tuneloop.config import RegistryConfig
    from tuneloop.errors import NotFound
    from tuneloop.registry import Registry

    try:
        Registry(RegistryConfig(home=home)).get("support-intents@production")
    except NotFound:
        subprocess.run(
            [sys.executable, "-m", "tuneloop", "demo", f"registry.home={home}"], check=True, stdout=sys.stderr
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat-clients", type=int, default=60)
    parser.add_argument("--clients", type=int, default=200, help="predict → feedback users")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="Reply length of the local generator.")
    parser.add_argument("--probe-ms", type=float, default=50.0, help="How often /readyz is timed.")
    parser.add_argument("--max-requests", type=int, default=500_000, help="Request budget of the predict clients.")
    parser.add_argument("--home", type=Path, help="A home to reuse (the demo is trained into it if it has none).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="tuneloop serve setting.")
    add_result_options(parser)
    args = parser.parse_args()

    from tuneloop.demo import packaged_file

    labelled = pd.read_csv(packaged_file("demo", "data", "support_intents.csv"))
    texts = list(zip(labelled["text"].astype(str), labelled["intent"].astype(str), strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        demo_home(home)
        unlimited = ["serve.feedback_rate_limit=null", "serve.feedback_daily_quota=null"]
        assistant = assistant_file(Path(tmp), args.max_new_tokens)
        server = Server([f"registry.home={home}", f"serve.assistant={assistant}", *unlimited, *args.overrides])
        start_s = server.start()
        try:
            idle = probe_result(*probing(server.port, 5.0, args.probe_ms / 1000))
            during = probing(server.port, args.seconds, args.probe_ms / 1000)
            chat, predict = asyncio.run(burst(server.url, texts, args))
            busy = probe_result(*during)
        finally:
            assert server.process is not None
            stop(server.process)
    predict_statuses = dict(sorted(predict.statuses.items()))
    every = {**chat["statuses"], **predict_statuses}
    result = {
        "chat_clients": args.chat_clients,
        "predict_feedback_clients": args.clients,
        "seconds": args.seconds,
        "max_new_tokens": args.max_new_tokens,
        "cores": os.cpu_count(),
        "start_to_ready_s": round(start_s, 2),
        "chat": chat,
        "predict_feedback": {"statuses": predict_statuses, "requests": sum(predict.statuses.values())},
        "refused_503": sum(n for key, n in every.items() if key.endswith(" 503")),
        "server_errors": sum(n for key, n in every.items() if key.split()[-1] in map(str, SERVER_ERRORS)),
        "dropped": sum(n for key, n in every.items() if key.endswith("dropped")),
        "readyz_idle": idle,
        "readyz_during_burst": busy,
        "clean_stop": server.process.returncode == 0,
    }
    publish(args, "burst", result)


if __name__ == "__main__":
    main()
