"""Two sweeps' stores side by side, cell by cell (matched by id: run, checkpoint name and axis values):
the cells that passed before and fail now, and each cell's drift (its worst margin and every summary
metric, before and after). The CI view across commits: exit 1 when a cell regressed."""
from __future__ import annotations

import dataclasses
import math

from .store import read_records
from .summary import fmt_margin


@dataclasses.dataclass(frozen=True)
class Drift:
    id: str
    label: str
    old_status: str
    new_status: str
    old_margin: float | None
    new_margin: float | None
    metrics: dict  # name -> (old, new)

    @property
    def margin_delta(self) -> float | None:
        if self.old_margin is None or self.new_margin is None:
            return None
        if math.isinf(self.old_margin) and self.old_margin == self.new_margin:
            return 0.0
        return self.new_margin - self.old_margin


@dataclasses.dataclass(frozen=True)
class Comparison:
    drifts: tuple[Drift, ...]
    only_old: tuple[str, ...]
    only_new: tuple[str, ...]

    @property
    def regressions(self) -> tuple[Drift, ...]:
        return tuple(d for d in self.drifts if d.old_status == "pass" and d.new_status != "pass")

    @property
    def fixed(self) -> tuple[Drift, ...]:
        return tuple(d for d in self.drifts if d.old_status != "pass" and d.new_status == "pass")

    def to_dict(self) -> dict:
        return {"format": "sdport.sweep.compare", "format_version": 1,
                "regressions": [d.label for d in self.regressions], "fixed": [d.label for d in self.fixed],
                "only_old": list(self.only_old), "only_new": list(self.only_new),
                "cells": [{"id": d.id, "label": d.label, "status": [d.old_status, d.new_status],
                           "worst_margin": [d.old_margin, d.new_margin], "margin_delta": d.margin_delta,
                           "metrics": {k: list(v) for k, v in d.metrics.items()}} for d in self.drifts]}


def compare_stores(old_dir: str, new_dir: str) -> Comparison:
    old, new = read_records(old_dir), read_records(new_dir)
    drifts = []
    for cid in sorted(set(old) & set(new)):
        a, b = old[cid], new[cid]
        sa, sb = a.get("summary") or {}, b.get("summary") or {}
        metrics = {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb))}
        drifts.append(Drift(cid, b["label"], a["status"], b["status"], a.get("worst_margin"), b.get("worst_margin"),
                            metrics))
    return Comparison(tuple(drifts), tuple(old[i]["label"] for i in sorted(set(old) - set(new))),
                      tuple(new[i]["label"] for i in sorted(set(new) - set(old))))


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.3g}"


def text(c: Comparison, all_cells: bool = False) -> str:
    lines = [f"{len(c.drifts)} cells in both: {len(c.regressions)} regressed (passed, fail now), "
             f"{len(c.fixed)} fixed; {len(c.only_old)} only in OLD, {len(c.only_new)} only in NEW"]
    for d in c.regressions:
        lines.append(f"REGRESSED {d.label}: {d.old_status} -> {d.new_status}, worst margin "
                     f"{fmt_margin(d.old_margin)} -> {fmt_margin(d.new_margin)}")
    lines.append("drift (worst margin in decades, old -> new, delta; summary metrics old -> new):")
    shown = sorted(c.drifts, key=lambda d: (d.margin_delta is None, d.margin_delta if d.margin_delta is not None
                                            and not math.isnan(d.margin_delta) else 0.0))
    for d in shown if all_cells else shown[:20]:
        delta = d.margin_delta
        mets = ", ".join(f"{k} {_num(o)} -> {_num(n)}" for k, (o, n) in d.metrics.items() if o != n)
        lines.append(f"  {d.label}: {fmt_margin(d.old_margin)} -> {fmt_margin(d.new_margin)} "
                     f"({'-' if delta is None else f'{delta:+.2f}'})" + (f"; {mets}" if mets else "; unchanged"))
    if not all_cells and len(shown) > 20:
        lines.append(f"  ... {len(shown) - 20} more (--all lists every cell)")
    for label in c.only_old:
        lines.append(f"only in OLD: {label}")
    for label in c.only_new:
        lines.append(f"only in NEW: {label}")
    return "\n".join(lines)
