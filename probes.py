"""Probe features: what a network computes, read on a shared set of probe inputs.

A :class:`ProbeSet` (an ``nn.Module`` owned by an encoder and saved in its file) holds the probe
inputs of every input size it knows, in blocks of ``num_probes`` each:

* ``"gauss"``: seeded standard-normal probes in the standardized input space (training-free);
* ``"data"``: unlabeled, untransformed source inputs of that size (set with :meth:`ProbeSet.set_data`,
  e.g. :func:`source_inputs`);
* ``"learned"``: ProbeGen-style probes (Kahana et al., ICLR 2025): a fixed latent code per probe
  through a deep linear generator shared by the probes of one input size, trained with the encoder.

Probes are keyed by the number of input features, so an MLP on flattened digits (64,) and a CNN on
(1, 8, 8) digits read the same probes, reshaped: their fingerprints are comparable.

:func:`probe_features` runs a batch of neuron graphs (weight_to_graph.py) on the probes through
``architecture.forward_layers``, batched per architecture (``torch.func.vmap`` over the stacked
weights of the batch's graphs of one architecture), and returns

* ``node`` (N, 2P): per neuron, two numbers per probe (P probes in all):
  hidden neurons: [mean, RMS] of the response over space (a linear neuron is a 1 x 1 map), divided by
  the neuron's RMS over probes, the mean multiplied by the sign of its third moment for odd
  activations (tanh, identity): a positive rescaling or a sign flip of the neuron leaves them exactly
  unchanged; output neurons: [centred log-softmax, softmax probability]; input neurons (features,
  or channels summarised over space as hidden ones): [saliency, |saliency|], the input gradient of
  the norm of the centred log-softmax, divided by its RMS over the graph's inputs and probes;
* ``fingerprint`` (B, P * out_slots): the centred log-softmax on every probe, output neuron o in slot o
  (more outputs than slots are binned evenly), each kind's block L2-normalised.

Every feature is a function of the network's function (inputs, outputs) or of one hidden neuron's
response normalised as above, so the features travel with their node under a permutation and are
exactly invariant to the scaling and sign symmetries (up to float rounding), canonical form or not.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

import architecture as A
from weight_to_graph import graph_structure

log = logging.getLogger("weightzoo")

PROBE_KINDS = ("gauss", "data", "learned")
ODD_ACTIVATIONS = frozenset(A.ACTIVATIONS[a] for a in A.ODD)


def probe_key(n_features: int) -> str:
    """Buffer-name key of an input size, e.g. ``in64``."""
    return f"in{int(n_features)}"


def gaussian_probes(n_features: int, num_probes: int, seed: int) -> Tensor:
    """Seeded standard-normal probes (num_probes, n_features): the same on every machine for (seed, size)."""
    s = int(hashlib.sha1(f"{seed}/{n_features}".encode()).hexdigest()[:8], 16)
    return torch.randn(num_probes, n_features, generator=torch.Generator().manual_seed(s))


def source_inputs(n_features: int, num_probes: int, seed: int = 0) -> Tensor | None:
    """``num_probes`` unlabeled train inputs (num_probes, n_features) of the *original* task of a source dataset
    whose inputs have ``n_features`` features (standardized as the zoo's models saw them); None if no source
    dataset has that size. Drawn without replacement where the split is large enough."""
    from tasks import SOURCE_SHAPES, TASKS, load_task_data

    names = [t.name for t in TASKS.values() if t.kind == "original"
             and int(np.prod(SOURCE_SHAPES[t.dataset])) == int(n_features)]
    if not names:
        return None
    X = load_task_data(sorted(names)[0])[0].reshape(-1, int(n_features))
    rows = np.random.default_rng(seed).choice(len(X), size=num_probes, replace=len(X) < num_probes)
    return X[torch.from_numpy(np.sort(rows))].float()


class ProbeSet(nn.Module):
    """The probe inputs of an encoder: ``len(kinds)`` blocks of ``num_probes`` per input size.

    Args:
        num_probes: probes per kind and input size.
        kinds: subset of :data:`PROBE_KINDS`, in block order.
        input_sizes: input feature counts stored in the module (buffers / generators); other sizes, and sizes
            whose data probes were never set, get seeded Gaussian probes made on the fly in place of the
            missing blocks (with a warning).
        seed: seed of the Gaussian probes and of the learned probes' latent codes.
        latent_dim, generator_width, generator_depth: the learned probes' generator (deep linear).
    """

    def __init__(self, num_probes: int, kinds: Sequence[str] = ("gauss",), input_sizes: Sequence[int] = (),
                 seed: int = 0, latent_dim: int = 32, generator_width: int = 64, generator_depth: int = 3):
        super().__init__()
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in PROBE_KINDS]
        if num_probes < 1 or not kinds or bad or len(set(kinds)) != len(kinds):
            raise ValueError(f"ProbeSet needs num_probes >= 1 and distinct kinds from {PROBE_KINDS}, "
                             f"got {num_probes}, {kinds}")
        self.num_probes, self.kinds, self.seed = int(num_probes), kinds, int(seed)
        self.input_sizes = tuple(sorted({int(n) for n in input_sizes}))
        self.generators = nn.ModuleDict()
        self._warned: set[str] = set()
        for n in self.input_sizes:
            key = probe_key(n)
            if "gauss" in kinds:
                self.register_buffer(f"gauss_{key}", gaussian_probes(n, num_probes, seed))
            if "data" in kinds:
                self.register_buffer(f"data_{key}", torch.zeros(num_probes, n))
                self.register_buffer(f"data_set_{key}", torch.tensor(False))
            if "learned" in kinds:
                self.register_buffer(f"latent_{key}", gaussian_probes(latent_dim, num_probes, seed + 1))
                dims = [latent_dim] + [generator_width] * (generator_depth - 1) + [n]
                self.generators[key] = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])

    @property
    def total(self) -> int:
        """P: probes per input size, all kinds."""
        return self.num_probes * len(self.kinds)

    def set_data(self, n_features: int, X: Tensor) -> None:
        """Store the "data" probes of one input size: X (num_probes, n_features)."""
        key = probe_key(n_features)
        if "data" not in self.kinds or not hasattr(self, f"data_{key}"):
            raise ValueError(f"ProbeSet has no data block for {n_features} inputs (kinds {self.kinds}, "
                             f"input sizes {self.input_sizes})")
        X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, n_features)
        if X.shape[0] != self.num_probes:
            raise ValueError(f"data probes for {n_features} inputs: {X.shape[0]} rows, need {self.num_probes}")
        getattr(self, f"data_{key}").copy_(X)
        getattr(self, f"data_set_{key}").fill_(True)

    def _fallback(self, kind: str, n: int, offset: int) -> Tensor:
        what = f"{kind}/{n}"
        if kind != "gauss" and what not in self._warned:
            self._warned.add(what)
            log.warning("probes: no %s probes for %d inputs in this encoder; seeded Gaussian probes stand in "
                        "(models of this input size are compared with each other only)", kind, n)
        return gaussian_probes(n, self.num_probes, self.seed + offset)

    def inputs(self, n_features: int) -> Tensor:
        """All probes of one input size (P, n_features), kinds in block order (learned ones carry gradients)."""
        key, blocks = probe_key(n_features), []
        for j, kind in enumerate(self.kinds):
            if kind == "gauss" and hasattr(self, f"gauss_{key}"):
                blocks.append(getattr(self, f"gauss_{key}"))
            elif kind == "data" and hasattr(self, f"data_{key}") and bool(getattr(self, f"data_set_{key}")):
                blocks.append(getattr(self, f"data_{key}"))
            elif kind == "learned" and key in self.generators:
                blocks.append(self.generators[key](getattr(self, f"latent_{key}")))
            else:
                blocks.append(self._fallback(kind, n_features, 1000 * (j + 1)).to(self._device()))
        return torch.cat(blocks)

    def _device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


# --------------------------------------------------------------------------- responses of stacked models
def _centred_log_softmax(logits: Tensor) -> Tensor:
    y = torch.log_softmax(logits, dim=-1)
    return y - y.mean(dim=-1, keepdim=True)


def _space_summary(h: Tensor) -> tuple[Tensor, Tensor]:
    """(M, P, C[, H, W]) -> mean and RMS over space, each (M, C, P)."""
    if h.dim() == 5:
        return h.mean(dim=(3, 4)).transpose(1, 2), h.square().mean(dim=(3, 4)).sqrt().transpose(1, 2)
    return h.transpose(1, 2), h.abs().transpose(1, 2)


def _saliency(spec: A.ArchitectureSpec, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
    """d ||centred log-softmax|| / dx per model and probe: (M, P, *input_shape), no graph kept."""
    def one_model(p: Mapping[str, Tensor]) -> Tensor:
        def f(x: Tensor) -> Tensor:
            return _centred_log_softmax(A.forward(spec, p, x[None])[0]).square().sum().add(1e-12).sqrt()
        return vmap(grad(f))(X)

    with torch.enable_grad():
        return vmap(one_model)({k: v.detach() for k, v in params.items()}).detach()


@dataclass(frozen=True)
class ModelResponses:
    """Probe features of M stacked models of one architecture (node order of weight_to_graph.py)."""

    inputs: Tensor  # (M, n_in, 2P)
    hidden: list[Tensor]  # per hidden layer (M, width, 2P)
    outputs: Tensor  # (M, n_out, 2P)
    log_probs: Tensor  # (M, P, n_out) centred log-softmax


def model_responses(spec: A.ArchitectureSpec, params: Mapping[str, Tensor], X: Tensor,
                    saliency: bool = True) -> ModelResponses:
    """Probe features of stacked models: ``params`` (M, *shape) per key, probes ``X`` (P, n_features)."""
    Xs = X.reshape(len(X), *spec.input_shape)
    layers = vmap(lambda p: A.forward_layers(spec, p, Xs))(dict(params))  # per layer (M, P, ...)
    hidden = []
    for layer, h in zip(spec.layers[:-1], layers[:-1]):
        mean, rms = _space_summary(h)  # (M, C, P) each
        scale = rms.square().mean(dim=2, keepdim=True).sqrt().clamp_min(1e-12)  # (M, C, 1): positive rescaling
        if A.ACTIVATIONS[layer.activation] in ODD_ACTIVATIONS:  # sign flips: the sign of the third moment
            sign = torch.where(mean.pow(3).sum(dim=2, keepdim=True) < 0, -1.0, 1.0)
            mean = mean * sign
        hidden.append(torch.cat([mean, rms], dim=2) / scale)
    lp = _centred_log_softmax(layers[-1])  # (M, P, n_out)
    outputs = torch.cat([lp.transpose(1, 2), torch.softmax(layers[-1], dim=-1).transpose(1, 2)], dim=2)
    M, P = lp.shape[:2]
    if saliency:
        g = _saliency(spec, params, Xs)  # (M, P, *input_shape)
        g = g / g.square().mean(dim=tuple(range(1, g.dim())), keepdim=True).sqrt().clamp_min(1e-12)
        if spec.is_cnn:
            gm, gr = _space_summary(g)
        else:
            gm, gr = g.transpose(1, 2), g.abs().transpose(1, 2)
        inputs = torch.cat([gm, gr], dim=2)
    else:
        inputs = lp.new_zeros(M, spec.num_inputs, 2 * P)
    return ModelResponses(inputs, hidden, outputs, lp)


def fingerprint(log_probs: Tensor, num_kinds: int, out_slots: int, normalize: bool = True) -> Tensor:
    """(M, P, n_out) centred log-softmax -> (M, P * out_slots): slot o holds output o (binned evenly when
    n_out > out_slots); with ``normalize`` each of the ``num_kinds`` probe blocks is L2-normalised and the
    whole has unit norm (else raw: the scale of the log-probabilities, the models' confidence, stays)."""
    M, P, n_out = log_probs.shape
    slot = torch.arange(n_out, device=log_probs.device) * out_slots // n_out if n_out > out_slots \
        else torch.arange(n_out, device=log_probs.device)
    out = log_probs.new_zeros(M, P, out_slots).index_add_(2, slot, log_probs)
    counts = torch.bincount(slot, minlength=out_slots).clamp_min(1).to(log_probs.dtype)
    blocks = (out / counts).reshape(M, num_kinds, (P // num_kinds) * out_slots)
    if normalize:
        blocks = F.normalize(blocks, dim=2) / math.sqrt(num_kinds)
    return blocks.reshape(M, -1)


# --------------------------------------------------------------------------- neuron graphs -> stacked weights
@functools.lru_cache(maxsize=4096)
def _layout(spec_json: str) -> tuple[A.ArchitectureSpec, tuple[int, ...], tuple[int, ...]]:
    spec = A.ArchitectureSpec.from_json(spec_json)
    s = graph_structure(spec)
    return spec, s.node_offsets, s.edge_offsets


@dataclass(frozen=True)
class GraphGroup:
    """The graphs of one architecture in a batch: their positions and first node/edge rows."""

    spec: A.ArchitectureSpec
    node_offsets: tuple[int, ...]  # per graph-layer start within one graph, plus N
    edge_offsets: tuple[int, ...]
    graphs: Tensor  # (M,) graph ids in the batch
    node_start: Tensor  # (M,)
    edge_start: Tensor  # (M,)


def graph_groups(batch) -> list[GraphGroup]:
    """Group a (batched) neuron graph by architecture (``spec_json``), in order of first appearance."""
    sj = getattr(batch, "spec_json", None)
    if sj is None:
        raise ValueError("probe features need the graphs' spec_json (weight_to_graph.py contract)")
    specs = [sj] if isinstance(sj, str) else list(sj)
    dev = batch.x.device
    ptr = getattr(batch, "ptr", None)
    if ptr is None:
        node_start = torch.zeros(1, dtype=torch.long, device=dev)
        edge_start = torch.zeros(1, dtype=torch.long, device=dev)
    else:
        node_start = ptr[:-1]
        n_edges = torch.bincount(batch.batch[batch.edge_index[0]], minlength=len(specs))
        edge_start = n_edges.cumsum(0) - n_edges
    order: dict[str, list[int]] = {}
    for g, s in enumerate(specs):
        order.setdefault(s, []).append(g)
    out = []
    for s, gs in order.items():
        spec, no, eo = _layout(s)
        idx = torch.tensor(gs, dtype=torch.long, device=dev)
        out.append(GraphGroup(spec, no, eo, idx, node_start[idx], edge_start[idx]))
    return out


def _rows(start: Tensor, lo: int, hi: int) -> Tensor:
    """(M, hi - lo) row indices start[m] + lo ... start[m] + hi - 1."""
    return start[:, None] + torch.arange(lo, hi, device=start.device)[None, :]


def stacked_params(batch, group: GraphGroup) -> dict[str, Tensor]:
    """The weights of a group's graphs, as ``WeightToGraph.to_state_dict`` reads them, stacked: (M, *shape)."""
    spec, K2 = group.spec, batch.edge_attr.size(1)
    K = int(round(math.sqrt(K2)))
    M = len(group.graphs)
    out = {}
    for i, layer in enumerate(spec.layers):
        kh, kw = spec.edge_window(i)
        lh, lw = (K - kh) // 2, (K - kw) // 2
        e = batch.edge_attr[_rows(group.edge_start, group.edge_offsets[i], group.edge_offsets[i + 1])]
        w = e.view(M, layer.out_dim, spec.graph_in_dim(i), K, K)[..., lh:lh + kh, lw:lw + kw]
        out[f"layers.{i}.weight"] = w.reshape(M, *layer.weight_shape()).contiguous()
        out[f"layers.{i}.bias"] = batch.x[_rows(group.node_start, group.node_offsets[i + 1],
                                                group.node_offsets[i + 2]), 0]
    return out


@dataclass(frozen=True)
class ProbeFeatures:
    """Probe features of a batch of neuron graphs (see the module docstring)."""

    node: Tensor  # (N, 2P)
    fingerprint: Tensor  # (B, P * out_slots)


def probe_features(probe_set: ProbeSet, batch, out_slots: int = 10, saliency: bool = True) -> ProbeFeatures:
    """Probe features of every node and graph of ``batch`` (a PyG ``Data``/``Batch`` of neuron graphs)."""
    groups = graph_groups(batch)
    P = probe_set.total
    n_graphs = sum(len(g.graphs) for g in groups)
    node = batch.x.new_zeros(batch.x.size(0), 2 * P)
    fp = batch.x.new_zeros(n_graphs, P * out_slots)
    for grp in groups:
        spec = grp.spec
        X = probe_set.inputs(int(np.prod(spec.input_shape))).to(batch.x.dtype)
        r = model_responses(spec, stacked_params(batch, grp), X, saliency)
        no = grp.node_offsets
        parts = [r.inputs] + r.hidden + [r.outputs]  # graph layers 0 .. L
        for l, feats in enumerate(parts):
            node[_rows(grp.node_start, no[l], no[l + 1]).reshape(-1)] = feats.reshape(-1, 2 * P).to(node.dtype)
        fp[grp.graphs] = fingerprint(r.log_probs, len(probe_set.kinds), out_slots).to(fp.dtype)
    return ProbeFeatures(node, fp)


__all__ = ["PROBE_KINDS", "ProbeSet", "ProbeFeatures", "ModelResponses", "probe_features", "model_responses",
           "fingerprint", "gaussian_probes", "source_inputs", "graph_groups", "stacked_params", "probe_key"]
