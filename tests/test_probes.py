"""Probe features on real trained networks: weights read back from graphs, exact symmetry invariance,
the vmapped forward against the plain one, the fingerprint layout, the probe set (fixed, data, learned)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import architecture as A
import probes as PR
from symmetry import flip_signs, permute_hidden, rescale_hidden
from weight_to_graph import WeightToGraph
from zoo_plan import cnn_bn_spec, resnet_spec

pytestmark = pytest.mark.usefixtures("one_thread")
EXTENDED = [cnn_bn_spec((1, 8, 8), (4, 8), 16, 10), resnet_spec((1, 8, 8), 4, 1, 10, "tanh")]


def _random_sd(spec: A.ArchitectureSpec, seed: int) -> dict:
    torch.manual_seed(seed)
    return A.build_model(spec).state_dict()


@pytest.fixture(scope="module")
def models(trained_models) -> list:
    """(spec, state_dict): the trained fixture families, plus a flatten-head CNN and a tanh ResNet (random)."""
    return list(trained_models.values()) + [(s, _random_sd(s, i)) for i, s in enumerate(EXTENDED)]


def _views(models: list, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(s, flip_signs(s, rescale_hidden(s, permute_hidden(s, sd, g), g, 0.2, 5.0), g)) for s, sd in models]


def _batch(conv: WeightToGraph, models: list) -> Batch:
    return Batch.from_data_list([conv.to_graph(s, sd, i) for i, (s, sd) in enumerate(models)])


@pytest.mark.parametrize("canonical", [True, False])
def test_stacked_params_read_back_every_graph_of_a_mixed_batch(models, canonical):
    conv = WeightToGraph(5, canonicalize=canonical)
    batch = _batch(conv, models + models[:2])  # repeated architectures share a group
    groups = PR.graph_groups(batch)
    assert sum(len(g.graphs) for g in groups) == batch.num_graphs and len(groups) == len(models)
    for grp in groups:
        params = PR.stacked_params(batch, grp)
        for m, g in enumerate(grp.graphs.tolist()):
            _, sd = conv.to_state_dict(batch.get_example(g))
            for k, v in sd.items():
                assert torch.equal(params[k][m], v), (grp.spec.name, g, k)


def test_vmapped_responses_equal_the_plain_forward(models):
    X = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for spec, sd in models:
        params = {k: torch.stack([v, 2 * v]) for k, v in sd.items()}  # two models of one architecture
        r = PR.model_responses(spec, params, X)
        for m, scale in enumerate((1, 2)):
            logits = A.forward(spec, {k: scale * v for k, v in sd.items()}, X.reshape(16, *spec.input_shape))
            lp = torch.log_softmax(logits, -1)
            torch.testing.assert_close(r.log_probs[m], lp - lp.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)
            # float32 rounding of logits of magnitude |z| moves softmax by about eps * |z|; the vmapped and plain
            # forwards round differently on other CPUs' kernels (1.1e-5 measured with SSE4.1 oneDNN, |z| ~ 100)
            tol = 4 * torch.finfo(torch.float32).eps * float(logits.abs().max()) + 1e-6
            torch.testing.assert_close(r.outputs[m][:, 16:], torch.softmax(logits, -1).T, atol=tol, rtol=1e-5)
        assert [h.shape[1] for h in r.hidden] == [layer.out_dim for layer in spec.layers[:-1]]
        assert r.inputs.shape == (2, spec.num_inputs, 32) and torch.isfinite(r.inputs).all()


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (by a weighted row sum): compares the multisets of rows of a layer."""
    key = (t * torch.linspace(1.0, 2.0, t.shape[1], dtype=t.dtype)).sum(1)
    return t[torch.argsort(key)]


@pytest.mark.parametrize("canonical", [True, False])
def test_probe_features_exactly_invariant_on_trained_models(models, canonical):
    """Permuted, rescaled (ReLU) and sign-flipped (tanh) copies: the same fingerprint, and per layer the same
    node features (they travel with their node), with and without the canonical form."""
    conv = WeightToGraph(5, canonicalize=canonical)
    ps = PR.ProbeSet(12, ("gauss", "data"), [64], seed=3)
    ps.set_data(64, torch.randn(12, 64))
    a, b = _batch(conv, models), _batch(conv, _views(models, seed=1))
    assert all((x.edge_attr - y.edge_attr).abs().max() > 1e-2 for x, y in zip(a.to_data_list(), b.to_data_list()))
    fa, fb = PR.probe_features(ps, a), PR.probe_features(ps, b)
    torch.testing.assert_close(fa.fingerprint, fb.fingerprint, atol=1e-5, rtol=1e-4)
    for g in range(a.num_graphs):
        rows = slice(int(a.ptr[g]), int(a.ptr[g + 1]))
        layer = a.layer_index[rows] - a.layer_index[rows][0]
        for l in layer.unique():
            m = layer == l
            na, nb = fa.node[rows][m], fb.node[rows][m]
            assert na.abs().sum() > 0
            torch.testing.assert_close(_sorted_rows(na), _sorted_rows(nb), atol=1e-4, rtol=1e-4)


def test_hidden_features_are_normalised_and_see_the_function(models):
    """Hidden responses have unit RMS over probes; different networks give different features."""
    conv = WeightToGraph(5)
    ps = PR.ProbeSet(8, ("gauss",), [64])
    f = PR.probe_features(ps, _batch(conv, models[:2]))
    batch = _batch(conv, models[:2])
    hidden = batch.node_type == 1
    rms = f.node[hidden][:, 8:].square().mean(1).sqrt()  # the RMS-over-space half: unit mean square per neuron
    alive = rms > 0
    torch.testing.assert_close(rms[alive], torch.ones_like(rms[alive]), atol=1e-5, rtol=1e-5)
    assert (f.fingerprint[0] - f.fingerprint[1]).abs().max() > 1e-2


def test_fingerprint_slots_binning_and_normalisation():
    lp = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # 2 models, 4 probes (2 kinds x 2), 3 outputs
    raw = PR.fingerprint(lp, num_kinds=2, out_slots=5, normalize=False).reshape(2, 4, 5)
    assert torch.equal(raw[..., :3], lp) and (raw[..., 3:] == 0).all()
    binned = PR.fingerprint(lp, num_kinds=1, out_slots=2, normalize=False).reshape(2, 4, 2)  # slots 0, 0, 1
    torch.testing.assert_close(binned[..., 0], lp[..., :2].mean(-1))
    torch.testing.assert_close(binned[..., 1], lp[..., 2])
    norm = PR.fingerprint(lp, num_kinds=2, out_slots=5).reshape(2, 2, 10)
    torch.testing.assert_close(norm.norm(dim=2), torch.full((2, 2), 0.5 ** 0.5))


def test_probe_set_kinds_fallback_and_learned_gradients(caplog):
    ps = PR.ProbeSet(6, ("gauss", "data", "learned"), [4], seed=1)
    assert torch.equal(ps.inputs(4)[:6], PR.gaussian_probes(4, 6, 1))
    assert torch.equal(PR.gaussian_probes(4, 6, 1), PR.gaussian_probes(4, 6, 1))
    with caplog.at_level(logging.WARNING, logger="weightzoo"):
        unset = ps.inputs(4)  # data probes not set: seeded Gaussian ones stand in, with a warning
        other = ps.inputs(9)  # a size the set does not store
    assert unset.shape == (18, 4) and other.shape == (18, 9) and "stand in" in caplog.text
    X = torch.arange(24.0).reshape(6, 4)
    ps.set_data(4, X)
    assert torch.equal(ps.inputs(4)[6:12], X)
    with pytest.raises(ValueError, match="rows"):
        ps.set_data(4, X[:3])
    with pytest.raises(ValueError, match="distinct kinds"):
        PR.ProbeSet(6, ("gauss", "gauss"))
    spec = A.mlp_spec(4, [5], 3, "relu")
    params = {k: v.unsqueeze(0) for k, v in _random_sd(spec, 0).items()}
    PR.model_responses(spec, params, ps.inputs(4)).log_probs.square().sum().backward()
    grads = [p.grad for p in ps.generators.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # learned probes are trained
    state = ps.state_dict()
    assert {"gauss_in4", "data_in4", "data_set_in4", "latent_in4"} <= set(state)


def test_source_inputs_are_unlabeled_inputs_of_the_original_task():
    from tasks import load_task_data

    X = PR.source_inputs(64, 10, seed=0)
    digits = load_task_data("digits")[0].reshape(-1, 64)
    assert X.shape == (10, 64)
    assert all(bool((digits == x).all(1).any()) for x in X)  # rows of the digits train split
    assert PR.source_inputs(7, 10) is None  # no source dataset has 7 features
    np.testing.assert_array_equal(PR.source_inputs(64, 10, seed=0).numpy(), X.numpy())


def test_retrieval_embeds_a_checkpoint_exactly_as_training_did(models, tmp_path):
    """An encoder file with data probes, a learned-part weight and a metric head: retrieval's Embedder (weights ->
    canonical graph -> loaded encoder) gives the embedding the trained encoder gives the zoo's graph."""
    import gnn_encoder as G
    from encoder_blocks import MetricHead
    from retrieval import Embedder

    torch.manual_seed(0)
    enc = G.build_encoder("gnn", hidden_dim=16, global_dim=8, projection_dim=4, message_passing_steps=1, probes=5,
                          probe_kinds=["gauss", "data"], probe_sizes=[64], fingerprint_weight=1.0).eval()
    enc.probe_set.set_data(64, torch.randn(5, 64))
    conv = WeightToGraph(5)
    batch = _batch(conv, models)
    with torch.no_grad():
        raw = enc(batch)
    noisy = torch.cat([raw + 0.05 * torch.randn_like(raw) for _ in range(4)])
    enc.set_metric(MetricHead(enc.embedding_dim, 6).fit(noisy, list(range(len(models))) * 4, 0.5), learned_weight=0.5)
    path = tmp_path / "enc.pt"
    G.save_encoder(str(path), enc)
    with torch.no_grad():
        expected = enc(batch).numpy()
    got = Embedder.from_file(path, batch_size=3).embed(models)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert G.load_encoder(str(path)).learned_weight == 0.5
