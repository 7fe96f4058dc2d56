"""A sweep end to end: the spec's cells keyed by their inputs' checksums, the finished ones taken from
the store (--resume), the rest run on an executor, each outcome stored as it arrives, then the summary
page and JUnit."""
from __future__ import annotations

import dataclasses
import os

from .executors import Executor, schedule
from .spec import Cell, Spec
from .store import FINISHED, Store, StoreError
from .summary import junit_xml, summary_html


@dataclasses.dataclass(frozen=True)
class SweepResult:
    out: str
    records: tuple[dict, ...]   # spec order
    computed: int               # cells run now
    reused: int                 # cells taken from the store
    retried: int                # cells handed to another worker after theirs died
    executor: str

    @property
    def counts(self) -> dict:
        st = [r["status"] for r in self.records]
        return {"cells": len(st), "pass": st.count("pass"), "fail": st.count("fail"), "error": st.count("error"),
                "computed": self.computed, "reused": self.reused, "retried": self.retried}

    @property
    def passed(self) -> bool:
        return all(r["status"] == "pass" for r in self.records)


def checksums(paths, sha=None) -> dict[str, str]:
    """sha256 of each input file, each read once."""
    if sha is None:
        from ...models.storage.layout import file_sha256 as sha
    return {p: sha(p) for p in dict.fromkeys(paths)}


def _order(spec: Spec, cells: list[Cell]) -> list[Cell]:
    """Checkpoint by checkpoint (a worker's cache holds the recent ones), then runs in spec order."""
    ck = {c.name: i for i, c in enumerate(spec.checkpoints)}
    run = {r: i for i, r in enumerate(spec.runs)}
    return sorted(cells, key=lambda c: (ck[c.checkpoint.name], run[c.run]))


def run_sweep(spec: Spec, out: str, make_executor, *, resume: bool = False, progress=None, log=None) -> SweepResult:
    """`make_executor()` -> an Executor, called only when a cell is left to run. `progress(done, total)`
    counts the cells run now; `log(line)` tells of reuse and retries."""
    from .cells import check_ports

    log = log or (lambda line: None)
    check_ports(spec)
    store = Store(out)
    if store.exists() and not resume:
        raise StoreError(f"--out {out} holds a sweep already: --resume continues it (finished cells are kept), "
                         f"or choose another folder")
    store.create()
    sums = checksums([f for c in spec.cells for f in c.files()])
    keys = {c.id: c.key(sums) for c in spec.cells}
    old = store.records() if resume else {}
    store.clear_leftovers()  # of a previous run that was killed: cells in flight, half-written files
    records = {cid: r for cid, r in old.items() if cid in keys and r.get("key") == keys[cid]
               and r.get("status") in FINISHED}
    todo = _order(spec, [c for c in spec.cells if c.id not in records])
    reused = len(spec.cells) - len(todo)
    if resume:
        log(f"{reused} of {len(spec.cells)} cells finished in {out} with the same inputs: kept")
    meta = {"spec": os.path.abspath(spec.path), "name": spec.name, "attempts": spec.attempts,
            "inputs_sha256": sums, "cells": [{"id": c.id, "label": c.label, "key": keys[c.id]} for c in spec.cells]}
    store.write_sweep({**meta, "state": "running"})
    retried, done = [0], [0]
    describe = "nothing to run"
    if todo:
        executor: Executor = make_executor()
        describe = executor.describe()
        log(f"running {len(todo)} cells on {describe}")

        def on_done(cell, outcome):
            records[cell.id] = store.write_cell(cell, keys[cell.id], outcome)
            done[0] += 1
            if outcome["status"] == "error":
                log(f"error cell {cell.label}: {outcome['error']}")
            if progress:
                progress(done[0], len(todo))

        def on_retry(cell, worker, why):
            retried[0] += 1
            log(f"worker {worker} died running {cell.label} ({why[:120]}): handed to another worker")

        with executor:
            schedule(executor, todo, spec.attempts, on_start=lambda c, w, a: store.running(c, w, a),
                     on_done=on_done, on_retry=on_retry)
    result = SweepResult(out, tuple(records[c.id] for c in spec.cells), done[0], reused, retried[0], describe)
    write_summaries(spec, result, store)
    store.write_sweep({**meta, "state": "done", "executor": describe, "counts": result.counts})
    return result


def write_summaries(spec: Spec, result: SweepResult, store: Store) -> None:
    from .store import write_atomic

    records = list(result.records)
    write_atomic(os.path.join(store.out, "summary.html"),
                 summary_html(spec.name, records, list(spec.runs), result.executor, result.counts))
    write_atomic(os.path.join(store.out, "junit.xml"), junit_xml(spec.name, records, list(spec.runs)))
