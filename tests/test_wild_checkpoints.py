"""Checkpoints from the wild: BatchNorm folding, pooling, Dropout, flatten heads and residual blocks.

Real torch ``nn.Sequential``-style networks are trained briefly on sklearn digits (BatchNorm in train
mode, so its running statistics are real), put in eval mode, and then: imported from their
state_dicts (checkpoint_import), compared output for output with the torch module, converted to
neuron graphs and back, transformed by every symmetry op, saved as .pt/.safetensors and read back
from a folder through ``ModelZooDataset.from_checkpoints``.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch_geometric.data import Batch

import architecture as A
import checkpoint_import as CI
from symmetry import (SymmetryAugmenter, canonicalize, flip_signs, flip_signs_graph, permute_graph, permute_hidden,
                      rescale_graph, rescale_hidden)
from weight_to_graph import EDGE_CONV, EDGE_LINEAR, POOL_KINDS, WeightToGraph, extension_features
from conftest import FAMILY_SPECS


class Block(nn.Module):
    """ResNet basic block with an identity shortcut: relu(bn(conv(relu(bn(conv(x))))) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


def _wild_nets() -> dict[str, tuple[nn.Module, dict]]:
    """name -> (torch module, sidecar JSON that says what its keys cannot)."""
    return {
        # Conv-BN-ReLU-MaxPool x2, Dropout, Flatten -> Linear-BN1d-ReLU-Dropout -> Linear
        "bn_pool_flatten": (nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Dropout(0.1), nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(12 * 2 * 2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(16, 10))),
            {"activation": "relu", "pool": "max2", "input_shape": [1, 8, 8]}),
        # affine-free BN, tanh, avg then max pooling (no sign freedom before the max pool), 5x5 kernels
        "tanh_avg_max": (nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 8, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10)),
            {"activation": "tanh", "pool": ["avg2", "max2"], "input_shape": [1, 8, 8]}),
        # stem conv-BN-ReLU-MaxPool, two identity-shortcut blocks, flatten head
        "resnet": (nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), Block(8), Block(8),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
            {"activation": "relu", "pool": ["max2", "", "", "", ""], "input_shape": [1, 8, 8],
             "residual": [[0, 2], [2, 4]]}),
        # an MLP with BatchNorm1d (no bias before it) and Dropout
        "mlp_bn": (nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(32, 10)),
                   {"activation": "relu"}),
    }


def _inputs(name: str, X: torch.Tensor) -> torch.Tensor:
    return X if name == "mlp_bn" else X.view(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def wild(digits_data):
    """name -> (eval-mode torch module, sidecar, spec, folded state_dict, inputs, torch outputs)."""
    X, y = digits_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: extra intra-op threads only add contention on a shared machine
    try:
        return _train_wild(X[:512], y[:512])  # enough for > 0.6 accuracy in a few steps
    finally:
        torch.set_num_threads(threads)


def _train_wild(X: torch.Tensor, y: torch.Tensor) -> dict:
    out = {}
    for seed, (name, (net, side)) in enumerate(_wild_nets().items()):
        torch.manual_seed(seed)
        for m in net.modules():  # re-init under the seed (the nets were built before it was set)
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        x = _inputs(name, X)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        net.train()
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            ref = net(x)
        acc = (ref.argmax(1) == y).float().mean().item()
        assert acc > 0.6, f"{name} did not train (acc {acc:.2f})"
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        spec, folded, warns = CI.infer_wild_spec(sd, side, name)
        assert warns == [], warns
        out[name] = (net, side, spec, folded, x[:256], ref[:256])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


NAMES = list(_wild_nets())


# --- inference and BatchNorm folding ------------------------------------------------------------------
def test_inferred_specs(wild):
    spec = wild["bn_pool_flatten"][2]
    assert [(l.kind, l.in_dim, l.out_dim, l.pool, l.flatten) for l in spec.layers] == [
        ("conv2d", 1, 8, "max2", False), ("conv2d", 8, 12, "max2", False), ("linear", 48, 16, "", True),
        ("linear", 16, 10, "", False)]
    assert spec.spatial_sizes()[:2] == [(4, 4), (2, 2)] and spec.edge_window(2) == (2, 2)
    assert spec.family == "cnn-2c-flat" and "+bn" in spec.name
    assert [l.pool for l in wild["tanh_avg_max"][2].layers[:2]] == ["avg2", "max2"]
    res = wild["resnet"][2]
    assert [l.residual_from for l in res.layers] == [None, None, 0, None, 2, None]
    assert res.residual_groups() == [(0, 2, 4)] and res.family == "rescnn-5c"
    assert wild["mlp_bn"][2] == A.mlp_spec(64, [32], 10, "relu")  # BN folded away: a plain zoo MLP
    for name in NAMES:  # specs survive JSON
        spec = wild[name][2]
        again = A.ArchitectureSpec.from_json(spec.to_json())
        assert again == spec and again.arch_id == spec.arch_id


@pytest.mark.parametrize("name", NAMES)
def test_folded_network_matches_torch_module_in_eval_mode(name, wild):
    net, _, spec, sd, x, ref = wild[name]
    assert not any(k.endswith("running_mean") for k in sd)  # BN adds no parameters and no layer
    assert rel_err(ref, A.forward(spec, sd, x)) < 1e-5
    assert rel_err(ref, A.build_model(spec, sd)(x).detach()) < 1e-5  # SpecNet loads the folded weights
    raw = net.state_dict()
    bn = {k.rpartition(".")[0] for k in raw if k.endswith("running_mean")}
    # the folding is not vacuous: the same weights without their BatchNorms compute another function
    no_bn = {k: v for k, v in raw.items() if k.rpartition(".")[0] not in bn}
    spec_nb, sd_nb, _ = CI.infer_wild_spec(no_bn, wild[name][1])
    assert rel_err(ref, A.forward(spec_nb, sd_nb, x)) > 1e-2
    # BatchNorm(track_running_stats=False) (affine params, no statistics) is refused, naming the module
    no_stats = {k: v for k, v in raw.items() if "running" not in k and "num_batches" not in k}
    if any(k.rpartition(".")[0] in bn and k.endswith(".weight") for k in raw):  # affine BNs only
        with pytest.raises(ValueError, match="normalization without running statistics"):
            CI.infer_wild_spec(no_stats, wild[name][1])


def test_fold_batchnorm_formula():
    torch.manual_seed(0)
    lin, bn = nn.Linear(5, 4), nn.BatchNorm1d(4, eps=1e-3)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    bn.eval()
    x = torch.randn(7, 5)
    w, b = CI.fold_batchnorm(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-3)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, b), bn(lin(x)).detach(), rtol=1e-5, atol=1e-6)
    # eps is not in a state_dict: the sidecar gives it, the default is PyTorch's 1e-5
    sd = {"0.weight": lin.weight.detach(), "0.bias": lin.bias.detach(), **{f"1.{k}": v for k, v in bn.state_dict().items()},
          "2.weight": torch.randn(3, 4), "2.bias": torch.randn(3)}
    spec, folded, _ = CI.infer_wild_spec(sd, {"activation": "relu", "bn_eps": 1e-3})
    torch.testing.assert_close(folded["layers.0.weight"], w)
    _, folded_default, _ = CI.infer_wild_spec(sd, {"activation": "relu"})
    assert not torch.allclose(folded_default["layers.0.weight"], w, rtol=1e-6, atol=0)


# --- neuron graphs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_graph_round_trip_and_function(name, wild):
    _, _, spec, sd, x, ref = wild[name]
    raw = WeightToGraph(canonicalize=False)
    d = raw.to_graph(spec, sd)
    spec2, sd2 = raw.to_state_dict(d)
    assert spec2 == spec and set(sd2) == set(sd)
    for k in sd:
        assert torch.equal(sd2[k], sd[k]), k
    canon = WeightToGraph(canonicalize=True)
    spec3, sd3 = canon.to_state_dict(canon.to_graph(spec, sd))
    assert rel_err(ref, A.forward(spec3, sd3, x)) < 1e-5


def test_flatten_head_edges_are_channel_blocks(wild):
    _, _, spec, sd, _, _ = wild["bn_pool_flatten"]
    K = 5
    d = WeightToGraph(max_kernel=K, canonicalize=False).to_graph(spec, sd)
    widths = [1, 8, 12, 16, 10]
    assert d.num_nodes == sum(widths)  # channel nodes, no node per flattened position
    e0 = 1 * 8 + 8 * 12
    n = 16 * 12  # one edge per (linear neuron, conv channel)
    assert d.edge_index.shape[1] == e0 + n + 10 * 16
    assert (d.edge_kind[e0:e0 + n] == EDGE_CONV).all() and (d.edge_kind[e0 + n:] == EDGE_LINEAR).all()
    block = d.edge_attr[e0:e0 + n].view(16, 12, K, K)
    w = sd["layers.2.weight"].view(16, 12, 2, 2)  # channel-major flatten: column c*4 + h*2 + w
    assert torch.equal(block[:, :, 1:3, 1:3], w)
    assert torch.count_nonzero(block) == torch.count_nonzero(w)
    o, c = 5, 7
    assert d.edge_index[0, e0 + o * 12 + c] == 1 + 8 + c and d.edge_index[1, e0 + o * 12 + c] == 1 + 8 + 12 + o
    # a map larger than the edge feature is refused without flatten summaries, naming the layer and the fix
    big = A.ArchitectureSpec((1, 8, 8), (A.LayerSpec("conv2d", 1, 4, "relu", 3),
                                         A.LayerSpec("linear", 4 * 64, 10, "identity", flatten=True)))
    with pytest.raises(ValueError, match=r"layer 1 .*flatten head over a 8x8 map, larger than the 5x5 edge "
                                         r"features, and this converter does not summarize flatten heads"):
        WeightToGraph(max_kernel=5).structure(big)
    assert WeightToGraph(max_kernel=9).structure(big).num_edges == 4 + 40
    assert WeightToGraph(max_kernel=5, flatten_summary=True).structure(big).num_edges == 4 + 40


def test_residual_edges_are_identity_kernels(wild):
    _, _, spec, sd, _, _ = wild["resnet"]
    K = 5
    conv = WeightToGraph(max_kernel=K, canonicalize=True)
    d = conv.to_graph(spec, sd)
    s = conv.structure(spec)
    assert s.num_residual_edges == 16 and d.edge_attr.shape[0] == s.edge_offsets[-1] + 16
    res = slice(s.edge_offsets[-1], None)
    src, dst = d.edge_index[:, res]
    # layer 0 (stem) -> layer 2 and layer 2 -> layer 4, channel c -> channel c
    assert torch.equal(d.layer_index[src], torch.tensor([1] * 8 + [3] * 8))
    assert torch.equal(d.layer_index[dst], torch.tensor([3] * 8 + [5] * 8))
    assert torch.equal(d.neuron_index[src], d.neuron_index[dst])
    assert torch.equal(d.edge_layer[res], d.layer_index[dst]) and (d.edge_kind[res] == EDGE_CONV).all()
    eye = torch.zeros(K * K)
    eye[K * K // 2] = 1
    assert (d.edge_attr[res] == eye).all()  # canonical scaling keeps shortcuts exactly the identity
    f = extension_features(d)
    assert torch.equal(f["edge_residual"], torch.arange(d.edge_attr.shape[0]) >= s.edge_offsets[-1])
    assert torch.equal(f["edge_flatten"], d.edge_layer == 6) and f["edge_flatten"].sum() == 10 * 8
    assert torch.equal(f["pool_kind"], torch.where(d.layer_index == 1, POOL_KINDS["max"], 0))
    assert torch.equal(f["pool_size"], torch.where(d.layer_index == 1, 2, 0))
    bad = d.clone()
    bad.edge_attr = d.edge_attr.clone()
    bad.edge_attr[-1, K * K // 2] = 2.0
    with pytest.raises(ValueError, match="shortcut edge .* is not the identity"):
        conv.to_state_dict(bad)


def test_mixed_batch_with_zoo_graphs(wild):
    conv = WeightToGraph()
    torch.manual_seed(0)
    plain_cnn = A.cnn_spec((1, 8, 8), [8, 12], 3, 10, "relu")
    pairs = [(plain_cnn, A.build_model(plain_cnn).state_dict())] + [wild[n][2:4] for n in NAMES]
    graphs = [conv.to_graph(spec, sd, model_idx=i) for i, (spec, sd) in enumerate(pairs)]
    assert all(set(g.keys()) == set(graphs[0].keys()) for g in graphs)  # same fields as the zoo's graphs
    batch = Batch.from_data_list(graphs)
    assert (batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]).all()
    for i, (spec, sd) in enumerate(pairs):
        spec2, sd2 = conv.to_state_dict(batch.get_example(i))
        x = wild["resnet"][4] if spec.is_cnn else wild["mlp_bn"][4]
        assert spec2 == spec and rel_err(A.forward(spec, sd, x), A.forward(spec2, sd2, x)) < 1e-5


# --- symmetries --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_symmetries_preserve_function(name, wild):
    _, _, spec, sd, x, ref = wild[name]
    g = torch.Generator().manual_seed(0)
    y = A.forward(spec, sd, x)
    p, perms = permute_hidden(spec, sd, g, return_permutations=True)
    assert any(not torch.equal(p[k], sd[k]) for k in sd)
    exact_views = SymmetryAugmenter(noise_std=0.0, edge_dropout=0.0, rescale_range=(0.2, 5.0))
    transformed = {"permute": p, "rescale": rescale_hidden(spec, sd, g, 0.2, 5.0), "flip": flip_signs(spec, sd, g),
                   "canonical": canonicalize(spec, sd), "augmenter": exact_views.view(spec, sd, g)}
    for what, t in transformed.items():
        assert rel_err(y, A.forward(spec, t, x)) < 1e-5, what
    if name == "resnet":  # shortcut-coupled channels share one permutation
        assert torch.equal(perms[0], perms[2]) and torch.equal(perms[2], perms[4])
        assert not torch.equal(perms[0], perms[1])


def test_residual_tanh_mlp_couples_sign_flips(digits_data):
    """A residual MLP (built from a spec, trained through SpecNet): shortcut edges are linear, tanh sign flips
    are shared by the coupled layers, and the canonical form stays exact."""
    from conftest import train_small
    X, y = digits_data
    spec = A.ArchitectureSpec((64,), (A.LayerSpec("linear", 64, 16, "tanh"),
                                      A.LayerSpec("linear", 16, 16, "tanh", residual_from=0),
                                      A.LayerSpec("linear", 16, 10, "identity")), "resmlp")
    assert spec.family == "resmlp-2h"
    sd = train_small(spec, X[:512], y[:512], seed=0, epochs=30)
    x = X[512:768]
    y0 = A.forward(spec, sd, x)
    assert (y0.argmax(1) == y[512:768]).float().mean() > 0.6
    f = flip_signs(spec, sd, torch.Generator().manual_seed(0))
    s0, s1 = f["layers.0.bias"].sign() * sd["layers.0.bias"].sign(), f["layers.1.bias"].sign() * sd["layers.1.bias"].sign()
    assert torch.equal(s0, s1) and (s0 < 0).any()  # one sign per coupled channel
    for t in (f, canonicalize(spec, sd), permute_hidden(spec, sd, torch.Generator().manual_seed(1))):
        assert rel_err(y0, A.forward(spec, t, x)) < 1e-5
    conv = WeightToGraph(canonicalize=True)
    d = conv.to_graph(spec, f)
    assert (d.edge_kind[-16:] == EDGE_LINEAR).all() and (d.edge_attr[-16:, 12] == 1).all()
    torch.testing.assert_close(d.x, conv.to_graph(spec, sd).x)  # flips removed exactly by the canonical form
    _, sd_back = conv.to_state_dict(flip_signs_graph(d, torch.Generator().manual_seed(2)))
    assert rel_err(y0, A.forward(spec, sd_back, x)) < 1e-5


def test_coupling_is_needed(wild):
    """The coupled ops are not vacuous: independent permutations / sign flips before a max pool break the nets."""
    _, _, spec, sd, x, _ = wild["resnet"]
    y = A.forward(spec, sd, x)
    p = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    naive = dict(sd)  # permute layer 2 alone (as if it had no shortcut)
    naive["layers.2.weight"], naive["layers.2.bias"] = sd["layers.2.weight"][p], sd["layers.2.bias"][p]
    naive["layers.3.weight"] = sd["layers.3.weight"][:, p]
    assert rel_err(y, A.forward(spec, naive, x)) > 1e-2
    _, _, spec, sd, x, _ = wild["tanh_avg_max"]
    y = A.forward(spec, sd, x)
    flipped = flip_signs(spec, sd, torch.Generator().manual_seed(2))
    assert torch.equal(flipped["layers.1.bias"], sd["layers.1.bias"])  # max-pooled tanh channels: no flips
    assert torch.equal(flipped["layers.2.weight"], sd["layers.2.weight"])
    assert not torch.equal(flipped["layers.0.bias"], sd["layers.0.bias"])  # avg-pooled ones: flipped
    naive = dict(sd)
    naive["layers.1.weight"], naive["layers.1.bias"] = -sd["layers.1.weight"], -sd["layers.1.bias"]
    naive["layers.2.weight"] = -sd["layers.2.weight"]
    assert rel_err(y, A.forward(spec, naive, x)) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_graph_symmetry_ops(name, wild):
    _, _, spec, sd, x, _ = wild[name]
    y = A.forward(spec, sd, x)
    raw = WeightToGraph(canonicalize=False)
    d = raw.to_graph(spec, sd)
    gp = permute_graph(d, torch.Generator().manual_seed(3))  # same draws as permute_hidden
    ref = raw.to_graph(spec, permute_hidden(spec, sd, torch.Generator().manual_seed(3)))
    assert torch.equal(gp.x, ref.x) and torch.equal(gp.edge_attr, ref.edge_attr)
    for op in (permute_graph, rescale_graph, flip_signs_graph):
        _, sd_out = raw.to_state_dict(op(d, torch.Generator().manual_seed(4)))  # shortcuts stay identity
        assert rel_err(y, A.forward(spec, sd_out, x)) < 1e-5
    canon = WeightToGraph(canonicalize=True)
    view = SymmetryAugmenter(noise_std=0.05, edge_dropout=0.1, prune_fraction=0.1).augment_graph(
        canon.to_graph(spec, sd), torch.Generator().manual_seed(5))
    _, sd_v = canon.to_state_dict(view)  # weight-changing views leave the padding and the shortcuts intact
    assert 0 < rel_err(y, A.forward(spec, sd_v, x)) < 1.0


def test_edge_dropout_drops_whole_flatten_blocks(wild):
    _, _, spec, sd, _, _ = wild["bn_pool_flatten"]
    w = SymmetryAugmenter(False, False, False, 0.0, 0.5, 0.0).view(spec, sd, torch.Generator().manual_seed(0))
    blocks = w["layers.2.weight"].view(16, 12, 4)  # (out, channel, position): one edge of the graph each
    dropped = (blocks == 0).all(-1)
    assert 0.3 < dropped.float().mean() < 0.7 and ((blocks == 0).any(-1) == dropped).all()


def test_canonical_graph_is_invariant_under_symmetries(wild):
    _, _, spec, sd, _, _ = wild["resnet"]
    g = torch.Generator().manual_seed(6)
    t = permute_hidden(spec, rescale_hidden(spec, sd, g, 0.2, 5.0), g)
    conv = WeightToGraph(canonicalize=True)
    a, b = conv.to_graph(spec, sd), conv.to_graph(spec, t)
    for l in range(len(spec.layers) + 1):
        torch.testing.assert_close(a.x[a.layer_index == l].sort(0).values, b.x[b.layer_index == l].sort(0).values)
    torch.testing.assert_close(a.edge_attr.flatten().sort().values, b.edge_attr.flatten().sort().values,
                               rtol=1e-5, atol=1e-6)


def test_gnn_embedding_is_permutation_invariant_on_a_residual_network(wild):
    import gnn_encoder as G
    torch.manual_seed(0)
    enc = G.build_encoder("gnn", hidden_dim=16, global_dim=16, projection_dim=8, message_passing_steps=2,
                          dropout=0.0).eval()
    _, _, spec, sd, _, _ = wild["resnet"]
    conv = WeightToGraph(canonicalize=True)
    d = conv.to_graph(spec, sd)
    views = [d] + [permute_graph(d, torch.Generator().manual_seed(s)) for s in range(3)]
    views.append(conv.to_graph(spec, rescale_hidden(spec, sd, torch.Generator().manual_seed(9), 0.2, 5.0)))
    with torch.no_grad():
        z = enc(Batch.from_data_list(views))
        other = enc(Batch.from_data_list([conv.to_graph(*wild["bn_pool_flatten"][2:4])]))
    assert torch.isfinite(z).all()
    scale = z[0].norm()
    assert ((z - z[0]).norm(dim=1) / scale).max() < 1e-4
    assert (other[0] - z[0]).norm() / scale > 1e-2  # a different network embeds elsewhere


# --- a folder of checkpoints, end to end -----------------------------------------------------------------
def _unsupported() -> dict[str, tuple[dict, dict, str]]:
    """file -> (state_dict, sidecar, expected error pattern)."""
    torch.manual_seed(0)
    ln = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 10))
    c1 = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 62, 10))
    proj = {"0.weight": torch.randn(8, 1, 3, 3), "0.bias": torch.randn(8), "1.weight": torch.randn(16, 8, 3, 3),
            "1.bias": torch.randn(16), "2.weight": torch.randn(16, 8, 1, 1), "3.weight": torch.randn(10, 16),
            "3.bias": torch.randn(10)}  # a 1x1 projection shortcut after the second conv
    attn = nn.MultiheadAttention(16, 2)
    bn_first = {"0.running_mean": torch.zeros(64), "0.running_var": torch.ones(64), "1.weight": torch.randn(10, 64),
                "1.bias": torch.randn(10)}
    return {
        "layernorm.pt": (ln.state_dict(), {}, r"module '1' .*normalization without running statistics"),
        "conv1d.pt": (c1.state_dict(), {}, r"module '0' .*Conv1d/Conv3d"),
        "projection.safetensors": (proj, {"input_shape": [1, 8, 8]},
                                   r"layer 2 \('2', conv2d 8->16\).*cannot be placed"),
        "attention.pt": (attn.state_dict(), {}, r"module '<root>' .*unsupported entry 'in_proj_bias'"),
        "bn_first.pt": (bn_first, {}, r"module '0' .*BatchNorm before any conv/linear"),
        "flatten_mismatch.pt": (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Flatten(), nn.Linear(4 * 16, 10)).state_dict(),
                                {"input_shape": [1, 8, 8]},  # the max pool is not declared in the sidecar
                                r"layer 1 \('4', linear 64->10\): .*flatten 256.*'pool'"),
    }


def _save(path, sd, side):
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    if side:
        path.with_name(path.name + ".spec.json").write_text(json.dumps(side))


def test_folder_of_checkpoints_end_to_end(wild, tmp_path):
    import data_prep
    folder = tmp_path / "ckpts"
    (folder / "bad").mkdir(parents=True)
    expected = {}
    for name in NAMES:
        net, side, spec, _, x, ref = wild[name]
        for suffix in (".pt", ".safetensors"):
            _save(folder / f"{name}{suffix}", net.state_dict(), side)
            expected[f"{name}{suffix}"] = (spec, x, ref)
    torch.save({"state_dict": wild["resnet"][0].state_dict(), "epoch": 3}, folder / "nested.pt")
    (folder / "nested.pt.spec.json").write_text(json.dumps({**wild["resnet"][1], "task": "digits", "epoch": 3}))
    expected["nested.pt"] = wild["resnet"][2], wild["resnet"][4], wild["resnet"][5]
    bad = _unsupported()
    for fname, (sd, side, _) in bad.items():
        _save(folder / "bad" / fname, sd, side)

    # read_checkpoint on each file: supported ones give the spec and the same function as the torch module
    for fname, (spec, x, ref) in expected.items():
        spec2, sd2, warns, meta = CI.read_checkpoint(folder / fname)
        assert spec2 == spec and warns == [], fname
        assert rel_err(ref, A.forward(spec2, sd2, x)) < 1e-5, fname
    assert CI.read_checkpoint(folder / "nested.pt")[3] == {"task": "digits", "epoch": 3}
    for fname, (_, _, pattern) in bad.items():
        with pytest.raises(CI.CheckpointError, match=pattern):
            CI.read_checkpoint(folder / "bad" / fname)

    zoo, errors = data_prep.ModelZooDataset.from_checkpoints(folder)
    assert len(zoo) == len(expected) and sorted(zoo.metadata.model_id) == sorted(expected)
    assert sorted(e.file.rpartition("/")[2] for e in errors) == sorted(bad)
    assert all(e.cause.count("\n") == 0 for e in errors)  # one clear line each
    conv = WeightToGraph()
    graphs = conv.convert_model_to_graphs(zoo, cache_dir=tmp_path / "cache")
    again = conv.convert_model_to_graphs(zoo, cache_dir=tmp_path / "cache")  # from the cache
    for i, mid in enumerate(zoo.metadata.model_id):
        spec, x, ref = expected[mid]
        assert torch.equal(graphs[i].edge_attr, again[i].edge_attr)
        spec2, sd2 = conv.to_state_dict(graphs[i])
        assert spec2 == spec and rel_err(ref, A.forward(spec2, sd2, x)) < 1e-5, mid

    # index the folder and query it (retrieval reads files with checkpoint_import.read_checkpoint)
    import gnn_encoder as G
    from retrieval import Embedder, ModelIndex
    torch.manual_seed(0)
    enc = G.build_encoder("gnn", hidden_dim=16, global_dim=16, projection_dim=8, message_passing_steps=2, dropout=0.0)
    index = ModelIndex.build(folder, Embedder(enc), index_type="flat")
    assert sorted(m.rpartition("@")[0] for m in index.model_ids()) == sorted(expected)  # file @ content hash
    assert sorted(e.source.rpartition("/")[2] for e in index.errors) == sorted(bad)
    _, _, spec, sd, _, _ = wild["resnet"]
    g = torch.Generator().manual_seed(11)
    query = permute_hidden(spec, rescale_hidden(spec, sd, g, 0.3, 3.0), g)  # same function, other weights
    hits = index.query((spec, query), k=3)
    assert {h["model_id"].rpartition("@")[0] for h in hits} == {"resnet.pt", "resnet.safetensors", "nested.pt"}
    assert min(h["similarity"] for h in hits) > 1 - 1e-5  # the embedding is exactly symmetry invariant


def _renamed(sd: dict, rules: list[tuple[str, str]]) -> dict:
    """Keys renamed by the first matching prefix rule, in the original (registration) order."""
    out = {}
    for k, v in sd.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def test_named_modules_order(wild, tmp_path):
    """VGG-style features/classifier and conv1/bn1-named blocks: alphabetical order would misplace them."""
    vgg_rules = [("0.", "features."), ("1.", "classifier.")]
    block_rules = [(f"{b}.body.{i}.", f"block{b - 3}.{n}.") for b in (4, 5)
                   for i, n in ((0, "conv1"), (1, "bn1"), (3, "conv2"), (4, "bn2"))]
    cases = {"vgg": ("bn_pool_flatten", vgg_rules), "blocks": ("resnet", block_rules)}
    for case, (name, rules) in cases.items():
        net, side, spec, _, x, ref = wild[name]
        sd = _renamed(net.state_dict(), rules)
        _save(tmp_path / f"{case}.pt", sd, side)
        spec2, sd2, warns, _ = CI.read_checkpoint(tmp_path / f"{case}.pt")  # registration order of the file
        assert spec2 == spec and rel_err(ref, A.forward(spec2, sd2, x)) < 1e-5, case
        assert len(warns) == 1 and "key order" in warns[0]
        _save(tmp_path / f"{case}.safetensors", sd, side)  # keys come back sorted: refused, not misread
        with pytest.raises(CI.CheckpointError, match=r"forward order of the named modules .* sidecar 'order'"):
            CI.read_checkpoint(tmp_path / f"{case}.safetensors")
        order = list(dict.fromkeys(k.rpartition(".")[0] for k in sd))
        _save(tmp_path / f"{case}.safetensors", sd, {**side, "order": order})
        spec3, sd3, warns, _ = CI.read_checkpoint(tmp_path / f"{case}.safetensors")
        assert spec3 == spec and warns == [] and rel_err(ref, A.forward(spec3, sd3, x)) < 1e-5, case


# --- the zoo's specs are unchanged ---------------------------------------------------------------------------
def test_zoo_specs_and_ids_unchanged(wild):
    # arch_ids computed with the committed architecture.py before the extensions
    assert A.mlp_spec(64, [32], 10, "relu").arch_id == "42dde683ab27"
    assert A.cnn_spec((1, 8, 8), [8, 12], 3, 10, "relu").arch_id == "85726d444c5a"
    assert A.cnn_spec((3, 32, 32), [8, 16, 32], 5, 10, "tanh", hidden=[12]).arch_id == "ada0ea9780c6"
    for spec in FAMILY_SPECS.values():
        assert all(set(l) == {"kind", "in_dim", "out_dim", "activation", "kernel_size"}
                   for l in spec.to_dict()["layers"])
        assert not spec.is_extended and spec.residual_groups() == []
    # the importer reads the zoo's own layers.{i}.* checkpoints: same spec, same weights, the zoo's plain naming
    torch.manual_seed(0)
    cnn = FAMILY_SPECS["cnn2_leaky_k3_hidden"]
    for spec, sd in (wild["mlp_bn"][2:4], (cnn, A.build_model(cnn).state_dict())):
        act = spec.layers[0].activation
        mine, sd_mine, _ = CI.infer_wild_spec(sd, {"activation": act, "input_shape": list(spec.input_shape)})
        kind = "cnn" if spec.is_cnn else "mlp"
        assert mine == spec and mine.name == f"{kind}-" + "-".join(str(l.out_dim) for l in spec.layers) + f"-{act}"
        assert all(torch.equal(sd_mine[k], sd[k]) for k in sd)


def test_spec_errors_name_the_layer():
    conv = A.LayerSpec("conv2d", 8, 8, "relu", 3)
    with pytest.raises(ValueError, match=r"layer 1 \(residual_from=0\): identity shortcut needs equal widths"):
        A.ArchitectureSpec((1, 8, 8), (A.LayerSpec("conv2d", 1, 4, "relu", 3),
                                       A.LayerSpec("conv2d", 4, 8, "relu", 3, residual_from=0),
                                       A.LayerSpec("linear", 8, 10, "identity")))
    with pytest.raises(ValueError, match=r"layer 1 \(residual_from=-1\): source map \(8, 8\) differs .*\(4, 4\)"):
        A.ArchitectureSpec((8, 8, 8), (A.LayerSpec("conv2d", 8, 8, "relu", 3, pool="max2"),
                                       A.LayerSpec("conv2d", 8, 8, "relu", 3, residual_from=-1),
                                       A.LayerSpec("linear", 8, 10, "identity")))
    ok = A.ArchitectureSpec((8, 8, 8), (conv, A.LayerSpec("conv2d", 8, 8, "relu", 3, residual_from=-1),
                                        A.LayerSpec("linear", 8, 10, "identity")))
    assert ok.residual_groups() == [(-1, 1)]  # coupled to the input: no freedom
    sd = A.build_model(ok).state_dict()
    p = permute_hidden(ok, sd, torch.Generator().manual_seed(0))
    assert torch.equal(p["layers.1.bias"], sd["layers.1.bias"]) and not torch.equal(p["layers.0.bias"], sd["layers.0.bias"])
    with pytest.raises(ValueError, match=r"layer 1 \(flatten\) expects 100 inputs but layer 0 gives 8 channels"):
        A.ArchitectureSpec((1, 8, 8), (A.LayerSpec("conv2d", 1, 8, "relu", 3, pool="max2"),
                                       A.LayerSpec("linear", 100, 10, "identity", flatten=True)))
    with pytest.raises(ValueError, match="pooling .* only supported after conv"):
        A.LayerSpec("linear", 4, 4, "relu", pool="max2")
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        A.LayerSpec("conv2d", 4, 4, "relu", 3, pool="max")
    with pytest.raises(ValueError, match="shortcut into the output layer"):
        A.ArchitectureSpec((8,), (A.LayerSpec("linear", 8, 8, "relu"),
                                  A.LayerSpec("linear", 8, 8, "identity", residual_from=0)))
