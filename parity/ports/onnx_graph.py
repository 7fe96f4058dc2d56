"""An ONNX graph as the port pairing sees it: which weights each node consumes, and the region of
nodes that computes what one reference module computes (docs/onnx.md, "Regions").

Tensors are of three kinds: constants (initializers, Constant nodes and everything computed from
constants alone), shape values (Shape's outputs and what is computed from them and constants), and
data. Only data edges connect a region; constants carry the weights' *atoms* (the reference tensors,
or parts of them, that an initializer's values matched) to the nodes that consume them.

The region of a reference module whose atoms are S:
1. its weighted nodes W: every node that consumes weights of S and of nothing else; their atoms
   together must be S;
2. the hull: W and every node that lies on a data path between two nodes of W;
3. residual joins: a weightless node downstream whose data inputs come (through chains of weightless
   single-input nodes) from at least two different tensors, each produced in the region or an input
   of it, joins it with those chains (ResBlock's `skip(x) + h`, a transformer's `x + proj_out(...)`).
   SiLU's `x * sigmoid(x)` has one source and does not join.
The region's output is the last tensor it produces that a node outside it (or the graph's output)
reads. Its inputs are the data tensors its nodes read and it does not produce.

Weights stay on disk: the graph is read without its external data, and an initializer stored
externally is read, when asked for, as a memory map of its validated file range (`External`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat

import numpy as np

# Ops that only move or relabel values: a node of these is never "where a value went wrong" on its own.
# Residual joins are arithmetic (a Concat of a block's output with its input is the next block's business).
JOIN_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sum"})
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast",
                        "Expand", "Dropout", "Split", "Slice", "Gather", "Concat"})


EXTERNAL = 1  # TensorProto.EXTERNAL: the tensor's bytes are in a file


@dataclasses.dataclass(frozen=True)
class External:
    """Where an initializer's bytes lie: a regular file inside the graph's folder, and a range of it."""

    path: str
    offset: int
    length: int


class ExternalDataError(ValueError):
    """An initializer's external data that is not read: outside the graph's folder, a link, out of range."""


def _external_fields(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _inside(folder: str, location: str) -> str:
    """The path of `location` below `folder`, refused when it is absolute, climbs (`..`) or passes a link."""
    parts = location.replace("\\", "/").split("/")
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in parts[0]:
        raise ExternalDataError(f"location '{location[:80]}' is not a relative path")
    if any(p in ("", "..") for p in parts):
        raise ExternalDataError(f"location '{location[:80]}' leaves the graph's folder or is not a plain path")
    parts = [p for p in parts if p != "."]
    path = os.path.join(folder, *parts)
    walk = folder
    for p in parts:
        walk = os.path.join(walk, p)
        if os.path.islink(walk):
            raise ExternalDataError(f"location '{location[:80]}' passes through a link")
    return path


def _file_size(path: str, location: str) -> int:
    """The size of a regular file, opened without following a link (and without waiting on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ExternalDataError(f"cannot open '{location[:80]}' ({e.strerror})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ExternalDataError(f"'{location[:80]}' is not a regular file")
    return st.st_size


def _element_bytes(t) -> tuple[int, int] | None:
    """(elements, bytes per element) of a tensor's declared type, or None for a type this reader
    does not map (strings; 4- and 2-bit types, packed several to a byte)."""
    from onnx import TensorProto, helper

    unmapped = {getattr(TensorProto, n, None) for n in ("STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}
    if t.data_type in unmapped:
        return None
    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(t.dims), item  # Python integers: a crafted shape cannot wrap around


def all_tensors(model):
    """Every tensor the model stores: initializers and node attributes, in subgraphs too."""
    from onnx import AttributeProto

    todo = [model.graph]
    while todo:
        g = todo.pop()
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == AttributeProto.GRAPH:
                    todo.append(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    todo.extend(a.graphs)


def external_refs(model, folder: str) -> dict[str, External]:
    """{initializer: External} for every initializer of `model` stored externally. Every tensor the
    model stores externally is checked (a Constant's value or a subgraph's initializer is read by ORT
    too): a relative location inside `folder`, no `..`, no link, a regular file; offset and length
    within the file; the length the tensor's type and shape need. Raises ExternalDataError."""
    folder = os.path.abspath(folder)
    sizes: dict[str, int] = {}
    for t in all_tensors(model):
        if t.data_location == EXTERNAL:
            _checked(t, folder, sizes)
    return {t.name: _checked(t, folder, sizes) for t in model.graph.initializer if t.data_location == EXTERNAL}


def _checked(t, folder: str, sizes: dict[str, int]) -> External:
    f = _external_fields(t)
    name = t.name[:80]
    location = f.get("location", "")
    path = _inside(folder, location)
    if path not in sizes:
        sizes[path] = _file_size(path, location)
    size = sizes[path]
    try:
        offset = int(f.get("offset", "0"))
        length = int(f["length"]) if "length" in f else size - offset
    except ValueError:
        raise ExternalDataError(f"initializer {name}: offset or length is not an integer") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise ExternalDataError(f"initializer {name}: bytes {offset}..{offset + length} lie outside "
                                f"'{location[:80]}' ({size} bytes)")
    if any(d < 0 for d in t.dims):
        raise ExternalDataError(f"initializer {name}: negative dimension {list(t.dims)}")
    shape = _element_bytes(t)
    if shape is not None and shape[0] * shape[1] != length:
        raise ExternalDataError(f"initializer {name}: {list(t.dims)} of {shape[1]}-byte elements is "
                                f"{shape[0] * shape[1]} bytes, its external data {length}")
    return External(path, offset, length)


def _mapped(e: External, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of `e`'s range, the file opened without following a link."""
    fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or e.offset + e.length > st.st_size:
            raise ExternalDataError(f"'{os.path.basename(e.path)}' changed since the graph was read")
        if e.length == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", offset=e.offset, shape=shape)


@dataclasses.dataclass
class Region:
    nodes: list[int]          # node indices, in graph (topological) order
    output: str               # the tensor compared with the reference module's output
    inputs: list[str]         # data tensors read from outside the region
    weighted: list[int]       # the nodes holding the weights


class Graph:
    """Topology of one ONNX graph: producers, consumers, constants, shape values, data edges."""

    def __init__(self, model, folder: str | None = None, external: dict[str, External] | None = None):
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.folder = folder              # where ONNX Runtime resolves external data
        self.external = external or {}    # initializers whose bytes stay on disk
        self.nodes = list(g.node)
        self.inputs = [i.name for i in g.input]
        self.outputs = [o.name for o in g.output]
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.const: set[str] = set(self.initializers)
        self.shape: set[str] = set()
        for n in self.nodes:
            ins = [t for t in n.input if t]
            if n.op_type == "Constant" or (ins and all(t in self.const for t in ins)):
                self.const.update(o for o in n.output if o)
            elif n.op_type == "Shape" or (ins and all(t in self.const or t in self.shape for t in ins)):
                self.shape.update(o for o in n.output if o)
        self.numpy_helper = numpy_helper

    def data_inputs(self, i: int) -> list[str]:
        return [t for t in self.nodes[i].input if t and t not in self.const and t not in self.shape]

    def data_outputs(self, i: int) -> list[str]:
        return [t for t in self.nodes[i].output if t and t not in self.const and t not in self.shape]

    def name(self, i: int) -> str:
        n = self.nodes[i]
        return n.name or f"{n.op_type}_{i}"

    def initializer_array(self, name: str) -> np.ndarray:
        """An initializer's values; one stored externally is a read-only memory map of its file."""
        t = self.initializers[name]
        e = self.external.get(name)
        if e is None or _element_bytes(t) is None:
            return self.numpy_helper.to_array(t, base_dir=self.folder or "")
        from onnx import helper

        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
        return _mapped(e, dtype, tuple(t.dims))

    def initializer_dtype(self, name: str) -> np.dtype | None:
        from onnx import helper

        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.initializers[name].data_type))
        except (KeyError, TypeError, ValueError):
            return None

    def initializer_size(self, name: str) -> int:
        return math.prod(self.initializers[name].dims)

    def initializer_nbytes(self, name: str) -> int:
        """The bytes an initializer's values take (its external range, or its data in the graph)."""
        e = self.external.get(name)
        if e is not None:
            return e.length
        t = self.initializers[name]
        return len(t.raw_data) or self.initializer_array(name).nbytes

    def weight_bytes(self) -> int:
        return sum(self.initializer_nbytes(n) for n in self.initializers)

    # --- atoms ---------------------------------------------------------------------------------
    def node_atoms(self, init_atoms: dict[str, frozenset]) -> dict[int, frozenset]:
        """{node: the atoms of the weights it consumes}, weights reaching it through constant nodes
        (a Transpose or Cast of an initializer) included. Only nodes with data inputs hold weights."""
        const_atoms: dict[str, frozenset] = dict(init_atoms)
        out: dict[int, frozenset] = {}
        for i, n in enumerate(self.nodes):
            got = frozenset().union(*(const_atoms.get(t, frozenset()) for t in n.input if t))
            if not got:
                continue
            # A weight sliced by a shape value (positions[:T]) is no data yet: carried on, as constants are.
            if all(o in self.const or o in self.shape for o in n.output if o):
                for o in n.output:
                    const_atoms[o] = got
            elif self.data_inputs(i):
                out[i] = got
        return out

    # --- regions -------------------------------------------------------------------------------
    def _reach(self, start: set[int], forward: bool) -> set[int]:
        seen, todo = set(start), list(start)
        while todo:
            i = todo.pop()
            nxt = ([c for t in self.data_outputs(i) for c in self.consumers.get(t, ())] if forward else
                   [self.producer[t] for t in self.data_inputs(i) if t in self.producer])
            for j in nxt:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def region(self, weighted: set[int], atoms: dict[int, frozenset]) -> Region | str:
        """The region around `weighted` (module docstring), or why there is none."""
        hull = self._reach(weighted, True) & self._reach(weighted, False)
        foreign = [j for j in hull if j in atoms and j not in weighted]
        if foreign:
            return f"its weights' nodes are not contiguous (node {self.name(foreign[0])} holds other weights between them)"
        nodes = set(hull)
        while self._join(nodes, atoms):
            pass
        return self._finish(nodes, weighted)

    def _source(self, t: str, nodes: set[int], atoms) -> tuple[str, list[int]]:
        """`t` traced up through weightless single-data-input nodes outside `nodes`: (source, chain)."""
        chain = []
        while t in self.producer:
            j = self.producer[t]
            ins = self.data_inputs(j)
            if j in nodes or j in atoms or len(ins) != 1:
                break
            chain.append(j)
            t = ins[0]
        return t, chain

    def _join(self, nodes: set[int], atoms) -> bool:
        produced = {t for i in nodes for t in self.data_outputs(i)}
        read = {t for i in nodes for t in self.data_inputs(i)} - produced
        # The region's inputs as the module received them: a norm's input before its statistics.
        read |= {u for t in list(read) for u, _ in self.upstream(t, atoms)}
        frontier = sorted({c for t in produced for c in self.consumers.get(t, ()) if c not in nodes})
        # Follow single-input weightless chains out of the region to the first multi-input node.
        candidates = set()
        for c in frontier:
            j, seen = c, 0
            while j not in atoms and len(self.data_inputs(j)) == 1 and seen < 64:
                outs = [x for t in self.data_outputs(j) for x in self.consumers.get(t, ())]
                if len(outs) != 1:
                    break
                j, seen = outs[0], seen + 1
            if j not in atoms and len(self.data_inputs(j)) >= 2 and j not in nodes and self.nodes[j].op_type in JOIN_OPS:
                candidates.add(j)
        for j in sorted(candidates):
            traced = [self._source(t, nodes, atoms) for t in self.data_inputs(j)]
            sources = {s for s, _ in traced}
            if len(sources) >= 2 and sources <= produced | read and sources & produced:
                nodes.add(j)
                for _, chain in traced:
                    nodes.update(chain)
                return True
        return False

    def _finish(self, nodes: set[int], weighted: set[int]) -> Region:
        order = sorted(nodes)
        produced = {t for i in order for t in self.data_outputs(i)}
        leaving = [t for i in order for t in self.data_outputs(i)
                   if t in self.outputs or any(c not in nodes for c in self.consumers.get(t, ()))]
        read = []
        for i in order:
            for t in self.data_inputs(i):
                if t not in produced and t not in read:
                    read.append(t)
        return Region(order, leaving[-1] if leaving else self.data_outputs(order[-1])[-1], read, sorted(weighted))

    def upstream(self, t: str, atoms, limit: int = 64) -> list[tuple[str, list[int]]]:
        """Tensors `t` is computed from by weightless nodes of one source each (reshapes, a norm's
        statistics, SiLU's x * sigmoid(x)): [(tensor, nodes between it and t)], nearest first."""
        out, chain = [(t, [])], []
        while t in self.producer and len(out) < limit:
            j = self.producer[t]
            if j in atoms:
                break
            ins = self.data_inputs(j)
            if not ins:
                break
            common = self._common_source(ins, atoms)
            if common is None:
                break
            src, between = common
            chain = chain + [j] + between
            t = src
            out.append((t, list(chain)))
        return out

    def _common_source(self, ins: list[str], atoms) -> tuple[str, list[int]] | None:
        """The nearest tensor every one of `ins` is computed from through weightless nodes of a
        single data input (for one input: that input), with the nodes in between."""
        if len(ins) == 1:
            return ins[0], []
        chains = []
        for t in ins:
            c = [(t, [])]
            nodes: list[int] = []
            while t in self.producer and len(c) < 16:
                j = self.producer[t]
                d = self.data_inputs(j)
                if j in atoms or len(d) != 1:
                    break
                nodes = nodes + [j]
                t = d[0]
                c.append((t, list(nodes)))
            chains.append(c)
        for t, _ in chains[0]:
            if all(any(t == u for u, _ in c) for c in chains[1:]):
                between = sorted({j for c in chains for u, n in c if u == t for j in n})
                return t, between
        return None

    # --- subgraphs -----------------------------------------------------------------------------
    def subgraph(self, nodes: list[int], feeds: dict[str, np.ndarray], outputs: dict[str, np.dtype], onnx_dtype,
                 extra_nodes=()):
        """A model of `nodes` (with the constant nodes they need), reading `feeds` (name -> an array of
        the dtype and shape it will be fed) as graph inputs, producing `outputs` (name -> dtype);
        `extra_nodes` (NodeProtos reading what those nodes make) run after them."""
        from onnx import helper

        keep = set(nodes)
        todo = [t for i in nodes for t in self.nodes[i].input if t]
        seen = set()
        while todo:
            t = todo.pop()
            if t in seen or t in feeds or t in self.initializers:
                continue
            seen.add(t)
            j = self.producer.get(t)
            if j is not None and j not in keep and (t in self.const or t in self.shape):
                keep.add(j)
                todo.extend(x for x in self.nodes[j].input if x)
        needed = {t for i in keep for t in self.nodes[i].input if t}
        missing = [t for t in needed if t not in feeds and t not in self.initializers
                   and not any(t in self.nodes[i].output for i in keep)]
        if missing:
            raise KeyError(f"subgraph needs {missing[0]}, which is neither fed nor computed")
        inputs = [helper.make_tensor_value_info(k, onnx_dtype(v.dtype), list(v.shape)) for k, v in feeds.items()]
        outs = [helper.make_tensor_value_info(o, onnx_dtype(d), None) for o, d in outputs.items()]
        inits = [self.initializers[t] for t in sorted(needed) if t in self.initializers and t not in feeds]
        graph = helper.make_graph([self.nodes[i] for i in sorted(keep)] + list(extra_nodes), "region", inputs, outs, inits)
        m = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return m
