"""Encoders on real trained networks: exact symmetry invariance, batch independence, mixed batches, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import encoder_blocks as EB
import gnn_encoder as G
from conftest import assert_fused_matches_pyg
from symmetry import flip_signs, permute_hidden, rescale_hidden
from weight_to_graph import WeightToGraph
from weightnet import WeightNet, canonical_rank

SMALL = dict(hidden_dim=32, global_dim=48, projection_dim=16, message_passing_steps=2, dropout=0.0)
# probe features on: Gaussian and data probes, the raw fingerprint kept in the embedding
PROBED = dict(probes=6, probe_kinds=["gauss", "data"], probe_sizes=[64], fingerprint_weight=1.0)
INVARIANT = [("gnn", {}), ("gnn", PROBED), ("weightnet", {}), ("weightnet", {"canonical_order": True})]
WITH_PROBES = [(name, {}) for name in G.ENCODER_NAMES] + [("gnn", PROBED), ("nonequivariant_gnn", PROBED)]


def _encoder(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = G.build_encoder(name, **{**SMALL, **extra})
    if "data" in extra.get("probe_kinds", ()):
        enc.probe_set.set_data(64, torch.randn(extra["probes"], 64, generator=torch.Generator().manual_seed(1)))
    return enc


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row relative distance (B,)."""
    return (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converter() -> WeightToGraph:
    return WeightToGraph(max_kernel=5, canonicalize=True)


@pytest.fixture(scope="module")
def graphs(trained_models, converter) -> list:
    return [converter.to_graph(spec, sd, model_idx=i) for i, (spec, sd) in enumerate(trained_models.values())]


def _symmetric_views(trained_models, converter, seed: int, permute: bool = True) -> list:
    """Each model permuted (all hidden layers), rescaled (ReLU/LeakyReLU) and sign-flipped (tanh)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (spec, sd) in enumerate(trained_models.values()):
        sd2 = permute_hidden(spec, sd, generator=g) if permute else sd
        sd2 = flip_signs(spec, rescale_hidden(spec, sd2, generator=g, low=0.2, high=5.0), generator=g)
        out.append(converter.to_graph(spec, sd2, model_idx=i))
    return out


@pytest.mark.parametrize("name,extra", INVARIANT)
def test_embedding_exactly_invariant_to_permutation_scaling_sign(name, extra, trained_models, converter, graphs):
    enc = _encoder(name, **extra).eval()
    views = _symmetric_views(trained_models, converter, seed=1)
    # the views really are different graphs (so this test can fail)
    assert all((a.edge_attr - b.edge_attr).abs().max() > 1e-2 for a, b in zip(graphs, views))
    with torch.no_grad():
        z = enc(Batch.from_data_list(graphs))
        z_view = enc(Batch.from_data_list(views))
    assert torch.isfinite(z).all()
    rel = _rel(z, z_view)
    assert rel.max() < 1e-4, f"{name}{extra}: relative change {rel.tolist()}"


def test_nonequivariant_gnn_is_not_invariant(trained_models, converter, graphs):
    enc = _encoder("nonequivariant_gnn").eval()
    with torch.no_grad():
        z = enc(Batch.from_data_list(graphs))
        z_perm = enc(Batch.from_data_list(_symmetric_views(trained_models, converter, seed=1)))
        z_scaled = enc(Batch.from_data_list(_symmetric_views(trained_models, converter, seed=1, permute=False)))
    # permuting hidden neurons moves the embedding of every model ...
    rel = _rel(z, z_perm)
    assert rel.min() > 1e-4, f"non-equivariant GNN barely moved under permutation: {rel.tolist()}"  # the invariance tolerance
    # ... while scaling/sign (removed by the canonical form) do not: the difference is the permutation
    assert _rel(z, z_scaled).max() < 1e-4


@pytest.mark.parametrize("name,extra", WITH_PROBES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_batch_independence(name, extra, train_mode, graphs):
    enc = _encoder(name, **extra).train(train_mode)
    with torch.no_grad():
        alone = torch.cat([enc(Batch.from_data_list([g])) for g in graphs])
        together = enc(Batch.from_data_list(graphs))
        order = [3, 0, 6, 1, 5, 2, 4]
        shuffled = enc(Batch.from_data_list([graphs[i] for i in order] + [graphs[0]]))  # with a duplicate
    assert torch.allclose(alone, together, atol=1e-5, rtol=1e-4), (alone - together).abs().max()
    assert torch.allclose(alone[order], shuffled[:-1], atol=1e-5, rtol=1e-4)
    assert torch.allclose(alone[0], shuffled[-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,extra", WITH_PROBES)
def test_mixed_mlp_cnn_batch_forward_backward(name, extra, graphs, trained_models):
    specs = [spec for spec, _ in trained_models.values()]
    assert {s.is_cnn for s in specs} == {True, False} and len({len(s.layers) for s in specs}) > 1
    enc = _encoder(name, **extra).train()
    batch = Batch.from_data_list(graphs)
    z = enc(batch)
    p = enc.project(z)
    dim = getattr(enc, "embedding_dim", SMALL["global_dim"])
    assert z.shape == (len(graphs), dim) and p.shape == (len(graphs), SMALL["projection_dim"])
    if extra:  # [fingerprint (2 kinds x 6 probes x 10 slots), learned part]; the probe projections are trained
        assert dim == 2 * 6 * 10 + SMALL["global_dim"]
    p.square().sum().backward()
    grads = {n: q.grad for n, q in enc.named_parameters() if q.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # the message-passing layers and the edge encoder are trained by this loss
    assert any(n.startswith(("convs.0.lin_edge", "summary.0.lin_edge")) and g.abs().sum() > 0 for n, g in grads.items())
    # different architectures get different embeddings
    assert torch.cdist(z, z).add(torch.eye(len(graphs))).min() > 1e-4
    if extra:
        assert all(grads[f"node_encoder.probe.{t}.weight"].abs().sum() > 0 for t in range(3))


@pytest.mark.parametrize("name,extra", [(n, {"canonical_order": True, "num_properties": 3} if n == "weightnet" else {})
                                        for n in G.ENCODER_NAMES] + [("gnn", PROBED)])
def test_save_load_round_trip(name, extra, graphs, tmp_path):
    enc = _encoder(name, **extra).eval()
    path = tmp_path / f"{name}.pt"
    G.save_encoder(str(path), enc)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"name", "kwargs", "state_dict", "graph"} and raw["name"] == name
    loaded = G.load_encoder(str(path)).eval()
    assert type(loaded) is type(enc) and loaded.hparams == enc.hparams and loaded.flatten_summary
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        assert torch.equal(enc(batch), loaded(batch))


def test_factorized_message_equals_concat_mlp_reference():
    """s_ij = relu(W [h_dst, h_src, e_ij] + b), aggregated both ways, as a dense loop would compute it."""
    torch.manual_seed(0)
    h_dim, e_dim, n = 8, 5, 6
    conv = EB.FactorizedEdgeConv(h_dim, e_dim)
    edge_index = torch.tensor([[0, 1, 2, 0, 3, 4], [3, 3, 3, 4, 5, 5]])
    h, e = torch.randn(n, h_dim), torch.randn(edge_index.size(1), e_dim)
    h_new, s = conv(h, e, EB.edge_incidence(edge_index, n))
    hn = conv.norm(h)
    w = torch.cat([conv.lin_dst.weight, conv.lin_src.weight, conv.lin_edge.weight], dim=1)  # (h, 2h + e)
    m_in, m_out = torch.zeros(n, h_dim), torch.zeros(n, h_dim)
    for k, (i, j) in enumerate(edge_index.t().tolist()):
        s_ref = torch.relu(w @ torch.cat([hn[j], hn[i], e[k]]) + conv.lin_dst.bias)
        torch.testing.assert_close(s[k], s_ref, atol=1e-5, rtol=1e-5)
        m_in[j] += s_ref
        m_out[i] += s_ref
    ref = h + conv.update_mlp(torch.cat([hn, conv.norm_in(m_in), conv.norm_out(m_out)], dim=-1))
    torch.testing.assert_close(h_new, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", G.ENCODER_NAMES)
def test_fused_edge_kernel_equals_pyg_message_passing(name, graphs):
    """The fused autograd kernel and the plain PyG path give the same embeddings and gradients."""
    assert_fused_matches_pyg(lambda: _encoder(name), Batch.from_data_list(graphs), name)


def test_weightnet_property_head_trains_with_mse(graphs, trained_models):
    torch.manual_seed(0)
    enc = WeightNet(**SMALL, num_properties=2)
    batch = Batch.from_data_list(graphs)
    target = torch.randn(len(graphs), 2)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(enc.predict_properties(enc(batch)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert enc.predict_properties(enc(batch)).shape == (len(graphs), 2)
    assert losses[-1] < 0.2 * losses[0], losses


def test_canonical_rank_hand_example():
    key = torch.tensor([0.5, -1.0, 2.0, 0.3, 0.3, 9.0])
    tie = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, 0.0])
    seg = torch.tensor([0, 0, 0, 1, 1, 2])
    assert canonical_rank(key, tie, seg).tolist() == [1, 0, 2, 1, 0, 0]


def test_clear_errors(graphs):
    with pytest.raises(ValueError, match="unknown encoder"):
        G.build_encoder("pna")
    with pytest.raises(ValueError, match="edge_dim"):
        _encoder("gnn", edge_dim=9)(Batch.from_data_list(graphs[:1]))
    with pytest.raises(ValueError, match="max_layers"):
        _encoder("gnn", max_layers=2)(Batch.from_data_list(graphs))  # the 3-hidden-layer MLP is too deep
    g = graphs[0].clone()
    del g.neuron_index
    with pytest.raises(ValueError, match="neuron_index"):
        _encoder("nonequivariant_gnn")(Batch.from_data_list([g]))
    assert G.ModelEmbedder(**SMALL)(Batch.from_data_list([g])).shape == (1, SMALL["global_dim"])  # not needed here


@pytest.mark.parametrize("name", G.ENCODER_NAMES)
def test_build_from_config_and_gpu_setting_one_flag_away(name):
    from config import parse_args

    c = parse_args(["--hidden_dim", "256", "--message_passing_steps", "4", "--model", name]).encoder
    enc = G.build_encoder(c.model, **G.encoder_kwargs(c.hidden_dim, c.global_dim, c.projection_dim,
                                                      c.message_passing_steps, c.dropout, c.model, c.attention_heads,
                                                      c.canonical_order))
    assert enc.hparams["hidden_dim"] == 256 and enc.hparams["message_passing_steps"] == 4
    if name != "weightnet":
        assert len(enc.convs) == 4 and enc.convs[0].lin_dst.in_features == 256
    else:
        assert len(enc.intra.layers) == 4


@pytest.mark.parametrize("name", ["gnn", "weightnet"])
def test_equivariant_encoders_never_read_neuron_index(name, graphs):
    enc = _encoder(name).eval()
    scrambled = []
    for g in graphs:
        g = g.clone()
        g.neuron_index = torch.randperm(g.num_nodes)
        scrambled.append(g)
    with torch.no_grad():
        assert torch.equal(enc(Batch.from_data_list(graphs)), enc(Batch.from_data_list(scrambled)))


def test_bf16_autocast_path_runs_and_stays_close(graphs):
    """The fused kernel's autocast branch (used with bf16 on GPU), exercised on CPU."""
    enc = _encoder("gnn")
    batch = Batch.from_data_list(graphs)
    z = enc(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = enc(batch)
        loss = enc.project(zb).float().square().mean()
    loss.backward()
    assert zb.dtype == torch.bfloat16
    assert (z - zb.float()).norm() / z.norm() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_io_slot_readout_sees_input_positions_and_bins_wide_layers(graphs):
    """The slot readout keeps which input carried what: swapping two input features of an MLP
    (a different function, not a symmetry) moves the embedding far more with slots than the
    attention pooling alone does; layers wider than the slot grid are binned, not refused."""
    torch.manual_seed(0)
    pool = G.HierarchicalPool(8, 16, max_layers=4, io_slots=2, io_positions=4).eval()
    h = torch.randn(9, 8)
    # one graph: 6 inputs binned into 4 slots (slot = p * 4 // 6 = 0, 0, 1, 2, 2, 3), 1 hidden, 2 outputs
    f = {"node_type": torch.tensor([0] * 6 + [1] + [2] * 2), "layer_index": torch.tensor([0] * 6 + [1] + [2] * 2),
         "batch": torch.zeros(9, dtype=torch.long), "num_graphs": 1, "io_position": torch.tensor([0, 1, 2, 3, 4, 5, -1, 0, 1]),
         "num_layers_node": torch.full((9,), 2)}
    slots = pool._slots(h, f["node_type"] == 0, pool.slot_in, f).view(4, 2)
    proj = pool.slot_in(h[:6])
    expect = torch.stack([proj[[0, 1]].mean(0), proj[2], proj[[3, 4]].mean(0), proj[5]])
    assert torch.allclose(slots, expect, atol=1e-6)
    out = pool._slots(h, f["node_type"] == 2, pool.slot_out, f).view(4, 2)
    assert torch.allclose(out[:2], pool.slot_out(h[7:9]), atol=1e-6) and out[2:].abs().sum() == 0

    mlp = next(g for g in graphs if int(g.num_layers) == 2 and (g.node_type == 0).sum() > 4)
    swapped = mlp.clone()
    n_in = int((mlp.node_type == 0).sum())
    perm = torch.arange(n_in)
    perm[[0, 1]] = perm[[1, 0]]
    swapped.io_position = mlp.io_position.clone()
    swapped.io_position[:n_in] = mlp.io_position[:n_in][perm]  # input nodes 0 and 1 exchange identities
    moves = {}
    for slots_n in (0, 4):
        torch.manual_seed(0)
        enc = G.build_encoder("gnn", **{**SMALL, "io_slots": slots_n}).eval()
        with torch.no_grad():
            a, b = enc(Batch.from_data_list([mlp])), enc(Batch.from_data_list([swapped]))
        moves[slots_n] = float(_rel(a, b))
    assert moves[4] > 3 * moves[0], moves  # measured 1.0e-3 vs 2.1e-4: two of 64 inputs exchanged


def test_load_encoder_reads_files_saved_before_io_slots(graphs, tmp_path):
    enc = _encoder("gnn", io_slots=0).eval()
    path = tmp_path / "old.pt"
    kwargs = {k: v for k, v in enc.hparams.items() if k != "io_slots"}  # what older versions saved
    torch.save({"name": "gnn", "kwargs": kwargs, "state_dict": enc.state_dict()}, path)
    loaded = G.load_encoder(str(path)).eval()
    assert loaded.hparams["io_slots"] == 0
    with torch.no_grad():
        assert torch.equal(enc(Batch.from_data_list(graphs)), loaded(Batch.from_data_list(graphs)))


def test_probe_encoder_file_carries_probes_and_metric_head(graphs, tmp_path):
    """The encoder file holds the data probes and the fit metric head: a loaded copy embeds identically, with
    no access to the source data; before the head is fit, forward is embed_raw and project works."""
    from encoder_blocks import MetricHead

    enc = _encoder("gnn", **PROBED).eval()
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        raw = enc(batch)
        assert torch.equal(raw, enc.embed_raw(batch)) and enc.project(raw).shape == (len(graphs), 16)
        head = MetricHead(enc.embedding_dim, 4).fit(raw.repeat(3, 1) + 0.01 * torch.randn(21, raw.shape[1]),
                                                    list(range(7)) * 3, reg=0.5)
    enc.set_metric(head)
    assert enc.hparams["metric_dim"] == 4
    path = tmp_path / "probed.pt"
    G.save_encoder(str(path), enc)
    loaded = G.load_encoder(str(path)).eval()
    assert torch.equal(loaded.probe_set.data_in64, enc.probe_set.data_in64) and bool(loaded.probe_set.data_set_in64)
    with torch.no_grad():
        z = enc(batch)
        assert z.shape == (len(graphs), 4) and torch.equal(z, loaded(batch))
        torch.testing.assert_close(z, head(raw))
    with pytest.raises(RuntimeError, match="metric head is fit"):
        enc.project(raw)
    with pytest.raises(ValueError, match="probe features"):
        G.build_encoder("gnn", **SMALL, fingerprint_weight=1.0)


def test_metric_head_is_within_group_whitening():
    """MetricHead.fit against a float64 reference: PCA, then the within-group scatter (plus ridge) whitened."""
    from encoder_blocks import MetricHead

    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    groups = np.repeat(np.arange(6), 10)
    head = MetricHead(8, 5).fit(z, groups, reg=0.3)
    out = head(z.float()).double()
    # reference: the within-group covariance of the outputs is (1 + ridge)^-1-shrunk identity in its eigenbasis
    c = torch.zeros(5, 5, dtype=torch.float64)
    for k in range(6):
        r = out[groups == k] - out[groups == k].mean(0)
        c += r.T @ r
    c /= len(z)
    ev = torch.linalg.eigvalsh(c)
    assert (ev < 1 + 1e-4).all() and (ev > 0).all()
    zc = z - z.mean(0)
    v = torch.linalg.svd(zc, full_matrices=False).Vh[:5].T
    y = zc @ v
    w_ = torch.zeros(5, 5, dtype=torch.float64)
    for k in range(6):
        r = y[groups == k] - y[groups == k].mean(0)
        w_ += r.T @ r
    w_ /= len(z)
    w_ += 0.3 * w_.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    e, u = torch.linalg.eigh(w_)
    torch.testing.assert_close(out, y @ u / e.sqrt(), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="before fit"):
        MetricHead(8, 5)(z.float())


def test_learned_probes_train_with_the_encoder(graphs):
    enc = _encoder("gnn", probes=4, probe_kinds=["learned"], probe_sizes=[64], fingerprint_weight=1.0).train()
    z = enc(Batch.from_data_list(graphs))
    enc.project(z).square().sum().backward()
    gen = [p.grad for p in enc.probe_set.generators.parameters()]
    assert gen and all(g is not None and g.abs().sum() > 0 for g in gen)
