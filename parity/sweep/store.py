"""The results store under --out. Every file is written atomically (a temporary file in the same folder,
then os.replace), and a cell's record only after its reports, so a record on disk always has them.

    OUT/sweep.json             the spec as run: cells with their keys, the inputs' sha256, the counts
    OUT/cells/ID.json          one record per finished cell (docs/sweeps.md lists its keys)
    OUT/reports/ID.json|.html  the cell's full parity report
    OUT/running/ID.json        a cell in flight: its worker and attempt (removed when it is done)
    OUT/summary.html, OUT/junit.xml
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile

from ...models.errors import SdportError
from ..report import encode_nonfinite
from .spec import Cell

RECORD_FORMAT = "sdport.sweep.cell"
SWEEP_FORMAT = "sdport.sweep"
FORMAT_VERSION = 1
FINISHED = ("pass", "fail")  # an error cell is not a result: --resume runs it again


class StoreError(SdportError):
    pass


def write_atomic(path: str, data: str | bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dumps(x) -> str:
    return json.dumps(encode_nonfinite(x), indent=1, allow_nan=False, sort_keys=False) + "\n"


def decode_margin(v):
    return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}.get(v, v) if isinstance(v, str) else v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Store:
    def __init__(self, out: str):
        self.out = out
        self.cells_dir = os.path.join(out, "cells")
        self.reports_dir = os.path.join(out, "reports")
        self.running_dir = os.path.join(out, "running")

    def exists(self) -> bool:
        return os.path.isdir(self.cells_dir) or os.path.isfile(os.path.join(self.out, "sweep.json"))

    def create(self) -> None:
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise StoreError(f"--out {self.out}: exists and is not a folder")
        for d in (self.cells_dir, self.reports_dir, self.running_dir):
            os.makedirs(d, exist_ok=True)
        if not os.access(self.out, os.W_OK):
            raise StoreError(f"--out {self.out}: folder is not writable")

    def clear_leftovers(self) -> None:
        """Remove the in-flight markers and the temporary files a killed run left behind."""
        for d in (self.running_dir, self.cells_dir, self.reports_dir, self.out):
            for name in os.listdir(d):
                if d == self.running_dir or name.startswith(".tmp-"):
                    os.unlink(os.path.join(d, name))

    def records(self) -> dict[str, dict]:
        """{cell id: record} of every record on disk (unreadable ones are skipped: they will be recomputed)."""
        out = {}
        if not os.path.isdir(self.cells_dir):
            return out
        for name in sorted(os.listdir(self.cells_dir)):
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                with open(os.path.join(self.cells_dir, name)) as f:
                    r = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and r.get("format") == RECORD_FORMAT and "id" in r:
                r["worst_margin"] = decode_margin(r.get("worst_margin"))
                out[r["id"]] = r
        return out

    def running(self, cell: Cell, worker: str, attempt: int) -> None:
        write_atomic(os.path.join(self.running_dir, cell.id + ".json"),
                     dumps({"id": cell.id, "label": cell.label, "worker": worker, "attempt": attempt,
                            "started": _now()}))

    def done(self, cell: Cell) -> None:
        try:
            os.unlink(os.path.join(self.running_dir, cell.id + ".json"))
        except FileNotFoundError:
            pass

    def write_cell(self, cell: Cell, key: str, outcome: dict) -> dict:
        """Write the cell's reports, then its record; returns the record."""
        rel = {}
        for ext, field in (("json", "report_json"), ("html", "report_html")):
            if outcome.get(field) is not None:
                rel[ext] = f"reports/{cell.id}.{ext}"
                write_atomic(os.path.join(self.out, rel[ext]), outcome[field])
        record = {"format": RECORD_FORMAT, "format_version": FORMAT_VERSION, "id": cell.id, "label": cell.label,
                  "key": key, "run": cell.run, "kind": cell.kind,
                  "checkpoint": {"name": cell.checkpoint.name, "checkpoint": cell.checkpoint.checkpoint,
                                 "h5": cell.checkpoint.h5},
                  "params": cell.p, "axes": list(cell.axes),
                  **{k: outcome.get(k) for k in ("status", "error", "worst_margin", "worst_where", "summary",
                                                 "failures", "attempts", "seconds", "model_loads", "worker")},
                  "finished": _now(), "report": rel.get("json"), "html": rel.get("html")}
        write_atomic(os.path.join(self.cells_dir, cell.id + ".json"), dumps(record))
        self.done(cell)
        return record

    def write_sweep(self, meta: dict) -> None:
        write_atomic(os.path.join(self.out, "sweep.json"),
                     dumps({"format": SWEEP_FORMAT, "format_version": FORMAT_VERSION, "written": _now(), **meta}))


def read_records(out: str) -> dict[str, dict]:
    """The records of a finished sweep's folder (for compare), StoreError when it holds none."""
    st = Store(out)
    if not os.path.isdir(out):
        raise StoreError(f"{out}: no such folder")
    if not st.exists():
        raise StoreError(f"{out}: not a sweep folder (no cells/ or sweep.json)")
    return st.records()
