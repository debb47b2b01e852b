"""The edge kernels of the message-passing encoders against plain index ops, on real mixed batches.

Covers the fast paths of gnn_encoder: the one-pass gather-add (``_gather_add``), the int32 CSR
incidence sums (``edge_incidence`` / ``_csr_sum``, incl. the unsorted-dst case of shortcut edges),
the fused edge message vs the PyG path (values and gradients) on a batch mixing the real trained
MLPs/CNNs with flatten-head, pooling and residual networks, and the fast row sums of
``standardize_inputs``.
"""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

import architecture as A
import encoder_blocks as EB
import gnn_encoder as G
from conftest import assert_fused_matches_pyg
from weight_to_graph import WeightToGraph, extension_features

SMALL = dict(hidden_dim=16, global_dim=24, projection_dim=8, message_passing_steps=2, dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")

EXTENDED_SPECS = {
    # conv -> conv with an identity shortcut and max pooling -> flatten head (4 channels x 4x4 map)
    "rescnn-flatten": A.ArchitectureSpec((1, 8, 8), (
        A.LayerSpec("conv2d", 1, 4, "relu", 3),
        A.LayerSpec("conv2d", 4, 4, "relu", 3, pool="max2", residual_from=0),
        A.LayerSpec("linear", 64, 10, "identity", flatten=True)), "rescnn"),
    # residual tanh MLP, shortcut from the input of layer 1
    "resmlp": A.ArchitectureSpec((64,), (
        A.LayerSpec("linear", 64, 16, "tanh"),
        A.LayerSpec("linear", 16, 16, "tanh", residual_from=0),
        A.LayerSpec("linear", 16, 10, "identity")), "resmlp"),
}


@pytest.fixture(scope="module")
def mixed_batch(trained_models) -> Batch:
    """Real trained MLPs/CNNs (conftest) plus random-init flatten/pool/residual networks, in one batch."""
    conv = WeightToGraph(max_kernel=5, canonicalize=True)
    graphs = [conv.to_graph(spec, sd, model_idx=i) for i, (spec, sd) in enumerate(trained_models.values())]
    torch.manual_seed(0)
    for spec in EXTENDED_SPECS.values():
        graphs.insert(2, conv.to_graph(spec, A.build_model(spec).state_dict(), model_idx=len(graphs)))
    ext = [extension_features(g) for g in graphs]
    assert any(e["edge_residual"].any() for e in ext) and any(e["edge_flatten"].any() for e in ext)
    assert {bool(g.edge_kind.any()) for g in graphs} == {True, False}  # conv and MLP graphs
    return Batch.from_data_list(graphs)


def test_gather_add_equals_index_select(mixed_batch):
    n = mixed_batch.num_nodes
    inc = EB.edge_incidence(mixed_batch.edge_index, n)
    src, dst = mixed_batch.edge_index
    a, b = torch.randn(n, 7), torch.randn(n, 7)
    torch.testing.assert_close(EB._gather_add(a, b, inc), a[dst] + b[src], rtol=0, atol=0)


def test_csr_incidence_sums_equal_scatter(mixed_batch):
    src, dst = mixed_batch.edge_index
    # residual edges come after each graph's weight edges: dst is not sorted, so both CSRs go through the sort
    assert not bool((dst[1:] >= dst[:-1]).all())
    n = mixed_batch.num_nodes
    inc = EB.edge_incidence(mixed_batch.edge_index, n)
    assert inc.to_dst.crow_indices().dtype == torch.int32
    s = torch.randn(src.numel(), 5, dtype=torch.float64)
    for csr, index in ((inc.to_dst, dst), (inc.to_src, src)):
        ref = torch.zeros(n, 5, dtype=torch.float64).index_add_(0, index, s)
        torch.testing.assert_close(EB._csr_sum(csr, s), ref)
    # a graph of the contract alone (dst-sorted): the no-sort branch
    g = mixed_batch.get_example(0)
    inc1 = EB.edge_incidence(g.edge_index, g.num_nodes)
    s1 = torch.randn(g.edge_index.size(1), 3)
    torch.testing.assert_close(EB._csr_sum(inc1.to_dst, s1), torch.zeros(g.num_nodes, 3).index_add_(0, g.edge_index[1], s1))


@pytest.mark.parametrize("name", ["gnn", "weightnet"])
def test_fused_kernel_equals_pyg_path_on_extended_mixed_batch(name, mixed_batch):
    """Fused edge kernel vs PyG message passing (values and every gradient) on MLP + CNN + flatten/residual graphs."""

    def make():
        torch.manual_seed(0)
        return G.build_encoder(name, **SMALL)

    grads = assert_fused_matches_pyg(make, mixed_batch, name)
    assert any("lin_edge" in n for n in grads)


def test_fused_kernel_partial_gradients():
    """Backward when only some outputs carry a gradient (m_in only, m_out only, s only) equals autograd's."""
    torch.manual_seed(0)
    n, h = 7, 4
    edge_index = torch.tensor([[0, 1, 2, 0, 3, 4, 5], [3, 3, 3, 4, 5, 5, 6]])
    inc = EB.edge_incidence(edge_index, n)
    src, dst = edge_index
    leaves = [torch.randn(n, h), torch.randn(n, h), torch.randn(7, 3), torch.randn(h, 3)]
    for pick in (0, 1, 2):
        ins = [t.clone().requires_grad_() for t in leaves]
        ref_ins = [t.clone().requires_grad_() for t in leaves]
        outs = EB._FusedEdgeMessage.apply(*ins, inc)
        a, b, e, w = ref_ins
        s = torch.relu(a[dst] + b[src] + e @ w.t())
        ref = (s, torch.zeros(n, h).index_add(0, dst, s), torch.zeros(n, h).index_add(0, src, s))
        outs[pick].square().sum().backward()
        ref[pick].square().sum().backward()
        torch.testing.assert_close(outs[pick], ref[pick])
        for x, y in zip(ins, ref_ins):
            torch.testing.assert_close(x.grad, y.grad)


def test_standardize_row_sums_match_direct_formula(mixed_batch):
    f = EB.graph_fields(mixed_batch)
    e_std, x_std, log_w = EB.standardize_inputs(f, max_layers=16)
    # the direct formula: nonzero kernel entries and squares per edge, pooled per (graph, layer of the dst)
    e, dst = f["edge_attr"], f["edge_index"][1]
    seg = (f["batch"] * 17 + f["layer_index"])[dst]
    area = (e != 0).sum(1).clamp_min(1).double()
    ms = torch.zeros(seg.max() + 1, dtype=torch.float64).index_add_(0, seg, e.double().pow(2).sum(1))
    cnt = torch.zeros(seg.max() + 1, dtype=torch.float64).index_add_(0, seg, area).clamp_min(1)
    rms = (ms / cnt).sqrt().clamp_min(1e-8)
    torch.testing.assert_close(e_std.double(), e.double() / rms[seg].unsqueeze(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_w.double().squeeze(1), rms.log()[seg], rtol=1e-5, atol=1e-6)
