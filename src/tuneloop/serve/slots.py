"""The models a server answers with, and hot swapping them when production changes.

Each served name has a slot holding its live version. A new production version (promoted over HTTP,
from the CLI, by the gate, or by a rollback) is loaded on a separate thread while the old one keeps
answering; then the slot's reference is replaced in one assignment. A batch reads the slot once when
it starts, so requests in flight finish on the version they started with and none fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np

from tuneloop.config import ServeConfig
from tuneloop.errors import NotFound, TuneloopError, Unavailable, first_line
from tuneloop.evaluate.explain import Explanation, explain
from tuneloop.models.predictor import Predictor, load_model
from tuneloop.profiling import Profiler
from tuneloop.registry import Home, ModelVersion, Registry
from tuneloop.serve.batching import BatcherStopped, MicroBatcher, Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")
AUTO_MAX_PADDING = 0.25


def batch_padding(setting: float | str | None, runtime: str) -> float | None:
    """serve.max_padding with "auto" resolved for the runtime a version runs on. Measured with
    bench/serve_load.py (Banking77, 16 clients): ONNX Runtime served 147 and 142 req/s with 0.25 against 127
    with one pass per batch; PyTorch 79 and 89 with 0.25 against 90 with one pass, no gain, so it keeps one
    pass."""
    if setting == "auto":
        return AUTO_MAX_PADDING if runtime.startswith("onnx") else None
    return None if setting is None else float(setting)


class ModelSlot:
    """The live version of one model name plus its batcher."""

    def __init__(
        self, loaded: Predictor, max_padding: float | str | None = None, profiler: Profiler | None = None
    ) -> None:
        self.current = loaded
        self.max_padding = max_padding  # serve.max_padding, resolved per version (each has its runtime)
        self.loading: int | None = None
        self.failed: int | None = None  # a version that would not load: the watcher does not retry it
        self.batcher: MicroBatcher[Predictor] | None = None
        self.profiler = profiler  # serve.profile: records this model's first batches

    def infer(self, texts: list[str]) -> tuple[Predictor, np.ndarray]:
        """(version, logits): the version read once, so the whole batch runs on it even if a swap lands now."""
        live = self.current
        padding = batch_padding(self.max_padding, live.runtime)
        profiler = self.profiler
        if profiler is not None and profiler.summary is None and not profiler.active:
            profiler.start()  # on the inference thread, where the batches run
        logits = live.logits(texts, batch_size=max(len(texts), 1), max_padding=padding)
        if profiler is not None:
            profiler.step()
        return live, logits


class ServedModels:
    """Loads the production version of each served name, batches requests, and hot-swaps on promotion."""

    def __init__(
        self,
        registry: Registry,
        config: ServeConfig,
        on_batch: Callable[[str, int, float], None] | None = None,
        on_swap: Callable[[Predictor], None] | None = None,
        prepare: Callable[[Predictor], None] | None = None,
        required: tuple[str, ...] = (),
    ) -> None:
        """`prepare` runs on every version after it loads and before it serves (on the loader thread; an
        error there fails the swap); `required` names are served whatever serve.models says."""
        self.registry = registry
        self.config = config
        self.on_batch = on_batch
        self.on_swap = on_swap
        self.prepare = prepare
        self.required = required
        self.slots: dict[str, ModelSlot] = {}
        # Served names whose production version does not load, and why; the watcher tries again when
        # production moves to another version.
        self.unavailable: dict[str, str] = {}
        self._failed_versions: dict[str, int | None] = {}
        # One inference thread: torch already spreads a forward pass over the cores, and two passes at once
        # would only fight over them. Loading a new version gets its own thread so inference never waits.
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._watcher: asyncio.Task[None] | None = None
        self._swaps: dict[str, asyncio.Task[Predictor]] = {}
        # PyTorch copies of served versions for explanations (ONNX Runtime has no gradients): by ref, loaded on
        # first use; a version swapped out is let go at the next load.
        self._explainers: dict[str, Predictor] = {}

    def names_to_serve(self) -> list[str]:
        if self.config.models:
            names = list(self.config.models)
        else:
            names = sorted({v.name for v in self.registry.versions() if v.stage == "production"})
        names = list(dict.fromkeys([*names, *self.required]))
        if not names:
            raise TuneloopError(
                "nothing to serve: no model has a production version yet "
                "(tuneloop models promote NAME@VERSION, or set serve.models)"
            )
        return names

    def load(self) -> None:
        """Load every served name's production version (blocking; called once at start-up). One that does not
        load is reported as unavailable and the others are served."""
        for name in self.names_to_serve():
            version = None
            try:
                version = self.registry.get(f"{name}@production")
                self.slots[name] = ModelSlot(self._load_ready(version), self.config.max_padding, self._profiler(name))
                log.info("serving %s", self.slots[name].current.ref)
            except Exception as exc:
                self._mark_unavailable(name, version, exc)

    def _mark_unavailable(self, name: str, version: ModelVersion | None, error: BaseException) -> None:
        what = version.ref if version is not None else name
        # Clients (and the public /readyz) get the fact; the reason, which may name paths or database hosts,
        # goes to the server log.
        self.unavailable[name] = f"{what} could not be loaded (the server log says why)"
        self._failed_versions[name] = version.version if version is not None else None
        log.error("not serving %s: %s could not be loaded: %s", name, what, first_line(error))

    def _profiler(self, name: str) -> Profiler | None:
        if not self.config.profile:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Profiler(Home(self.registry.home).profiles / f"serve-{name}-{stamp}", self.config.profile_batches)

    def _load_ready(self, version: ModelVersion) -> Predictor:
        loaded = load_model(version, self.registry, self.config.runtime, self.config.threads)
        if self.prepare is not None:
            self.prepare(loaded)
        return loaded

    async def start(self) -> None:
        for name, slot in self.slots.items():
            self._start_batcher(name, slot)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="registry-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for task in self._swaps.values():
            task.cancel()
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()
            if slot.profiler is not None:  # fewer batches than serve.profile_batches: write what was recorded
                await asyncio.get_running_loop().run_in_executor(self.inference, slot.profiler.finish)
        self.inference.shutdown(wait=True)
        self.loader.shutdown(wait=False, cancel_futures=True)

    def _start_batcher(self, name: str, slot: ModelSlot) -> None:
        slot.batcher = MicroBatcher(
            slot.infer,
            self.inference,
            self.config.max_batch_size,
            self.config.max_wait_ms,
            on_batch=functools.partial(self._batched, name),
            max_queue=self.config.max_queue,
            deadline_seconds=self.config.request_timeout_seconds,
        )
        slot.batcher.start()

    def _batched(self, name: str, size: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(name, size, seconds)

    @property
    def ready(self) -> bool:
        """Every served name loaded, with its batcher running."""
        return (
            bool(self.slots)
            and not self.unavailable
            and all(s.batcher is not None and s.batcher.running for s in self.slots.values())
        )

    @property
    def names(self) -> list[str]:
        """Every name this server answers for, loaded or not."""
        return sorted([*self.slots, *self.unavailable])

    def slot(self, name: str | None) -> ModelSlot:
        if name is None:
            names = self.names
            if len(names) != 1:
                raise TuneloopError(f"this server serves several models ({', '.join(names)}): name one in 'model'")
            name = names[0]
        if name in self.unavailable:
            raise Unavailable(f"model '{name}' is unavailable: {self.unavailable[name]}")
        if name not in self.slots:
            served = ", ".join(self.slots) or "none"
            raise NotFound(f"model '{name}' is not served here; served: {served}")
        return self.slots[name]

    async def run(self, name: str | None, texts: list[str]) -> tuple[Predictor, np.ndarray]:
        """(the version that answered, logits rows of every task) for cleaned texts, through the name's batcher."""
        batcher = self.slot(name).batcher
        try:
            if batcher is None:
                raise BatcherStopped("the server has not started")
            return await batcher.submit(texts)
        except BatcherStopped:
            raise Unavailable("the server is shutting down; retry on another instance") from None
        except Overloaded as exc:
            raise Unavailable(f"model '{name or next(iter(self.slots))}' is overloaded: {exc}; retry shortly") from None

    async def on_inference_thread(self, work: Callable[[list[str]], T], texts: list[str]) -> T:
        """Run other model work (the assistant's FAQ embedding, explanations) on the thread that runs the
        forward passes."""
        try:
            # Submitting is what fails once the executor is shut down; an error of the work itself is its own.
            running = asyncio.get_running_loop().run_in_executor(self.inference, work, texts)
        except RuntimeError:  # the executor is shut down: the server is stopping
            raise Unavailable("the server is shutting down; retry on another instance") from None
        return await running

    async def explain(
        self, version: ModelVersion, texts: list[str], labels: list[str | None], steps: int
    ) -> list[Explanation]:
        """Integrated Gradients of each text's label (None: the predicted one) on `version`: a PyTorch copy
        of it (ONNX Runtime has no gradients), loaded on the loader thread the first time and kept while the
        version is served, run on the inference thread (between batches, not against them)."""
        loop = asyncio.get_running_loop()
        explainer = self._explainers.get(version.ref)
        if explainer is None:
            explainer = await loop.run_in_executor(
                self.loader, functools.partial(load_model, version, self.registry, "torch", self.config.threads)
            )
            current = {slot.current.ref for slot in self.slots.values()}
            self._explainers = {ref: kept for ref, kept in self._explainers.items() if ref in current}
            self._explainers[version.ref] = explainer
        work = functools.partial(explain, *explainer.transformer, labels=labels, steps=steps)
        return await self.on_inference_thread(work, texts)

    async def _load(self, slot: ModelSlot, target: ModelVersion) -> Predictor:
        slot.loading = target.version
        try:
            return await asyncio.get_running_loop().run_in_executor(self.loader, self._load_ready, target)
        except Exception:
            slot.failed = target.version
            raise
        finally:
            slot.loading = None

    def _switch(self, slot: ModelSlot, loaded: Predictor) -> None:
        previous, slot.current = slot.current, loaded
        log.info("hot swap: %s → %s", previous.ref, loaded.ref)
        if self.on_swap:
            self.on_swap(loaded)

    async def swap_to_production(self, name: str) -> Predictor:
        """Load `name`'s production version in the background and switch to it; if production moved
        on while loading, load again, so the server ends on what the registry says now."""
        slot = self.slots[name]
        loop = asyncio.get_running_loop()
        while True:
            target = await loop.run_in_executor(None, self.registry.get, f"{name}@production")
            if target.version == slot.current.version:
                return slot.current
            self._switch(slot, await self._load(slot, target))

    async def promote(self, name: str, version: int, reason: str) -> ModelVersion:
        """Load the version first, then promote it in the registry and switch: a version that will not load
        never becomes production."""
        slot = self.slots[name]
        loop = asyncio.get_running_loop()
        target = await loop.run_in_executor(None, self.registry.get, f"{name}@{version}")
        if target.version == slot.current.version:
            loaded = slot.current
        else:
            try:
                loaded = await self._load(slot, target)
            except Exception as exc:
                log.error("%s could not be loaded: %s", target.ref, exc)
                raise TuneloopError(
                    f"{target.ref} could not be loaded, so it was not promoted: {first_line(exc)}"
                ) from exc
        promoted = await loop.run_in_executor(None, self.registry.promote, target.ref, reason)
        # No await between the registry change and the switch: the watcher cannot see them apart.
        if loaded is slot.current:
            slot.current = replace(loaded, record=promoted)
        else:
            self._switch(slot, replace(loaded, record=promoted))
        return promoted

    def request_swap(self, name: str) -> asyncio.Task[Predictor]:
        """Start (or join) a swap of `name` to its production version (the watcher's path)."""
        running = self._swaps.get(name)
        if running is None or running.done():
            running = asyncio.get_running_loop().create_task(self.swap_to_production(name), name=f"swap-{name}")
            running.add_done_callback(self._report_failed_swap)
            self._swaps[name] = running
        return running

    @staticmethod
    def _report_failed_swap(task: asyncio.Task[Predictor]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("hot swap failed; the previous version keeps serving: %s", task.exception())

    async def _watch(self) -> None:
        """Notice promotions made elsewhere (CLI, gate, rollback) by polling the registry."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.reload_poll_seconds)
            for name in list(self.unavailable):
                await self._retry(name)
            for name, slot in self.slots.items():
                try:
                    live = await loop.run_in_executor(None, self.registry.get, f"{name}@production")
                except TuneloopError:
                    continue  # no production version right now (all archived): keep serving what we have
                except Exception:
                    log.exception("registry check for %s failed", name)
                    continue
                if live.version not in (slot.current.version, slot.loading, slot.failed):
                    self.request_swap(name)

    async def _retry(self, name: str) -> None:
        """Serve a name that was unavailable once its production version is another one that loads."""
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, self.registry.get, f"{name}@production")
        except Exception:
            return  # still no production version (or the database is away): try at the next poll
        if version.version == self._failed_versions.get(name):
            return
        try:
            loaded = await loop.run_in_executor(self.loader, self._load_ready, version)
        except Exception as exc:
            self._mark_unavailable(name, version, exc)
            return
        slot = ModelSlot(loaded, self.config.max_padding, self._profiler(name))
        self._start_batcher(name, slot)
        self.slots[name] = slot
        del self.unavailable[name]
        log.info("serving %s (it was unavailable)", loaded.ref)
        if self.on_swap:
            self.on_swap(loaded)
