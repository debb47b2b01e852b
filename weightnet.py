"""WeightNet: a permutation-invariant transformer over neuron graphs (sibling of gnn_encoder.py).

A network is read as a sequence of layers, each a *set* of neurons:

1. Neuron tokens: the node encoding of encoder_blocks (bias, type, activation, layer position,
   IO position) refined by ``summary_steps`` factorized message-passing steps, so each token
   holds a permutation-invariant summary (sums) of its incoming and outgoing weights.
2. Intra-layer attention: self-attention among the neurons of one layer of one graph, with no
   positional encoding for hidden neurons (a set: permutation equivariant), then mean+max
   pooling to one token per layer (invariant).
3. Cross-layer attention over the layer tokens of a graph, with layer-position embeddings
   (from the start and from the end) and a role embedding (input / hidden / output layer),
   read out through a CLS token -> the embedding (B, global_dim).

Graphs of extended specs (pooling, flatten heads, identity shortcuts) reach the tokens through the
shared ``NodeEncoder`` (pooling kind/size and flatten/shortcut edge flags, per layer).

``row_codes=True`` adds seed 004's tokens (a neuron's incoming weights) in an equivariant form before step 1
(:class:`AddressCodes`): every neuron has an address code (its input/output position, or for a hidden
neuron its canonical rank in the layer), and its token gets the sum of its incoming weights times their
sources' codes (its row) and of its outgoing weights times their destinations' codes (its column), so a
decoder can read a weight back by pairing a token with an address (reconstruction.py; the decoder also reads the
token right after this step, ``f["address_tokens"]``). The token must be as wide as the row (a fan-in of up to
100 in the zoo: width 128 for reconstruction). Measured on the small zoo, reconstruction only
(benchmarks/bench_reconstruction.py, width 128, batch 16, lr 3e-3): test R^2 0.54 after 378 steps, still rising.

Invariance to scaling/sign symmetries comes from the canonical form (see gnn_encoder).
``canonical_order=True`` sorts each hidden layer's neurons canonically (by bias, ties by the
sum of incoming weights) and gives each hidden neuron an embedding of its *rank*; the rank
moves with the neuron under a permutation, so the embedding stays invariant (barring exact
ties) while attention also sees an order. ``predict_properties(z)`` is a multi-property
regression head (test accuracy, generalization gap, ...), trained with MSE.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter, to_dense_batch

from encoder_blocks import (NODE_HIDDEN, NODE_INPUT, NODE_OUTPUT, FactorizedEdgeConv, NodeEncoder, _check_range,
                            edge_incidence, graph_fields, projection_head, standardize_inputs)


def _encoder_stack(hidden_dim: int, num_heads: int, num_layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True,
                                       norm_first=True, activation="gelu")
    # nested tensors would drop padding on the eval fast path only; keep one code path in train and eval
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def canonical_rank(key: Tensor, tiebreak: Tensor, seg: Tensor) -> Tensor:
    """Rank of each row within its segment when sorted by (key, tiebreak); seg sorted ascending.

    Shapes: key, tiebreak, seg (n,) -> rank (n,) long.
    """
    order = torch.argsort(tiebreak, stable=True)
    order = order[torch.argsort(key[order], stable=True)]
    order = order[torch.argsort(seg[order], stable=True)]  # sorted by (seg, key, tiebreak)
    seg_sorted = seg[order]
    pos = torch.arange(seg.numel(), device=seg.device)
    start = torch.zeros(int(seg.max()) + 1 if seg.numel() else 0, dtype=torch.long, device=seg.device)
    start = start.scatter_reduce(0, seg_sorted, pos, "amin", include_self=False)
    rank = torch.empty_like(pos)
    rank[order] = pos - start[seg_sorted]
    return rank


class AddressCodes(nn.Module):
    """Address-coded row and column sums of every neuron (see the module docstring).

    Inputs and outputs are addressed by their io position, hidden neurons by their canonical rank, which moves
    with the neuron under a permutation: the result is equivariant (barring exact rank ties).

    Shapes: e (E, edge_dim) standardized weights, rank (N,) -> (N, hidden_dim) = code + LN(proj([row, col])).
    """

    def __init__(self, hidden_dim: int, edge_dim: int, max_io_positions: int, max_width: int):
        super().__init__()
        self.max_io_positions = max_io_positions
        self.io = nn.Embedding(2 * max_io_positions, hidden_dim)  # inputs, then outputs
        self.rank = nn.Embedding(max_width, hidden_dim)
        self.row, self.col = nn.Linear(edge_dim, hidden_dim, bias=False), nn.Linear(edge_dim, hidden_dim, bias=False)
        self.proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, e: Tensor, f: dict, rank: Tensor) -> Tensor:
        node_type, n = f["node_type"], f["node_type"].numel()
        io = torch.where(node_type == NODE_INPUT, f["io_position"], self.max_io_positions + f["io_position"])
        code = torch.where((node_type == NODE_HIDDEN).unsqueeze(1), self.rank(rank), self.io(io.clamp_min(0)))
        src, dst = f["edge_index"]
        row = scatter(self.row(e) * code[src], dst, 0, n, "sum")  # (N, h): sum_i w_ij * code_i
        col = scatter(self.col(e) * code[dst], src, 0, n, "sum")  # (N, h): sum_j w_ij * code_j
        # LayerNorm, not 1/sqrt(h): at 1/sqrt(h) the row was ~6% of the token and the later blocks drowned it
        # (ridge readout of first-layer rows from the untrained final tokens, hidden 128: R^2 0.17-0.19; 0.43-0.52
        # with the norm; from this output: 1.0 / 0.97)
        return code + self.norm(self.proj(torch.cat([row, col], dim=-1)))


class WeightNet(nn.Module):
    """Permutation-invariant transformer encoder with a multi-property head.

    Args:
        hidden_dim: token width.
        global_dim: embedding size.
        projection_dim: output size of :meth:`project` (contrastive head).
        message_passing_steps: intra-layer attention blocks (the depth knob shared with the GNNs).
        dropout: dropout in attention blocks and heads.
        num_heads: attention heads (must divide hidden_dim).
        cross_layers: cross-layer attention blocks.
        summary_steps: message-passing steps that build the neuron tokens.
        canonical_order: add embeddings of the canonical rank of hidden neurons (see module doc).
        num_properties: outputs of :meth:`predict_properties`.
        edge_dim, max_layers, max_io_positions: as in ModelEmbedder.
        max_width: largest layer width accepted with canonical_order or row_codes.
        row_codes: add address-coded row and column sums to the neuron tokens (:class:`AddressCodes`).
    """

    name = "weightnet"

    def __init__(self, hidden_dim: int = 64, global_dim: int = 128, projection_dim: int = 64,
                 message_passing_steps: int = 2, dropout: float = 0.0, num_heads: int = 4, cross_layers: int = 2,
                 summary_steps: int = 1, canonical_order: bool = False, num_properties: int = 4, edge_dim: int = 25,
                 max_layers: int = 16, max_io_positions: int = 1024, max_width: int = 4096, row_codes: bool = False):
        super().__init__()
        self.hparams: dict[str, Any] = dict(
            hidden_dim=hidden_dim, global_dim=global_dim, projection_dim=projection_dim,
            message_passing_steps=message_passing_steps, dropout=dropout, num_heads=num_heads, cross_layers=cross_layers,
            summary_steps=summary_steps, canonical_order=canonical_order, num_properties=num_properties,
            edge_dim=edge_dim, max_layers=max_layers, max_io_positions=max_io_positions, max_width=max_width,
            row_codes=row_codes)
        if hidden_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_dim={hidden_dim}")
        self.edge_dim, self.max_layers, self.max_width = edge_dim, max_layers, max_width
        self.canonical_order = canonical_order
        self.node_encoder = NodeEncoder(hidden_dim, max_layers, max_io_positions)
        self.summary = nn.ModuleList(
            [FactorizedEdgeConv(hidden_dim, edge_dim if i == 0 else hidden_dim, dropout) for i in range(summary_steps)]
        )
        self.rank = nn.Embedding(max_width, hidden_dim) if canonical_order else None
        self.codes = AddressCodes(hidden_dim, edge_dim, max_io_positions, max_width) if row_codes else None
        self.intra = _encoder_stack(hidden_dim, num_heads, message_passing_steps, dropout)
        self.layer_mlp = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.layer_pos = nn.Embedding(max_layers + 1, hidden_dim)
        self.layer_from_end = nn.Embedding(max_layers + 1, hidden_dim)
        self.layer_role = nn.Embedding(3, hidden_dim)  # input / hidden / output layer
        self.cls = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.cross = _encoder_stack(hidden_dim, num_heads, cross_layers, dropout)
        self.out = nn.Sequential(nn.LayerNorm(2 * hidden_dim), nn.Linear(2 * hidden_dim, global_dim))
        self.projector = projection_head(global_dim, projection_dim)
        self.property_head = nn.Sequential(nn.Linear(global_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                           nn.Linear(hidden_dim, num_properties))

    def node_states(self, batch: Data | Batch) -> tuple[Tensor, dict]:
        """Neuron tokens after intra-layer attention (N, hidden_dim) and the parsed graph fields, with the
        (graph, layer) segments the read-out pools over (``seg`` (N,), ``uniq`` (G,))."""
        f = graph_fields(batch)
        if f["edge_attr"].size(-1) != self.edge_dim:
            raise ValueError(f"graphs have edge_attr of width {f['edge_attr'].size(-1)}, the encoder expects {self.edge_dim}")
        node_type, layer, b = f["node_type"], f["layer_index"], f["batch"]
        # (graph, layer) segments; the contract orders nodes by graph, then layer
        key = b * (self.max_layers + 1) + layer
        if key.numel() > 1 and bool((key[1:] < key[:-1]).any()):
            raise ValueError("WeightNet: nodes must be ordered by graph then layer (inputs, layer 1, ..., outputs), "
                             "as weight_to_graph.py produces them")
        uniq, seg = torch.unique_consecutive(key, return_inverse=True)  # G segments
        hidden = node_type == NODE_HIDDEN
        edge_index = f["edge_index"]
        rank = None
        if self.rank is not None or self.codes is not None:
            in_sum = scatter(f["edge_attr"].sum(-1), edge_index[1], 0, hidden.numel(), "sum")  # tiebreak
            rank = torch.where(hidden, canonical_rank(f["x"].squeeze(-1), in_sum, seg), 0)
            _check_range("hidden layer width (canonical rank)", rank, self.max_width, "max_width")
        # 1. neuron tokens
        e, f["x_std"], _ = standardize_inputs(f, self.max_layers)  # see encoder_blocks.standardize_inputs
        h = self.node_encoder(f)
        if self.codes is not None:
            h = h + self.codes(e.to(h.dtype), f, rank)
            f["address_tokens"] = h  # (N, h) read by the weight decoder beside the final tokens (reconstruction.py)
        inc = edge_incidence(edge_index, h.size(0))
        e = e.to(h.dtype)
        for conv in self.summary:
            h, e = conv(h, e, inc)
        if self.rank is not None:
            h = h + self.rank(rank) * hidden.unsqueeze(1).to(h.dtype)
        # 2. intra-layer attention over each layer's neurons (no hidden positions: a set)
        dense, mask = to_dense_batch(h, seg, batch_size=uniq.numel())  # (G, W, h), (G, W)
        dense = self.intra(dense, src_key_padding_mask=~mask)
        f["seg"], f["uniq"] = seg, uniq
        return dense[mask], f  # (N, h) back in node order

    def readout(self, h: Tensor, f: dict) -> Tensor:
        """Neuron tokens (N, hidden_dim) and the fields of :meth:`node_states` -> the embedding (B, global_dim)."""
        seg, uniq, num_graphs = f["seg"], f["uniq"], f["num_graphs"]
        g = uniq.numel()
        tok = torch.cat([scatter(h, seg, 0, g, "mean"), scatter(h, seg, 0, g, "max")], dim=-1)  # (G, 2h)
        tok_graph, tok_layer = uniq // (self.max_layers + 1), uniq % (self.max_layers + 1)
        first = torch.zeros(g, dtype=torch.long, device=h.device).scatter_reduce(
            0, seg, torch.arange(seg.numel(), device=h.device), "amin", include_self=False)
        tok_type = f["node_type"][first]  # input / hidden / output layer
        tok_from_end = f["num_layers_node"][first] - tok_layer
        tok = (self.layer_mlp(tok) + self.layer_pos(tok_layer) + self.layer_from_end(tok_from_end)
               + self.layer_role(tok_type))
        # 3. cross-layer attention with a CLS read-out
        seq, seq_mask = to_dense_batch(tok, tok_graph, batch_size=num_graphs)  # (B, L+1, h)
        seq = torch.cat([self.cls.expand(num_graphs, -1, -1), seq], dim=1)
        seq_mask = torch.cat([seq_mask.new_ones(num_graphs, 1), seq_mask], dim=1)
        seq = self.cross(seq, src_key_padding_mask=~seq_mask)
        mean = (seq[:, 1:] * seq_mask[:, 1:, None]).sum(1) / seq_mask[:, 1:].sum(1, keepdim=True).clamp_min(1)
        return self.out(torch.cat([seq[:, 0], mean], dim=-1))

    def forward(self, batch: Data | Batch) -> Tensor:
        """Embed a batch of neuron graphs -> (B, global_dim)."""
        return self.readout(*self.node_states(batch))

    def project(self, z: Tensor) -> Tensor:
        """Contrastive projection head: (B, global_dim) -> (B, projection_dim)."""
        return self.projector(z)

    def predict_properties(self, z: Tensor) -> Tensor:
        """Multi-property regression head: (B, global_dim) -> (B, num_properties); train with MSE."""
        return self.property_head(z)


__all__ = ["WeightNet", "canonical_rank", "NODE_INPUT", "NODE_OUTPUT"]
