"""state_dict + architecture spec <-> neuron graph (PyG ``Data``), fast batch conversion and a disk cache.

The neuron graph (contract shared with the encoders, see shared/DESIGN.md):

* nodes: one per neuron, ordered inputs (features or channels), layer 1 neurons, ..., outputs;
  ``x`` [N, 1] the neuron's bias (0 for inputs); ``node_type`` [N] 0 input / 1 hidden / 2 output;
  ``layer_index`` [N] 0 for inputs, l (1..L) for neurons produced by layer l; ``io_position`` [N]
  position within the input/output layer, -1 for hidden; ``neuron_index`` [N] index within the
  layer (for the non-equivariant baseline only); ``activation`` [N] ``ACTIVATIONS`` id of the
  neuron's layer (0 for inputs).
* edges: one per weight (a whole kernel for convs), layer by layer, row-major over (out, in) so
  that the inverse is a reshape; ``edge_index`` [2, E] src (layer l-1) -> dst (layer l);
  ``edge_attr`` [E, K*K] the kernel zero-padded centred to K x K (``max_kernel``), a linear weight
  sits at the centre slot (so the global-average-pooling link from the last conv channel to the
  first linear layer is a plain linear edge); ``edge_layer`` [E] l; ``edge_kind`` [E] 0 linear, 1 conv.
* graph attributes: ``num_layers`` (L), ``spec_json`` (str), ``model_idx`` (int).

Extended specs (``architecture`` module docstring) use the same fields, so one batch may mix them
with the zoo's graphs:

* a **flatten head** (``flatten=True``): the first linear layer's inputs are channel x position; its
  graph inputs are the C channel nodes of the last conv and one edge per (output neuron, channel)
  carries that channel's H x W block of columns as a kernel (``edge_kind`` conv, padded centred to
  K x K). Permuting a conv channel is then a node permutation, as for a GAP head, and the position
  of a column is the slot of its weight in the edge feature. A map side larger than K (the classic
  MNIST CNN's 7 x 7 map under K = 5) is summarized with ``flatten_summary=True``: each block is
  resampled to K along that side by area (``area_resample``: every position's weight is split
  between the slots its cell overlaps, so a block's sum, the response to a constant map, is kept).
  The summary is a fixed linear map applied to each edge alone, so permutation (and, on canonical
  weights, scaling) invariance stays exact; it cannot be inverted (``to_state_dict`` refuses it);
* **pooling** is part of the layer (``spec_json``); max/avg pooling commutes with channel permutation
  and positive scaling, so it adds no nodes or edges;
* an **identity shortcut** (``residual_from=s`` on layer j) adds, after all weight edges, one edge
  per channel c from node c of layer s (inputs for s = -1) to node c of layer j, with the identity
  kernel (1 at the centre slot), ``edge_layer`` j and the kind of layer j. ``to_state_dict`` checks
  that these edges are still the identity.

Graph tensors are float32. With ``canonicalize=True`` (default) the weights are put in the
canonical form of ``symmetry.canonicalize`` first (same function, no scale/sign freedom).

Speed: ``convert_model_to_graphs`` converts all models of one architecture with stacked tensor
ops; the graphs of one architecture are views into shared stacked tensors (read-only; saving one
graph alone with torch.save would save its whole group). The disk cache stores the compact
(canonicalized) stacked weights, not the K*K-padded edge features, and rebuilds graphs on load.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Data

from architecture import ACTIVATIONS, ArchitectureSpec, parse_pool
from symmetry import canonicalize, canonicalize_stacked  # noqa: F401  (canonicalize is re-exported)

NODE_INPUT, NODE_HIDDEN, NODE_OUTPUT = 0, 1, 2
EDGE_LINEAR, EDGE_CONV = 0, 1
CACHE_FORMAT = 1  # bump when the cached layout or the graph contract changes

__all__ = ["WeightToGraph", "canonicalize", "GraphStructure", "graph_structure", "extension_features",
           "area_resample", "flatten_window",
           "NODE_INPUT", "NODE_HIDDEN", "NODE_OUTPUT", "EDGE_LINEAR", "EDGE_CONV", "POOL_KINDS"]
POOL_KINDS = {"": 0, "max": 1, "avg": 2}  # ids of ``extension_features(...)["pool_kind"]``


@dataclass(frozen=True)
class GraphStructure:
    """The weight-independent part of one architecture's neuron graph (shared by all its models)."""

    node_type: Tensor  # (N,)
    layer_index: Tensor  # (N,)
    io_position: Tensor  # (N,)
    neuron_index: Tensor  # (N,)
    activation: Tensor  # (N,)
    edge_index: Tensor  # (2, E)
    edge_layer: Tensor  # (E,)
    edge_kind: Tensor  # (E,)
    node_offsets: tuple[int, ...]  # first node of layer l (l = 0 inputs .. L outputs), plus N at the end
    edge_offsets: tuple[int, ...]  # first edge of layer l (l = 1..L at positions 0..L-1), plus the weight edges' end
    spec_json: str
    num_residual_edges: int = 0  # identity-shortcut edges, stored after the weight edges

    @property
    def num_nodes(self) -> int:
        return self.node_offsets[-1]

    @property
    def num_edges(self) -> int:
        return self.edge_offsets[-1] + self.num_residual_edges


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while thousands of Data objects are created.

    Creating ~10 tracked containers per graph triggers repeated full collections that scan the
    whole zoo (measured: up to 2x the conversion time); nothing here creates reference cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def area_resample(n: int, m: int) -> Tensor:
    """(m, n) matrix resampling n cells to m <= n by area: entry (i, j) is the overlap of output cell i,
    the interval [i n/m, (i+1) n/m), with input cell [j, j+1); columns sum to 1 (each input cell's value
    is split, none lost). n == m gives the identity. Computed in float64 on the grid n*m, exactly."""
    if not 1 <= m <= n:
        raise ValueError(f"area_resample needs 1 <= m <= n, got n={n}, m={m}")
    # on a grid of n*m fine cells, output cell i covers fine cells [i n, (i+1) n), input cell j [j m, (j+1) m)
    fine = torch.arange(n * m)
    counts = torch.zeros(m, n, dtype=torch.float64).index_put_((fine // n, fine // m), torch.ones(n * m,
                                                                dtype=torch.float64), accumulate=True)
    return (counts / m).float()


def flatten_window(spec: ArchitectureSpec, i: int, max_kernel: int) -> tuple[int, int]:
    """(kh, kw) that layer i's edges occupy in a K x K edge feature: ``spec.edge_window(i)``, with a
    flatten head's map sides larger than K summarized to K."""
    kh, kw = spec.edge_window(i)
    return (min(kh, max_kernel), min(kw, max_kernel)) if spec.layers[i].flatten else (kh, kw)


def _check_supported(spec: ArchitectureSpec, max_kernel: int, flatten_summary: bool = False) -> None:
    """Raise ValueError naming the layer if the converter cannot represent ``spec``."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"expected an architecture.ArchitectureSpec, got {type(spec).__name__}")
    for i, layer in enumerate(spec.layers):
        where = f"layer {i} ({layer.kind}, {layer.in_dim}->{layer.out_dim}) of {spec.name or spec.arch_id}"
        if layer.kind not in ("linear", "conv2d"):
            raise ValueError(f"{where}: layer kind {layer.kind!r} has no neuron-graph encoding")
        if layer.kind == "conv2d":
            if layer.kernel_size % 2 == 0:
                raise ValueError(f"{where}: even kernel_size {layer.kernel_size} cannot be zero-padded "
                                 f"centred; only odd kernels are supported")
            if layer.kernel_size > max_kernel:
                raise ValueError(f"{where}: kernel_size {layer.kernel_size} exceeds max_kernel {max_kernel} "
                                 f"of this converter; use WeightToGraph(max_kernel={layer.kernel_size})")
        if layer.activation not in ACTIVATIONS:
            raise ValueError(f"{where}: unknown activation {layer.activation!r}")
        if layer.flatten and not flatten_summary:
            h, w = spec.edge_window(i)
            if max(h, w) > max_kernel:
                raise ValueError(f"{where}: flatten head over a {h}x{w} map, larger than the {max_kernel}x"
                                 f"{max_kernel} edge features, and this converter does not summarize flatten "
                                 f"heads (an encoder saved before flatten-head summaries); use an encoder saved "
                                 f"by the current code (WeightToGraph(flatten_summary=True))")


def extension_features(data: Data) -> dict[str, Tensor]:
    """Per-node/per-edge features of the spec extensions, derived from ``data.spec_json`` (one graph).

    Not stored in the graphs (the field layout is shared with the zoo's graphs and the encoders);
    an encoder that wants them computes them here. Returns:
      ``pool_kind`` long [N]: ``POOL_KINDS`` id of the pooling after the node's layer (0 none, 1 max, 2 avg);
      ``pool_size`` long [N]: its window k (0 without pooling);
      ``edge_flatten`` bool [E]: edge of a flatten head (its kernel slots are spatial positions);
      ``edge_residual`` bool [E]: identity-shortcut edge.
    """
    if not isinstance(data.spec_json, str):
        raise ValueError("extension_features needs a single graph (use batch.get_example(i))")
    spec = ArchitectureSpec.from_json(data.spec_json)
    s = graph_structure(spec)
    pool_kind = torch.zeros(s.num_nodes, dtype=torch.long)
    pool_size = torch.zeros(s.num_nodes, dtype=torch.long)
    edge_flatten = torch.zeros(s.num_edges, dtype=torch.bool)
    edge_residual = torch.zeros(s.num_edges, dtype=torch.bool)
    edge_residual[s.edge_offsets[-1]:] = True
    for i, layer in enumerate(spec.layers):
        parsed = parse_pool(layer.pool)
        if parsed is not None:
            pool_kind[s.node_offsets[i + 1]:s.node_offsets[i + 2]] = POOL_KINDS[parsed[0]]
            pool_size[s.node_offsets[i + 1]:s.node_offsets[i + 2]] = parsed[1]
        if layer.flatten:
            edge_flatten[s.edge_offsets[i]:s.edge_offsets[i + 1]] = True
    return {"pool_kind": pool_kind, "pool_size": pool_size, "edge_flatten": edge_flatten,
            "edge_residual": edge_residual}


def graph_structure(spec: ArchitectureSpec) -> GraphStructure:
    """Node/edge index tensors of ``spec``'s neuron graph (independent of the weights)."""
    L = len(spec.layers)
    widths = [spec.num_inputs] + [layer.out_dim for layer in spec.layers]
    node_offsets = [0]
    for w in widths:
        node_offsets.append(node_offsets[-1] + w)
    node_type, layer_index, io_position, neuron_index, activation = [], [], [], [], []
    for l, w in enumerate(widths):
        kind = NODE_INPUT if l == 0 else (NODE_OUTPUT if l == L else NODE_HIDDEN)
        ar = torch.arange(w)
        node_type.append(torch.full((w,), kind))
        layer_index.append(torch.full((w,), l))
        io_position.append(ar if kind != NODE_HIDDEN else torch.full((w,), -1))
        neuron_index.append(ar)
        act = 0 if l == 0 else ACTIVATIONS[spec.layers[l - 1].activation]
        activation.append(torch.full((w,), act))
    src, dst, e_layer, e_kind, edge_offsets = [], [], [], [], [0]
    for l, layer in enumerate(spec.layers, start=1):
        n_out, n_in = layer.out_dim, widths[l - 1]  # a flatten layer's graph inputs are the C channels
        # row-major over (out, in): edge o*n_in + i joins input neuron i to output neuron o
        src.append((torch.arange(n_in).repeat(n_out) + node_offsets[l - 1]))
        dst.append((torch.arange(n_out).repeat_interleave(n_in) + node_offsets[l]))
        e_layer.append(torch.full((n_out * n_in,), l))
        spatial = layer.kind == "conv2d" or layer.flatten
        e_kind.append(torch.full((n_out * n_in,), EDGE_CONV if spatial else EDGE_LINEAR))
        edge_offsets.append(edge_offsets[-1] + n_out * n_in)
    n_res = 0
    for l, layer in enumerate(spec.layers, start=1):  # identity shortcuts: channel c -> channel c
        if layer.residual_from is None:
            continue
        c = torch.arange(layer.out_dim)
        src.append(c + node_offsets[layer.residual_from + 1])
        dst.append(c + node_offsets[l])
        e_layer.append(torch.full((layer.out_dim,), l))
        e_kind.append(torch.full((layer.out_dim,), EDGE_CONV if layer.kind == "conv2d" else EDGE_LINEAR))
        n_res += layer.out_dim
    return GraphStructure(
        node_type=torch.cat(node_type), layer_index=torch.cat(layer_index), io_position=torch.cat(io_position),
        neuron_index=torch.cat(neuron_index), activation=torch.cat(activation),
        edge_index=torch.stack([torch.cat(src), torch.cat(dst)]), edge_layer=torch.cat(e_layer),
        edge_kind=torch.cat(e_kind), node_offsets=tuple(node_offsets), edge_offsets=tuple(edge_offsets),
        spec_json=spec.to_json(), num_residual_edges=n_res,
    )


class WeightToGraph:
    """Converts (spec, state_dict) to neuron graphs and back.

    Args:
        max_kernel: K, the side of the padded kernel in ``edge_attr`` (odd; the zoo's largest kernel).
        canonicalize: put weights in the canonical form (``symmetry.canonicalize``) before conversion.
        flatten_summary: summarize flatten heads over maps wider than K to K x K (module docstring);
            False refuses them. Maps up to K x K are encoded exactly either way.
    """

    def __init__(self, max_kernel: int = 5, canonicalize: bool = True, flatten_summary: bool = False):
        if max_kernel < 1 or max_kernel % 2 == 0:
            raise ValueError(f"max_kernel must be a positive odd number (kernels pad centred), got {max_kernel}")
        self.max_kernel = int(max_kernel)
        self.canonicalize = bool(canonicalize)
        self.flatten_summary = bool(flatten_summary)
        self._structures: dict[str, GraphStructure] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> "WeightToGraph":
        """Build from a ``config.GraphConfig``."""
        return cls(max_kernel=cfg.max_kernel, canonicalize=cfg.canonicalize)

    def __repr__(self) -> str:
        return (f"WeightToGraph(max_kernel={self.max_kernel}, canonicalize={self.canonicalize}, "
                f"flatten_summary={self.flatten_summary})")

    @property
    def edge_dim(self) -> int:
        """Width of ``edge_attr`` (K*K)."""
        return self.max_kernel * self.max_kernel

    def structure(self, spec: ArchitectureSpec) -> GraphStructure:
        """Cached weight-independent graph tensors of ``spec`` (checks that the spec is supported)."""
        key = spec.to_json()
        s = self._structures.get(key)
        if s is None:
            _check_supported(spec, self.max_kernel, self.flatten_summary)
            s = self._structures[key] = graph_structure(spec)
        return s

    # --- forward: weights -> graphs ----------------------------------------------------------
    def _prepare(self, spec: ArchitectureSpec, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Stacked params as float32, canonicalized if this converter does so."""
        params = {k: params[k].detach().float() for k in spec.param_shapes()}
        return canonicalize_stacked(spec, params) if self.canonicalize else params

    def _features(self, spec: ArchitectureSpec, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Prepared stacked params (B, ...) -> node features x (B, N, 1) and edge_attr (B, E, K*K).

        edge_attr is allocated once and filled in place: for a zoo it is by far the largest tensor
        (most edges are linear, one nonzero slot of K*K), so memory traffic is the cost that counts.
        """
        s = self.structure(spec)
        K = self.max_kernel
        B = params["layers.0.bias"].shape[0]
        x = torch.zeros(B, s.num_nodes, 1)
        ea = torch.zeros(B, s.num_edges, K, K)
        for i, layer in enumerate(spec.layers):
            x[:, s.node_offsets[i + 1]:s.node_offsets[i + 2], 0] = params[f"layers.{i}.bias"]
            kh, kw = spec.edge_window(i)  # conv kernel, flatten block (H, W) or (1, 1)
            w = params[f"layers.{i}.weight"].reshape(B, -1, kh, kw)  # (B, out*in_graph, kh, kw)
            if kh > K or kw > K:  # a flatten block wider than K (checked by structure()): its area summary
                w = torch.einsum("ph,behw,qw->bepq", area_resample(kh, min(kh, K)), w, area_resample(kw, min(kw, K)))
                kh, kw = w.shape[-2:]
            lh, lw = (K - kh) // 2, (K - kw) // 2  # centred; a linear weight lands on the centre slot
            ea[:, s.edge_offsets[i]:s.edge_offsets[i + 1], lh:lh + kh, lw:lw + kw] = w
        if s.num_residual_edges:
            ea[:, s.edge_offsets[-1]:, K // 2, K // 2] = 1.0  # identity kernels of the shortcuts
        return x, ea.view(B, s.num_edges, K * K)

    def _split(self, spec: ArchitectureSpec, x: Tensor, ea: Tensor, idx: Sequence[int]) -> list[Data]:
        """One Data per model; x/edge_attr are views into the stacked tensors (no copy)."""
        s = self.structure(spec)
        template = Data(
            x=x[0], edge_index=s.edge_index, edge_attr=ea[0], node_type=s.node_type, layer_index=s.layer_index,
            io_position=s.io_position, neuron_index=s.neuron_index, activation=s.activation,
            edge_layer=s.edge_layer, edge_kind=s.edge_kind, num_layers=len(spec.layers), spec_json=s.spec_json,
            model_idx=0, num_nodes=s.num_nodes,
        )
        out = []
        for b, (xb, eab) in enumerate(zip(x.unbind(0), ea.unbind(0))):
            d = copy.copy(template)  # shallow: ~10x cheaper than Data(...) with 13 fields
            d.x, d.edge_attr, d.model_idx = xb, eab, int(idx[b])
            out.append(d)
        return out

    def to_graph(self, spec: ArchitectureSpec, sd: Mapping[str, Tensor], model_idx: int = 0) -> Data:
        """One model's neuron graph (see the module docstring for the fields)."""
        self.structure(spec)  # fails first, naming the layer, if the spec is unsupported
        spec.validate_state_dict(sd, source=f"state_dict of model {model_idx} ({spec.name or spec.arch_id})")
        params = self._prepare(spec, {k: v.unsqueeze(0) for k, v in sd.items()})
        return self._split(spec, *self._features(spec, params), [model_idx])[0]

    def to_graphs_stacked(self, spec: ArchitectureSpec, params: Mapping[str, Tensor],
                          model_idx: Sequence[int] | Tensor) -> list[Data]:
        """Graphs of B models of one architecture from stacked params (each tensor (B, *shape)).

        The graphs share storage (edge_index, node_type, ... and the stacked x/edge_attr they are
        views of): treat them as read-only (``SymmetryAugmenter.augment_graph`` returns new tensors).
        """
        self.structure(spec)
        shapes = spec.param_shapes()
        idx = [int(i) for i in model_idx]
        for k, shape in shapes.items():
            if k not in params:
                raise ValueError(f"stacked params of {spec.name or spec.arch_id}: missing {k}")
            if tuple(params[k].shape) != (len(idx), *shape):
                raise ValueError(f"stacked params of {spec.name or spec.arch_id}: {k} has shape "
                                 f"{tuple(params[k].shape)}, expected {(len(idx), *shape)}")
        return self._split(spec, *self._features(spec, self._prepare(spec, params)), idx)

    # --- inverse: graph -> weights -----------------------------------------------------------
    def to_state_dict(self, data: Data) -> tuple[ArchitectureSpec, dict[str, Tensor]]:
        """Inverse of ``to_graph``: (spec, state_dict) from one graph (a ``Data``, not a ``Batch``).

        Raises ValueError if the graph's sizes do not match its spec, or if ``edge_attr`` holds
        nonzero values outside a layer's kernel window (they would be lost).
        """
        spec_json = data.spec_json
        if not isinstance(spec_json, str):
            raise ValueError("to_state_dict needs a single graph (spec_json is not a str; "
                             "use batch.get_example(i) for one graph of a Batch)")
        spec = ArchitectureSpec.from_json(spec_json)
        s = self.structure(spec)
        K = self.max_kernel
        x, ea = data.x, data.edge_attr
        name = spec.name or spec.arch_id
        if x.shape != (s.num_nodes, 1):
            raise ValueError(f"graph of {name}: x has shape {tuple(x.shape)}, the spec needs ({s.num_nodes}, 1)")
        if ea.shape != (s.num_edges, K * K):
            raise ValueError(f"graph of {name}: edge_attr has shape {tuple(ea.shape)}, "
                             f"this converter (max_kernel={K}) needs ({s.num_edges}, {K * K})")
        sd: dict[str, Tensor] = {}
        for i, layer in enumerate(spec.layers):
            if flatten_window(spec, i, K) != spec.edge_window(i):
                raise ValueError(f"graph of {name}: layer {i} is a flatten head over a {spec.edge_window(i)} map "
                                 f"summarized to {K}x{K}; its weights cannot be recovered from the graph")
            n_in = spec.graph_in_dim(i)
            block = ea[s.edge_offsets[i]:s.edge_offsets[i + 1]].reshape(layer.out_dim, n_in, K, K)
            kh, kw = spec.edge_window(i)
            lh, lw = (K - kh) // 2, (K - kw) // 2
            w = block[:, :, lh:lh + kh, lw:lw + kw]
            outside = block.clone()
            outside[:, :, lh:lh + kh, lw:lw + kw] = 0
            if bool(outside.any()):
                what = "flatten block" if layer.flatten else "kernel"
                raise ValueError(f"graph of {name}: layer {i} ({layer.kind}, {what} {kh}x{kw}) has nonzero edge_attr "
                                 f"outside its {kh}x{kw} {what} window")
            sd[f"layers.{i}.weight"] = (w.reshape(layer.out_dim, layer.in_dim) if layer.kind == "linear"
                                        else w).clone()
            sd[f"layers.{i}.bias"] = x[s.node_offsets[i + 1]:s.node_offsets[i + 2], 0].clone()
        if s.num_residual_edges:  # the spec can only express identity shortcuts
            res = ea[s.edge_offsets[-1]:]
            eye = torch.zeros_like(res)
            eye[:, (K // 2) * K + K // 2] = 1.0
            bad = (res - eye).abs().amax(1) > 1e-6
            if bool(bad.any()):
                e = int(bad.nonzero()[0])
                raise ValueError(f"graph of {name}: shortcut edge {s.edge_offsets[-1] + e} is not the identity "
                                 f"kernel; only identity shortcuts can be turned back into weights")
        return spec, sd

    # --- many models, cached -------------------------------------------------------------------
    def cache_key(self, zoo_version: str) -> str:
        """Hash of the zoo version, the converter settings and the cache format."""
        payload = json.dumps({"zoo": str(zoo_version), "max_kernel": self.max_kernel,
                              "canonicalize": self.canonicalize, "format": CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def cache_path(self, cache_dir: str | os.PathLike, zoo_version: str) -> Path:
        """File holding the graphs of zoo version ``zoo_version`` under these settings."""
        return Path(cache_dir) / f"graphs-{self.cache_key(zoo_version)}.pt"

    def convert_model_to_graphs(self, zoo: Any, cache_dir: str | os.PathLike | None = None,
                                show_progress: bool = False) -> list[Data]:
        """Graphs of every model of ``zoo`` (row i <-> model i, ``model_idx`` = i).

        Models sharing an architecture are converted together with stacked tensor ops. With
        ``cache_dir`` the result is stored as plain tensors keyed by ``zoo.version`` and the
        converter settings, and reloaded (``weights_only=True``) when the key matches; a cache
        written for another zoo version or other settings is never read.

        ``zoo`` needs ``len(zoo)``, ``zoo.spec(i)``, ``zoo.state_dict(i)`` and (with a cache)
        ``zoo.version``, as ``data_prep.ModelZooDataset`` has. Graphs of one architecture share
        storage: treat them as read-only.
        """
        path = None
        with _gc_paused():
            if cache_dir is not None:
                path = self.cache_path(cache_dir, zoo.version)
                if path.exists():
                    return self.load_cache(path, expected_zoo_version=zoo.version)
            groups = self._convert_groups(zoo, show_progress)
            if path is not None:
                self._save_cache(path, zoo.version, groups)
            return self._graphs_from_groups(groups, len(zoo))

    def _convert_groups(self, zoo: Any, show_progress: bool) -> list[dict]:
        """One dict per architecture: spec_json, model_idx (B,), params (prepared stacked weights).

        The cache holds these (compact: no K*K padding), the graphs are built from them on load.
        """
        by_arch: dict[str, list[int]] = {}
        specs: dict[str, ArchitectureSpec] = {}
        # id(spec) -> (spec, json): a zoo hands out one spec object per architecture, so to_json runs
        # once per architecture; holding the spec keeps its id from being reused
        seen: dict[int, tuple[ArchitectureSpec, str]] = {}
        for i in range(len(zoo)):
            spec = zoo.spec(i)
            hit = seen.get(id(spec))
            if hit is None:
                hit = seen[id(spec)] = (spec, spec.to_json())
                specs.setdefault(hit[1], spec)
            by_arch.setdefault(hit[1], []).append(i)
        items = by_arch.items()
        if show_progress:
            from tqdm import tqdm
            items = tqdm(items, desc="graphs per architecture", total=len(by_arch))
        groups = []
        for key, idx in items:
            spec = specs[key]
            self.structure(spec)  # fails early, naming the layer, if unsupported
            shapes = spec.param_shapes()
            sds = []
            for i in idx:
                sd = zoo.state_dict(i)
                if sd.keys() != shapes.keys() or any(tuple(sd[k].shape) != v for k, v in shapes.items()):
                    spec.validate_state_dict(sd, source=f"zoo model {i}")  # raises, naming the key
                sds.append(sd)
            stacked = {k: torch.stack([sd[k] for sd in sds]) for k in shapes}
            for k, t in stacked.items():  # one finiteness check per architecture, not per model
                if not torch.is_floating_point(t):
                    raise ValueError(f"zoo model {idx[0]}: {k} has dtype {t.dtype}, expected floating point")
                bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero()
                if len(bad):
                    raise ValueError(f"zoo model {idx[int(bad[0])]}: {k} contains NaN or Inf")
            params = self._prepare(spec, stacked)
            groups.append({"spec_json": key, "model_idx": torch.tensor(idx, dtype=torch.long), "params": params})
        return groups

    def _graphs_from_groups(self, groups: Iterable[dict], n: int) -> list[Data]:
        graphs: list[Data | None] = [None] * n
        for g in groups:
            spec = ArchitectureSpec.from_json(g["spec_json"])
            for d in self._split(spec, *self._features(spec, g["params"]), g["model_idx"].tolist()):
                graphs[d.model_idx] = d
        missing = [i for i, d in enumerate(graphs) if d is None]
        if missing:
            raise ValueError(f"graph groups cover {n - len(missing)} of {n} models (missing e.g. {missing[:5]})")
        return graphs  # type: ignore[return-value]

    def _save_cache(self, path: Path, zoo_version: str, groups: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        n = sum(len(g["model_idx"]) for g in groups)
        payload = {"format": CACHE_FORMAT, "zoo_version": str(zoo_version), "max_kernel": self.max_kernel,
                   "canonicalize": self.canonicalize, "num_models": n, "groups": groups}
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache under the real name

    def load_cache(self, path: str | os.PathLike, expected_zoo_version: str | None = None) -> list[Data]:
        """Graphs from a cache file written by ``convert_model_to_graphs`` (checked against the settings)."""
        path = Path(path)
        payload = torch.load(path, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: not a graph cache of format {CACHE_FORMAT}")
        if expected_zoo_version is not None and payload["zoo_version"] != str(expected_zoo_version):
            raise ValueError(f"{path}: cache of zoo version {payload['zoo_version']}, "
                             f"expected {expected_zoo_version}")
        if payload["max_kernel"] != self.max_kernel or payload["canonicalize"] != self.canonicalize:
            raise ValueError(f"{path}: cache written with max_kernel={payload['max_kernel']}, "
                             f"canonicalize={payload['canonicalize']}; this converter is {self!r}")
        with _gc_paused():
            return self._graphs_from_groups(payload["groups"], payload["num_models"])
