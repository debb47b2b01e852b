"""Encoders of neuron graphs: the equivariant ModelEmbedder, its non-equivariant twin, WeightNet.

Every encoder is an ``nn.Module`` with

* ``forward(batch) -> (B, global_dim)``: the model embedding, one row per graph;
* ``project(z) -> (B, projection_dim)``: the contrastive projection head;
* ``node_states(batch) -> (h (N, hidden_dim), fields)`` and ``readout(h, fields) -> (B, global_dim)``: the two
  halves of ``forward``, for objectives that read the per-neuron states (reconstruction.py);

and is built by name with :func:`build_encoder` (``gnn | nonequivariant_gnn | weightnet``),
saved with :func:`save_encoder` and loaded with :func:`load_encoder` (a plain dict
``{"name", "kwargs", "state_dict", "graph"}`` read back with ``weights_only=True``).

Input graphs follow the neuron-graph contract of ``weight_to_graph.py``: a node per neuron
(bias in ``x``, ``node_type``, ``layer_index``, ``io_position``, ``activation``; the
non-equivariant baseline alone also reads ``neuron_index``), an edge per weight
(``edge_attr`` = kernel flattened and zero-padded to ``K*K``, ``edge_kind``), graph attribute
``num_layers``.

Why the embedding is *exactly* invariant (ModelEmbedder and WeightNet):

* Hidden-neuron permutations: no hidden neuron sees its index. Every node/edge update is a
  function of (node state, edge state, the *sum* over incident edges), which commutes with any
  relabelling of the nodes; pooling over the hidden neurons of a layer is a mean and a max
  (order-free). Input and output neurons are not permutable (their order means something), so
  they do get embeddings of their ``io_position``. Invariance holds up to float summation order.
* Positive rescaling (ReLU/LeakyReLU) and sign flips (tanh): the encoders read the *canonical
  form* produced by ``WeightToGraph(canonicalize=True)`` (symmetry.py), where each such hidden
  neuron's incoming weights (kernel + bias) have unit norm / a fixed sign convention and the
  factor is pushed into the next layer. Every member of a scaling/sign orbit maps to the same
  canonical network, so any function of the canonical graph is invariant, with no constraint
  on the layers. We chose this over ScaleGMN-style scale-equivariant layers because it keeps
  ordinary (fast, expressive) MLP message functions, works for any activation mix in one
  batch, and the canonical map is cheap and exact; the price is a discontinuity where a
  neuron's incoming norm is near zero (dead neurons), which trained networks rarely hit.

Probe features (``probes > 0``, probes.py): the GNNs run every graph's network on the encoder's probe
inputs (a ``ProbeSet`` saved in the encoder file) inside ``forward``, so augmented views and checkpoints
embedded by retrieval.py get features computed from their own weights, never stale ones. Each neuron's
responses become node features (hidden neurons normalised per neuron, so rescaling and sign flips leave
them exactly unchanged; outputs carry the log-probabilities; inputs the saliency), and with
``fingerprint_weight > 0`` the embedding is ``[fingerprint_weight * fingerprint, learned_weight * learned
part]``: the training-free functional fingerprint stays in reach of the embedding, and the learned part is
trained (through the projection head, which reads both) to add what the fingerprint misses. A
``MetricHead`` (within-group whitening, fit in closed form after training) may follow; ``set_metric``
attaches it and the learned part's weight, both saved with the encoder.

The shared building blocks (graph fields, node encoder, factorized message passing, metric head) are in
encoder_blocks.py; WeightNet is in weightnet.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter, softmax

from encoder_blocks import (NODE_HIDDEN, NODE_INPUT, NODE_OUTPUT, FactorizedEdgeConv, MetricHead, NodeEncoder,
                            edge_incidence, graph_fields, projection_head, standardize_inputs)
from probes import ProbeSet, probe_features
from weightnet import WeightNet


# --------------------------------------------------------------------------- pooling
class HierarchicalPool(nn.Module):
    """Permutation-invariant pooling of node states into one vector per graph.

    1. Within each hidden layer of each graph: mean and max over its neurons -> a layer token,
       plus embeddings of the layer position (from the start and from the end).
    2. Across the layer tokens of a graph: gated-attention pooling and a mean.
    3. Input and output neurons keep their identity: their states carry their io_position
       embedding, and they are pooled per graph by gated attention and a mean, separately for
       inputs and outputs. Concatenating output nodes by position would give a vector whose
       size depends on the number of classes and whose slots mean different things for
       different tasks; attention pooling has a fixed size, works on mixed batches (10-way,
       2-way, CNN 1-channel inputs, 64 MLP inputs) and still sees which position carried what.
    4. Optional positional slots (``io_slots > 0``): each input and output neuron's state is
       projected to ``io_slots`` numbers and written into slot ``io_position`` of a fixed
       (``io_positions`` x ``io_slots``) grid per graph (networks with more IO neurons than
       slots are binned evenly: slot = position * io_positions // n). Within a shape group a
       slot always means the same pixel/feature/class, so the embedding can keep a per-input
       profile (which inputs a network uses) that a mean over inputs blurs. Input/output
       neurons are never permuted, so the slots keep the invariance.

    Shapes: h (N, h) -> (B, global_dim).
    """

    def __init__(self, hidden_dim: int, global_dim: int, max_layers: int, dropout: float = 0.0,
                 io_slots: int = 0, io_positions: int = 128):
        super().__init__()
        self.max_layers = max_layers
        self.io_slots, self.io_positions = io_slots, io_positions
        if io_slots > 0:
            self.slot_in = nn.Linear(hidden_dim, io_slots)
            self.slot_out = nn.Linear(hidden_dim, io_slots)
        slot_dim = 2 * io_positions * io_slots
        self.layer_mlp = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.layer_pos = nn.Embedding(max_layers + 1, hidden_dim)
        self.layer_from_end = nn.Embedding(max_layers + 1, hidden_dim)
        self.gate_layer = nn.Linear(hidden_dim, 1)
        self.gate_in = nn.Linear(hidden_dim, 1)
        self.gate_out = nn.Linear(hidden_dim, 1)
        self.out = nn.Sequential(
            nn.LayerNorm(6 * hidden_dim + slot_dim), nn.Linear(6 * hidden_dim + slot_dim, 2 * hidden_dim), nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_dim, global_dim),
        )

    @staticmethod
    def _attend(h: Tensor, gate: nn.Module, index: Tensor, size: int) -> Tensor:
        """[gated-attention sum, mean] of the rows of h grouped by index -> (size, 2h)."""
        w = softmax(gate(h), index, num_nodes=size)  # (n, 1), sums to 1 per group
        return torch.cat([scatter(w * h, index, 0, size, "sum"), scatter(h, index, 0, size, "mean")], dim=-1)

    def forward(self, h: Tensor, f: dict) -> Tensor:
        node_type, layer, b, num_graphs = f["node_type"], f["layer_index"], f["batch"], f["num_graphs"]
        hidden = node_type == NODE_HIDDEN
        # (graph, layer) segment ids of hidden neurons; nodes are grouped by graph then layer.
        key = b[hidden] * (self.max_layers + 1) + layer[hidden]
        uniq, seg = torch.unique(key, return_inverse=True)  # G tokens
        g = uniq.numel()
        hh = h[hidden]
        tok = torch.cat([scatter(hh, seg, 0, g, "mean"), scatter(hh, seg, 0, g, "max")], dim=-1)  # (G, 2h)
        tok_graph, tok_layer = uniq // (self.max_layers + 1), uniq % (self.max_layers + 1)
        tok_from_end = f["num_layers_node"][hidden][_first_index(seg, g)] - tok_layer
        tok = self.layer_mlp(tok) + self.layer_pos(tok_layer) + self.layer_from_end(tok_from_end)  # (G, h)
        pooled_layers = self._attend(tok, self.gate_layer, tok_graph, num_graphs)  # (B, 2h); zeros without hidden layers
        is_in, is_out = node_type == NODE_INPUT, node_type == NODE_OUTPUT
        pooled_in = self._attend(h[is_in], self.gate_in, b[is_in], num_graphs)  # (B, 2h)
        pooled_out = self._attend(h[is_out], self.gate_out, b[is_out], num_graphs)  # (B, 2h)
        parts = [pooled_layers, pooled_in, pooled_out]
        if self.io_slots > 0:
            parts += [self._slots(h, is_in, self.slot_in, f), self._slots(h, is_out, self.slot_out, f)]
        return self.out(torch.cat(parts, dim=-1))

    def _slots(self, h: Tensor, mask: Tensor, proj: nn.Module, f: dict) -> Tensor:
        """Projected states of the masked (input or output) nodes written into their position slots -> (B, P * s)."""
        b, pos, P = f["batch"][mask], f["io_position"][mask], self.io_positions
        n = torch.bincount(b, minlength=f["num_graphs"])[b]  # IO neurons of each node's graph
        slot = torch.where(n > P, pos * P // n.clamp_min(1), pos)  # binned evenly when a layer has more than P
        out = scatter(proj(h[mask]), b * P + slot, 0, f["num_graphs"] * P, "mean")  # (B * P, s)
        return out.view(f["num_graphs"], P * self.io_slots)


def _first_index(seg: Tensor, g: int) -> Tensor:
    """Index of the first row of each of the g segments in ``seg`` (G,)."""
    pos = torch.arange(seg.numel(), device=seg.device)
    return torch.full((g,), seg.numel(), device=seg.device, dtype=torch.long).scatter_reduce(0, seg, pos, "amin")



# --------------------------------------------------------------------------- encoders
class ModelEmbedder(nn.Module):
    """Equivariant GNN over neuron graphs -> an invariant model embedding.

    Node encoder (bias, type, activation, layer position from start and end, IO position)
    -> ``message_passing_steps`` x :class:`FactorizedEdgeConv` (edge states updated every
    step, messages in both directions) -> :class:`HierarchicalPool` -> (B, global_dim).
    See the module docstring for why the embedding is exactly invariant to permutation,
    scaling and sign symmetries (given canonical-form graphs). No normalization mixes
    graphs of a batch (LayerNorm is per node), so an embedding does not depend on its
    batch neighbours.

    Args:
        hidden_dim: node/edge state width (CPU default 64; the GPU setting is 256).
        global_dim: embedding size.
        projection_dim: output size of :meth:`project`.
        message_passing_steps: number of message-passing layers (CPU 3; GPU 4).
        dropout: dropout inside node-update MLPs and the pooling MLP.
        edge_dim: edge feature width of the graphs (K*K; 25 for the default max_kernel 5).
        max_layers: largest network depth accepted.
        max_io_positions: largest number of input or output neurons accepted.
        io_slots: numbers per input/output position slot in the readout (0: no slots; see
            :class:`HierarchicalPool`). Measured on the default zoo (seed 42, 3 supcon epochs):
            within-shape-group P@10 0.253 -> 0.345 untrained and 0.256 -> 0.342 trained with 4 slots.
        probes: probe inputs per kind and input size (0: no probe features; the arguments below are then unused).
        probe_kinds, probe_sizes, probe_seed: the :class:`probes.ProbeSet` (kinds, input feature counts stored,
            seed of the Gaussian probes); data probes are set after building (``probe_set.set_data``).
        probe_saliency: input neurons carry the input gradient on the probes (else zeros).
        out_slots: output slots of the fingerprint (outputs beyond are binned).
        fingerprint_weight: weight of the fingerprint in the embedding (0: the learned part alone).
        metric_dim: size of a metric head (0: none; set by :meth:`set_metric`, recorded for loading).
        learned_weight: weight of the learned part beside the fingerprint (set by :meth:`set_metric`).
    """

    name = "gnn"

    _max_neurons = 0  # > 0 only in NonEquivariantGNN: hidden neurons never see their index here

    def __init__(self, hidden_dim: int = 64, global_dim: int = 128, projection_dim: int = 64,
                 message_passing_steps: int = 3, dropout: float = 0.0, edge_dim: int = 25, max_layers: int = 16,
                 max_io_positions: int = 1024, io_slots: int = 4, probes: int = 0,
                 probe_kinds: Sequence[str] = ("gauss",), probe_sizes: Sequence[int] = (), probe_seed: int = 0,
                 probe_saliency: bool = True, out_slots: int = 10, fingerprint_weight: float = 0.0,
                 metric_dim: int = 0, learned_weight: float = 1.0):
        super().__init__()
        self.hparams: dict[str, Any] = dict(
            hidden_dim=hidden_dim, global_dim=global_dim, projection_dim=projection_dim,
            message_passing_steps=message_passing_steps, dropout=dropout, edge_dim=edge_dim, max_layers=max_layers,
            max_io_positions=max_io_positions, io_slots=io_slots)
        if probes > 0:  # recorded only when on: files of encoders without probes stay as they were
            self.hparams.update(probes=probes, probe_kinds=list(probe_kinds), probe_sizes=[int(n) for n in probe_sizes],
                                probe_seed=probe_seed, probe_saliency=probe_saliency, out_slots=out_slots,
                                fingerprint_weight=fingerprint_weight, metric_dim=metric_dim,
                                learned_weight=learned_weight)
        elif fingerprint_weight or metric_dim or learned_weight != 1.0:
            raise ValueError("fingerprint_weight, learned_weight and metric_dim need probe features (probes > 0)")
        if message_passing_steps < 1:
            raise ValueError(f"message_passing_steps must be >= 1, got {message_passing_steps}")
        self.edge_dim = edge_dim
        self.probe_set = ProbeSet(probes, probe_kinds, probe_sizes, probe_seed) if probes > 0 else None
        self.probe_saliency, self.out_slots, self.fingerprint_weight = probe_saliency, out_slots, float(fingerprint_weight)
        self.learned_weight = float(learned_weight)  # weight of the learned part beside the fingerprint (set_metric)
        probe_dim = 2 * self.probe_set.total if self.probe_set is not None else 0
        self.node_encoder = NodeEncoder(hidden_dim, max_layers, max_io_positions, self._max_neurons, probe_dim=probe_dim)
        self.convs = nn.ModuleList(
            [FactorizedEdgeConv(hidden_dim, edge_dim if i == 0 else hidden_dim, dropout) for i in range(message_passing_steps)]
        )
        self.pool = HierarchicalPool(hidden_dim, global_dim, max_layers, dropout, io_slots)
        # the embedding: [fingerprint_weight * fingerprint (P * out_slots), learned part (global_dim)], or the
        # learned part alone; the projection head reads all of it (the learned part learns what the fingerprint misses)
        fp_dim = self.probe_set.total * out_slots if self.fingerprint_weight > 0 else 0
        self.embedding_dim = fp_dim + global_dim
        self.projector = projection_head(self.embedding_dim, projection_dim, global_dim)
        self.metric = MetricHead(self.embedding_dim, metric_dim) if metric_dim > 0 else None
        # the raw-weight term of the first message must be as large as the node terms (std ~1 per unit
        # of standardized weight); the default init (U(+-1/sqrt(K*K))) makes it a small perturbation
        nn.init.normal_(self.convs[0].lin_edge.weight, std=1.0)

    def node_states(self, batch: Data | Batch) -> tuple[Tensor, dict]:
        """Final node states (N, hidden_dim) and the parsed graph fields (with ``fingerprint`` (B, P * out_slots)
        when the encoder has probes)."""
        f = graph_fields(batch)
        if f["edge_attr"].size(-1) != self.edge_dim:
            raise ValueError(f"graphs have edge_attr of width {f['edge_attr'].size(-1)} but the encoder was built for "
                             f"edge_dim={self.edge_dim} (max_kernel {int(self.edge_dim ** 0.5)})")
        if self.probe_set is not None:  # computed from these graphs' weights: views never see stale features
            learned = "learned" in self.probe_set.kinds and torch.is_grad_enabled()
            with torch.set_grad_enabled(learned):
                pf = probe_features(self.probe_set, batch, self.out_slots, self.probe_saliency)
            f["probe"], f["fingerprint"] = pf.node, pf.fingerprint
        e, f["x_std"], _ = standardize_inputs(f, self.node_encoder.max_layers)
        h = self.node_encoder(f)
        inc = edge_incidence(f["edge_index"], h.size(0))
        e = e.to(h.dtype)  # (E, K*K) standardized weights; then (E, h) edge states
        for conv in self.convs:
            h, e = conv(h, e, inc)
        return h, f

    def readout(self, h: Tensor, f: dict) -> Tensor:
        """Node states (N, hidden_dim) and the fields of :meth:`node_states` -> the embedding before the metric
        head, (B, embedding_dim): the pooled states, beside the unit-norm probe fingerprint when it is kept."""
        z = self.pool(h, f)  # (B, global_dim)
        if self.fingerprint_weight > 0:  # [w * fingerprint (unit norm), learned_weight * learned part (unit norm)]
            z = torch.cat([self.fingerprint_weight * f["fingerprint"].to(z.dtype),
                           self.learned_weight * nn.functional.normalize(z, dim=1)], 1)
        return z

    def embed_raw(self, batch: Data | Batch) -> Tensor:
        """The embedding before the metric head: (B, embedding_dim) (what the projection head reads)."""
        return self.readout(*self.node_states(batch))

    def forward(self, batch: Data | Batch) -> Tensor:
        """Embed a batch of neuron graphs -> (B, embedding_dim), or (B, metric_dim) once the metric head is fit."""
        z = self.embed_raw(batch)
        return self.metric(z) if self.metric is not None and self.metric.is_fit else z

    def set_metric(self, head: MetricHead | None, learned_weight: float | None = None) -> None:
        """Attach a fit metric head (``forward`` then returns its output), or None to drop it, and optionally set
        the weight of the learned part in the embedding it reads; both are recorded in hparams (saved)."""
        if head is not None and (not head.is_fit or head.transform.shape[0] != self.embedding_dim):
            raise ValueError(f"set_metric needs a fit MetricHead over {self.embedding_dim} dims")
        if self.probe_set is None and (head is not None or learned_weight is not None):
            raise ValueError("a metric head needs an encoder with probe features (probes > 0)")
        self.metric = head
        if learned_weight is not None:
            if self.fingerprint_weight <= 0:
                raise ValueError("learned_weight applies beside a fingerprint (fingerprint_weight > 0)")
            self.learned_weight = float(learned_weight)
        if self.probe_set is not None:
            self.hparams.update(metric_dim=0 if head is None else int(head.transform.shape[1]),
                                learned_weight=self.learned_weight)

    def project(self, z: Tensor) -> Tensor:
        """Contrastive projection head: (B, embedding_dim) -> (B, projection_dim)."""
        if self.metric is not None and self.metric.is_fit:
            raise RuntimeError("project() reads embed_raw(); this encoder's metric head is fit, so forward() returns "
                               "metric embeddings: train before fitting the metric head")
        return self.projector(z)


class NonEquivariantGNN(ModelEmbedder):
    """The ModelEmbedder made blind to the permutation symmetry (the method's baseline).

    Identical network, except that hidden neurons also get a learned embedding of their
    ``neuron_index`` (position within the layer), so a permuted network yields a different
    graph labelling and a different embedding. This measures the value of equivariance.
    """

    name = "nonequivariant_gnn"

    def __init__(self, hidden_dim: int = 64, global_dim: int = 128, projection_dim: int = 64,
                 message_passing_steps: int = 3, dropout: float = 0.0, edge_dim: int = 25, max_layers: int = 16,
                 max_io_positions: int = 1024, max_neurons: int = 1024, io_slots: int = 4, **probe_kwargs: Any):
        if max_neurons < 1:
            raise ValueError(f"max_neurons must be >= 1, got {max_neurons}")
        self._max_neurons = max_neurons  # read by ModelEmbedder.__init__ (instance attribute shadows the class's)
        super().__init__(hidden_dim, global_dim, projection_dim, message_passing_steps, dropout, edge_dim, max_layers,
                         max_io_positions, io_slots, **probe_kwargs)  # probes, probe_kinds, ... as ModelEmbedder
        self.hparams["max_neurons"] = max_neurons


# --------------------------------------------------------------------------- registry, save/load
ENCODERS: dict[str, type[nn.Module]] = {"gnn": ModelEmbedder, "nonequivariant_gnn": NonEquivariantGNN,
                                        "weightnet": WeightNet}
ENCODER_NAMES = tuple(ENCODERS)


def build_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build a trainable encoder by name (gnn | nonequivariant_gnn | weightnet) with its kwargs."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; trainable encoders: {sorted(ENCODERS)}")
    return ENCODERS[name](**kwargs)


def encoder_kwargs(hidden_dim: int, global_dim: int, projection_dim: int, message_passing_steps: int,
                   dropout: float, name: str = "gnn", attention_heads: int = 4, canonical_order: bool = False,
                   io_slots: int = 0, probes: int = 0, probe_kinds: Sequence[str] = ("gauss",),
                   probe_saliency: bool = True, fingerprint_weight: float = 0.0,
                   probe_sizes: Sequence[int] = ()) -> dict:
    """The :func:`build_encoder` kwargs for encoder ``name`` from the fields of ``config.EncoderConfig``.

    Example (``c = cfg.encoder``): ``build_encoder(c.model, **encoder_kwargs(c.hidden_dim, c.global_dim,
    c.projection_dim, c.message_passing_steps, c.dropout, c.model, c.attention_heads, c.canonical_order))``.
    Probe features (``probes`` > 0, with the input sizes ``probe_sizes`` of the zoo) apply to the GNNs only.
    """
    kw: dict[str, Any] = dict(hidden_dim=hidden_dim, global_dim=global_dim, projection_dim=projection_dim,
                              message_passing_steps=message_passing_steps, dropout=dropout)
    if name == "weightnet":
        kw.update(num_heads=attention_heads, canonical_order=canonical_order)
    elif canonical_order:
        raise ValueError(f"canonical_order applies to weightnet only, not to {name!r}")
    if name in ("gnn", "nonequivariant_gnn"):  # like attention_heads for the GNNs, io_slots does not apply to weightnet
        kw["io_slots"] = io_slots
        if probes > 0:
            kw.update(probes=probes, probe_kinds=list(probe_kinds), probe_saliency=probe_saliency,
                      fingerprint_weight=fingerprint_weight, probe_sizes=sorted(int(n) for n in probe_sizes))
    return kw


# What the graphs an encoder of this code embeds may hold (``weight_to_graph.WeightToGraph`` options), saved
# with it: flatten heads over maps wider than K come summarized (files saved before have no "graph" entry).
GRAPH_OPTIONS = {"flatten_summary": True}


def save_encoder(path: str, encoder: nn.Module) -> None:
    """Save ``{"name", "kwargs", "state_dict", "graph"}`` (plain types and tensors only)."""
    name = getattr(encoder, "name", None)
    if name not in ENCODER_NAMES:
        raise ValueError(f"save_encoder: {type(encoder).__name__} is not one of the encoders {ENCODER_NAMES}")
    torch.save({"name": name, "kwargs": dict(encoder.hparams), "state_dict": encoder.state_dict(),
                "graph": dict(GRAPH_OPTIONS)}, path)


def load_encoder(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load an encoder saved by :func:`save_encoder` (``weights_only=True``; strict state-dict match).

    Its ``flatten_summary`` attribute says whether it takes summarized flatten heads (False for files saved
    before ``GRAPH_OPTIONS`` existed)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    if not {"name", "kwargs", "state_dict"} <= keys <= {"name", "kwargs", "state_dict", "graph"}:
        raise ValueError(f"{path}: not an encoder file from save_encoder (keys {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)})")
    kwargs = dict(ckpt["kwargs"])
    if ckpt["name"] in ("gnn", "nonequivariant_gnn"):
        kwargs.setdefault("io_slots", 0)  # files saved before the slot readout existed have none
    encoder = build_encoder(ckpt["name"], **kwargs)
    encoder.load_state_dict(ckpt["state_dict"])
    encoder.flatten_summary = bool(ckpt.get("graph", {}).get("flatten_summary", False))
    return encoder


# --------------------------------------------------------------------------- CPU allocator
def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep large freed tensors in glibc's heap instead of returning them to the OS.

    PyTorch's CPU allocator has no cache: each [E x h] activation (39 MB for a batch of 64
    digits MLPs) is a fresh ``mmap`` whose pages fault in on first touch and a ``munmap`` on
    free. Raising glibc's mmap/trim thresholds makes such tensors reuse heap memory; measured
    here it cuts a [151k x 64] elementwise op from ~20 ms to ~2.5 ms. Process-wide, so it is
    opt-in and called by scripts (benchmarks, training), never at import. Returns False where
    glibc's ``mallopt`` is unavailable (non-glibc platforms), in which case nothing changed.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
    int_max = 2**31 - 1  # mallopt takes a C int
    if not 0 < threshold_bytes <= int_max:
        raise ValueError(f"threshold_bytes must be in (0, {int_max}], got {threshold_bytes}")
    ok = libc.mallopt(m_mmap_threshold, ctypes.c_int(threshold_bytes)) == 1
    ok = libc.mallopt(m_trim_threshold, ctypes.c_int(int_max)) == 1 and ok
    return ok

