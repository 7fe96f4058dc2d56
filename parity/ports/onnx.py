"""An ONNX graph against the reference, node by node, in ONNX Runtime: `--port onnx:FILE.onnx[:LEVEL]`.

One run (docs/onnx.md), holding one model's weights at a time:
1. pairing from the weights: every float initializer of the graph *as stored* is matched to checkpoint
   tensors (pairing.match_parameter, plus a transpose of 2-D weights: the exporter stores a Linear's
   weight as MatMul's [in, out]); a reference module pairs with the region of nodes that consumes its
   weights (onnx_graph.py). Both sides are read one tensor at a time: the graph's initializers from
   its external data files (open_graph), the checkpoint's against the reference's weightless structure;
2. the reference runs once with hooks on the paired modules, spilling outputs and recorded inputs, and
   is freed before any ONNX Runtime session exists;
3. the graph runs once in ONNX Runtime with every intermediate tensor exposed as a graph output
   (accumulated mode), in segments that hold at most a byte budget of observed tensors, each pair
   compared as soon as its tensors are there (onnx_stream.py); and once as it is, at the optimization level LEVEL (default `disabled`): that
   run gives the whole model's row, and the optimized graph ORT writes says which paired tensors that
   level fuses away (the report lists them as not observable at that level);
4. isolated mode: each region is cut out into a graph of its own and fed the reference module's
   recorded inputs, each in place of the tensor of the graph nearest to it in value (the same rule as
   for torch ports, by value because a graph has no call to replay);
5. when a region fails in isolation, the first node inside it that the reference never computes is
   named (the node rule, `node_culprit`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch

from ...models import memory
from ...models.errors import cut
from ..components import ParityError, entry
from ..layers import first_tensor
from ..metrics import METRICS, check, compare, default_tolerance
from ..report import ACCUMULATED, ISOLATED, MODES, LapClock, Report, collect_versions, make_layer
from ..spill import Spill, check_room, estimate_reference
from . import onnx_stream
from .onnx_graph import EXTERNAL, LAYOUT_OPS, ExternalDataError, Graph, Region, all_tensors, external_refs
from .pairing import (SIMILARITY, Index, _atom_tensor, _atoms_of_tensor, _module_sets, _representative, match_parameter,
                      split_tensors)

MODEL = "(model)"


def _ort():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ParityError(f"--port onnx: needs the onnx extra: pip install 'sdport[onnx]' ({e})") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# Pairing


class OnnxPair:
    def __init__(self, reference: tuple[str, ...], kind: str, region: Region, tokens: bool, notes: tuple[str, ...]):
        self.reference, self.kind, self.region, self.tokens, self.notes = reference, kind, region, tokens, notes

    @property
    def reference_name(self) -> str:
        if len(self.reference) == 1:
            return self.reference[0]
        heads = {r.rpartition(".")[0] for r in self.reference}
        tails = ",".join(r.rpartition(".")[2] for r in self.reference)
        return f"{heads.pop()}.{{{tails}}}" if len(heads) == 1 else "+".join(self.reference)


def _match_initializers(graph: Graph, index: Index) -> tuple[dict[str, object], dict[str, str]]:
    """{initializer: Match} and {initializer: why unmatched} for the float initializers that can hold
    a weight (more than one value, not all equal: an InstanceNormalization's ones are no weight). A
    2-D initializer is also tried transposed (MatMul's [in, out] for a Linear's [out, in]). One
    initializer is in memory at a time (an external one read from its file)."""
    found, unmatched = {}, {}
    for name in graph.initializers:
        dtype = graph.initializer_dtype(name)
        if dtype is None or dtype.kind != "f" or graph.initializer_size(name) < 2:
            continue
        a = graph.initializer_array(name)
        if np.all(a == a.flat[0]):
            continue
        t = torch.from_numpy(np.array(a))
        del a
        r = _match_either_way(name, t, index)
        if isinstance(r, list):
            found[name] = r[0]
        elif isinstance(r, tuple):
            unmatched[name] = (f"no checkpoint tensor holds its values (nearest of its size: {r[0]}, cosine "
                               f"{r[1]:.4f} < {SIMILARITY})")
        else:
            unmatched[name] = "no checkpoint tensor of its size holds its values"
    return found, unmatched


def _match_either_way(name: str, t: torch.Tensor, index: Index):
    """match_parameter on `t`, and for a 2-D `t` on its transpose where `t` holds no exact match; the
    search by cosine (which reads every tensor of the size) only where neither way matches exactly."""
    r = match_parameter(name, t, index, nearest=False)
    if r is None and t.dim() == 2:
        r = match_parameter(name, t.t().contiguous(), index, nearest=False)
    if r is not None:
        return r
    r = match_parameter(name, t, index)
    if t.dim() == 2 and not (isinstance(r, list) and r[0].how != "nearest"):
        rt = match_parameter(name, t.t().contiguous(), index)
        if isinstance(rt, list) and (rt[0].how != "nearest" or not isinstance(r, list)):
            r = rt
    return r


def reference_tensors(component: str, checkpoint: str, structure: torch.nn.Module, key_of: dict[str, str]):
    """The reference's parameters, each read from the checkpoint when asked for (in the order the
    reference model holds them), for pairing without a loaded reference."""
    from .run import CheckpointTensors

    names = [n for n, _ in structure.named_parameters()]
    empty = [n for n in names if n not in key_of]
    if empty:
        raise ParityError(f"{checkpoint}: reference {component} has tensors the checkpoint does not fill "
                          f"({', '.join(empty[:3])})")
    return CheckpointTensors(checkpoint, {n: key_of[n] for n in names})


def pair_graph(graph: Graph, reference: torch.nn.Module, tensors=None):
    """(pairs, unpaired {name: why}, {initializer: Match}, coverage, {node: atoms}) for the graph
    against `reference`: a weightless structure (meta parameters) with `tensors` its parameters by
    name, read when asked for (CheckpointTensors), or a loaded model when `tensors` is None."""
    ref_tensors = tensors if tensors is not None else dict(reference.named_parameters())
    index = Index(ref_tensors)
    matches, unmatched = _match_initializers(graph, index)
    split = split_tensors(matches)
    ref_sets, ref_mods = _module_sets(reference, ref_tensors, lambda n: _atoms_of_tensor(n, split))
    atoms = graph.node_atoms({n: frozenset(m.atoms) for n, m in matches.items()})
    init_of = {}  # node -> the initializer names it consumes (for layout and notes)
    for i in atoms:
        init_of[i] = [t for t in graph.nodes[i].input if t in matches]
    groups: dict[frozenset, list[str]] = {}
    for m, s in ref_sets.items():
        groups.setdefault(s, []).append(m)
    owner = {a: t.rpartition(".")[0] for t in ref_tensors for a in _atoms_of_tensor(t, split)}
    pairs, unpaired = [], {}
    for s, names in groups.items():
        rep = _representative(names, ref_mods)
        if rep == "":
            continue  # the whole model: compared through the graph's output
        if isinstance(ref_mods[rep], (torch.nn.ModuleList, torch.nn.ModuleDict)):
            unpaired[f"reference {rep}"] = f"a {type(ref_mods[rep]).__name__} is never called: compared through its members"
            continue
        weighted = {i for i, a in atoms.items() if a <= s}
        if not weighted or frozenset().union(*(atoms[i] for i in weighted)) != s:
            held = {a for i in weighted for a in atoms[i]}
            why = ("no node consumes its weights alone" if not held else
                   f"no node set consumes exactly its weights ({len(s - held)} of {len(s)} held only by nodes with other weights)")
            unpaired[f"reference {rep}"] = why
            continue
        if isinstance(ref_mods[rep], torch.nn.Embedding) and not any(graph.nodes[i].op_type == "Gather" for i in weighted):
            unpaired[f"reference {rep}"] = ("the graph reads its table without a lookup (a slice of positions, added to "
                                            "the tokens): no node computes this module's output")
            continue
        region = graph.region(weighted, atoms)
        if isinstance(region, str):
            unpaired[f"reference {rep}"] = region
            continue
        pairs.append(OnnxPair((rep,), type(ref_mods[rep]).__name__, region,
                              _tokens(graph, weighted, init_of, matches, index.shapes), _notes(weighted, init_of, matches)))
    # Fused nodes: a node whose weight concatenates several whole reference layers' weights (with the
    # node adding their concatenated biases) pairs with those layers, in the order of its weight.
    fused_done = set()
    for i in sorted(atoms):
        m = next((matches[t] for t in init_of.get(i, []) if matches[t].how == "concat"), None)
        if m is None:
            continue
        owners = tuple(owner[x] for x in m.atoms)
        if owners in fused_done or len(set(owners)) != len(owners) or \
                any(o in {r for p in pairs for r in p.reference} for o in owners):
            continue
        union = frozenset().union(*(ref_sets[o] for o in owners))
        weighted = {j for j, a in atoms.items() if a <= union}
        if frozenset().union(*(atoms[j] for j in weighted)) != union:
            continue
        region = graph.region(weighted, atoms)
        if isinstance(region, str):
            continue
        fused_done.add(owners)
        pairs.append(OnnxPair(owners, type(ref_mods[owners[0]]).__name__, region,
                              _tokens(graph, weighted, init_of, matches, index.shapes), ()))
        for o in owners:
            unpaired.pop(f"reference {o}", None)
    leaves = [m for m in ref_sets if any(t.rpartition(".")[0] == m for t in ref_tensors)]
    paired_refs = {r for p in pairs for r in p.reference} | {n for p in pairs for s, ns in groups.items()
                                                            if p.reference[0] in ns for n in ns}
    coverage = {"reference_layers": len(leaves), "reference_layers_paired": sum(m in paired_refs for m in leaves),
                "reference_modules": len(ref_sets), "reference_modules_paired": len(paired_refs & set(ref_sets)),
                "port_parameters": len(matches) + len(unmatched), "port_parameters_matched": len(matches)}
    for name, why in unmatched.items():
        unpaired[f"initializer {name}"] = why
    return pairs, unpaired, matches, coverage, atoms


def _tokens(graph: Graph, weighted, init_of, matches, ref_shapes) -> bool:
    """The region computes on tokens [B, HW, C] where the reference has [B, C, H, W]: its weight is a
    2-D initializer matched to a 4-D (1x1 convolution) weight. Known from the weights, not shapes."""
    for i in weighted:
        for t in init_of.get(i, []):
            m = matches[t]
            ref = ref_shapes.get(_atom_tensor(m.atoms[0]))
            if ref is not None and len(ref) == 4 and len(graph.initializers[t].dims) == 2:
                return True
    return False


def _notes(weighted, init_of, matches) -> tuple[str, ...]:
    out = []
    for i in sorted(weighted):
        for t in init_of.get(i, []):
            m = matches[t]
            if m.how == "nearest":
                out.append(f"initializer {t} is not bit-equal to {m.atoms[0]} (cosine {m.similarity:.6f}): "
                           f"quantized or changed")
    return tuple(out)


def coverage_line(c: dict) -> str:
    pct = 100.0 * c["reference_layers_paired"] / c["reference_layers"] if c["reference_layers"] else float("nan")
    return (f"{c['reference_layers_paired']} of {c['reference_layers']} reference layers with weights paired "
            f"({pct:.0f}%), {c['reference_modules_paired']} of {c['reference_modules']} modules at every level; "
            f"{c['port_parameters_matched']} of {c['port_parameters']} weight initializers matched")


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def _session(model_or_path, level: str, device: str, optimized_path: str | None = None, folder: str | None = None):
    """An ORT session of a graph file, or of a model built here (a segment, a cut region) whose
    external initializers ORT reads from `folder`, the graph's: no weights pass through Python."""
    _, ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if folder and not isinstance(model_or_path, str):
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    try:
        return ort.InferenceSession(src, opts, providers=providers)
    except Exception as e:  # ORT's refusal of the graph: one line
        raise ParityError(f"--port onnx: ONNX Runtime refuses the graph ({cut(str(e).splitlines()[0], 200)})") from None


def _feeds(sess, graph: Graph, component: str, cpu_inputs: dict) -> dict[str, np.ndarray]:
    """The component's inputs for the graph's inputs: by name where the graph uses the native call's
    names (x, t, context, ...), else in call order; each cast to the type the graph declares."""
    from ...models.components import component as native_entry

    names = list(native_entry(component).inputs)
    declared = sess.get_inputs()
    if len(declared) != len(names):
        raise ParityError(f"--port onnx: the graph takes {len(declared)} input(s) ({', '.join(d.name for d in declared)}); "
                          f"the {component} call has {len(names)} ({', '.join(names)})")
    by_name = {d.name for d in declared} == set(names)
    out = {}
    for i, d in enumerate(declared):
        v = cpu_inputs[d.name if by_name else names[i]].numpy()
        out[d.name] = v.astype(_NP_TYPES.get(d.type, v.dtype))
    return out


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _types(model) -> dict[str, int]:
    """{tensor: ONNX element type} from shape inference (what ORT needs to declare an output)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # past protobuf's 2 GB or an op inference does not know: the declared types only
        inferred = model
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)
            if v.type.tensor_type.elem_type}


def _exposed(model, names: list[str], types: dict[str, int]):
    """A copy of `model` with `names` (those of a known type) as extra graph outputs."""
    from onnx import helper

    m = type(model)()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names
                          if n not in have and n in types)
    return m


def whole_run(graph: Graph, path: str, component: str, cpu_inputs: dict, level: str, device: str, work: str,
              wanted: list[str]):
    """One session of the whole graph at `level`: (feeds, provider, the graph's output, {tensor: why}
    for the wanted tensors the optimized graph no longer has). Exposing a tensor as an output keeps
    it; this run exposes none."""
    import onnx

    opt = os.path.join(work, "optimized.onnx")
    # ORT writes the optimized graph as one protobuf: past 2 GB of weights it cannot, and none is asked for.
    big = graph.weight_bytes() >= 2 ** 31 - 2 ** 26
    check = level != "disabled" and not big
    sess = _session(path, level, device, optimized_path=opt if check else None)
    feeds = _feeds(sess, graph, component, cpu_inputs)
    provider = sess.get_providers()[0]
    out = sess.run([sess.get_outputs()[0].name], feeds)[0]
    del sess
    if not check:
        return feeds, provider, out, {}
    kept = {t for n in onnx.load(opt, load_external_data=False).graph.node for t in n.output}
    return feeds, provider, out, {t: f"ONNX Runtime's '{level}' optimizations fuse it away (observed with it "
                                     f"exposed as an output)" for t in wanted if t not in kept}


# ---------------------------------------------------------------------------------------------
# The reference pass


class _Spilled:
    """A tensor argument of a recorded call, held in the spill under `key`."""

    def __init__(self, key: str):
        self.key = key


def _skeleton(v, spill: Spill, prefix: str, counter: list):
    if isinstance(v, torch.Tensor):
        key = f"{prefix}:{counter[0]}"
        counter[0] += 1
        spill.put(key, v)
        return _Spilled(key)
    if isinstance(v, (list, tuple)):
        return type(v)(_skeleton(x, spill, prefix, counter) for x in v)
    return v


def _refill(v, spill: Spill):
    if isinstance(v, _Spilled):
        return spill.get(v.key)
    if isinstance(v, (list, tuple)):
        return type(v)(_refill(x, spill) for x in v)
    return v


def _reference_output(outs: list[torch.Tensor]) -> torch.Tensor:
    """Several reference layers of one fused node: their outputs concatenated along the feature axis."""
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, dim=1 if outs[0].dim() == 4 else -1)


@torch.no_grad()
def reference_pass(component, ref, pairs: list[OnnxPair], inputs, fmt, spill: Spill, record_inputs: bool):
    """Run the reference with hooks on the paired modules; spill each pair's output (and the first
    member's recorded call). Returns the pairs in completion order and the whole model's output."""
    from ..capture import hooks

    pc = entry(component)
    members: dict[str, list[tuple[int, int]]] = {pc.contract_module: []} if pc.contract_module else {}
    for k, p in enumerate(pairs):
        for i, r in enumerate(p.reference):
            members.setdefault(r, []).append((k, i))
    got: dict[int, dict[int, torch.Tensor]] = {}
    order: list[int] = []
    calls: dict[str, tuple] = {}
    contract: list[torch.Tensor] = []

    def on_input(rname, args, kwargs):
        if record_inputs and rname not in calls:
            calls[rname] = (_skeleton(args, spill, f"in:{rname}", [0]), _skeleton(tuple(kwargs.items()), spill, f"kw:{rname}", [0]))

    def on_output(rname, out):
        if rname == pc.contract_module and not contract:
            contract.append(first_tensor(out).detach().float().cpu())
        for k, i in members[rname]:
            parts = got.setdefault(k, {})
            if k in order or i in parts:
                continue  # called again: the first call counts
            parts[i] = first_tensor(out).detach().float().cpu()
            if len(parts) == len(pairs[k].reference):
                spill.put(f"out:{k}", _reference_output([parts[j] for j in range(len(parts))]))
                del got[k]
                order.append(k)

    with hooks(ref, list(members), side="reference", on_input=on_input, on_output=on_output):
        out = pc.call_reference(ref, inputs, fmt)
    whole = contract[0] if pc.contract_module else pc.contract_output(out).detach().float().cpu()
    return order, whole, calls


# ---------------------------------------------------------------------------------------------
# Comparing, isolating, naming the node


def _align(y: np.ndarray, r: torch.Tensor, tokens: bool) -> torch.Tensor | None:
    """A port tensor in the reference's layout (tokens [B, HW, C] -> [B, C, H, W] where the pairing
    says so), or None when the sizes differ."""
    t = torch.from_numpy(np.asarray(y, dtype=np.float32))
    if tuple(t.shape) == tuple(r.shape):
        return t
    if t.numel() != r.numel():
        return None
    if tokens and t.dim() == 3 and r.dim() == 4:
        return t.transpose(1, 2).reshape(r.shape)  # [B, HW, C] -> [B, C, HW] -> [B, C, H, W]
    return t.reshape(r.shape)


def _as_port(r: torch.Tensor, like: np.ndarray, tokens: bool) -> np.ndarray:
    """A reference tensor in the layout and dtype of the port tensor `like` (same element count)."""
    shape = tuple(like.shape)
    if tuple(r.shape) != shape:
        if tokens and r.dim() == 4 and len(shape) == 3:
            r = r.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        r = r.reshape(shape)
    return r.detach().cpu().numpy().astype(like.dtype)


def _metrics(y, r: torch.Tensor, tokens: bool) -> tuple[dict, str]:
    a = _align(y, r, tokens)
    if a is None:
        return ({m: float("nan") for m in METRICS} | {"nonfinite": 0},
                f"outputs of different sizes (port {list(np.shape(y))}, reference {list(r.shape)}): not compared")
    return compare(a, r), ""


def _reference_inputs(spill: Spill, name: str) -> list[torch.Tensor]:
    """The tensors of the reference module's recorded call: floats, and integers (token ids)."""
    out = []
    for prefix in ("in", "kw"):
        j = 0
        while f"{prefix}:{name}:{j}" in spill:
            t = spill.get(f"{prefix}:{name}:{j}")
            if t.dtype != torch.bool and not t.is_complex():
                out.append(t)
            j += 1
    return out


def _distance(v: np.ndarray, r: torch.Tensor, tokens: bool) -> float:
    """How far a graph tensor is from a recorded input: rel_l2 for floats; for integers (ids) 0 when
    equal, else no match (inf); a float never stands for an integer or the other way round."""
    if v.size != r.numel() or (v.dtype.kind == "f") != r.is_floating_point() or v.dtype.kind not in "fiu":
        return float("inf")
    if v.dtype.kind != "f":
        return 0.0 if np.array_equal(v.reshape(-1), r.reshape(-1).numpy()) else float("inf")
    a = torch.from_numpy(_as_port(r, v, tokens).astype(np.float64))
    return float((torch.from_numpy(v.astype(np.float64)) - a).norm() / max(float(a.norm()), 1e-30))


def isolate(graph: Graph, atoms, p: OnnxPair, values: dict, spill: Spill):
    """The region cut out and fed the reference module's recorded inputs, each in place of the tensor
    upstream of the region's inputs nearest to it in value (weightless nodes in between join the cut;
    token ids replace a tensor of equal ids). Returns (kept nodes, feeds, names fed with the
    reference's values) or None without inputs."""
    ref_in = _reference_inputs(spill, p.reference[0])
    if not ref_in:
        return None
    cands = [(u, chain) for t in p.region.inputs for u, chain in graph.upstream(t, atoms) if u in values]
    kept, chosen = set(p.region.nodes), {}
    for r in ref_in:
        best, best_d = None, float("inf")
        for u, chain in cands:
            if u in chosen:
                continue
            d = _distance(values[u], r, p.tokens)
            if d < best_d:
                best, best_d = (u, chain), d
        if best is not None:
            chosen[best[0]] = _as_port(r, values[best[0]], p.tokens)
            kept.update(best[1])
    produced = {t for i in kept for t in graph.nodes[i].output if t}
    feeds = {}
    for i in sorted(kept):
        for t in graph.nodes[i].input:
            if t and t not in produced and t not in graph.const and t not in feeds:
                feeds[t] = chosen[t] if t in chosen else values[t]
    return sorted(kept), feeds, set(chosen)


def run_region(graph: Graph, kept, feeds, outputs, dtypes, level: str, device: str) -> dict[str, np.ndarray]:
    """The nodes `kept` run on `feeds`; `outputs` (those observed, in their dtypes: `dtypes`)."""
    from onnx import helper

    outputs = [o for o in outputs if o in dtypes]
    m = graph.subgraph(kept, feeds, {o: dtypes[o] for o in outputs}, helper.np_dtype_to_tensor_dtype)
    sess = _session(m, level, device, folder=graph.folder)
    return dict(zip(outputs, sess.run(outputs, feeds)))


class _Record(torch.utils._python_dispatch.TorchDispatchMode):
    """Every floating tensor an op produces inside the reference module's call, sorted (a value set
    that any permutation of the same tensor shares), by element count."""

    def __init__(self):
        super().__init__()
        self.values: dict[int, list[torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
                self.values.setdefault(t.numel(), []).append(t.detach().double().flatten().sort().values)
        return out


def node_culprit(graph: Graph, kept, feeds, got: dict, recorded, bound: float) -> str | None:
    """The node rule (docs/onnx.md): in the region run on the reference's inputs, the first node (graph
    order) whose output no tensor of the reference module's own computation matches as a set of values
    (permutation-free: a transpose matches), whose data inputs all agree with the reference, and after
    which no node of the region matches again. Layout-only ops pass their inputs' agreement on."""
    def matches(v):
        if v is None or v.dtype.kind != "f" or v.size < 2:
            return False
        s = torch.from_numpy(v.astype(np.float64)).flatten().sort().values
        return any(float((s - w).norm()) <= bound * max(float(w.norm()), 1e-30) for w in recorded.get(v.size, ()))

    agree = set(feeds) | graph.const | graph.shape
    true_match, order = set(), sorted(kept)
    for i in order:
        outs = graph.data_outputs(i)
        if outs and all(matches(got.get(o)) for o in outs):
            true_match.add(i)
            agree.update(outs)
        elif graph.nodes[i].op_type in LAYOUT_OPS and all(t in agree for t in graph.data_inputs(i)):
            agree.update(outs)
    keep = set(kept)
    for i in order:
        if i in true_match or all(o in agree for o in graph.data_outputs(i)):
            continue
        if not all(t in agree for t in graph.data_inputs(i)):
            continue
        later = graph._reach({i}, True) & keep - {i}
        if not later & true_match:
            n = graph.nodes[i]
            return (f"first node off the reference: {graph.name(i)} ({n.op_type}): its inputs agree with tensors the "
                    f"reference computes, its output with none, and nothing after it in the region agrees again")
    return None


def _needs(graph: Graph, atoms, p: OnnxPair, isolated: bool) -> set[str]:
    """The observed tensors a pair reads: its region's output and, for isolated mode, every tensor
    `isolate` may feed or compare with (the region's inputs, the tensors upstream of them, their
    chains' inputs)."""
    need = {p.region.output}
    if not isolated:
        return need
    made = {t for i in p.region.nodes for t in graph.nodes[i].output if t}
    nodes = set(p.region.nodes)
    for t in p.region.inputs:
        for u, chain in graph.upstream(t, atoms):
            need.add(u)
            nodes.update(chain)
    for i in nodes:
        need.update(t for t in graph.nodes[i].input if t and t not in graph.const and t not in made)
    return need


def _region_name(graph: Graph, region: Region) -> str:
    i = graph.producer.get(region.output, region.nodes[-1])
    return graph.name(i) + (f" [{len(region.nodes)} nodes]" if len(region.nodes) > 1 else "")


# ---------------------------------------------------------------------------------------------
# The run


INLINE_LIMIT = 1024  # an inline initializer of this many bytes or more is moved out of the protobuf


def _load_proto(path: str):
    """The graph's protobuf without external data (the weights stay in their files)."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ParityError(f"--port onnx:{path}: not an ONNX model ({type(e).__name__}: {cut(e, 120)})") from None
    if not model.graph.node:
        raise ParityError(f"--port onnx:{path}: the graph has no nodes")
    return model


def _externalize(model, work: str) -> str:
    """Write a graph whose weights are inline into `work` with them in one external file, each at a
    page-aligned offset (ORT may map such a range instead of copying it). Returns the graph's path."""
    import onnx
    from onnx.external_data_helper import set_external_data

    data = "graph.onnx.data"
    with open(os.path.join(work, data), "wb") as f:
        for t in model.graph.initializer:
            n = len(t.raw_data) if t.HasField("raw_data") else 0
            if n < INLINE_LIMIT:
                continue
            f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            f.write(t.raw_data)
            set_external_data(t, data, offset, n)
            t.ClearField("raw_data")
    path = os.path.join(work, "graph.onnx")
    onnx.save_model(model, path)
    return path


def open_graph(path: str, work: str) -> tuple[str, Graph]:
    """(the graph file sessions are built from, the Graph) with no weights held by Python: external
    data is validated (docs/security.md) and left in its files; a graph with its weights inline is
    first rewritten into `work` with them in an external file, and read back without them (a
    cleared protobuf field keeps its memory)."""
    if not os.path.isfile(path):
        raise ParityError(f"--port onnx:{path}: no such file")
    label = path
    model = _load_proto(path)
    if not any(t.data_location == EXTERNAL for t in all_tensors(model)):
        try:
            path = _externalize(model, work)
        except OSError as e:
            raise ParityError(f"--port onnx:{label}: cannot write its weights into {work} ({e.strerror})") from None
        del model
        memory.release()
        model = _load_proto(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        external = external_refs(model, folder)
    except ExternalDataError as e:
        raise ParityError(f"--port onnx:{label}: external data refused: {e}") from None
    return path, Graph(model, folder, external)


def _first_nonfinite_in(graph: Graph, values: dict, nodes) -> tuple[int, int] | None:
    """(node, count) of the first of `nodes` (graph order) whose float output holds an inf or a NaN.
    A node that reads a shape value (a mask built from the input's shape: the causal mask's -inf
    above the diagonal) is counted for NaN and +inf only: its -inf is the mask's."""
    for i in nodes:
        masked = any(t in graph.shape for t in graph.nodes[i].input)
        for t in graph.data_outputs(i):
            v = values.get(t)
            if v is not None and v.dtype.kind == "f":
                bad = int(np.isnan(v).sum() + np.isposinf(v).sum()) + (0 if masked else int(np.isneginf(v).sum()))
                if bad:
                    return i, bad
    return None


def run_onnx(component: str, checkpoint: str, spec, *, modes=MODES, device: str = "cpu", dtype: str = "fp32",
             seed: int = 0, prompt: str | None = None, batch: int = 2, size: int | None = None, tolerance=None,
             num_heads: int | None = None, workdir: str | None = None, progress=None,
             observe_budget: int | None = None):
    from .. import harness
    from ..reference.load import load_reference
    from .run import reference_structure

    _ort()
    progress = progress or harness.no_progress
    level = spec.func or "disabled"
    pc = entry(component)
    modes = tuple(m for m in MODES if m in modes)
    dev = harness.resolve_device(device)
    harness.deterministic()
    tol = tolerance or default_tolerance(dtype)
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-onnx-"))
        # One model's weights at a time: pairing reads graph and checkpoint tensors one by one; the
        # reference runs and is freed; only then do ORT sessions load the graph's weights.
        path, graph = open_graph(spec.target, work)
        cfg, fmt, structure, key_of = reference_structure(component, checkpoint, num_heads)
        with reference_tensors(component, checkpoint, structure, key_of) as tensors:
            pairs, unpaired, matches, coverage, atoms = pair_graph(graph, structure, tensors)
        encode = None
        if pc.takes_prompt_context and prompt is not None:
            from .run import reference_text_context
            encode = lambda ids: reference_text_context(checkpoint, ids, torch.device("cpu"))  # noqa: E731
        cpu_inputs, desc = harness.draw_inputs(component, cfg, seed=seed, batch=batch, size=size, prompt=prompt,
                                               encode_text=encode)
        desc.update(checkpoint=os.path.basename(checkpoint), port=spec.label, source_format=fmt,
                    reference_dtype="fp32", pairing=coverage_line(coverage), pairing_counts=coverage,
                    onnx_optimization=level, onnx_nodes=len(graph.nodes))
        check_room(work, _spill_estimate(component, structure, pairs, cpu_inputs, fmt, ISOLATED in modes), ParityError)
        spill = stack.enter_context(Spill(work))
        ref, _, _ = load_reference(component, checkpoint, num_heads=num_heads)
        order, whole, calls = reference_pass(component, ref, pairs, cpu_inputs, fmt, spill, ISOLATED in modes)
        progress("reference pass", 1, 1)
        del ref
        memory.release()

        feeds, desc["onnx_provider"], out, gone = whole_run(graph, path, component, cpu_inputs, level, device, work,
                                                            [pairs[k].region.output for k in order])
        in_order = {k: n for n, k in enumerate(order)}
        results: dict[int, tuple] = {}   # k -> (acc, iso, note parts) or None when skipped
        first_bad: list = []             # (node, count) of the first inf/NaN, in graph order
        culprit_cut: dict = {}           # the cut of the earliest (in `order`) pair failing in isolation
        contract = next((p for p in pairs if p.reference == (pc.contract_module,)), None)
        contract_m: list = []
        clock, done = LapClock(), [0]

        def on_segment(a, b, names, arrays):
            if not first_bad:
                hit = _first_nonfinite_in(graph, dict(zip(names, arrays)), range(a, b))
                if hit is not None:
                    first_bad.append(hit)

        def on_ready(k, values):
            p = pairs[k]
            if contract is p and p.region.output in values:
                contract_m.append(_metrics(values[p.region.output], whole, p.tokens))
            if k not in in_order:
                return
            r = spill.get(f"out:{k}")
            y = values.get(p.region.output)
            if y is None:
                results[k] = ("unobservable",)
                return
            if np.size(y) != r.numel():
                results[k] = ("size", list(np.shape(y)), list(r.shape))
                return
            acc, why = _metrics(y, r, p.tokens) if ACCUMULATED in modes else (None, "")
            iso = None
            if ISOLATED in modes and not why:
                try:
                    cut_ = isolate(graph, atoms, p, values, spill)
                    if cut_ is not None:
                        got = run_region(graph, cut_[0], cut_[1], [p.region.output], dtypes, level, device)
                        iso, why = _metrics(got[p.region.output], r, p.tokens)
                        if check(iso, tol)[1] and in_order[k] < culprit_cut.get("n", len(order)):
                            culprit_cut.update(n=in_order[k], k=k, cut=cut_)
                except (KeyError, ParityError) as e:  # a tensor of unknown type, or ORT refuses the cut
                    why = f"isolated run failed: {cut(e, 160)}"
            results[k] = ("row", acc, iso, tuple(r.shape), why)
            clock.lap(str(k))
            done[0] += 1
            progress("ONNX regions" + (" (and isolated runs)" if ISOLATED in modes else ""), done[0], len(order))

        types = _types(graph.model)
        dtypes: dict = {}
        needs = {k: _needs(graph, atoms, pairs[k], ISOLATED in modes) for k in range(len(pairs))
                 if k in in_order or pairs[k] is contract}
        figures = onnx_stream.observe(graph, feeds, types, lambda m: _session(m, level, device, folder=graph.folder),
                                      budget=observe_budget or onnx_stream.DEFAULT_BUDGET, needs=needs,
                                      on_ready=on_ready, on_segment=on_segment, dtypes=dtypes)
        desc["onnx_observation"] = {k: v for k, v in figures.items()}
        bad = first_bad[0] if first_bad else None
        if bad is not None:
            desc["first_nonfinite"] = (f"{graph.name(bad[0])} ({graph.nodes[bad[0]].op_type}) is the first node, in "
                                       f"graph order, whose output holds inf/NaN ({bad[1]} values)")
        rows = []
        for k in order:
            p = pairs[k]
            res = results[k]
            if res[0] == "unobservable":
                unpaired[f"port {_region_name(graph, p.region)}"] = f"paired with {p.reference_name}, but its output is not observable"
                continue
            if res[0] == "size":
                # Same weights, different outputs: the graph computes more or less in the region (a norm
                # applied to the pooled token only). The model's row still compares the end.
                unpaired[f"port {_region_name(graph, p.region)}"] = (
                    f"paired with {p.reference_name}; outputs of different sizes (port {res[1]}, "
                    f"reference {res[2]}): not compared")
                continue
            _, acc, iso, shape, why = res
            notes = list(p.notes) + ([why] if why else [])
            if p.region.output in gone:
                notes.append(gone[p.region.output])
                unpaired[f"port {_region_name(graph, p.region)} at '{level}'"] = gone[p.region.output]
            if bad is not None and bad[0] in p.region.nodes:
                notes.append(f"contains the first node producing inf/NaN: {graph.name(bad[0])}")
            rows.append((k, acc, iso, shape, "; ".join(notes)))
        desc["onnx_not_observable_at_level"] = sum(k.endswith(f" at '{level}'") for k in unpaired)
        layers = [make_layer(j, _region_name(graph, pairs[k].region), pairs[k].reference_name, pairs[k].kind, shape,
                             tol, accumulated=acc, isolated=iso, seconds=clock.seconds.get(str(k)), note=note)
                  for j, (k, acc, iso, shape, note) in enumerate(rows)]
        m, why = _metrics(out, whole, False)
        if contract is not None and contract_m:
            # The contract is a module's output (the encoder's moments before the clamp), not the graph's.
            m, why = contract_m[0]
            why = why or f"the output of {_region_name(graph, contract.region)}, paired with {pc.contract_module}"
        layers.append(make_layer(len(layers), MODEL, MODEL, "model", tuple(whole.shape), tol,
                                 accumulated=m if ACCUMULATED in modes else None,
                                 isolated=m if ISOLATED in modes else None, note=why))
        layers = _name_the_node(layers, rows, pairs, graph, culprit_cut, dtypes, spill, calls, component, checkpoint,
                                (structure, key_of), level, device, tol)
        desc["spilled_bytes"] = spill.bytes
    report = Report(component, modes, dtype, f"{harness.device_name(dev)}; ONNX Runtime {desc['onnx_provider']}",
                    tol, desc, collect_versions(onnx=_ort()[0].__version__, onnxruntime=_ort()[1].__version__),
                    tuple(layers), candidate="port")
    return harness.ParityResult(report, unpaired, {})


def _name_the_node(layers, rows, pairs, graph, culprit_cut, dtypes, spill, calls, component, checkpoint, reference,
                   level, device, tol):
    """For the culprit found in isolation: the node rule inside its region, as the layer's note.
    `reference` is (the weightless structure, {parameter: checkpoint key}): only the culprit's module
    is given its weights."""
    import dataclasses

    from ..report import find_culprit

    c = find_culprit(layers)
    if c is None or c.mode != ISOLATED or c.native == MODEL:
        return layers
    k = rows[c.index][0]
    p = pairs[k]
    if len(p.reference) != 1 or p.reference[0] not in calls:
        return layers
    if culprit_cut.get("k") != k:
        return layers
    kept, feeds, _ = culprit_cut["cut"]
    outs = [t for i in kept for t in graph.data_outputs(i)]
    got = run_region(graph, kept, feeds, outs, dtypes, level, device)
    module = _reference_module(component, checkpoint, *reference, p.reference[0])
    args, kwargs = calls[p.reference[0]]
    rec = _Record()
    with torch.no_grad(), rec:
        module(*_refill(args, spill), **dict(_refill(kwargs, spill)))
    del module
    finding = node_culprit(graph, kept, feeds, got, rec.values, tol.rel_l2 or 1e-5)
    if finding is None:
        finding = "no single node departs from the reference by the node rule (docs/onnx.md)"
    l = layers[c.index]
    layers[c.index] = dataclasses.replace(l, note="; ".join(x for x in (l.note, finding) if x))
    return layers


def _reference_module(component: str, checkpoint: str, structure: torch.nn.Module, key_of: dict, name: str):
    """The reference module `name` of the weightless `structure`, given its checkpoint weights (fp32):
    the one module the node rule re-runs, not the whole reference."""
    from .run import CheckpointTensors

    module = dict(structure.named_modules())[name]
    prefix = f"{name}." if name else ""
    keys = {k: key_of[prefix + k] for k, _ in module.named_parameters() if prefix + k in key_of}
    with CheckpointTensors(checkpoint, keys) as tensors:
        module.load_state_dict(dict(tensors.items()), strict=False, assign=True)
    empty = [n for n, t in module.named_parameters() if t.is_meta]
    if empty:
        raise ParityError(f"{checkpoint}: reference {component} has tensors the checkpoint does not fill "
                          f"({', '.join(prefix + n for n in empty[:3])})")
    return module.float().eval().requires_grad_(False)


def _spill_estimate(component: str, structure, pairs: list[OnnxPair], cpu_inputs: dict, fmt: str,
                    record_inputs: bool) -> int:
    """Bytes the reference pass spills (a pass of the weightless structure on meta), 0 if unknown."""
    pc = entry(component)
    members = list(dict.fromkeys([*([pc.contract_module] if pc.contract_module else []),
                                  *(r for p in pairs for r in p.reference)]))
    return estimate_reference(component, structure, cpu_inputs, fmt, members, members if record_inputs else ())
