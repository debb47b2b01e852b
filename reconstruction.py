"""Weight reconstruction (hyper-representations, seed 004): decode every weight and bias back from the encoder.

Schürholt et al. (NeurIPS 2021) train an autoencoder on the weights of one fixed architecture beside a
SimCLR loss. The zoo mixes architectures, so the decoder here works in the neuron graph's own layout:
each neuron's state decodes its bias, and each weight edge (a linear weight or a whole conv kernel) is
decoded from the states of its two neurons (and the model embedding)::

    u_n      = MLP([h_n (+ a_n), z_graph(n)])                           (N, d)  per neuron
    w_ij     = Linear(GELU(A u_j + B u_i + (C u_j) * (D u_i)))          (E, K*K) edge i -> j, standardized
    b_n, s_n = Linear(u_n)                                              bias (standardized), log-scales

where a_n is WeightNet's address-coded token (its row and column in the code basis, before the attention
blocks; weightnet.AddressCodes), when the encoder has one. The decoder reads per-neuron states, so nothing
forces the pooled embedding z to carry the weights: the states hold each neuron's row (no bottleneck),
unlike seed 004's autoencoder, which decodes from its compressed latent.

The loss runs over exactly the graph's weights: every kernel window of every weight edge and the bias of
every non-input neuron; the K*K padding around smaller kernels, identity-shortcut edges and
input nodes are masked out (the mask follows the graph, so a mixed batch needs no fixed layout).
Targets are the *clean* canonical weights of the view's network (``target_x``/``target_edge_attr``,
attached by :func:`with_targets` before the view is drawn: noise and erasing change the input only,
symmetry transformations move the targets with the weights, symmetry.py), standardized per
(graph, layer) to unit RMS like the encoder's input; each neuron also predicts its layer's log-RMS
of weights and biases, so the decoder's output alone determines the network.

Neuron permutation: the encoders' node states (gnn, weightnet) and this decoder are permutation
equivariant and the target is permuted with the input, so the loss (and the embedding) is unchanged by
a permutation view: the view is a no-op for them and is only worth drawing for nonequivariant_gnn.

:class:`Reconstruction` is the objective ``ContrastiveLearner`` adds with weight beta
(``L = (1 - beta) L_con + beta L_rec``); :func:`reconstruct` and :func:`reconstruction_quality` measure
it on test models (R^2 of the weights, accuracy of the rebuilt networks through ``architecture.forward``).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from architecture import ArchitectureSpec, forward
from encoder_blocks import NODE_INPUT
from weight_to_graph import WeightToGraph, graph_structure

LOG_EPS = 1e-6  # floor of a layer's RMS before the log (an all-zero bias layer)


# --------------------------------------------------------------------------- targets and layout
def _with(data: Data, **fields: Tensor) -> Data:
    out = copy.copy(data)  # shallow: the structure tensors stay shared
    for k, v in fields.items():
        setattr(out, k, v)
    return out


def attach_targets(data: Data) -> Data:
    """``data`` with its clean weights as reconstruction targets (shared tensors: views never write into them)."""
    return _with(data, target_x=data.x, target_edge_attr=data.edge_attr)


def with_targets(view_fn: Callable[[Data, torch.Generator], Data] | None) -> Callable[[Data, torch.Generator], Data]:
    """A view function whose views carry the clean weights of the view's network (see the module docstring)."""
    def fn(data: Data, generator: torch.Generator) -> Data:
        data = attach_targets(data)
        return view_fn(data, generator) if view_fn is not None else data

    return fn


@functools.lru_cache(maxsize=1024)
def weight_layout(spec_json: str, max_kernel: int) -> tuple[Tensor, Tensor]:
    """(mask (E, K*K) bool: the real weights of each edge (its kernel window; none on shortcut edges),
    residual (E,) bool: identity-shortcut edges) of one architecture's neuron graph."""
    spec = ArchitectureSpec.from_json(spec_json)
    s = graph_structure(spec)
    K = max_kernel
    mask = torch.zeros(s.num_edges, K, K, dtype=torch.bool)
    for i in range(len(spec.layers)):
        kh, kw = spec.edge_window(i)
        if max(kh, kw) > K:
            raise ValueError(f"{spec.name or spec.arch_id}: layer {i}'s {kh}x{kw} flatten blocks do not fit the "
                             f"{K}x{K} edge features (a summarized flatten head is not invertible: no reconstruction)")
        lh, lw = (K - kh) // 2, (K - kw) // 2
        mask[s.edge_offsets[i]:s.edge_offsets[i + 1], lh:lh + kh, lw:lw + kw] = True
    residual = torch.zeros(s.num_edges, dtype=torch.bool)
    residual[s.edge_offsets[-1]:] = True
    return mask.view(s.num_edges, K * K), residual


def _specs(batch: Data | Batch) -> list[str]:
    return [batch.spec_json] if isinstance(batch.spec_json, str) else list(batch.spec_json)


def batch_layout(batch: Data | Batch) -> tuple[Tensor, Tensor]:
    """:func:`weight_layout` of every graph of ``batch``, concatenated: mask (E, K*K), residual (E,)."""
    K = int(round(batch.edge_attr.size(1) ** 0.5))
    parts = [weight_layout(s, K) for s in _specs(batch)]
    dev = batch.edge_attr.device
    return torch.cat([m for m, _ in parts]).to(dev), torch.cat([r for _, r in parts]).to(dev)


@dataclass(frozen=True)
class Targets:
    """Standardized clean weights of a batch and where they are real."""

    w: Tensor  # (E, K*K) weights / RMS of their (graph, layer)
    mask: Tensor  # (E, K*K) bool: real weights
    b: Tensor  # (N,) biases / RMS of their (graph, layer)
    has_bias: Tensor  # (N,) bool: every neuron but the inputs
    log_scale: Tensor  # (N, 2) log RMS of the weights and of the biases of the node's layer
    node_seg: Tensor  # (N,) (graph, layer) segment of every node; an edge's is its destination's
    num_segments: int


def _segments(f: dict) -> tuple[Tensor, int]:
    layers = int(f["layer_index"].max()) + 1
    return f["batch"] * layers + f["layer_index"], int(f["num_graphs"]) * layers


def _segment_mean(values: Tensor, weights: Tensor, seg: Tensor, n: int) -> Tensor:
    """Weighted mean of ``values`` (M,) per segment with ``weights`` (M,) -> (n,); 0 where a segment weighs 0."""
    return scatter(values * weights, seg, 0, n, "sum") / scatter(weights, seg, 0, n, "sum").clamp_min(1)


def standardized_targets(batch: Data | Batch, f: dict) -> Targets:
    """The decoder's targets from a batch of views carrying ``target_x``/``target_edge_attr``."""
    for k in ("target_x", "target_edge_attr"):
        if getattr(batch, k, None) is None:
            raise ValueError(f"reconstruction needs views with clean-weight targets ({k} is missing): draw them "
                             f"through reconstruction.with_targets(view_fn)")
    mask, _ = batch_layout(batch)
    tw, tb = batch.target_edge_attr.float(), batch.target_x[:, 0].float()
    node_seg, n = _segments(f)
    edge_seg = node_seg[f["edge_index"][1]]
    has_bias = f["node_type"] != NODE_INPUT
    m = mask.float()
    rms_w = _segment_mean((tw * tw * m).sum(1), m.sum(1), edge_seg, n).sqrt().clamp_min(LOG_EPS)  # (n,)
    rms_b = _segment_mean(tb * tb, has_bias.float(), node_seg, n).sqrt().clamp_min(LOG_EPS)
    log_scale = torch.stack([rms_w.log()[node_seg], rms_b.log()[node_seg]], dim=1)
    return Targets(w=tw * m / rms_w[edge_seg, None], mask=mask, b=tb * has_bias / rms_b[node_seg], has_bias=has_bias,
                   log_scale=log_scale, node_seg=node_seg, num_segments=n)


# --------------------------------------------------------------------------- decoder
class WeightDecoder(nn.Module):
    """Per-neuron states (and the embedding) -> every weight and bias of the neuron graph (module docstring).

    Args:
        node_dim: width of the encoder's node states.
        embed_dim: width of the model embedding (appended to every node's state).
        edge_dim: K*K, the width of the graphs' edge features.
        hidden_dim: decoder width d.
    Shapes:
        h (N, node_dim), z (B, embed_dim) -> weights (E, edge_dim) standardized,
        nodes (N, 3) = [standardized bias, log RMS of the layer's weights, log RMS of its biases].
    """

    def __init__(self, node_dim: int, embed_dim: int, edge_dim: int, hidden_dim: int = 64):
        super().__init__()
        self.node = nn.Sequential(nn.LayerNorm(node_dim + embed_dim), nn.Linear(node_dim + embed_dim, hidden_dim),
                                  nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.dst, self.src = nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.dst_gate, self.src_gate = nn.Linear(hidden_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)
        self.edge_out = nn.Sequential(nn.GELU(), nn.Linear(hidden_dim, edge_dim))
        self.node_out = nn.Linear(hidden_dim, 3)

    def forward(self, h: Tensor, z: Tensor, f: dict) -> tuple[Tensor, Tensor]:
        if "address_tokens" in f:  # WeightNet with row codes: each token's linear code of its row, before the
            h = h + f["address_tokens"].to(h.dtype)  # blocks that blur it (weightnet.AddressCodes)
        u = self.node(torch.cat([h, z[f["batch"]].to(h.dtype)], dim=-1))  # (N, d)
        src, dst = f["edge_index"]
        # the product term makes w_ij a bilinear function of the two neurons' states
        pre = (self.dst(u)[dst] + self.src(u)[src] + self.dst_gate(u)[dst] * self.src_gate(u)[src])  # (E, d)
        return self.edge_out(pre), self.node_out(u)


def reconstruction_loss(pred_w: Tensor, pred_node: Tensor, t: Targets) -> Tensor:
    """Mean squared error over every real weight and bias (standardized), plus that of the log-scales."""
    m = t.mask.float()
    err = ((pred_w.float() - t.w) ** 2 * m).sum() + ((pred_node[:, 0].float() - t.b) ** 2 * t.has_bias).sum()
    values = err / (m.sum() + t.has_bias.sum()).clamp_min(1)
    scales = ((pred_node[:, 1:].float() - t.log_scale) ** 2)[t.has_bias].mean()
    return values + scales


class Reconstruction(nn.Module):
    """The reconstruction objective: ``forward(encoder, view) -> (z (B, D), loss)`` with one encoder pass.

    The encoder needs ``node_states(batch) -> (h, fields)`` and ``readout(h, fields) -> z`` (gnn,
    nonequivariant_gnn, weightnet); build with :meth:`for_encoder`.
    """

    def __init__(self, decoder: WeightDecoder):
        super().__init__()
        self.decoder = decoder

    @classmethod
    def for_encoder(cls, encoder: nn.Module, hidden_dim: int = 64) -> "Reconstruction":
        """A decoder sized for ``encoder`` (its ``hparams`` hidden_dim, global_dim and edge_dim)."""
        for name in ("node_states", "readout"):
            if not callable(getattr(encoder, name, None)):
                raise TypeError(f"weight reconstruction needs an encoder of neuron graphs with per-neuron states "
                                f"(gnn, nonequivariant_gnn, weightnet); {type(encoder).__name__} has no {name}()")
        hp = encoder.hparams
        return cls(WeightDecoder(hp["hidden_dim"], hp["global_dim"], hp["edge_dim"], hidden_dim))

    def decode(self, encoder: nn.Module, batch: Data | Batch) -> tuple[Tensor, Tensor, Tensor, dict]:
        """(z (B, D), standardized weights (E, K*K), node outputs (N, 3), graph fields) of one encoder pass."""
        h, f = encoder.node_states(batch)
        z = encoder.readout(h, f)
        pred_w, pred_node = self.decoder(h, z, f)
        return z, pred_w, pred_node, f

    def forward(self, encoder: nn.Module, batch: Data | Batch) -> tuple[Tensor, Tensor]:
        z, pred_w, pred_node, f = self.decode(encoder, batch)
        with torch.autocast(device_type=z.device.type, enabled=False):  # the loss in fp32, also under bf16
            return z, reconstruction_loss(pred_w, pred_node, standardized_targets(batch, f))


@torch.no_grad()
def part_quality(encoder: nn.Module, objective: Reconstruction, graphs: Sequence[Data], device: torch.device,
                 batch_size: int = 64) -> dict[str, float]:
    """Pooled R^2 of the decoder's standardized outputs per part (the diagnosis of what the loss learns).

    Parts: "w_first" (weights out of input neurons), "w_later" (every other real weight), "bias"; and
    "log_scale_mse" (the per-layer log-RMS outputs). Clean inputs, targets as in training.
    """
    encoder.eval()
    objective.eval()
    pairs: dict[str, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in ("w_first", "w_later", "bias")}
    sq, count = 0.0, 0
    for start in range(0, len(graphs), batch_size):
        batch = Batch.from_data_list([attach_targets(g) for g in graphs[start:start + batch_size]]).to(device)
        _, pred_w, pred_node, f = objective.decode(encoder, batch)
        t = standardized_targets(batch, f)
        first = f["node_type"][f["edge_index"][0]] == NODE_INPUT  # (E,)
        for key, sel in (("w_first", first), ("w_later", ~first)):
            m = t.mask[sel]
            pairs[key][0].append(t.w[sel][m])
            pairs[key][1].append(pred_w[sel].float()[m])
        pairs["bias"][0].append(t.b[t.has_bias])
        pairs["bias"][1].append(pred_node[t.has_bias, 0].float())
        sq += float(((pred_node[:, 1:].float() - t.log_scale) ** 2)[t.has_bias].sum())
        count += 2 * int(t.has_bias.sum())
    out = {k: r2(torch.cat(y).double().cpu(), torch.cat(y_hat).double().cpu()) for k, (y, y_hat) in pairs.items()}
    return {**out, "log_scale_mse": sq / max(count, 1)}


# --------------------------------------------------------------------------- reconstructed networks
def decoded_weights(pred_w: Tensor, pred_node: Tensor, batch: Data | Batch, f: dict) -> tuple[Tensor, Tensor]:
    """Raw weights from the decoder's output: (x (N, 1), edge_attr (E, K*K)) in the graph's layout.

    Each layer's scale is the mean of its neurons' predicted log-RMS; padding is zero and identity-shortcut
    edges are the identity kernel (structure, not weights), so ``WeightToGraph.to_state_dict`` accepts it.
    """
    mask, residual = batch_layout(batch)
    node_seg, n = _segments(f)
    has_bias = (f["node_type"] != NODE_INPUT).float()
    log_w = _segment_mean(pred_node[:, 1].float(), has_bias, node_seg, n)  # (n,)
    log_b = _segment_mean(pred_node[:, 2].float(), has_bias, node_seg, n)
    edge_seg = node_seg[f["edge_index"][1]]
    ea = pred_w.float() * log_w.exp()[edge_seg, None] * mask
    K = int(round(ea.size(1) ** 0.5))
    ea[residual, (K // 2) * K + K // 2] = 1.0
    x = (pred_node[:, 0].float() * log_b.exp()[node_seg] * has_bias).unsqueeze(1)
    return x, ea


@torch.no_grad()
def reconstruct(encoder: nn.Module, objective: Reconstruction, graphs: Sequence[Data], device: torch.device,
                batch_size: int = 64) -> list[Data]:
    """The decoder's version of each graph of ``graphs`` (clean inputs): same structure, decoded x/edge_attr."""
    encoder.eval()
    objective.eval()
    out: list[Data] = []
    for start in range(0, len(graphs), batch_size):
        chunk = list(graphs[start:start + batch_size])
        batch = Batch.from_data_list(chunk).to(device)
        _, pred_w, pred_node, f = objective.decode(encoder, batch)
        x, ea = decoded_weights(pred_w, pred_node, batch, f)
        n_off = np.cumsum([0] + [g.num_nodes for g in chunk])
        e_off = np.cumsum([0] + [g.edge_attr.size(0) for g in chunk])
        for j, g in enumerate(chunk):
            out.append(_with(g, x=x[n_off[j]:n_off[j + 1]].cpu(), edge_attr=ea[e_off[j]:e_off[j + 1]].cpu()))
    return out


def _flat(spec: ArchitectureSpec, sd: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(weights and biases in state-dict order (P,), the RMS of each one's block (a layer's weight or bias) (P,))."""
    parts = [sd[k].reshape(-1).double() for k in spec.param_shapes()]
    return torch.cat(parts), torch.cat([p.pow(2).mean().sqrt().clamp_min(LOG_EPS).expand_as(p) for p in parts])


def r2(true: Tensor, pred: Tensor) -> float:
    """Coefficient of determination of ``pred`` for ``true`` (1-D), around the mean of ``true``."""
    sst = (true - true.mean()).pow(2).sum()
    return float(1 - (true - pred).pow(2).sum() / sst) if sst > 0 else float("nan")


def reconstruction_quality(originals: Sequence[Data], recons: Sequence[Data], converter: WeightToGraph,
                           task_data: Callable[[int], tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """R^2 of the reconstructed weights and test accuracy of the rebuilt networks against the originals'.

    Args:
        originals / recons: graphs of the same models (clean canonical inputs, :func:`reconstruct` output).
        converter: the ``WeightToGraph`` that made the graphs (its inverse rebuilds both networks).
        task_data: position i -> (X_test (n, *input_shape), y_test (n,)) of model i's task.
    Returns:
        per-model lists "r2" (raw canonical weights and biases), "r2_standardized" (each layer's weight and
        bias blocks at unit RMS), "acc_original", "acc_reconstructed"; and their summaries "mean_r2",
        "mean_r2_standardized", "pooled_r2" (every weight of every model at once), "mean_acc_original",
        "mean_acc_reconstructed", "mean_acc_drop" (original - reconstructed), "frac_within_5_points".
    """
    assert len(originals) == len(recons) > 0, f"{len(originals)} originals for {len(recons)} reconstructions"
    per: dict[str, list[float]] = {k: [] for k in ("r2", "r2_standardized", "acc_original", "acc_reconstructed")}
    sse = 0.0
    trues = []
    for i, (g, r) in enumerate(zip(originals, recons)):
        spec, sd = converter.to_state_dict(g)
        spec_r, sd_r = converter.to_state_dict(r)
        assert spec_r == spec, f"model {i}: the reconstruction has another architecture"
        (w, rms), (w_hat, _) = _flat(spec, sd), _flat(spec, sd_r)
        per["r2"].append(r2(w, w_hat))
        per["r2_standardized"].append(r2(w / rms, w_hat / rms))
        sse += float((w - w_hat).pow(2).sum())
        trues.append(w)
        X, y = task_data(i)
        for key, params in (("acc_original", sd), ("acc_reconstructed", sd_r)):
            per[key].append(float((forward(spec, params, X).argmax(1) == y).double().mean()))
    allw = torch.cat(trues)
    sst = float((allw - allw.mean()).pow(2).sum())
    acc_o, acc_r = np.array(per["acc_original"]), np.array(per["acc_reconstructed"])
    return {**per, "n_models": len(originals), "mean_r2": float(np.mean(per["r2"])),
            "mean_r2_standardized": float(np.mean(per["r2_standardized"])), "pooled_r2": 1 - sse / sst,
            "mean_acc_original": float(acc_o.mean()), "mean_acc_reconstructed": float(acc_r.mean()),
            "mean_acc_drop": float((acc_o - acc_r).mean()),
            "frac_within_5_points": float((np.abs(acc_o - acc_r) <= 0.05).mean())}
