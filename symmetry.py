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

``canonicalize`` removes the scaling and sign freedom exactly; permutations stay (the graph
encoders are permutation equivariant). All functions take and return ``(spec, state_dict)``
with keys ``layers.{i}.weight``/``layers.{i}.bias`` and never modify their input.

Internally the ops work on *stacked* parameters (a leading model axis ``B``) so the graph
converter can canonicalize all models of one architecture at once.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor
from torch_geometric.data import Data

from architecture import ACTIVATIONS, ODD, POSITIVE_HOMOGENEOUS, ArchitectureSpec

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


def _apply_neuron_factors(ws: list[Tensor], bs: list[Tensor], i: int, f: Tensor) -> None:
    """Multiply neuron j of layer i's incoming weights+bias by f[:, j] and divide its outgoing column."""
    ws[i] = _scale_rows(ws[i], f)
    bs[i] = bs[i] * f
    ws[i + 1] = _scale_cols(ws[i + 1], 1.0 / f)


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
    for i, layer in enumerate(spec.layers[:-1]):
        act = layer.activation
        flat = ws[i].flatten(2)  # (B, out, in*k*k)
        if act in POSITIVE_HOMOGENEOUS:
            norm = torch.sqrt(flat.pow(2).sum(-1) + bs[i].pow(2))  # (B, out)
            norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            _apply_neuron_factors(ws, bs, i, 1.0 / norm)
            flat = ws[i].flatten(2)
        if act in ODD:
            idx = flat.abs().argmax(-1, keepdim=True)  # (B, out, 1)
            big = flat.gather(-1, idx).squeeze(-1)
            ref = torch.where(bs[i] != 0, bs[i], big)
            sign = torch.where(ref < 0, -torch.ones_like(ref), torch.ones_like(ref))
            _apply_neuron_factors(ws, bs, i, sign)
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
    perms = []
    for i, layer in enumerate(spec.layers[:-1]):
        p = torch.randperm(layer.out_dim, generator=generator)
        ws[i], bs[i] = ws[i][:, p], bs[i][:, p]
        ws[i + 1] = ws[i + 1][:, :, p]
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
    for i, layer in enumerate(spec.layers[:-1]):
        if layer.activation in POSITIVE_HOMOGENEOUS:
            u = torch.rand(1, layer.out_dim, generator=generator, dtype=bs[i].dtype)
            _apply_neuron_factors(ws, bs, i, torch.exp(math.log(low) + u * math.log(high / low)))
    return _unstack(_to_params(ws, bs))


def flip_signs(spec: ArchitectureSpec, sd: Mapping[str, Tensor], generator: torch.Generator | None = None) -> StateDict:
    """Random per-neuron sign flips of tanh (odd-activation) hidden neurons."""
    _check(spec, sd)
    ws, bs = _layer_tensors(spec, _stack(sd))
    for i, layer in enumerate(spec.layers[:-1]):
        if layer.activation in ODD:
            s = torch.randint(0, 2, (1, layer.out_dim), generator=generator).to(bs[i].dtype) * 2 - 1
            _apply_neuron_factors(ws, bs, i, s)
    return _unstack(_to_params(ws, bs))


# --- graph-level symmetry ops (on neuron graphs of weight_to_graph) -----------------------------
def _graph_layout(data: Data) -> tuple[ArchitectureSpec, list[int], list[int]]:
    """Spec, node offsets (per layer 0..L, plus N) and edge offsets (per layer 1..L, plus E) of one graph."""
    if not isinstance(data.spec_json, str):
        raise ValueError("graph ops need a single graph (spec_json is not a str; use batch.get_example(i))")
    spec = ArchitectureSpec.from_json(data.spec_json)
    widths = [spec.num_inputs] + [layer.out_dim for layer in spec.layers]
    node_off, edge_off = [0], [0]
    for w in widths:
        node_off.append(node_off[-1] + w)
    for layer in spec.layers:
        edge_off.append(edge_off[-1] + layer.out_dim * layer.in_dim)
    if data.num_nodes != node_off[-1] or data.edge_attr.shape[0] != edge_off[-1]:
        raise ValueError(f"graph of {spec.name or spec.arch_id}: {data.num_nodes} nodes/{data.edge_attr.shape[0]} "
                         f"edges, its spec needs {node_off[-1]}/{edge_off[-1]}")
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
    perms = [torch.arange(widths[0])]
    perms += [torch.randperm(widths[l], generator=generator) for l in range(1, L)]
    perms.append(torch.arange(widths[L]))
    node_perm = torch.cat([p + node_off[l] for l, p in enumerate(perms)])
    edge_perm = torch.cat([
        (perms[l][:, None] * widths[l - 1] + perms[l - 1][None, :]).reshape(-1) + edge_off[l - 1]
        for l in range(1, L + 1)
    ])
    return _replace(data, x=data.x[node_perm], edge_attr=data.edge_attr[edge_perm])


def _scale_graph(data: Data, f: Tensor) -> Data:
    """Per-node factor f (N,): bias and incoming edges times f[dst], outgoing edges divided by f[src]."""
    src, dst = data.edge_index
    return _replace(data, x=data.x * f[:, None], edge_attr=data.edge_attr * (f[dst] / f[src])[:, None])


def rescale_graph(data: Data, generator: torch.Generator | None = None, low: float = 0.5,
                  high: float = 2.0) -> Data:
    """Graph version of ``rescale_hidden`` (positive factors on ReLU/LeakyReLU/identity hidden nodes)."""
    if not 0 < low <= high:
        raise ValueError(f"rescale range needs 0 < low <= high, got ({low}, {high})")
    ph = torch.tensor([ACTIVATIONS[a] for a in sorted(POSITIVE_HOMOGENEOUS)])
    on = (data.node_type == 1) & torch.isin(data.activation, ph)
    u = torch.rand(data.num_nodes, generator=generator)
    f = torch.exp(math.log(low) + u * math.log(high / low)).to(data.x.dtype)
    return _scale_graph(data, torch.where(on, f, torch.ones_like(f)))


def flip_signs_graph(data: Data, generator: torch.Generator | None = None) -> Data:
    """Graph version of ``flip_signs`` (random signs on tanh/identity hidden nodes)."""
    odd = torch.tensor([ACTIVATIONS[a] for a in sorted(ODD)])
    on = (data.node_type == 1) & torch.isin(data.activation, odd)
    s = (torch.randint(0, 2, (data.num_nodes,), generator=generator) * 2 - 1).to(data.x.dtype)
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
                keep = torch.rand(layer.out_dim, layer.in_dim, generator=generator) >= self.edge_dropout
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
            for l, layer in enumerate(spec.layers):
                k, lo = layer.kernel_size, (K - layer.kernel_size) // 2
                block = ea[edge_off[l]:edge_off[l + 1]].view(-1, K, K)  # a view: writes go into ea
                win = block[:, lo:lo + k, lo:lo + k]  # (n_edges, k, k): the real weights, no padding
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
