"""The engine: one thread that runs every request's decoding steps in shared forward passes.

Continuous batching at step granularity::

    loop:
        run adapter loads/unloads that are due (never during a forward)
        drop cancelled requests (client gone)
        admit waiting requests up to max_batch: ONE forward prefills all of them
        ONE forward decodes a token for every running request, whatever its adapter
        finished requests (EOS, stop string, max_tokens) leave

HTTP handlers run on the event loop thread: they ``submit`` a :class:`Job` and read its events
(text pieces, then "done" or "error") through the ``emit`` callback each job carries.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..errors import LoraError
from .batch import Batch, Routing, prefill
from .sampling import SamplingParams, new_generator, next_tokens
from .text import TextStream

Event = tuple[str, Any]  # ("text", str) | ("done", (finish_reason, tokens)) | ("error", str)
GATHER_S = 0.002  # an idle engine waits this long for requests that arrive together


class ServerBusy(LoraError):
    """The batch and the queue are full: the client should retry later (HTTP 429)."""


class Job:
    """One request inside the engine: its prompt, adapter, sampling and where its text goes.

    Args:
        prompt: token ids of the prompt.
        adapter: the adapter's name in the model, ``None`` for the base model.
        params: sampling and stopping.
        text: turns the generated ids into streamed text.
        emit: called with each :data:`Event`, from the engine thread.
    """

    def __init__(
        self,
        prompt: list[int],
        adapter: str | None,
        params: SamplingParams,
        text: TextStream,
        emit: Callable[[Event], None],
    ) -> None:
        self.prompt, self.adapter, self.params = prompt, adapter, params
        self.text, self.emit = text, emit
        self.generator = new_generator(params.seed)
        self.tokens: list[int] = []
        self.cancelled = False  # set from the event loop thread; read between steps

    def cancel(self) -> None:
        """Stop generating for this job at the next step (its client is gone)."""
        self.cancelled = True

    def accept(self, token: int, eos: set[int]) -> bool:
        """Record a generated token, emit its text; return whether the job is finished."""
        self.tokens.append(token)
        if token in eos and not self.params.ignore_eos:
            return self._finish("stop", self.text.flush())
        delta, stopped = self.text.push(token)
        if stopped:
            return self._finish("stop", delta)
        if len(self.tokens) >= self.params.max_tokens:
            return self._finish("length", delta + self.text.flush())
        if delta:
            self.emit(("text", delta))
        return False

    def _finish(self, reason: str, delta: str) -> bool:
        if delta:
            self.emit(("text", delta))
        self.emit(("done", (reason, len(self.tokens))))
        return True


@dataclass
class Stats:
    """Counters for /health: what the engine has done since it started."""

    forwards: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    largest_batch: int = 0


@dataclass
class _Call:
    fn: Callable[[], Any]
    ready: Callable[[], bool]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Engine:
    """Runs jobs on ``model`` in a background thread, batching them across adapters.

    Args:
        model: the base model with every served adapter loaded (never merged).
        eos: token ids that end a reply.
        max_batch: most jobs decoding at once.
        max_queue: most jobs waiting beyond those; past it ``submit`` raises ``ServerBusy``.
    """

    def __init__(self, model: nn.Module, eos: Iterable[int], max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 0:
            raise LoraError(
                f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}."
            )
        self.model, self.eos = model, set(eos)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._batch = Batch()
        self._routing = Routing(model)
        self._calls: list[_Call] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    # --- the event loop thread's side ------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the thread (the server has stopped taking requests)."""
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._running]:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``ServerBusy`` when the batch and the queue are full."""
        with self._cond:
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                raise ServerBusy(
                    f"The server is busy: {self.max_batch} requests running and "
                    f"{self.max_queue} waiting, the most it takes. Retry shortly."
                )
            self._waiting.append(job)
            self._cond.notify()

    def call(
        self, fn: Callable[[], Any], ready: Callable[[], bool] = lambda: True
    ) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps, once ``ready()``; its future."""
        item = _Call(fn, ready)
        with self._cond:
            self._calls.append(item)
            self._cond.notify()
        return item.future

    def uses(self, adapter: str) -> bool:
        """Whether a waiting or running job uses ``adapter`` (call on the engine thread)."""
        with self._cond:
            return any(j.adapter == adapter for j in [*self._waiting, *self._running])

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs."""
        with self._cond:
            return len(self._running), len(self._waiting)

    # --- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = not (self._waiting or self._running)
                while not (self._waiting or self._running or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
            if idle and self._waiting:
                time.sleep(GATHER_S)  # let requests sent together arrive together
            try:
                self._step()
            except Exception as error:  # never leave requests waiting on a dead thread
                self._fail(self._running, error)
                self._keep([])
        self._stopped()

    def _step(self) -> None:
        """Due adapter changes, then one prefill (if jobs wait) and one decoding step."""
        self._run_calls()
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()

    def _stopped(self) -> None:
        """Tell the jobs left (only after a forced stop) that they will not finish."""
        self._routing.close()
        for job in [*self._waiting, *self._running]:
            job.emit(("error", "The server is shutting down."))

    def _run_calls(self) -> None:
        with self._cond:
            due = [c for c in self._calls if c.ready()]
            self._calls = [c for c in self._calls if c not in due]
        if due:
            self._routing.close()  # adapters change: no route block may stay open over them
        for item in due:
            try:
                item.future.set_result(item.fn())
            except Exception as error:  # handed to the caller, who answers the client
                item.future.set_exception(error)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in [*self._waiting, *self._running] if j.cancelled]
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
        if gone:
            self.stats.cancelled += len(gone)
            self._keep([j for j in self._running if not j.cancelled])

    def _keep(self, jobs: list[Job]) -> None:
        """Make ``jobs`` (a subset of the running ones, in order) the running jobs."""
        ids = {id(j) for j in jobs}
        self._batch.keep([i for i, j in enumerate(self._running) if id(j) in ids])
        with self._cond:
            self._running = jobs

    def _admit(self) -> None:
        """Prefill waiting jobs, as many as the batch has room for, in one forward pass."""
        with self._cond:
            room = self.max_batch - len(self._running)
            new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if not new:
            return
        try:
            self._routing.use([j.adapter for j in new])
            logits, cache, pads = prefill(self.model, [j.prompt for j in new])
        except Exception as error:  # a failed forward fails its requests, not the server
            self._fail(new, error)
            return
        self._batch.join(cache, pads)
        with self._cond:
            self._running += new
        self._advance(new, logits)

    def _decode(self) -> None:
        """One token for every running job, in one forward pass."""
        jobs = self._running
        try:
            self._routing.use([j.adapter for j in jobs])
            logits = self._batch.decode(self.model, [j.tokens[-1] for j in jobs])
        except Exception as error:
            self._fail(jobs, error)
            self._keep([])
            return
        self._advance(jobs, logits)

    def _advance(self, jobs: list[Job], logits: Tensor) -> None:
        """Sample the next token of each of ``jobs`` (row i: ``logits[i]``); drop finished ones."""
        self.stats.forwards += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))
        tokens = _sample(jobs, logits)
        done = {id(j) for j, t in zip(jobs, tokens, strict=True) if self._accept(j, t)}
        self.stats.tokens += len(jobs)
        if done:
            self._keep([j for j in self._running if id(j) not in done])

    def _accept(self, job: Job, token: int | Exception | None) -> bool:
        """Give ``job`` its token; whether it leaves the batch (finished, or failed alone:
        a row's bad logits, sampling or decoding error never stops the other rows)."""
        if token is None or isinstance(token, Exception):
            self._fail([job], NonFinite(len(job.tokens) + 1) if token is None else token)
            return True
        try:
            finished = job.accept(token, self.eos)
        except Exception as error:
            self._fail([job], error)
            return True
        self.stats.finished += finished
        return finished

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        self.stats.failed += len(jobs)
        named = isinstance(error, LoraError)  # ours: a sentence; anything else: its type too
        message = str(error) if named else f"{type(error).__name__}: {error}"
        for job in jobs:
            job.emit(("error", message))


class NonFinite(LoraError):
    """A row's logits hold NaN or inf: its request fails, the rest of the batch goes on."""

    def __init__(self, token: int) -> None:
        super().__init__(
            f"The model's scores for token {token} of this reply are not finite (NaN or inf): "
            "the adapter or the model overflows on this prompt. Only this request was stopped."
        )


def _sample(jobs: list[Job], logits: Tensor) -> list[int | Exception | None]:
    """Each job's next token (``None``: non-finite logits; an exception: its row's sampling
    failed), so that one row's failure is that row's alone."""
    params, generators = [j.params for j in jobs], [j.generator for j in jobs]
    try:
        return next_tokens(logits, params, generators)
    except Exception:  # a row no check foresaw: sample row by row to find it
        tokens: list[int | Exception | None] = []
        for i in range(len(jobs)):
            try:
                tokens += next_tokens(logits[i : i + 1], params[i : i + 1], generators[i : i + 1])
            except Exception as error:
                tokens.append(error)
        return tokens
