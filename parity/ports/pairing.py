"""Pairing a port's modules with the reference's, from the weights alone (no name map).

1. Parameters. Each port parameter is matched to the checkpoint tensors that hold its values, up to
   the transforms ports use: the same values in another shape (a 1x1 conv stored as a linear weight),
   a transpose, several reference tensors concatenated along the first axis (fused q/k/v or k/v), a
   part of one reference tensor (q, k, v split out of a fused in_proj), a dtype cast. A weight that is
   none of these (quantized, or changed) matches the reference tensor of the same size it is nearest
   to by cosine similarity, when that is at least SIMILARITY; the match says so.
2. Modules. A port module's *atoms* are the reference tensors (or parts) its parameters matched; a
   reference module's atoms are its own tensors. Equal atom sets pair the modules, at every level
   (a diffusers ResnetBlock2D <-> ldm ResBlock, Attention <-> CrossAttention, the whole model <-> the
   whole model). A port layer whose weight concatenates several reference layers' weights (a fused
   qkv) pairs with those layers, in the order of its weight. Modules with equal atom sets on one side
   (a Sequential holding one conv) are one group: the deepest module stands for it (the port itself,
   for the whole model).
3. Layouts. A pair computes on tokens [B, HW, C] on the port side where the reference computes on
   NCHW exactly when the pair's weight matched a 1x1 convolution's as a linear one's: known from the
   weights, never guessed from shapes.
4. Findings. A pairing that contradicts the port's own structure is reported next to the layer: a
   child named like a reference child but holding another child's weights (to_k holding to_v's); a
   square weight that matches only through a transpose in a layer that stores [out, in] as the
   reference does; a weight that is not bit-equal to any checkpoint tensor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch

from ..layers import fused_name

SIMILARITY = 0.99  # least cosine similarity for a weight that equals no checkpoint tensor exactly
_SPLITS = (3, 2, 4)  # fused projections: q/k/v, k/v, and 4-way (gates)
# Layers that store a 2-D weight as [out, in], as the reference's Linear (and a 1x1 conv) does.
_OUT_IN = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class Match:
    """A port parameter and the reference atoms that hold its values."""

    port: str
    atoms: tuple[str, ...]  # "a.weight", or "a.in_proj_weight[1/3]" for the 2nd of 3 parts
    how: str                # identity | reshape | transpose | concat | slice | nearest
    parts: tuple[str, ...] = ()  # per atom, for concat: identity | reshape | transpose
    cast: bool = False      # the port holds another dtype
    similarity: float = 1.0


@dataclasses.dataclass(frozen=True)
class Pair:
    port: str                   # port module ("" is the port itself)
    reference: tuple[str, ...]  # reference module(s); several for a fused port layer, in its weight's order
    kind: str                   # the reference module's class
    tokens: bool = False        # the port side is [B, HW, C] where the reference is [B, C, H, W]
    notes: tuple[str, ...] = ()
    port_aliases: tuple[str, ...] = ()  # port modules with the same weights (they compute the same)
    reference_aliases: tuple[str, ...] = ()

    @property
    def reference_name(self) -> str:
        return fused_name(self.reference)


@dataclasses.dataclass
class Pairing:
    matches: dict[str, Match]
    pairs: list[Pair]
    port_unpaired: dict[str, str]        # port module -> why it has no counterpart
    reference_unpaired: dict[str, str]   # reference module -> why
    unmatched: dict[str, str]            # port parameter -> why no checkpoint tensor matched
    coverage: dict[str, int]

    def by_reference(self) -> dict[str, Pair]:
        return {r: p for p in self.pairs for r in p.reference}


# ---------------------------------------------------------------------------------------------
# Parameters


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)


class Index:
    """Reference tensors by element count, with a fingerprint (sum of squares) that reshapes and
    transposes keep. `tensors` may read each tensor when asked for (CheckpointTensors): the index
    reads each once and keeps only shapes and fingerprints; a comparison reads its candidates again."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.by_numel: dict[int, list[str]] = {}
        self.sumsq: dict[str, float] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, t in tensors.items():
            self.by_numel.setdefault(t.numel(), []).append(name)
            self.sumsq[name] = float(_f64(t).square().sum())
            self.shapes[name] = tuple(t.shape)
            del t
        self.slices: dict[int, list[tuple[str, int, int]]] | None = None

    def candidates(self, p: torch.Tensor) -> list[str]:
        """Same element count, fingerprint within what a dtype cast can change, nearest first."""
        s = float(_f64(p).square().sum())
        rel = 1e-6 if p.dtype in (torch.float32, torch.float64) else 2e-2
        near = [n for n in self.by_numel.get(p.numel(), [])
                if abs(self.sumsq[n] - s) <= rel * max(s, self.sumsq[n]) + 1e-30]
        return sorted(near, key=lambda n: abs(self.sumsq[n] - s))

    def slice_candidates(self, p: torch.Tensor) -> list[tuple[str, int, int]]:
        """(tensor, part, parts): equal parts of a reference tensor along its first axis."""
        if self.slices is None:
            self.slices = {}
            for name, shape in self.shapes.items():
                numel = math.prod(shape)
                for k in _SPLITS:
                    if len(shape) >= 1 and shape[0] % k == 0 and shape[0] > k - 1:
                        for i in range(k):
                            self.slices.setdefault(numel // k, []).append((name, i, k))
        return self.slices.get(p.numel(), [])


def _equal(p: torch.Tensor, r: torch.Tensor) -> str | None:
    """How `p` holds exactly `r`'s values (after casting r to p's dtype), or None."""
    if p.numel() != r.numel():
        return None
    rc = r.detach().to(device=p.device, dtype=p.dtype)
    if p.shape == r.shape and torch.equal(p, rc):
        return "identity"
    if p.dim() == 2 and r.dim() == 2 and p.shape == r.shape[::-1] and torch.equal(p, rc.t()):
        return "transpose"
    if p.shape != r.shape and torch.equal(p.reshape(-1), rc.reshape(-1)):
        return "reshape"
    return None


def _part(t: torch.Tensor, i: int, k: int) -> torch.Tensor:
    return t.chunk(k, dim=0)[i]


def _match_one(name: str, p: torch.Tensor, index: Index) -> list[Match]:
    """Every exact match of `p` as one tensor (several when the checkpoint repeats values)."""
    cast = p.dtype != torch.float32
    out = []
    for r in index.candidates(p):
        how = _equal(p, index.tensors[r])
        if how:
            out.append(Match(name, (r,), how, cast=cast))
    return out


def match_parameter(name: str, p: torch.Tensor, index: Index,
                    nearest: bool = True) -> list[Match] | tuple[str, float] | None:
    """Exact matches (possibly several), else (nearest tensor, cosine) for a near miss, else None.
    `nearest=False`: exact matches or None (no search by cosine)."""
    p = p.detach()
    if not p.is_floating_point() and p.dtype not in (torch.int8, torch.uint8):
        return None
    found = _match_one(name, p, index) if p.is_floating_point() else []
    if found:
        return found
    cast = p.dtype != torch.float32
    # Fused: consecutive parts along the first axis, each a whole reference tensor.
    if p.is_floating_point() and p.dim() >= 1:
        for k in _SPLITS:
            if p.shape[0] % k or p.shape[0] < k:
                continue
            parts = [_match_one(name, c, index) for c in p.chunk(k, dim=0)]
            if all(parts):
                atoms = tuple(m[0].atoms[0] for m in parts)
                return [Match(name, atoms, "concat", tuple(m[0].how for m in parts), cast)]
        # Split: one part of a reference tensor (a fused in_proj held as q, k and v).
        for r, i, k in index.slice_candidates(p):
            how = _equal(p, _part(index.tensors[r], i, k))
            if how:
                return [Match(name, (f"{r}[{i}/{k}]",), "slice", (how,), cast)]
    if not nearest:
        return None
    # Nearest by cosine among tensors of the same size (same shape, or a transpose / reshape of it).
    best, best_cos = None, -1.0
    pv = _f64(p)
    pn = float(pv.norm())
    for r in index.by_numel.get(p.numel(), []):
        t = index.tensors[r]
        views = [_f64(t)]
        if t.dim() == 2 and p.dim() == 2 and p.shape == t.shape[::-1] and p.shape != t.shape:
            views = [_f64(t.t())]
        for v in views:
            denom = pn * float(v.norm())
            c = float(pv @ v) / denom if denom else 0.0
            if c > best_cos:
                best, best_cos = r, c
    if best is not None and best_cos >= SIMILARITY:
        t = index.tensors[best]
        how = "transpose" if (t.dim() == 2 and p.shape == t.shape[::-1] and p.shape != t.shape) else "nearest"
        return [Match(name, (best,), "nearest", (how,), cast, best_cos)]
    return (best, best_cos) if best is not None else None


# ---------------------------------------------------------------------------------------------
# Modules


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _depth(name: str) -> int:
    return 0 if name == "" else name.count(".") + 1


def split_tensors(matches: dict[str, Match]) -> dict[str, int]:
    """{reference tensor: parts} for the tensors the port holds in parts (a fused in_proj as q, k, v)."""
    split = {}
    for m in matches.values():
        if m.how == "slice":
            t, _, frac = m.atoms[0].partition("[")
            split[t] = int(frac.rstrip("]").split("/")[1])
    return split


def _atoms_of_tensor(name: str, split: dict[str, int]) -> set[str]:
    k = split.get(name)
    return {f"{name}[{i}/{k}]" for i in range(k)} if k else {name}


def _atom_tensor(atom: str) -> str:
    return atom.partition("[")[0]


def _module_sets(model: torch.nn.Module, names, atoms_of_param) -> tuple[dict[str, frozenset], dict[str, torch.nn.Module]]:
    """{module name: its atoms (recursively)}, for modules with at least one; and the modules."""
    mods = dict(model.named_modules())
    direct: dict[str, set] = {}
    for pname in names:
        direct.setdefault(_parent(pname), set()).update(atoms_of_param(pname))
    sets: dict[str, set] = {}
    for owner, atoms in direct.items():
        m = owner
        while True:
            sets.setdefault(m, set()).update(atoms)
            if m == "":
                break
            m = _parent(m)
    return {m: frozenset(a) for m, a in sets.items() if a and m in mods}, mods


def _representative(names: list[str], mods) -> str:
    """The whole model where it is in the group, else the deepest module that has a forward of its
    own (a ModuleList or ModuleDict is never called)."""
    if "" in names:
        return ""
    callable_ = [n for n in names if not isinstance(mods[n], (torch.nn.ModuleList, torch.nn.ModuleDict))] or names
    return max(callable_, key=lambda n: (_depth(n), names.index(n)))


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's weights by name: its state dict's floating (and int8) tensors. The state dict, not the
    parameters: a port may keep weights in buffers (quantized ones) or in a packed form that its
    state dict gives back plainly."""
    return {k: v for k, v in model.state_dict().items()
            if v.is_floating_point() or v.dtype in (torch.int8, torch.uint8)}


def pair_modules(port: torch.nn.Module, reference: torch.nn.Module,
                 reference_tensors: Mapping[str, torch.Tensor] | None = None) -> Pairing:
    """Pair `port`'s modules with `reference`'s through their weights (module docstring)."""
    ref_tensors = dict(reference_tensors) if reference_tensors is not None else {
        n: p for n, p in reference.named_parameters()}
    index = Index(ref_tensors)
    port_params = weights_of(port)
    found: dict[str, list[Match]] = {}
    unmatched: dict[str, str] = {}
    for name, p in port_params.items():
        r = match_parameter(name, p, index)
        if isinstance(r, list):
            found[name] = r
        elif isinstance(r, tuple):
            unmatched[name] = (f"no checkpoint tensor holds its values (nearest of its size: {r[0]}, "
                               f"cosine {r[1]:.4f} < {SIMILARITY})")
        else:
            unmatched[name] = "no checkpoint tensor of its size holds its values"
    matches = _resolve(found)

    split = split_tensors(matches)
    ref_sets, ref_mods = _module_sets(reference, ref_tensors, lambda n: _atoms_of_tensor(n, split))
    port_sets, port_mods = _module_sets(port, port_params, lambda n: set(matches[n].atoms) if n in matches else set())

    ref_groups: dict[frozenset, list[str]] = {}
    for m, s in ref_sets.items():
        ref_groups.setdefault(s, []).append(m)
    port_groups: dict[frozenset, list[str]] = {}
    for m, s in port_sets.items():
        port_groups.setdefault(s, []).append(m)

    pairs: list[Pair] = []
    paired_ref: set[str] = set()
    paired_port: set[str] = set()
    for s, pnames in port_groups.items():
        rnames = ref_groups.get(s)
        if rnames:
            pr, rr = _representative(pnames, port_mods), _representative(rnames, ref_mods)
            pairs.append(Pair(pr, (rr,), type(ref_mods[rr]).__name__,
                              tokens=_tokens(pr, rr, port_mods, ref_mods, matches),
                              port_aliases=tuple(n for n in pnames if n != pr),
                              reference_aliases=tuple(n for n in rnames if n != rr)))
            paired_ref.update(rnames)
            paired_port.update(pnames)

    # Fused layers: a port layer whose own weight concatenates whole reference layers' weights.
    ref_owner = {a: _parent(t) for t in ref_tensors for a in _atoms_of_tensor(t, split)}
    for s, pnames in port_groups.items():
        if any(n in paired_port for n in pnames):
            continue
        pr = _representative(pnames, port_mods)
        w = matches.get(_join(pr, "weight"))
        if w is None or w.how != "concat":
            continue
        owners = [ref_owner[a] for a in w.atoms]
        if len(set(owners)) == len(owners) and frozenset().union(*(ref_sets[o] for o in owners)) == s:
            kind = type(ref_mods[owners[0]]).__name__
            pairs.append(Pair(pr, tuple(owners), kind, tokens=all(h == "reshape" for h in w.parts)))
            paired_port.update(pnames)
            paired_ref.update(owners)

    pairs = [dataclasses.replace(p, notes=_notes(p, pairs, matches, port_mods, ref_mods)) for p in pairs]
    port_unpaired = {m: _why_port(m, port_sets[m], ref_sets, ref_owner) for m in port_sets if m not in paired_port}
    for name, why in unmatched.items():
        port_unpaired.setdefault(_parent(name), f"parameter {name}: {why}")
    ref_unpaired = {m: _why_reference(m, ref_sets[m], matches, port_sets) for m in ref_sets if m not in paired_ref}
    leaves = [m for m in ref_sets if any(_parent(t) == m for t in ref_tensors)]
    coverage = {"reference_layers": len(leaves), "reference_layers_paired": sum(m in paired_ref for m in leaves),
                "reference_modules": len(ref_sets), "reference_modules_paired": len(paired_ref & set(ref_sets)),
                "port_parameters": len(port_params), "port_parameters_matched": len(matches)}
    return Pairing(matches, pairs, port_unpaired, ref_unpaired, unmatched, coverage)


def _resolve(found: dict[str, list[Match]]) -> dict[str, Match]:
    """One match per parameter. Where the checkpoint repeats values, prefer the tensor whose module
    already holds the parameter's siblings' matches, then one not taken by another parameter."""
    out = {n: ms[0] for n, ms in found.items() if len(ms) == 1}
    used = {a for m in out.values() for a in m.atoms}
    for n, ms in found.items():
        if n in out:
            continue
        owners = {_parent(_atom_tensor(a)) for s, m in out.items() if _parent(s) == _parent(n) for a in m.atoms}
        pick = next((m for m in ms if _parent(_atom_tensor(m.atoms[0])) in owners), None)
        pick = pick or next((m for m in ms if m.atoms[0] not in used), ms[0])
        out[n] = pick
        used.update(pick.atoms)
    return out


def _tokens(port_name: str, ref_name: str, port_mods, ref_mods, matches) -> bool:
    """The port layer is a linear on tokens where the reference layer is a 1x1 convolution: its
    weight matched the convolution's in another shape ([out, in] for [out, in, 1, 1])."""
    w = matches.get(_join(port_name, "weight"))
    r = ref_mods[ref_name]
    one_by_one = isinstance(r, torch.nn.Conv2d) and tuple(r.kernel_size) == (1, 1)
    return (w is not None and one_by_one and not isinstance(port_mods[port_name], torch.nn.Conv2d)
            and w.how in ("reshape", "nearest"))


def _notes(p: Pair, pairs: list[Pair], matches, port_mods, ref_mods) -> tuple[str, ...]:
    notes = []
    mod = port_mods[p.port]
    for pname, m in matches.items():
        if _parent(pname) != p.port:
            continue
        leaf = pname.rpartition(".")[2]
        if m.how == "transpose" and isinstance(mod, _OUT_IN) and isinstance(ref_mods[p.reference[0]], _OUT_IN):
            notes.append(f"{leaf} matches {m.atoms[0]} only through a transpose, but {type(mod).__name__} stores "
                         f"[out, in] as the reference does: loaded transposed")
        if m.how == "nearest":
            notes.append(f"{leaf} is not bit-equal to {m.atoms[0]} (cosine {m.similarity:.6f}): quantized or changed")
    # A child named like a reference child that holds another child's weights.
    for q in pairs:
        if q is p or len(q.reference) != 1 or len(p.reference) != 1 or _parent(q.port) != p.port:
            continue
        rel_port = q.port[len(p.port) + 1:] if p.port else q.port
        ref_parent = p.reference[0]
        rel_ref = q.reference[0][len(ref_parent) + 1:] if ref_parent else q.reference[0]
        # Numbered children (up_blocks.0 <-> up.3) are ordered by convention, not named: skipped.
        if (_parent(q.reference[0]) == ref_parent and rel_port != rel_ref and not rel_port.isdigit()
                and not rel_ref.isdigit() and _join(ref_parent, rel_port) in ref_mods):
            notes.append(f"port {rel_port} holds the reference's {rel_ref} weights "
                         f"(not {_join(ref_parent, rel_port)}'s): swapped?")
    return tuple(notes)


def _short(names, n: int = 3) -> str:
    names = sorted(n or "(model)" for n in names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _why_port(m: str, atoms: frozenset, ref_sets, ref_owner) -> str:
    owners = {ref_owner.get(a, _parent(_atom_tensor(a))) for a in atoms}
    sliced = [a for a in atoms if "[" in a]
    if sliced:
        return (f"holds part of {_short({_atom_tensor(a) for a in sliced})}, which is no module of its own in "
                f"the reference: compared through the enclosing block")
    return f"holds the weights of reference modules {_short(owners)} (and no reference module holds exactly these)"


def _why_reference(m: str, atoms: frozenset, matches, port_sets) -> str:
    held = {a for mt in matches.values() for a in mt.atoms}
    missing = {_atom_tensor(a) for a in atoms - held}
    if missing:
        return f"no port parameter holds {_short(missing)}"
    owners = {_parent(p) for p, mt in matches.items() if set(mt.atoms) & atoms}
    return f"its weights are spread over port modules {_short(owners)} (no one port module holds exactly them)"


def coverage_line(c: dict) -> str:
    pct = 100.0 * c["reference_layers_paired"] / c["reference_layers"] if c["reference_layers"] else math.nan
    return (f"{c['reference_layers_paired']} of {c['reference_layers']} reference layers with weights paired "
            f"({pct:.0f}%), {c['reference_modules_paired']} of {c['reference_modules']} modules at every level; "
            f"{c['port_parameters_matched']} of {c['port_parameters']} port parameters matched")
