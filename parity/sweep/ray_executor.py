"""The Ray executor: one Ray Core actor per worker slot, each holding a CellRunner, so a worker loads
each model once per checkpoint, not once per cell. The only module of sdport that imports ray, and
only when a RayExecutor is made (pip install sdport[ray]).

Paths in the spec must be readable at the same place on every node (a shared file system), and every
node needs sdport and the reference side installed: Ray ships the cells, not the code or the weights.
"""
from __future__ import annotations

from .executors import Executor, ExecutorError, WorkerDied
from .spec import Cell, SpecError


class CellActor:
    """Made a Ray actor by RayExecutor (ray.remote at run time, so importing this module needs no ray)."""

    def __init__(self, keep: int):
        from .cells import CellRunner

        self.runner = CellRunner(keep=keep)

    def name(self) -> str:
        return self.runner.name

    def run(self, cell: Cell) -> dict:
        return self.runner.run(cell)

    def close(self) -> None:
        self.runner.close()


def _ray():
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: pip install 'sdport[ray]'") from None
    return ray


class RayExecutor(Executor):
    """`address`: "auto" (a running cluster), "local" (start one on this machine), a cluster address,
    or None to use the Ray this process has already initialised. `workers` defaults to the cluster's
    GPUs when it has any (one GPU per worker), else its CPUs (one CPU per worker)."""

    kind = "ray"

    def __init__(self, address: str | None = "auto", workers: int | None = None, keep: int = 2):
        ray = self.ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                raise SpecError(f"--ray {address}: no Ray cluster there ({' '.join(str(e).split())[:200]})") from None
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        per = {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1}
        super().__init__(workers or self.gpus or max(1, int(res.get("CPU", 1))))
        self._cls = ray.remote(**per, max_restarts=0)(CellActor)
        self.keep = keep
        self._actors: dict[int, object] = {}

    def describe(self) -> str:
        return super().describe() + (f", 1 GPU each ({self.gpus} in the cluster)" if self.gpus else "")

    def start(self, slot: int) -> str:
        old = self._actors.pop(slot, None)
        if old is not None:
            try:
                self.ray.kill(old, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        actor = self._cls.remote(self.keep)
        self._actors[slot] = actor
        try:
            return self.ray.get(actor.name.remote())
        except self.ray.exceptions.RayError as e:
            raise ExecutorError(f"a Ray worker could not start: {' '.join(str(e).split())[:200]}") from None

    def submit(self, slot: int, cell: Cell):
        return self._actors[slot].run.remote(cell)

    def wait(self, handles: list) -> list:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as e:  # the actor died (or its node): the cell goes elsewhere
            raise WorkerDied(" ".join(str(e).split())[:300]) from None

    def close(self) -> None:
        # A graceful exit first, so each actor removes its work folder; then kill what is left.
        refs = [a.close.remote() for a in self._actors.values()]
        try:
            self.ray.wait(refs, num_returns=len(refs), timeout=30)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to clean
            pass
        for a in self._actors.values():
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors.clear()
