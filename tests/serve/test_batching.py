"""The micro-batcher on a fake model: batches form, respect the size cap, keep requests whole, survive errors."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tuneloop.serve.batching import BatcherStopped, MicroBatcher, Overloaded


class FakeModel:
    def __init__(self, seconds: float = 0.02, fail_on: str | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[str]] = []

    def __call__(self, texts: list[str]):
        if self.fail_on in texts:
            raise ValueError("bad batch")
        self.batches.append(list(texts))
        time.sleep(self.seconds)
        return len(self.batches), [text.upper() for text in texts]


def run(coroutine):
    return asyncio.run(coroutine)


async def _serve(model: FakeModel, requests: list[list[str]], **options):
    batcher = MicroBatcher(model, ThreadPoolExecutor(1), **options)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(texts) for texts in requests), return_exceptions=True)
    await batcher.stop()
    return results


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = FakeModel()
    requests = [[f"t{i}"] for i in range(40)]
    results = run(_serve(model, requests, max_batch_size=16, max_wait_ms=20))
    assert [rows for _, rows in results] == [[f"T{i}"] for i in range(40)]
    assert max(len(b) for b in model.batches) == 16
    assert len(model.batches) <= 4  # 40 texts in batches of at most 16: three, or four with an early start


def test_a_request_is_never_split_and_the_cap_holds():
    model = FakeModel()
    requests = [["a"] * 5 for _ in range(7)]
    results = run(_serve(model, requests, max_batch_size=12, max_wait_ms=20))
    assert all(len(b) <= 12 and len(b) % 5 == 0 for b in model.batches)
    for batch_number, rows in results:
        assert rows == ["A"] * 5 and 1 <= batch_number <= len(model.batches)


def test_an_oversized_request_runs_alone():
    model = FakeModel()
    results = run(_serve(model, [["x"] * 30, ["y"]], max_batch_size=8, max_wait_ms=5))
    assert results[0][1] == ["X"] * 30 and results[1][1] == ["Y"]
    assert sorted(len(b) for b in model.batches) == [1, 30]


def test_a_failing_batch_fails_only_its_requests():
    model = FakeModel(fail_on="boom")

    async def scenario():
        batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch_size=4, max_wait_ms=0)
        batcher.start()
        with pytest.raises(ValueError):
            await batcher.submit(["boom"])
        ok = await batcher.submit(["fine"])
        await batcher.stop()
        return ok

    assert run(scenario())[1] == ["FINE"]


def test_stop_finishes_queued_requests_and_then_refuses_new_ones():
    model = FakeModel(seconds=0.05)

    async def scenario():
        batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch_size=2, max_wait_ms=1)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit([str(i)])) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await batcher.submit(["late"])
        return [p.result()[1] for p in pending]

    assert run(scenario()) == [[str(i)] for i in range(6)]


@pytest.mark.parametrize("max_wait_ms, batches", [(2000, 1), (0, 2)])
def test_the_first_request_waits_for_company_only_up_to_max_wait(max_wait_ms, batches):
    model = FakeModel(seconds=0)

    async def scenario():
        batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch_size=2, max_wait_ms=max_wait_ms)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.submit(["second"]))
        await batcher.stop()

    run(scenario())
    assert len(model.batches) == batches


class BlockedModel:
    """A model whose first forward pass waits until the test releases it: the queue behind it fills up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, texts: list[str]):
        self.batches.append(list(texts))
        self.release.wait(timeout=30)
        return len(self.batches), [text.upper() for text in texts]


def test_a_full_queue_refuses_at_once_and_the_queued_requests_are_still_answered():
    async def scenario():
        model = BlockedModel()
        batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch_size=2, max_wait_ms=0, max_queue=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(["a", "b"]))  # the pass that blocks
        while not model.batches:
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.submit([t])) for t in ("c", "d", "e")]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="3 texts are waiting"):
            await batcher.submit(["f"])  # refused while the model is still blocked: no waiting in line
        assert not running.done()
        model.release.set()
        answers = [await running, *[await q for q in queued]]
        await batcher.stop()
        return answers

    answers = run(scenario())
    assert [rows for _, rows in answers] == [["A", "B"], ["C"], ["D"], ["E"]]


def test_a_request_past_its_deadline_is_refused_and_leaves_the_queue():
    async def scenario():
        model = BlockedModel()
        batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch_size=1, max_wait_ms=0, deadline_seconds=0.05)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        while not model.batches:
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded, match="no answer within"):
            await batcher.submit(["late"])
        assert batcher._queued_texts == 0  # the refused request holds no place in the queue
        model.release.set()
        with pytest.raises(Overloaded):
            await first  # it waited past its deadline too: its answer is dropped
        answer = await asyncio.wait_for(batcher.submit(["next"]), 5)
        await batcher.stop()
        return answer, model.batches

    (_, rows), batches = run(scenario())
    assert rows == ["NEXT"] and ["late"] not in batches
