"""Exact symmetries, canonical form and contrastive views, on the real trained fixture networks."""
from __future__ import annotations

import pytest
import torch

import architecture as A
from symmetry import (SymmetryAugmenter, canonicalize, erase_spans, flip_signs, flip_signs_graph, permute_graph,
                      permute_hidden, rescale_graph, rescale_hidden)
from weight_to_graph import WeightToGraph
from conftest import FAMILY_SPECS, train_small
from zoo_plan import cnn_bn_spec, resnet_spec

FAMILIES = list(FAMILY_SPECS)


def assert_same_outputs(spec, sd_a, sd_b, x, rel=1e-5):
    ya, yb = A.forward(spec, sd_a, x), A.forward(spec, sd_b, x)
    err = (ya - yb).abs().max().item() / ya.abs().max().item()
    assert err <= rel, f"{spec.name}: outputs differ by {err:.2e} (relative)"


def changed(sd_a, sd_b) -> bool:
    return any(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def unpermute(spec, sd, perms):
    """Undo permute_hidden: new neuron j of layer i was old neuron perms[i][j]."""
    out = dict(sd)
    for i, p in enumerate(perms):
        inv = torch.argsort(p)
        out[f"layers.{i}.weight"] = out[f"layers.{i}.weight"][inv]
        out[f"layers.{i}.bias"] = out[f"layers.{i}.bias"][inv]
        out[f"layers.{i + 1}.weight"] = out[f"layers.{i + 1}.weight"][:, inv]
    return out


def assert_sd_close(a, b, tol=1e-5):
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a[k] / scale, b[k] / scale, rtol=0, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", FAMILIES)
def test_each_transform_preserves_function(name, trained_models, model_inputs):
    spec, sd = trained_models[name]
    x = model_inputs(spec)
    g = torch.Generator().manual_seed(0)
    acts = {layer.activation for layer in spec.layers[:-1]}

    p = permute_hidden(spec, sd, g)
    assert changed(sd, p)
    assert_same_outputs(spec, sd, p, x)

    r = rescale_hidden(spec, sd, g, 0.2, 5.0)
    assert changed(sd, r) == bool(acts & A.POSITIVE_HOMOGENEOUS)  # a no-op for tanh/gelu nets
    assert_same_outputs(spec, sd, r, x)

    f = flip_signs(spec, sd, g)
    assert changed(sd, f) == bool(acts & A.ODD)
    assert_same_outputs(spec, sd, f, x)

    c = canonicalize(spec, sd)
    assert_same_outputs(spec, sd, c, x)
    assert sd["layers.0.weight"].data_ptr() != c["layers.0.weight"].data_ptr()  # input never modified in place


@pytest.mark.parametrize("name", FAMILIES)
def test_canonical_form_is_invariant(name, trained_models):
    spec, sd = trained_models[name]
    g = torch.Generator().manual_seed(1)
    t = flip_signs(spec, rescale_hidden(spec, sd, g, 0.2, 5.0), g)
    t, perms = permute_hidden(spec, t, g, return_permutations=True)
    c0, c1 = canonicalize(spec, sd), unpermute(spec, canonicalize(spec, t), perms)
    assert_sd_close(c0, c1)
    assert_sd_close(c0, canonicalize(spec, c0))  # idempotent


@pytest.mark.parametrize("name", FAMILIES)
def test_canonical_conventions(name, trained_models):
    spec, sd = trained_models[name]
    c = canonicalize(spec, sd)
    for i, layer in enumerate(spec.layers[:-1]):
        w, b = c[f"layers.{i}.weight"].flatten(1), c[f"layers.{i}.bias"]
        if layer.activation in ("relu", "leaky_relu"):
            norm = torch.sqrt(w.pow(2).sum(1) + b.pow(2))
            torch.testing.assert_close(norm, torch.ones_like(norm))
        elif layer.activation == "tanh":
            assert (b > 0).all()
        elif layer.activation == "gelu":
            assert torch.equal(w, sd[f"layers.{i}.weight"].flatten(1))
    last = len(spec.layers) - 1
    assert torch.equal(c[f"layers.{last}.bias"], sd[f"layers.{last}.bias"])  # output biases untouched


def test_tanh_zero_bias_tie_break_is_permutation_invariant(trained_models):
    spec, sd = trained_models["mlp3_tanh"]
    sd = dict(sd)
    sd["layers.1.bias"] = torch.zeros_like(sd["layers.1.bias"])  # force the tie-break path
    g = torch.Generator().manual_seed(2)
    t, perms = permute_hidden(spec, flip_signs(spec, sd, g), g, return_permutations=True)
    assert_sd_close(canonicalize(spec, sd), unpermute(spec, canonicalize(spec, t), perms))


def test_bad_inputs_raise(trained_models):
    spec, sd = trained_models["mlp1_relu"]
    with pytest.raises(ValueError, match="rescale range"):
        rescale_hidden(spec, sd, None, 0.0, 2.0)
    bad = dict(sd)
    bad["layers.0.weight"] = bad["layers.0.weight"][:, :3]
    with pytest.raises(ValueError, match="layers.0.weight"):
        canonicalize(spec, bad)
    with pytest.raises(ValueError, match="edge_dropout"):
        SymmetryAugmenter(edge_dropout=1.0)
    with pytest.raises(ValueError, match="erase_fraction"):
        SymmetryAugmenter(erase_fraction=-0.1)


@pytest.mark.parametrize("name", ["mlp2_leaky", "cnn3_tanh_k5", "cnn2_leaky_k3_hidden"])
def test_graph_symmetry_ops_match_state_dict_ops(name, trained_models, model_inputs):
    spec, sd = trained_models[name]
    x = model_inputs(spec)
    conv = WeightToGraph(canonicalize=False)
    data = conv.to_graph(spec, sd)
    # same seed -> same permutations (both draw one randperm per hidden layer, in order)
    gp = permute_graph(data, torch.Generator().manual_seed(3))
    ref = conv.to_graph(spec, permute_hidden(spec, sd, torch.Generator().manual_seed(3)))
    assert torch.equal(gp.x, ref.x) and torch.equal(gp.edge_attr, ref.edge_attr)
    assert torch.equal(gp.edge_index, data.edge_index)
    # canonicalization commutes with permutation: same graphs either way
    canon = WeightToGraph(canonicalize=True)
    cp = permute_graph(canon.to_graph(spec, sd), torch.Generator().manual_seed(3))
    cref = canon.to_graph(spec, permute_hidden(spec, sd, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(cp.edge_attr, cref.edge_attr)
    torch.testing.assert_close(cp.x, cref.x)
    act = spec.layers[0].activation
    for op, applies in ((rescale_graph, act in A.POSITIVE_HOMOGENEOUS), (flip_signs_graph, act in A.ODD),
                        (permute_graph, True)):
        out = op(data, torch.Generator().manual_seed(4))
        assert torch.equal(out.edge_attr, data.edge_attr) != applies
        _, sd_out = conv.to_state_dict(out)
        assert_same_outputs(spec, sd, sd_out, x)


def test_augmenter_symmetry_only_views_preserve_function(trained_models, model_inputs):
    aug = SymmetryAugmenter(noise_std=0.0, edge_dropout=0.0, prune_fraction=0.0, rescale_range=(0.3, 3.0))
    g = torch.Generator().manual_seed(5)
    for name in FAMILIES:
        spec, sd = trained_models[name]
        v = aug.view(spec, sd, g)
        assert changed(sd, v)
        assert_same_outputs(spec, sd, v, model_inputs(spec))


def test_augmenter_weight_changing_views(trained_models, model_inputs):
    spec, sd = trained_models["cnn2_leaky_k3_hidden"]
    x = model_inputs(spec)
    g = torch.Generator().manual_seed(6)
    pruned = SymmetryAugmenter(False, False, False, 0.0, 0.0, 0.3).view(spec, sd, g)
    for i, layer in enumerate(spec.layers):
        w = pruned[f"layers.{i}.weight"]
        assert (w == 0).sum().item() == int(0.3 * w.numel())
        kept = w[w != 0].abs().min()
        assert kept >= sd[f"layers.{i}.weight"].abs().flatten().sort().values[int(0.3 * w.numel()) - 1]
    dropped = SymmetryAugmenter(False, False, False, 0.0, 0.5, 0.0).view(spec, sd, g)
    w = dropped["layers.1.weight"]  # conv (8, 8, 3, 3): whole kernels dropped
    zero_kernels = (w.flatten(2).abs().sum(-1) == 0)
    assert 0.3 < zero_kernels.float().mean() < 0.7
    assert ((w.flatten(2) == 0).all(-1) == zero_kernels).all()
    noisy = SymmetryAugmenter(False, False, False, 0.05, 0.0, 0.0).view(spec, sd, g)
    ratio = noisy["layers.0.weight"] / sd["layers.0.weight"]
    assert 0.02 < (ratio - 1).std() < 0.08
    y, yn = A.forward(spec, sd, x), A.forward(spec, noisy, x)
    assert 0 < (y - yn).abs().max() / y.abs().max() < 0.5  # a nearby, different function


def test_augment_graph(trained_models, model_inputs):
    spec, sd = trained_models["cnn3_tanh_k5"]
    conv = WeightToGraph(canonicalize=True)
    data = conv.to_graph(spec, sd)
    g = torch.Generator().manual_seed(7)
    # permutation only: same function, same multiset of node features, same structure
    v = SymmetryAugmenter(True, True, True, 0.0, 0.0, 0.0).augment_graph(data, g)
    assert torch.equal(v.edge_index, data.edge_index) and not torch.equal(v.x, data.x)
    assert torch.equal(v.x.sort(0).values, data.x.sort(0).values)
    _, sd_v = conv.to_state_dict(v)
    assert_same_outputs(spec, sd, sd_v, model_inputs(spec))
    # weight-changing views act on edge_attr/x and keep padding slots zero (the inverse still works)
    aug = SymmetryAugmenter(False, False, False, 0.05, 0.2, 0.25)
    w = aug.augment_graph(data, g)
    assert data.edge_attr.data_ptr() != w.edge_attr.data_ptr()
    _, sd_w = conv.to_state_dict(w)
    for i in range(len(spec.layers)):
        n = sd_w[f"layers.{i}.weight"].numel()
        assert (sd_w[f"layers.{i}.weight"] == 0).sum() >= int(0.25 * n)
    assert not torch.equal(w.x, data.x)
    # a non-canonical pipeline also gets scale/sign views on the graph
    raw = WeightToGraph(canonicalize=False).to_graph(spec, sd)
    s = SymmetryAugmenter(False, True, True, 0.0, 0.0, 0.0).augment_graph(raw, g, canonical=False)
    assert not torch.equal(s.x, raw.x)
    _, sd_s = conv.to_state_dict(s)
    assert_same_outputs(spec, sd, sd_s, model_inputs(spec))


def test_augmenter_from_config():
    from config import AugmentConfig
    cfg = AugmentConfig()
    aug = SymmetryAugmenter.from_config(cfg)
    assert aug.noise_std == cfg.noise_std and aug.rescale_range == (cfg.rescale_low, cfg.rescale_high)
    assert aug.erase_fraction == cfg.erase_fraction


# --- seed 004's erasing ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_shapes(digits_data) -> dict:
    """A max-pooled flatten-head CNN and a residual CNN (the zoo's published shapes), trained on digits."""
    X, y = digits_data
    specs = {"cnn_bn_flat": cnn_bn_spec((1, 8, 8), (4, 8), 16, 10), "resnet": resnet_spec((1, 8, 8), 4, 1, 10)}
    return {name: (spec, train_small(spec, X.view(-1, 1, 8, 8), y, seed=7, epochs=40)) for name, spec in specs.items()}


def test_erase_spans_cover_one_contiguous_span():
    g = torch.Generator().manual_seed(0)
    sizes = [7, 3, 12, 1, 5]
    for _ in range(20):
        spans = erase_spans(sizes, 0.3, g)
        hit = torch.cat([(torch.arange(s) >= a) & (torch.arange(s) < b) for s, (a, b) in zip(sizes, spans)]).nonzero()
        assert len(hit) == round(0.3 * sum(sizes)) and bool((hit.flatten().diff() == 1).all())


@pytest.mark.parametrize("name", ["mlp2_leaky", "cnn2_relu_k3", "cnn_bn_flat", "resnet"])
def test_erasing_zeroes_one_span_of_the_state_dict_at_both_levels(trained_models, published_shapes, name):
    spec, sd = {**trained_models, **published_shapes}[name]
    aug = SymmetryAugmenter(permute=False, rescale=False, sign_flip=False, noise_std=0.0, edge_dropout=0.0,
                            erase_fraction=0.2)
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in spec.param_shapes()])  # noqa: E731  state-dict order
    clean = flat(sd)
    assert bool((clean != 0).all()), "trained weights have no exact zeros (the test counts the erased ones)"
    conv = WeightToGraph(canonicalize=False)
    views = {"state_dict": flat(aug.perturb(spec, sd, torch.Generator().manual_seed(1))),
             "graph": flat(conv.to_state_dict(aug.augment_graph(conv.to_graph(spec, sd),
                                                                torch.Generator().manual_seed(1)))[1])}
    for level, v in views.items():  # (to_state_dict also checks that shortcut edges stay the identity)
        zero = torch.nonzero(v == 0).flatten()
        assert zero.numel() == round(0.2 * clean.numel()) and bool((zero.diff() == 1).all()), level
        assert torch.equal(v[v != 0], clean[v != 0]), f"{level}: only the span changes"
