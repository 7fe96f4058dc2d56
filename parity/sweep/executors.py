"""Executors: where cells run. One interface, two implementations: the standard library's process
pools on this machine (the default) and Ray Core actors on a cluster (ray_executor.py).

An executor has `workers` slots, each a worker process that keeps its CellRunner (its loaded models)
from cell to cell. `schedule` deals cells to idle slots one at a time, so every cell in flight is
known to its worker: when a worker dies, exactly its cell is charged an attempt and handed to
the next free worker (the dead one is replaced by a fresh process), and after `attempts` deaths the
cell becomes an error cell. A cell whose run raises is an error cell at once (the same inputs
would raise again).
"""
from __future__ import annotations

import abc
import collections
import concurrent.futures as cf
import multiprocessing
import multiprocessing.util
import os

from ...models.errors import SdportError
from .spec import Cell


class WorkerDied(Exception):
    """The worker running a cell is gone (killed, crashed, its node lost)."""


class ExecutorError(SdportError):
    """No worker could be started: the sweep cannot go on (one line for the command line)."""


class Executor(abc.ABC):
    kind = "?"

    def __init__(self, workers: int):
        self.workers = workers

    @abc.abstractmethod
    def start(self, slot: int) -> str:
        """Start (or restart) the worker of `slot`; returns its name (host:pid)."""

    @abc.abstractmethod
    def submit(self, slot: int, cell: Cell):
        """Start `cell` on `slot`'s worker; returns a handle for wait and result."""

    @abc.abstractmethod
    def wait(self, handles: list) -> list:
        """Block until at least one handle is done; returns the done ones."""

    @abc.abstractmethod
    def result(self, handle) -> dict:
        """The cell's outcome, or WorkerDied."""

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def describe(self) -> str:
        return f"{self.workers} {self.kind} worker{'s' if self.workers != 1 else ''}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def died_outcome(tries: int, why: str) -> dict:
    return {"status": "error", "error": f"its worker died {tries} time{'s' if tries != 1 else ''} running it "
                                        f"(last: {why})", "worst_margin": None, "worst_where": "", "summary": {},
            "failures": [], "report_json": None, "report_html": None, "seconds": None, "model_loads": 0,
            "worker": None}


def schedule(executor: Executor, cells: list[Cell], attempts: int, on_start=None, on_done=None, on_retry=None):
    """Run every cell; `on_start(cell, worker, attempt)`, `on_done(cell, outcome)` (outcome["attempts"]
    set), `on_retry(cell, worker, why)` as things happen. Returns nothing: outcomes go to on_done."""
    pending = collections.deque(cells)
    names = {s: executor.start(s) for s in range(executor.workers)}
    idle = list(range(executor.workers))[::-1]
    inflight: dict = {}
    tries: collections.Counter = collections.Counter()
    while pending or inflight:
        while idle and pending:
            slot, cell = idle.pop(), pending.popleft()
            tries[cell.id] += 1
            if on_start:
                on_start(cell, names[slot], tries[cell.id])
            inflight[executor.submit(slot, cell)] = (slot, cell)
        for h in executor.wait(list(inflight)):
            slot, cell = inflight.pop(h)
            try:
                out = executor.result(h)
            except WorkerDied as e:
                dead = names[slot]
                names[slot] = executor.start(slot)
                if tries[cell.id] < attempts:
                    if on_retry:
                        on_retry(cell, dead, str(e))
                    pending.appendleft(cell)  # next out, to another idle worker where there is one
                    idle.insert(0, slot)
                    continue
                out = died_outcome(tries[cell.id], f"{dead}: {e}")
            idle.append(slot)
            out["attempts"] = tries[cell.id]
            if on_done:
                on_done(cell, out)


# ---------------------------------------------------------------------------------------------
# The local pool: one single-process ProcessPoolExecutor per slot, so a death breaks one slot only

_RUNNER = None


def _init_worker(threads: int, keep: int) -> None:
    global _RUNNER
    import torch

    from .cells import CellRunner

    torch.set_num_threads(threads)
    _RUNNER = CellRunner(keep=keep)
    # A pool's worker exits without running atexit; multiprocessing's own finalizers do run.
    multiprocessing.util.Finalize(_RUNNER, _RUNNER.close, exitpriority=10)


def _worker_name() -> str:
    return _RUNNER.name


def _run_cell(cell: Cell) -> dict:
    return _RUNNER.run(cell)


class LocalExecutor(Executor):
    """Worker processes on this machine (spawned: the driver's threads and torch state stay its own).
    Each gets cpu_count // workers torch threads."""

    kind = "local"

    def __init__(self, workers: int = 1, keep: int = 2):
        super().__init__(workers)
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.keep = keep
        self._pools: dict[int, cf.ProcessPoolExecutor] = {}

    def start(self, slot: int) -> str:
        old = self._pools.pop(slot, None)
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(self.threads, self.keep))
        self._pools[slot] = pool
        try:
            return pool.submit(_worker_name).result()
        except cf.process.BrokenProcessPool as e:
            raise ExecutorError(f"a local worker process could not start: {e}") from None

    def submit(self, slot: int, cell: Cell):
        return self._pools[slot].submit(_run_cell, cell)

    def wait(self, handles: list) -> list:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except cf.process.BrokenProcessPool as e:
            raise WorkerDied(str(e) or "the worker process ended") from None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()
