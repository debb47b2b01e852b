"""Neuron-graph converter: the field contract, exact round trips, canonical invariance, mixed batches,
the cached many-model conversion and the errors, on the real trained fixture networks."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch_geometric.data import Batch

import architecture as A
from symmetry import flip_signs, permute_hidden, rescale_hidden
from weight_to_graph import EDGE_CONV, EDGE_LINEAR, WeightToGraph
from conftest import FAMILY_SPECS

FAMILIES = list(FAMILY_SPECS)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def make_zoo(models):
    """A real data_prep.ModelZooDataset (in memory) holding the given (spec, state_dict) pairs."""
    import pandas as pd
    from data_prep import ModelZooDataset
    rows = [{"model_id": f"m{i}", "arch_id": spec.arch_id} for i, (spec, _) in enumerate(models)]
    specs = {spec.arch_id: spec for spec, _ in models}
    return ModelZooDataset(pd.DataFrame(rows), specs, {f"m{i}": sd for i, (_, sd) in enumerate(models)})


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_fields_follow_the_contract(name, trained_models):
    spec, sd = trained_models[name]
    K = 5
    d = WeightToGraph(max_kernel=K, canonicalize=False).to_graph(spec, sd, model_idx=7)
    L = len(spec.layers)
    widths = [spec.num_inputs] + [layer.out_dim for layer in spec.layers]
    N, E = sum(widths), sum(layer.in_dim * layer.out_dim for layer in spec.layers)
    assert d.x.shape == (N, 1) and d.x.dtype == torch.float32
    assert d.edge_index.shape == (2, E) and d.edge_attr.shape == (E, K * K)
    for f in ("node_type", "layer_index", "io_position", "neuron_index", "activation", "edge_index",
              "edge_layer", "edge_kind"):
        assert getattr(d, f).dtype == torch.long, f
    assert d.num_layers == L and d.model_idx == 7 and A.ArchitectureSpec.from_json(d.spec_json) == spec
    # nodes: inputs, layer 1, ..., outputs
    layer_of_node = torch.cat([torch.full((w,), l) for l, w in enumerate(widths)])
    assert torch.equal(d.layer_index, layer_of_node)
    assert torch.equal(d.node_type, torch.where(layer_of_node == 0, 0, torch.where(layer_of_node == L, 2, 1)))
    assert torch.equal(d.io_position[:widths[0]], torch.arange(widths[0]))
    assert torch.equal(d.io_position[-widths[-1]:], torch.arange(widths[-1]))
    assert (d.io_position[widths[0]:-widths[-1]] == -1).all()
    assert torch.equal(d.neuron_index, torch.cat([torch.arange(w) for w in widths]))
    assert (d.activation[:widths[0]] == 0).all()
    assert (d.activation[widths[0]:-widths[-1]] == A.ACTIVATIONS[spec.layers[0].activation]).all()
    assert (d.activation[-widths[-1]:] == A.ACTIVATIONS["identity"]).all()
    assert (d.x[:widths[0]] == 0).all()
    assert torch.equal(d.x[-widths[-1]:, 0], sd[f"layers.{L - 1}.bias"])
    # edges: layer by layer, row-major over (out, in), src in layer l-1 and dst in layer l
    assert torch.equal(d.edge_layer, layer_of_node[d.edge_index[1]])
    assert torch.equal(d.edge_layer - 1, layer_of_node[d.edge_index[0]])
    assert (d.edge_layer.diff() >= 0).all()
    start = 0
    for l, layer in enumerate(spec.layers, start=1):
        n = layer.in_dim * layer.out_dim
        w = sd[f"layers.{l - 1}.weight"]
        block = d.edge_attr[start:start + n].view(layer.out_dim, layer.in_dim, K, K)
        kind = EDGE_CONV if layer.kind == "conv2d" else EDGE_LINEAR
        assert (d.edge_kind[start:start + n] == kind).all()
        o, i = 2 % layer.out_dim, 1 % layer.in_dim
        e = start + o * layer.in_dim + i
        assert d.edge_index[0, e] == sum(widths[:l - 1]) + i and d.edge_index[1, e] == sum(widths[:l]) + o
        if layer.kind == "linear":  # centre slot, also for the GAP link conv channel -> first linear
            assert torch.equal(block[:, :, K // 2, K // 2], w)
            assert torch.count_nonzero(block) == torch.count_nonzero(w)
        else:
            p = (K - layer.kernel_size) // 2
            assert torch.equal(block[:, :, p:p + layer.kernel_size, p:p + layer.kernel_size], w)
        start += n


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_and_same_outputs(name, trained_models, model_inputs):
    spec, sd = trained_models[name]
    x = model_inputs(spec)
    y = A.forward(spec, sd, x)
    raw = WeightToGraph(canonicalize=False)
    spec2, sd2 = raw.to_state_dict(raw.to_graph(spec, sd))
    assert spec2 == spec and spec2.name == spec.name and set(sd2) == set(sd)
    for k in sd:
        assert torch.equal(sd2[k], sd[k]), k
    assert torch.equal(A.forward(spec2, sd2, x), y)
    canon = WeightToGraph(canonicalize=True)
    spec3, sd3 = canon.to_state_dict(canon.to_graph(spec, sd))
    assert rel_err(y, A.forward(spec3, sd3, x)) < 1e-5
    assert A.build_model(spec3, sd3)(x).shape == y.shape  # loads into a real nn.Module


def _sorted_features(d):
    """Permutation-invariant summary: per layer, sorted biases and sorted edge vectors."""
    out = []
    for l in range(int(d.num_layers) + 1):
        out.append(d.x[d.layer_index == l, 0].sort().values)
    for l in range(1, int(d.num_layers) + 1):
        ea = d.edge_attr[d.edge_layer == l]
        out.append(ea.sum(1).sort().values)
        out.append(ea.flatten().sort().values)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_canonical_graphs_of_symmetric_models_match(name, trained_models):
    spec, sd = trained_models[name]
    g = torch.Generator().manual_seed(0)
    t = permute_hidden(spec, flip_signs(spec, rescale_hidden(spec, sd, g, 0.2, 5.0), g), g)
    conv = WeightToGraph(canonicalize=True)
    a, b = conv.to_graph(spec, sd), conv.to_graph(spec, t)
    for u, v in zip(_sorted_features(a), _sorted_features(b)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    # without canonicalization the scaled/flipped graphs differ (the test above can fail)
    if any(layer.activation != "gelu" for layer in spec.layers[:-1]):
        raw = WeightToGraph(canonicalize=False)
        ra, rb = _sorted_features(raw.to_graph(spec, sd)), _sorted_features(raw.to_graph(spec, t))
        assert any(not torch.allclose(u, v, atol=1e-4) for u, v in zip(ra, rb))


def test_mixed_batch_of_all_families(trained_models, model_inputs):
    conv = WeightToGraph()
    graphs = [conv.to_graph(*trained_models[n], model_idx=i) for i, n in enumerate(FAMILIES)]
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == len(FAMILIES)
    assert batch.x.shape[0] == sum(d.num_nodes for d in graphs)
    assert batch.edge_attr.shape == (sum(d.edge_attr.shape[0] for d in graphs), 25)
    assert torch.equal(batch.num_layers, torch.tensor([len(FAMILY_SPECS[n].layers) for n in FAMILIES]))
    assert torch.equal(batch.model_idx, torch.arange(len(FAMILIES)))
    assert isinstance(batch.spec_json, list) and len(batch.spec_json) == len(FAMILIES)
    assert (batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]).all()
    for i, n in enumerate(FAMILIES):  # each graph comes back out of the batch intact
        spec, sd = trained_models[n]
        spec2, sd2 = conv.to_state_dict(batch.get_example(i))
        x = model_inputs(spec)
        assert spec2 == spec and rel_err(A.forward(spec, sd, x), A.forward(spec2, sd2, x)) < 1e-5
    with pytest.raises(ValueError, match="single graph"):
        conv.to_state_dict(batch)


def test_convert_many_models_and_cache(trained_models, tmp_path):
    models = []
    for n in FAMILIES:  # several models per architecture, interleaved
        spec, sd = trained_models[n]
        models += [(spec, sd), (spec, {k: v * 1.5 for k, v in sd.items()})]
    models = models[::2] + models[1::2]
    conv = WeightToGraph(canonicalize=True)
    zoo = make_zoo(models)
    graphs = conv.convert_model_to_graphs(zoo, cache_dir=tmp_path)
    assert len(graphs) == len(models)
    for i, (spec, sd) in enumerate(models):
        ref = conv.to_graph(spec, sd, model_idx=i)
        assert graphs[i].model_idx == i and graphs[i].spec_json == ref.spec_json
        torch.testing.assert_close(graphs[i].x, ref.x, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(graphs[i].edge_attr, ref.edge_attr, rtol=1e-6, atol=1e-7)
        assert torch.equal(graphs[i].edge_index, ref.edge_index)
    files = list(tmp_path.glob("graphs-*.pt"))
    assert len(files) == 1
    # the cache holds plain tensors and loads with weights_only=True
    payload = torch.load(files[0], weights_only=True)
    assert payload["zoo_version"] == zoo.version
    cached = conv.convert_model_to_graphs(zoo, cache_dir=tmp_path)
    for a, b in zip(graphs, cached):
        assert torch.equal(a.x, b.x) and torch.equal(a.edge_attr, b.edge_attr) and a.spec_json == b.spec_json
    # another zoo version never reuses the cache: new weights give new graphs and a second file
    zoo2 = make_zoo([(s, {k: -v for k, v in sd.items()}) for s, sd in models])
    assert zoo2.version != zoo.version
    raw = WeightToGraph(canonicalize=False)
    g2 = raw.convert_model_to_graphs(zoo2, cache_dir=tmp_path)
    assert torch.equal(g2[0].x[-10:, 0], -models[0][1][f"layers.{len(models[0][0].layers) - 1}.bias"])
    assert len(list(tmp_path.glob("graphs-*.pt"))) == 2
    # settings are part of the key and checked on load
    assert raw.cache_path(tmp_path, zoo.version) != conv.cache_path(tmp_path, zoo.version)
    with pytest.raises(ValueError, match="canonicalize"):
        raw.load_cache(files[0])
    with pytest.raises(ValueError, match="zoo version"):
        conv.load_cache(files[0], expected_zoo_version=zoo2.version)
    # a model with NaN weights is refused, naming the model and the key
    nan = [(s, dict(sd)) for s, sd in models[:3]]
    nan[2][1]["layers.0.bias"] = torch.full_like(nan[2][1]["layers.0.bias"], float("nan"))
    with pytest.raises(ValueError, match="zoo model 2: layers.0.bias contains NaN"):
        conv.convert_model_to_graphs(make_zoo(nan))


def test_stacked_conversion_equals_single(trained_models):
    spec, sd = trained_models["cnn2_relu_k3"]
    sds = [sd, {k: v * 0.5 for k, v in sd.items()}, {k: -v for k, v in sd.items()}]
    params = {k: torch.stack([s[k] for s in sds]) for k in sd}
    conv = WeightToGraph()
    graphs = conv.to_graphs_stacked(spec, params, [4, 5, 6])
    for i, g in enumerate(graphs):
        ref = conv.to_graph(spec, sds[i], model_idx=4 + i)
        torch.testing.assert_close(g.edge_attr, ref.edge_attr)
        torch.testing.assert_close(g.x, ref.x)
        assert g.model_idx == 4 + i
    with pytest.raises(ValueError, match="layers.0.weight has shape"):
        conv.to_graphs_stacked(spec, params, [1, 2])


def test_clear_errors(trained_models):
    spec7 = A.cnn_spec((1, 8, 8), [4], 7, 10, "relu")
    with pytest.raises(ValueError, match=r"layer 0 \(conv2d.*kernel_size 7 exceeds max_kernel 5"):
        WeightToGraph(max_kernel=5).to_graph(spec7, A.build_model(spec7).state_dict())
    assert WeightToGraph(max_kernel=7).to_graph(spec7, A.build_model(spec7).state_dict()).edge_attr.shape[1] == 49
    with pytest.raises(ValueError, match="max_kernel must be a positive odd"):
        WeightToGraph(max_kernel=4)
    # an even kernel cannot come from LayerSpec; simulate a spec built around its checks
    spec, sd = trained_models["cnn2_relu_k3"]
    bad_layer = spec.layers[1]
    object.__setattr__(bad_layer := replace(bad_layer), "kernel_size", 4)
    even = A.ArchitectureSpec(spec.input_shape, (spec.layers[0], bad_layer, *spec.layers[2:]), "even")
    with pytest.raises(ValueError, match=r"layer 1 \(conv2d.*even kernel_size 4"):
        WeightToGraph().structure(even)
    wrong = dict(sd)
    wrong["layers.1.weight"] = wrong["layers.1.weight"][:, :, :1, :1]
    with pytest.raises(ValueError, match="layers.1.weight has shape"):
        WeightToGraph().to_graph(spec, wrong)
    with pytest.raises(ValueError, match="missing"):
        WeightToGraph().to_graph(spec, {k: v for k, v in sd.items() if k != "layers.0.bias"})
    d = WeightToGraph(canonicalize=False).to_graph(spec, sd)
    d.edge_attr = d.edge_attr.clone()
    d.edge_attr[-1, 0] = 1.0  # a linear edge with a value outside its 1x1 window
    with pytest.raises(ValueError, match="layer 2 .*outside its 1x1 kernel window"):
        WeightToGraph(canonicalize=False).to_state_dict(d)
    with pytest.raises(ValueError, match=r"max_kernel=3\) needs"):
        WeightToGraph(max_kernel=3).to_state_dict(d)
