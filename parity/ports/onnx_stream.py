"""The observation run of an ONNX port within a byte budget (docs/onnx.md, "Memory").

ONNX Runtime returns all the outputs of one `session.run` together, so a graph run with every
intermediate tensor exposed holds all of them at once. Here the graph runs as a sequence of
*segments*, consecutive node ranges in graph (topological) order, each a session of its own that
exposes the tensors its nodes make and reads the tensors it needs from earlier segments. After each
segment its observed tensors go to the comparison (the caller's `on_ready` for every pair whose
tensors are all there) and are freed once neither a later node nor a pending pair reads them.

Segments are planned from exact sizes: a first, sizing run (segmented by weight bytes alone) exposes
only `Shape` of every tensor, plus what crosses its segments. Before a segment runs, the held tensors
are those made earlier and still needed; the segment adds all it makes; the plan keeps their sum under
the budget wherever one node allows (a segment is at least one node, so one node whose outputs, with
what must stay alive across it, pass the budget passes it: the peak is measured and reported).
"""
from __future__ import annotations

import numpy as np

WEIGHT_CAP = 2 ** 30  # initializer bytes per segment: what one segment's session loads (inline ones: < 2 GB of protobuf)
DEFAULT_BUDGET = 2 ** 30


class Held:
    """The observed tensors held in memory, by name, with the peak of their bytes and count."""

    def __init__(self):
        self.values: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.peak_tensors = 0
        self.dtypes: dict[str, np.dtype] = {}

    def add(self, name: str, v: np.ndarray) -> None:
        if name in self.values:
            self.drop(name)
        self.values[name] = v
        self.dtypes[name] = v.dtype
        self.bytes += v.nbytes
        self._peak()

    def drop(self, name: str) -> None:
        v = self.values.pop(name, None)
        if v is not None:
            self.bytes -= v.nbytes

    def arrived(self, arrays: list[np.ndarray]) -> None:
        """A run's outputs, all in memory together with what is held (before any is kept or freed)."""
        n = sum(a.nbytes for a in arrays)
        self.peak_bytes = max(self.peak_bytes, self.bytes + n)
        self.peak_tensors = max(self.peak_tensors, len(self.values) + len(arrays))

    def _peak(self):
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.peak_tensors = max(self.peak_tensors, len(self.values))


def _weights(graph) -> list[int]:
    """Initializer bytes each node needs, through the constant nodes that feed it."""
    memo: dict[str, int] = {}

    def of(t: str, depth=0) -> int:
        if t in graph.initializers:
            return graph.initializer_nbytes(t)
        if t not in graph.const or t not in graph.producer or depth > 32:
            return 0
        if t not in memo:
            memo[t] = sum(of(x, depth + 1) for x in graph.nodes[graph.producer[t]].input if x)
        return memo[t]

    return [sum(of(t) for t in n.input if t) for n in graph.nodes]


def _crossing(graph, types):
    """(first node of every segment must not start at b, for the b where an untyped tensor crosses)."""
    n = len(graph.nodes)
    bad = np.zeros(n + 1, dtype=np.int64)
    for t, j in graph.producer.items():
        if t in graph.const or t in types:
            continue
        last = max((c for c in graph.consumers.get(t, ())), default=j)
        if last > j:
            bad[j + 1] += 1
            bad[last + 1] -= 1
    return np.cumsum(bad) > 0  # [b]: a cut before node b would cross an untyped tensor


def observed_names(graph, i: int, types) -> list[str]:
    """The tensors node i makes that a run can expose: data and shape values of a known type."""
    return [t for t in graph.nodes[i].output if t and t not in graph.const and t in types]


def plan(graph, nbytes: dict[str, int], last_use: dict[str, int], types, budget: int,
         weights: list[int] | None = None) -> tuple[list[tuple[int, int]], int]:
    """Consecutive node ranges [a, b) covering the graph, each keeping (tensors held before it) +
    (tensors it makes) under `budget` where one node allows, with under WEIGHT_CAP of weights; and
    the least peak any plan has (the largest, over nodes, of what is held before it plus what it makes)."""
    n = len(graph.nodes)
    weights = weights if weights is not None else _weights(graph)
    no_cut = _crossing(graph, types)
    # held_before[a]: bytes of tensors made before node a and read at or after it.
    diff = np.zeros(n + 2, dtype=np.int64)
    for t, size in nbytes.items():
        j = graph.producer.get(t, -1)
        end = min(last_use.get(t, n), n)
        if end > j:
            diff[j + 1] += size
            diff[end + 1] -= size
    held_before = np.cumsum(diff)
    made = [sum(nbytes.get(t, 0) for t in observed_names(graph, i, types)) for i in range(n)]
    least = int(max((held_before[i] + made[i] for i in range(n)), default=0))
    out, a = [], 0
    while a < n:
        b, acc, w = a + 1, made[a], weights[a]
        while b < n and (no_cut[b] or (held_before[a] + acc + made[b] <= budget and w + weights[b] <= WEIGHT_CAP)):
            acc, w, b = acc + made[b], w + weights[b], b + 1
        out.append((a, b))
        a = b
    return out, least


def _control_flow(graph) -> bool:
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.nodes for a in n.attribute)


def _weight_plan(graph, types) -> list[tuple[int, int]]:
    if _control_flow(graph):
        return [(0, len(graph.nodes))]
    return plan(graph, {}, {}, types, budget=2 ** 62, weights=_weights(graph))[0]


def _segment_feeds(graph, a: int, b: int, held: dict) -> dict[str, np.ndarray]:
    """What nodes [a, b) read from before them (data and shape values; constants are recomputed)."""
    made = {t for i in range(a, b) for t in graph.nodes[i].output if t}
    feeds = {}
    for i in range(a, b):
        for t in graph.nodes[i].input:
            if t and t not in made and t not in graph.const and t not in feeds:
                if t not in held:
                    raise KeyError(f"segment [{a}, {b}) reads {t}, which no earlier run kept")
                feeds[t] = held[t]
    return feeds


def _run(graph, a, b, feeds, outputs: dict[str, int], extra_nodes, session):
    from onnx import helper

    if not outputs:  # constants only: nothing to observe, nothing to run
        return [], []
    def onnx_type(d):
        return d if isinstance(d, int) else helper.np_dtype_to_tensor_dtype(np.dtype(d))

    m = graph.subgraph(list(range(a, b)), feeds, outputs, onnx_type, extra_nodes=extra_nodes)
    sess = session(m)
    names = list(outputs)
    return names, sess.run(names, feeds)


def sizes(graph, feeds: dict, types, session) -> dict[str, int]:
    """Bytes of every exposable tensor of one run on `feeds`: a run exposing only their shapes (and
    the tensors crossing its segments, cut by weight bytes)."""
    from onnx import helper

    nbytes: dict[str, int] = {}
    last = {t: max(cs) for t, cs in graph.consumers.items()}
    held = dict(feeds)
    for a, b in _weight_plan(graph, types):
        names = [t for i in range(a, b) for t in observed_names(graph, i, types)]
        crossing = {t: types[t] for t in names if last.get(t, -1) >= b}
        shapes = {f"{t}::shape": t for t in names}
        extra = [helper.make_node("Shape", [t], [s]) for s, t in shapes.items()]
        outs = {**crossing, **{s: helper.TensorProto.INT64 for s in shapes}}
        got = dict(zip(*_run(graph, a, b, _segment_feeds(graph, a, b, held), outs, extra, session)))
        for s, t in shapes.items():
            item = np.dtype(helper.tensor_dtype_to_np_dtype(types[t])).itemsize
            nbytes[t] = int(np.prod(got[s])) * item
        for t in crossing:
            held[t] = got[t]
        for t in [t for t in held if t not in feeds and last.get(t, -1) < b]:
            del held[t]
    for t, v in feeds.items():
        nbytes[t] = v.nbytes
    return nbytes


def observe(graph, feeds: dict, types, session, *, budget: int, needs: dict[int, set[str]], on_ready,
            on_segment=None, dtypes: dict | None = None) -> dict:
    """Run the graph segment by segment within `budget` bytes of observed tensors held; after each
    segment call `on_ready(k, held_values)` for every pair k (of `needs`: k -> tensors it reads) whose
    tensors have all been made, then free what nothing later reads. `on_segment(a, b, names, arrays)`
    sees every segment's outputs as they arrive. Returns the figures of the run."""
    n = len(graph.nodes)
    exposable = {t for i in range(n) for t in observed_names(graph, i, types)} | set(feeds)
    pos = {t: graph.producer.get(t, -1) for t in exposable}
    ready_at: dict[int, int] = {}
    for k, ts in needs.items():
        ready_at[k] = max((pos[t] for t in ts if t in pos), default=-1)
    last_use = {t: max(graph.consumers.get(t, [-1])) for t in exposable}
    for k, ts in needs.items():
        for t in ts:
            if t in last_use:
                last_use[t] = max(last_use[t], ready_at[k])
    for t in feeds:
        last_use[t] = n  # the inputs stay
    nbytes = sizes(graph, feeds, types, session)
    segments, least = plan(graph, nbytes, last_use, types, budget)
    if _control_flow(graph):  # a body reads outer tensors no node input names: never cut
        segments = [(0, n)]
    held = Held()
    if dtypes is not None:
        held.dtypes = dtypes
    for t, v in feeds.items():
        held.add(t, v)
    pending = sorted(needs, key=lambda k: ready_at[k])
    for a, b in segments:
        outs = {t: types[t] for i in range(a, b) for t in observed_names(graph, i, types)}
        names, arrays = _run(graph, a, b, _segment_feeds(graph, a, b, held.values), outs, [], session)
        held.arrived(arrays)
        if on_segment is not None:
            on_segment(a, b, names, arrays)
        for t, v in zip(names, arrays):
            held.dtypes[t] = v.dtype
            if last_use.get(t, -1) >= a:  # read later, or by a pair that becomes ready now
                held.add(t, v)
        del arrays
        while pending and ready_at[pending[0]] < b:
            on_ready(pending.pop(0), held.values)
        for t in [t for t in held.values if last_use.get(t, n) < b]:
            held.drop(t)
    for k in pending:
        on_ready(k, held.values)
    return {"budget_bytes": int(budget), "peak_bytes": int(held.peak_bytes), "peak_tensors": int(held.peak_tensors),
            "least_peak_bytes": least, "segments": len(segments), "observed_bytes": int(sum(nbytes.get(t, 0) for t in exposable if t not in feeds))}
