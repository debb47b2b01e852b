"""Exact weight-space symmetries of the zoo's networks, their canonical form, and contrastive views.

Every hidden neuron (or conv channel) of a feed-forward network can be

* **permuted** with the other neurons of its layer (any activation): rows of the layer's
  weight/bias and the matching input columns of the next layer move together;
* **rescaled** by a positive factor ``a`` when its activation is positively homogeneous
  (ReLU, LeakyReLU, identity): incoming weights and bias times ``a``, the next layer's
  column divided by ``a``;
* **sign-flipped** when its activation is odd (tanh, identity): the same with ``a = -1``.

For a conv channel feeding global average pooling, "the next layer's column" is the first
linear layer's input column of that channel (pooling is linear, so the factor passes through).

Extended specs (``architecture`` module docstring):

* a **flatten head**: a conv channel owns the block of H*W flattened columns of the first linear
  layer; permuting/scaling the channel permutes/scales the whole block;
* **pooling**: max and average pooling commute with channel permutation and positive scaling;
  max pooling does not commute with a sign flip (max(-x) = -min(x)), so channels followed by
  max pooling get no sign freedom;
* **identity shortcuts** couple channels: channel c of every layer in a ``spec.residual_groups()``
  group is added into channel c of another member, so the group is permuted with one permutation
  and rescaled/flipped with one factor per channel (only if every member's activation allows it;
  a group containing the network input has no freedom). Its canonical scale is set by the first
  member (the "leader").

``canonicalize`` removes the scaling and sign freedom exactly; permutations stay (the graph
encoders are permutation equivariant). All functions take and return ``(spec, state_dict)``
with keys ``layers.{i}.weight``/``layers.{i}.bias`` and never modify their input.

Internally the ops work on *stacked* parameters (a leading model axis ``B``) so the graph
converter can canonicalize all models of one architecture at once.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor
from torch_geometric.data import Data

from architecture import ODD, POSITIVE_HOMOGENEOUS, ArchitectureSpec

StateDict = dict[str, Tensor]


# --- helpers on stacked parameters ------------------------------------------------------------
def _layer_tensors(spec: ArchitectureSpec, params: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Cloned weights/biases per layer, each with a leading model axis: W (B, out, in[, k, k]), b (B, out)."""
    ws = [params[f"layers.{i}.weight"].clone() for i in range(len(spec.layers))]
    bs = [params[f"layers.{i}.bias"].clone() for i in range(len(spec.layers))]
    return ws, bs


def _to_params(ws: list[Tensor], bs: list[Tensor]) -> StateDict:
    out: StateDict = {}
    for i, (w, b) in enumerate(zip(ws, bs)):
        out[f"layers.{i}.weight"] = w
        out[f"layers.{i}.bias"] = b
    return out


def _scale_rows(w: Tensor, f: Tensor) -> Tensor:
    """w (B, out, ...) times f (B, out) along the output axis."""
    return w * f.view(*f.shape, *([1] * (w.dim() - 2)))


def _scale_cols(w: Tensor, f: Tensor) -> Tensor:
    """w (B, out, in, ...) times f (B, in) along the input axis."""
    return w * f.view(f.shape[0], 1, f.shape[1], *([1] * (w.dim() - 3)))


def _scale_next_cols(spec: ArchitectureSpec, w: Tensor, i: int, f: Tensor) -> Tensor:
    """Layer i+1's weight ``w`` times f (B, out_i) along layer i's neurons (a flatten head: whole column blocks)."""
    if spec.layers[i + 1].flatten:
        B, O = w.shape[:2]
        return (w.reshape(B, O, f.shape[1], -1) * f.view(f.shape[0], 1, f.shape[1], 1)).reshape(B, O, -1)
    return _scale_cols(w, f)


def _permute_next_cols(spec: ArchitectureSpec, w: Tensor, i: int, p: Tensor) -> Tensor:
    """Layer i+1's weight ``w`` with layer i's neurons reordered by p (a flatten head: whole column blocks)."""
    if spec.layers[i + 1].flatten:
        B, O = w.shape[:2]
        return w.reshape(B, O, len(p), -1)[:, :, p].reshape(B, O, -1)
    return w[:, :, p]


def _apply_factors(spec: ArchitectureSpec, ws: list[Tensor], bs: list[Tensor], group: tuple[int, ...],
                   f: Tensor) -> None:
    """For each layer i of ``group``: neuron j's incoming weights+bias times f[:, j], outgoing columns divided.

    A shortcut between two members carries channel j scaled by f[:, j] into a pre-activation scaled by the
    same factor, so the function is unchanged.
    """
    for i in group:
        ws[i] = _scale_rows(ws[i], f)
        bs[i] = bs[i] * f
        ws[i + 1] = _scale_next_cols(spec, ws[i + 1], i, 1.0 / f)


@dataclass(frozen=True)
class _Coupling:
    """Which hidden layers share their symmetry transformations (identity shortcuts couple channels).

    ``leader[i]``: the layer whose draw/normalisation hidden layer i shares (i itself if uncoupled;
    None if coupled to the network input: no freedom). ``group[l]``: the hidden layers led by l.
    ``can_scale[l]`` / ``can_flip[l]``: positive scaling / sign flips are exact for the whole group.
    """

    leader: tuple[int | None, ...]
    group: dict[int, tuple[int, ...]]
    can_scale: dict[int, bool]
    can_flip: dict[int, bool]


@functools.lru_cache(maxsize=1024)
def _coupling(spec: ArchitectureSpec) -> _Coupling:
    """Cached per spec (specs are frozen and hashable); graph ops call it once per view."""
    hidden = range(len(spec.layers) - 1)
    leader: list[int | None] = list(hidden)
    group = {i: (i,) for i in hidden}
    for g in spec.residual_groups():
        members = tuple(m for m in g if m >= 0)
        for m in members:
            group.pop(m, None)
            leader[m] = None if -1 in g else members[0]
        if -1 not in g:
            group[members[0]] = members
    can_scale = {l: all(spec.layers[m].activation in POSITIVE_HOMOGENEOUS for m in g) for l, g in group.items()}
    can_flip = {l: all(spec.layers[m].activation in ODD and not spec.layers[m].pool.startswith("max") for m in g)
                for l, g in group.items()}
    return _Coupling(tuple(leader), group, can_scale, can_flip)


def _stack(sd: Mapping[str, Tensor]) -> StateDict:
    return {k: v.unsqueeze(0) for k, v in sd.items()}


def _unstack(params: Mapping[str, Tensor]) -> StateDict:
    return {k: v[0] for k, v in params.items()}


def _check(spec: ArchitectureSpec, sd: Mapping[str, Tensor]) -> None:
    spec.validate_state_dict(sd, source=f"state_dict of {spec.name or spec.arch_id}")


# --- canonical form -----------------------------------------------------------------------------
def canonicalize_stacked(spec: ArchitectureSpec, params: Mapping[str, Tensor]) -> StateDict:
    """Canonical form of B stacked models of one architecture (tensors with a leading axis B).

    Layer by layer (so factors pushed forward are included before the next layer is normalised):
      * ReLU/LeakyReLU/identity hidden neurons: incoming weights (whole kernel) and bias are
        divided by their joint L2 norm, the next layer's column multiplied by it. All-zero
        (dead) neurons are left as they are.
      * tanh/identity hidden neurons: sign such that the bias is positive; if the bias is exactly
        0, such that the incoming weight of largest magnitude is positive (a permutation-invariant
        tie-break, unlike "first nonzero weight").
      * GELU hidden neurons and the output layer are untouched (no such symmetry).
    """
    ws, bs = _layer_tensors(spec, params)
    cp = _coupling(spec)
    for i in range(len(spec.layers) - 1):
        if cp.leader[i] != i:  # shares the factor of an earlier layer (already applied) or has no freedom
            continue
        group = cp.group[i]  # (i,) unless identity shortcuts couple it to later layers
        flat = ws[i].flatten(2)  # (B, out, in*k*k)
        if cp.can_scale[i]:
            norm = torch.sqrt(flat.pow(2).sum(-1) + bs[i].pow(2))  # (B, out)
            norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            _apply_factors(spec, ws, bs, group, 1.0 / norm)
            flat = ws[i].flatten(2)
        if cp.can_flip[i]:
            idx = flat.abs().argmax(-1, keepdim=True)  # (B, out, 1)
            big = flat.gather(-1, idx).squeeze(-1)
            ref = torch.where(bs[i] != 0, bs[i], big)
            sign = torch.where(ref < 0, -torch.ones_like(ref), torch.ones_like(ref))
            _apply_factors(spec, ws, bs, group, sign)
    return _to_params(ws, bs)


def canonicalize(spec: ArchitectureSpec, sd: Mapping[str, Tensor]) -> StateDict:
    """Canonical state_dict of one model: same function, scaling and sign freedom removed exactly.

    ``canonicalize(T(sd))`` equals ``canonicalize(sd)`` up to float error and a permutation of
    hidden neurons for any symmetry transformation ``T`` (permutation, positive rescaling of
    ReLU/LeakyReLU neurons, sign flips of tanh neurons). See ``canonicalize_stacked``.
    """
    _check(spec, sd)
    return _unstack(canonicalize_stacked(spec, _stack(sd)))


# --- symmetry transformations -------------------------------------------------------------------
def permute_hidden(
    spec: ArchitectureSpec, sd: Mapping[str, Tensor], generator: torch.Generator | None = None,
    return_permutations: bool = False,
) -> StateDict | tuple[StateDict, list[Tensor]]:
    """Randomly permute the neurons/channels of every hidden layer (exact for every activation).

    With ``return_permutations`` also returns ``perms``: ``perms[i]`` (out_i,) such that new neuron
    ``j`` of layer ``i`` is old neuron ``perms[i][j]``.
    """
    _check(spec, sd)
    ws, bs = _layer_tensors(spec, _stack(sd))
    cp = _coupling(spec)
    perms: list[Tensor] = []
    for i, layer in enumerate(spec.layers[:-1]):
        lead = cp.leader[i]
        if lead is None:  # coupled to the network input by a shortcut: not permutable
            p = torch.arange(layer.out_dim)
        elif lead == i:
            p = torch.randperm(layer.out_dim, generator=generator)
        else:  # coupled by a shortcut: same permutation as its leader
            p = perms[lead]
        ws[i], bs[i] = ws[i][:, p], bs[i][:, p]
        ws[i + 1] = _permute_next_cols(spec, ws[i + 1], i, p)
        perms.append(p)
    out = _unstack(_to_params(ws, bs))
    return (out, perms) if return_permutations else out


def rescale_hidden(
    spec: ArchitectureSpec, sd: Mapping[str, Tensor], generator: torch.Generator | None = None,
    low: float = 0.5, high: float = 2.0,
) -> StateDict:
    """Positive per-neuron rescaling (log-uniform in [low, high]) of ReLU/LeakyReLU/identity hidden neurons."""
    if not 0 < low <= high:
        raise ValueError(f"rescale range needs 0 < low <= high, got ({low}, {high})")
    _check(spec, sd)
    ws, bs = _layer_tensors(spec, _stack(sd))
    cp = _coupling(spec)
    for i, layer in enumerate(spec.layers[:-1]):
        if cp.leader[i] == i and cp.can_scale[i]:
            u = torch.rand(1, layer.out_dim, generator=generator, dtype=bs[i].dtype)
            _apply_factors(spec, ws, bs, cp.group[i], torch.exp(math.log(low) + u * math.log(high / low)))
    return _unstack(_to_params(ws, bs))


def flip_signs(spec: ArchitectureSpec, sd: Mapping[str, Tensor], generator: torch.Generator | None = None) -> StateDict:
    """Random per-neuron sign flips of tanh (odd-activation) hidden neurons (none before a max pool)."""
    _check(spec, sd)
    ws, bs = _layer_tensors(spec, _stack(sd))
    cp = _coupling(spec)
    for i, layer in enumerate(spec.layers[:-1]):
        if cp.leader[i] == i and cp.can_flip[i]:
            s = torch.randint(0, 2, (1, layer.out_dim), generator=generator).to(bs[i].dtype) * 2 - 1
            _apply_factors(spec, ws, bs, cp.group[i], s)
    return _unstack(_to_params(ws, bs))


# --- graph-level symmetry ops (on neuron graphs of weight_to_graph) -----------------------------
@functools.lru_cache(maxsize=1024)
def _layout_of(spec_json: str) -> tuple[ArchitectureSpec, list[int], list[int], int]:
    """Parsed spec, node offsets, weight-edge offsets and edge count of a spec_json (cached: the graph ops run
    once per contrastive view, and parsing the JSON dominated their cost). Callers must not mutate the lists."""
    spec = ArchitectureSpec.from_json(spec_json)
    widths = [spec.num_inputs] + [layer.out_dim for layer in spec.layers]
    node_off, edge_off = [0], [0]
    for w in widths:
        node_off.append(node_off[-1] + w)
    for i, layer in enumerate(spec.layers):
        edge_off.append(edge_off[-1] + layer.out_dim * spec.graph_in_dim(i))
    n_edges = edge_off[-1] + sum(layer.out_dim for layer in spec.layers if layer.residual_from is not None)
    return spec, node_off, edge_off, n_edges


def _graph_layout(data: Data) -> tuple[ArchitectureSpec, list[int], list[int]]:
    """Spec, node offsets (per layer 0..L, plus N) and edge offsets (per layer 1..L, plus the end of the
    weight edges; identity-shortcut edges follow them) of one graph."""
    if not isinstance(data.spec_json, str):
        raise ValueError("graph ops need a single graph (spec_json is not a str; use batch.get_example(i))")
    spec, node_off, edge_off, n_edges = _layout_of(data.spec_json)
    if data.num_nodes != node_off[-1] or data.edge_attr.shape[0] != n_edges:
        raise ValueError(f"graph of {spec.name or spec.arch_id}: {data.num_nodes} nodes/{data.edge_attr.shape[0]} "
                         f"edges, its spec needs {node_off[-1]}/{n_edges}")
    return spec, node_off, edge_off


def _replace(data: Data, **tensors: Tensor) -> Data:
    out = copy.copy(data)  # shallow: structure tensors stay shared, replaced ones are new
    for k, v in tensors.items():
        setattr(out, k, v)
    return out


def permute_graph(data: Data, generator: torch.Generator | None = None) -> Data:
    """Randomly relabel the hidden neurons of one neuron graph, keeping the node/edge order contract.

    Equals ``to_graph(permute_hidden(spec, sd))`` (with the same permutations): node ``j`` of a
    hidden layer takes the bias of old node ``p[j]``, and edge (o, i) of layer l the weight of old
    edge (p_l[o], p_{l-1}[i]). Only ``x`` and ``edge_attr`` change.
    """
    spec, node_off, edge_off = _graph_layout(data)
    L = len(spec.layers)
    widths = [node_off[l + 1] - node_off[l] for l in range(L + 1)]
    cp = _coupling(spec)
    perms = [torch.arange(widths[0])]  # perms[l]: graph layer l (0 inputs, l = layer l-1's neurons)
    for l in range(1, L):
        lead = cp.leader[l - 1]
        if lead is None:  # coupled to the inputs by a shortcut
            perms.append(torch.arange(widths[l]))
        elif lead == l - 1:
            perms.append(torch.randperm(widths[l], generator=generator))
        else:  # shortcut-coupled channels share their leader's permutation
            perms.append(perms[lead + 1])
    perms.append(torch.arange(widths[L]))
    node_perm = torch.cat([p + node_off[l] for l, p in enumerate(perms)])
    parts = [(perms[l][:, None] * widths[l - 1] + perms[l - 1][None, :]).reshape(-1) + edge_off[l - 1]
             for l in range(1, L + 1)]
    start = edge_off[-1]
    for j, layer in enumerate(spec.layers):  # shortcut edge c joins channel c at both ends
        if layer.residual_from is not None:
            parts.append(perms[j + 1] + start)
            start += layer.out_dim
    return _replace(data, x=data.x[node_perm], edge_attr=data.edge_attr[torch.cat(parts)])


def _node_freedom(data: Data, kind: str) -> tuple[Tensor, Tensor]:
    """(on, rep) per node: ``on`` where a factor of this kind ("scale"/"flip") is an exact symmetry, and
    ``rep`` the node whose factor it shares (itself unless a shortcut couples its channel to a leader's)."""
    spec, node_off, _ = _graph_layout(data)
    cp = _coupling(spec)
    on = torch.zeros(data.num_nodes, dtype=torch.bool)
    rep = torch.arange(data.num_nodes)
    ok = cp.can_scale if kind == "scale" else cp.can_flip
    for i in range(len(spec.layers) - 1):
        lead = cp.leader[i]
        if lead is None or not ok[lead]:
            continue
        on[node_off[i + 1]:node_off[i + 2]] = True
        rep[node_off[i + 1]:node_off[i + 2]] = torch.arange(node_off[lead + 1], node_off[lead + 2])
    return on, rep


def _scale_graph(data: Data, f: Tensor) -> Data:
    """Per-node factor f (N,): bias and incoming edges times f[dst], outgoing edges divided by f[src]."""
    src, dst = data.edge_index
    return _replace(data, x=data.x * f[:, None], edge_attr=data.edge_attr * (f[dst] / f[src])[:, None])


def rescale_graph(data: Data, generator: torch.Generator | None = None, low: float = 0.5,
                  high: float = 2.0) -> Data:
    """Graph version of ``rescale_hidden`` (positive factors on ReLU/LeakyReLU/identity hidden nodes)."""
    if not 0 < low <= high:
        raise ValueError(f"rescale range needs 0 < low <= high, got ({low}, {high})")
    on, rep = _node_freedom(data, "scale")
    u = torch.rand(data.num_nodes, generator=generator)
    f = torch.exp(math.log(low) + u * math.log(high / low)).to(data.x.dtype)[rep]
    return _scale_graph(data, torch.where(on, f, torch.ones_like(f)))


def flip_signs_graph(data: Data, generator: torch.Generator | None = None) -> Data:
    """Graph version of ``flip_signs`` (random signs on tanh/identity hidden nodes)."""
    on, rep = _node_freedom(data, "flip")
    s = (torch.randint(0, 2, (data.num_nodes,), generator=generator) * 2 - 1).to(data.x.dtype)[rep]
    return _scale_graph(data, torch.where(on, s, torch.ones_like(s)))


# --- contrastive views --------------------------------------------------------------------------
@dataclass
class SymmetryAugmenter:
    """Contrastive views of a network: exact symmetries plus weight-changing perturbations.

    Args:
        permute: random hidden-neuron permutation (exact symmetry).
        rescale: random positive per-neuron scaling of ReLU/LeakyReLU/identity neurons (exact).
        sign_flip: random sign flips of tanh neurons (exact).
        noise_std: multiplicative noise ``w * (1 + noise_std * N(0, 1))`` on weights and biases.
        edge_dropout: fraction of edges (a weight, or a whole conv kernel) set to zero.
        prune_fraction: fraction of each layer's smallest-magnitude weights set to zero.
        rescale_range: (low, high) of the log-uniform scaling factors.

    The weight-changing views (prune, dropout, noise, in that order) are applied first, then the
    symmetries, so a view computes exactly the function of the perturbed weights.
    """

    permute: bool = True
    rescale: bool = True
    sign_flip: bool = True
    noise_std: float = 0.05
    edge_dropout: float = 0.1
    prune_fraction: float = 0.0
    rescale_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        for name in ("edge_dropout", "prune_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        low, high = self.rescale_range
        if not 0 < low <= high:
            raise ValueError(f"rescale_range needs 0 < low <= high, got {self.rescale_range}")

    @classmethod
    def from_config(cls, cfg: Any) -> "SymmetryAugmenter":
        """Build from a ``config.AugmentConfig``."""
        return cls(permute=cfg.permute, rescale=cfg.rescale, sign_flip=cfg.sign_flip, noise_std=cfg.noise_std,
                   edge_dropout=cfg.edge_dropout, prune_fraction=cfg.prune_fraction,
                   rescale_range=(cfg.rescale_low, cfg.rescale_high))

    # state_dict level ---------------------------------------------------------------------------
    def perturb(self, spec: ArchitectureSpec, sd: Mapping[str, Tensor],
                generator: torch.Generator | None = None) -> StateDict:
        """Only the weight-changing views (prune, edge dropout, noise) of one state_dict."""
        _check(spec, sd)
        out = {k: v.detach().clone() for k, v in sd.items()}
        for i, layer in enumerate(spec.layers):
            w, b = out[f"layers.{i}.weight"], out[f"layers.{i}.bias"]
            if self.prune_fraction > 0:
                k = int(self.prune_fraction * w.numel())
                if k > 0:
                    order = w.abs().flatten().argsort()[:k]
                    w.view(-1)[order] = 0
            if self.edge_dropout > 0:
                n_in = spec.graph_in_dim(i)  # one draw per graph edge: a flatten head drops whole channel blocks
                keep = torch.rand(layer.out_dim, n_in, generator=generator) >= self.edge_dropout
                if layer.flatten:
                    keep = keep.repeat_interleave(layer.in_dim // n_in, dim=1)
                w.mul_(keep.view(*keep.shape, *([1] * (w.dim() - 2))).to(w.dtype))
            if self.noise_std > 0:
                w.mul_(1 + self.noise_std * torch.randn(w.shape, generator=generator, dtype=w.dtype))
                b.mul_(1 + self.noise_std * torch.randn(b.shape, generator=generator, dtype=b.dtype))
        return out

    def view(self, spec: ArchitectureSpec, sd: Mapping[str, Tensor],
             generator: torch.Generator | None = None) -> StateDict:
        """One random view of a state_dict: perturbations, then the enabled symmetry transformations."""
        out = self.perturb(spec, sd, generator)
        if self.rescale:
            out = rescale_hidden(spec, out, generator, *self.rescale_range)
        if self.sign_flip:
            out = flip_signs(spec, out, generator)
        if self.permute:
            out = permute_hidden(spec, out, generator)
        return out

    # graph level ---------------------------------------------------------------------------------
    def augment_graph(self, data: Data, generator: torch.Generator | None = None,
                      canonical: bool = True) -> Data:
        """One random view of one neuron graph, without reconverting from weights.

        Applies prune/edge dropout/noise to ``edge_attr`` and ``x`` and the hidden-node
        relabelling (``permute_graph``). Scaling and sign views are applied only when
        ``canonical=False``: on canonical graphs (``WeightToGraph(canonicalize=True)``) they are
        removed exactly by canonicalization, so adding them would only make the views non-canonical.
        """
        spec, node_off, edge_off = _graph_layout(data)
        ea, x = data.edge_attr, data.x
        if self.prune_fraction > 0 or self.edge_dropout > 0 or self.noise_std > 0:
            ea, x = ea.clone(), x.clone()
            K = int(round(math.sqrt(ea.shape[1])))
            for l in range(len(spec.layers)):  # weight edges only: identity shortcuts stay exact
                (kh, kw) = spec.edge_window(l)
                kh, kw = min(kh, K), min(kw, K)  # a flatten block wider than K sits summarized in K x K
                lh, lw = (K - kh) // 2, (K - kw) // 2
                block = ea[edge_off[l]:edge_off[l + 1]].view(-1, K, K)  # a view: writes go into ea
                win = block[:, lh:lh + kh, lw:lw + kw]  # (n_edges, kh, kw): the real weights, no padding
                if self.prune_fraction > 0:
                    n_prune = int(self.prune_fraction * win.numel())
                    if n_prune > 0:
                        flat = win.reshape(-1)  # a copy (win is strided)
                        flat[flat.abs().argsort()[:n_prune]] = 0
                        win.copy_(flat.view_as(win))
                if self.edge_dropout > 0:
                    win.mul_((torch.rand(win.shape[0], 1, 1, generator=generator) >= self.edge_dropout).to(ea.dtype))
                if self.noise_std > 0:  # noise only on real weights: 25x fewer draws for linear edges
                    win.mul_(1 + self.noise_std * torch.randn(win.shape, generator=generator, dtype=ea.dtype))
            if self.noise_std > 0:
                x.mul_(1 + self.noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype))
        out = _replace(data, x=x, edge_attr=ea)
        if not canonical and self.rescale:
            out = rescale_graph(out, generator, *self.rescale_range)
        if not canonical and self.sign_flip:
            out = flip_signs_graph(out, generator)
        if self.permute:
            out = permute_graph(out, generator)
        return out
