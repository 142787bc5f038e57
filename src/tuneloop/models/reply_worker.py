"""A reply model in a process of its own, at a lower CPU priority: what the server writes chat replies with.

Generating with a small causal LM is many short torch calls driven from Python, so a generating thread holds
the interpreter lock for much of every token and keeps the cores busy. Inside the server's process that
starved the event loop: in bench/burst.py (60 chat users with the packaged SmolLM2, 200 predict → feedback
users, 2 cores) the event loop's thread spent 74% of its time waiting for a core (/proc schedstat) and /readyz
took up to half a second, while 8 replies generated at once each ran at an eighth of the speed. Here the model
runs in a child process, with its own interpreter lock and `nice` raised by GENERATION_NICE, one reply at a
time: the event loop and the classifiers win the CPU, generation takes what is left.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from tuneloop.errors import TuneloopError, first_line
from tuneloop.models.lm import STREAM_TIMEOUT, GenerationSettings, Message

# How much lower than the server's the worker's CPU priority is (Linux nice levels, 19 at most): at +10 a
# generating thread weighs about a tenth of a thread of the server, so a request waiting for a core gets one.
GENERATION_NICE = 10
# Seconds the worker may take to load its model before the server gives up on it.
LOAD_TIMEOUT = 300.0

# Over one pipe. Server → worker: (kind, reply number, messages, settings) with kind "reply", "cancel" or "stop".
# Worker → server: (kind, reply number, text) with kind "ready" (text: the special tokens), "piece", "end" or
# "failed" (text: why).
Request = tuple[str, int, list[Message] | None, GenerationSettings | None]


def serve_replies(folder: Path, connection: Connection, nice: int) -> None:
    """The worker process: load the model, then answer replies one at a time until the server stops or goes."""
    os.nice(nice)  # before torch starts its threads, so that they inherit it
    try:
        from tuneloop.models.lm import ReplyModel

        model = ReplyModel(folder)
    except Exception as exc:
        connection.send(("failed", 0, first_line(exc)))
        return
    connection.send(("ready", 0, sorted(model.special_tokens)))
    replies: queue.Queue[tuple[int, list[Message], GenerationSettings] | None] = queue.Queue()
    cancelled: set[int] = set()

    def read() -> None:
        try:
            while (request := connection.recv())[0] != "stop":
                kind, number, messages, settings = request
                if kind == "cancel":
                    cancelled.add(number)
                elif messages is not None and settings is not None:
                    replies.put((number, messages, settings))
        except (EOFError, OSError):
            os._exit(0)  # the server is gone: at once, even mid-reply, since nobody is left to read it
        # Stopped: the loop below returns and the process ends as processes do, releasing what it holds (a library's
        # semaphores, which os._exit would leave for the resource tracker to warn about).
        replies.put(None)

    threading.Thread(target=read, daemon=True, name="reply-requests").start()
    with contextlib.suppress(OSError):  # the server is gone: read() ends the process
        while (reply := replies.get()) is not None:
            number, messages, settings = reply
            connection.send(_answer(model.stream(messages, settings), number, connection, cancelled))
            cancelled.discard(number)


def _answer(pieces: Iterator[str], number: int, connection: Connection, cancelled: set[int]) -> tuple[str, int, str]:
    """Send one reply's pieces as they come; its last message ("end", or "failed" with why)."""
    try:
        for piece in pieces:
            if number in cancelled:  # the reader went away: closing the stream stops the model
                pieces.close()  # type: ignore[attr-defined]  # a generator function's iterator
                break
            connection.send(("piece", number, piece))
    except OSError:  # the pipe: the server is gone
        raise
    except Exception as exc:
        return ("failed", number, first_line(exc))
    return ("end", number, "")


class ReplyWorker:
    """ReplyModel's `stream` answered by a worker process (see the module's docstring). A worker that dies fails
    the replies in progress, and the next reply starts a new one."""

    def __init__(self, folder: Path, nice: int = GENERATION_NICE) -> None:
        """Starts the worker and waits until its model is loaded: a model that does not load fails here."""
        self.folder, self.nice = folder, nice
        self._numbers = itertools.count(1)
        self._waiting: dict[int, queue.Queue[tuple[str, str]]] = {}
        self._lock = threading.Lock()  # one sender at a time on the pipe, and the waiting table with it
        self.special_tokens: frozenset[str] = frozenset()
        self.process, self._connection = self._start()

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        spawn = multiprocessing.get_context("spawn")  # a fork would copy the server's threads' locks mid-use
        ours, theirs = spawn.Pipe()
        process = spawn.Process(
            target=serve_replies, args=(self.folder, theirs, self.nice), daemon=True, name="reply-worker"
        )
        process.start()
        theirs.close()
        kind, _, detail = ours.recv() if ours.poll(LOAD_TIMEOUT) else ("failed", 0, "it did not load in time")
        if kind != "ready":
            process.kill()
            process.join()
            raise TuneloopError(f"the reply model in {self.folder} could not be loaded: {detail}")
        self.special_tokens = frozenset(detail)
        threading.Thread(target=self._route, args=(ours,), daemon=True, name="reply-answers").start()
        return process, ours

    def _route(self, connection: Connection) -> None:
        """Hand each message from the worker to the reply it belongs to; when the worker dies, fail every reply."""
        try:
            while True:
                kind, number, text = connection.recv()
                with self._lock:
                    waiting = self._waiting.get(number)
                if waiting is not None:
                    waiting.put((kind, text))
        except (EOFError, OSError):
            with self._lock:
                for waiting in self._waiting.values():
                    waiting.put(("failed", "the reply worker stopped"))

    def _send(self, request: Request) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: the reply reader hears so from _route
            self._connection.send(request)

    def stream(self, messages: list[Message], settings: GenerationSettings) -> Iterator[str]:
        """Text pieces as the worker's model produces them; a reader that stops early stops the model too."""
        number, answers = next(self._numbers), queue.Queue[tuple[str, str]]()
        with self._lock:
            if not self.process.is_alive():
                self.process, self._connection = self._start()
            self._waiting[number] = answers
            self._send(("reply", number, messages, settings))
        finished = False
        try:
            while True:
                try:
                    kind, text = answers.get(timeout=STREAM_TIMEOUT)
                except queue.Empty:
                    raise TuneloopError(f"the reply worker sent nothing for {STREAM_TIMEOUT:g} s") from None
                finished = kind != "piece"
                if kind == "failed":
                    raise TuneloopError(f"the reply model failed: {text}")
                if finished:
                    return
                yield text
        finally:
            with self._lock:
                del self._waiting[number]
                if not finished:
                    self._send(("cancel", number, None, None))

    def close(self) -> None:
        """Stop the worker (a reply in progress ends there)."""
        with self._lock:
            self._send(("stop", 0, None, None))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._connection.close()
