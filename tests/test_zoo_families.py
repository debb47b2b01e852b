"""The zoo's families of published shapes: Conv-BN-ReLU-MaxPool CNNs with a flatten head ("cnn-bn") and
small ResNet-style CNNs ("resnet", with and without BatchNorm).

A tiny zoo of the families has the metadata, model cards and metrics it should; its models convert to
neuron graphs and back; the GNN embedding of a trained residual model is invariant to channel permutations
coupled across its shortcuts; and the encoders tell max from average pooling. (Stacked training of these
families equals per-model torch training: tests/test_zoo_training.py.)
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import architecture as A
import data_prep as D
import encoder_blocks as EB
import gnn_encoder as G
import tasks as T
from conftest import assert_accuracy_of
from symmetry import permute_hidden, rescale_hidden
from weight_to_graph import WeightToGraph

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_dim=32, global_dim=48, projection_dim=16, message_passing_steps=2, dropout=0.0)
TASKS = ["digits", "digits_parity"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)


# ------------------------------------------------------------------------------ a tiny zoo of the families

@pytest.fixture(scope="module")
def family_zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo") / "families"
    D.ModelZooDataset.create_synthetic_model_zoo(
        d, num_models=16, epochs=4, checkpoints_per_run=1, seed=0, group_size=8, cnn_fraction=0.25,
        cnn_bn_fraction=0.375, resnet_fraction=0.375, tasks=TASKS)
    return D.ModelZooDataset.load(d)  # through the disk format


def _extended(zoo) -> list[int]:
    return [i for i in range(len(zoo)) if zoo.spec(i).is_extended]


def _first(zoo, pred) -> int:
    m = zoo.metadata
    idx = [i for i in range(len(zoo)) if pred(zoo.spec(i), m.iloc[i])]
    assert idx, "the tiny zoo lacks a model of this kind"
    return idx[0]


def test_family_zoo_metadata_cards_and_stored_metrics(family_zoo):
    zoo, m = family_zoo, family_zoo.metadata
    fams = set(m["arch_family"])
    assert any(f.startswith("rescnn") for f in fams) and "cnn-2c-flat" in fams and not any(f.startswith("mlp") for f in fams)
    assert m["batchnorm"].dtype == bool and m["batchnorm"].any()
    res_bn = set(m.loc[m["arch_family"].str.startswith("rescnn"), "batchnorm"])
    assert res_bn == {True, False}, f"the tiny zoo should hold residual nets with and without BatchNorm: {res_bn}"
    assert set(m.loc[m["arch_family"] == "cnn-2c-flat", "batchnorm"]) == {True}
    flat = m[m["arch_family"] == "cnn-2c-flat"]
    assert flat["model_card"].str.contains("BatchNorm").all() and flat["model_card"].str.contains("pooling 2x2").all()
    res = m[m["arch_family"].str.startswith("rescnn")]
    assert res["model_card"].str.contains("residual block").all()
    assert (res["model_card"].str.contains("BatchNorm") == res["batchnorm"]).all()
    assert len(_extended(zoo)) == 12 and not m["batchnorm"][[i for i in range(len(zoo)) if i not in _extended(zoo)]].any()
    for i in range(len(zoo)):  # stored specs are plain (pool/flatten/shortcut fields) and compute the recorded metric
        model = zoo[i]
        assert set(model.state_dict) == set(model.spec.param_shapes())
        _, _, Xte, yte = T.load_task_data(model.meta["task"])
        assert_accuracy_of(A.forward(model.spec, model.state_dict, T.inputs_for_spec(model.spec, Xte)), yte,
                           model.meta["test_acc"])
    chance = 1.0 / m["shape_group"].str.extract(r"out(\d+)")[0].astype(int)
    assert (m["test_acc"] > chance + 0.1).mean() >= 0.75, m[["arch_name", "batchnorm", "task", "lr", "test_acc"]]


@pytest.mark.parametrize("kind", ["flat", "res"])
def test_zoo_family_graph_round_trip(family_zoo, kind):
    zoo = family_zoo
    i = _first(zoo, lambda s, r: any(l.flatten for l in s.layers) if kind == "flat"
               else any(l.residual_from is not None for l in s.layers))
    spec, sd = zoo.spec(i), zoo.state_dict(i)
    _, _, Xte, _ = T.load_task_data(zoo.metadata["task"][i])
    for canon in (False, True):
        conv = WeightToGraph(max_kernel=5, canonicalize=canon)
        data = conv.to_graph(spec, sd, model_idx=i)
        spec2, sd2 = conv.to_state_dict(data)
        assert spec2 == spec
        if not canon:
            assert all(torch.equal(sd[k], sd2[k]) for k in sd)
        assert torch.allclose(A.forward(spec, sd, Xte), A.forward(spec2, sd2, Xte), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gnn", "weightnet"])
def test_embedding_invariant_to_coupled_permutation_of_trained_residual_model(family_zoo, name):
    zoo = family_zoo
    i = _first(zoo, lambda s, r: any(l.residual_from is not None for l in s.layers))
    spec, sd = zoo.spec(i), zoo.state_dict(i)
    assert spec.residual_groups(), "expected channels coupled by shortcuts"
    _, _, Xte, _ = T.load_task_data(zoo.metadata["task"][i])
    g = torch.Generator().manual_seed(0)
    sd2 = rescale_hidden(spec, permute_hidden(spec, sd, generator=g), generator=g, low=0.3, high=3.0)
    assert max((sd[k] - sd2[k]).abs().max() for k in sd) > 1e-2  # really different weights
    assert torch.allclose(A.forward(spec, sd, Xte), A.forward(spec, sd2, Xte), atol=1e-4, rtol=1e-4)
    # permuting the channels of one member of a shortcut group alone breaks the function: the coupling matters
    lone = dict(sd)
    j = spec.residual_groups()[0][-1]
    p = torch.roll(torch.arange(spec.layers[j].out_dim), 1)
    lone[f"layers.{j}.weight"], lone[f"layers.{j}.bias"] = sd[f"layers.{j}.weight"][p], sd[f"layers.{j}.bias"][p]
    nxt = f"layers.{j + 1}.weight"
    lone[nxt] = sd[nxt][:, p]
    assert not torch.allclose(A.forward(spec, sd, Xte), A.forward(spec, lone, Xte), atol=1e-3)
    conv = WeightToGraph(max_kernel=5, canonicalize=True)
    torch.manual_seed(0)
    enc = G.build_encoder(name, **SMALL).eval()
    with torch.no_grad():
        z = enc(Batch.from_data_list([conv.to_graph(spec, sd), conv.to_graph(spec, lone)]))
        z2 = enc(Batch.from_data_list([conv.to_graph(spec, sd2)]))
    assert _rel(z[:1], z2).max() < 1e-4
    assert _rel(z[:1], z[1:]).max() > 1e-4  # the broken network embeds differently


def _pool_twins(zoo) -> tuple[A.ArchitectureSpec, A.ArchitectureSpec, dict]:
    """A trained max-pooled cnn-bn zoo model and the same weights with average pooling."""
    i = _first(zoo, lambda s, r: any(l.pool for l in s.layers))
    spec, sd = zoo.spec(i), zoo.state_dict(i)
    swap = {"max2": "avg2", "avg2": "max2"}
    twin = A.ArchitectureSpec(spec.input_shape, tuple(
        A.LayerSpec(**{**l.to_dict(), "pool": swap.get(l.pool, l.pool)}) for l in spec.layers), spec.name)
    return spec, twin, sd


@pytest.mark.parametrize("name", G.ENCODER_NAMES)
def test_pooling_kind_changes_the_embedding(family_zoo, name):
    spec, twin, sd = _pool_twins(family_zoo)
    conv = WeightToGraph(max_kernel=5, canonicalize=True)
    a, b = conv.to_graph(spec, sd), conv.to_graph(twin, sd)
    assert torch.equal(a.edge_attr, b.edge_attr) and torch.equal(a.x, b.x)  # only the pooling differs
    torch.manual_seed(0)
    enc = G.build_encoder(name, **SMALL).eval()
    with torch.no_grad():
        z = enc(Batch.from_data_list([a, b]))
    assert _rel(z[:1], z[1:]).item() > 1e-3, "max- and average-pooled networks embed the same"
    # the difference is the pooling feature: zero its tables and the twins embed alike again
    with torch.no_grad():
        enc.node_encoder.pool_kind.weight.zero_()
        enc.node_encoder.pool_size.weight.zero_()
        z0 = enc(Batch.from_data_list([a, b]))
    assert _rel(z0[:1], z0[1:]).item() < 1e-5


@pytest.mark.parametrize("name", G.ENCODER_NAMES)
def test_extended_graphs_batch_independent_and_old_encoders_load(family_zoo, name, tmp_path):
    zoo = family_zoo
    conv = WeightToGraph(max_kernel=5, canonicalize=True)
    ext = [conv.to_graph(zoo.spec(i), zoo.state_dict(i), model_idx=i) for i in _extended(zoo)[::3]]
    plain = [conv.to_graph(zoo.spec(i), zoo.state_dict(i), model_idx=i) for i in range(len(zoo))
             if not zoo.spec(i).is_extended][:3]
    assert len(ext) >= 3 and len(plain) == 3
    torch.manual_seed(0)
    enc = G.build_encoder(name, **SMALL).eval()
    with torch.no_grad():
        alone = torch.cat([enc(Batch.from_data_list([d])) for d in ext + plain])
        mixed = enc(Batch.from_data_list([plain[0], *ext, *plain[1:]]))
    assert torch.allclose(alone, mixed[[*range(1, len(ext) + 1), 0, *range(len(ext) + 1, len(mixed))]], atol=1e-5,
                          rtol=1e-4)
    # an encoder saved before the pooling/edge-flag tables loads (zero tables) and embeds plain graphs as before
    path = tmp_path / "old.pt"
    G.save_encoder(str(path), enc)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items()
                         if not any(k == f"node_encoder.{t}.weight" for t in EB.NodeEncoder._EXTENSION_TABLES)}
    assert len(raw["state_dict"]) == len(enc.state_dict()) - 3
    torch.save(raw, path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = G.load_encoder(str(path)).eval()
    assert any("saved before pooling" in str(x.message) for x in w)
    with torch.no_grad():
        assert torch.equal(old(Batch.from_data_list(plain)), enc(Batch.from_data_list(plain)))
        assert old.node_encoder.pool_kind.weight.abs().sum() == 0
    assert np.isfinite(old(Batch.from_data_list(ext)).detach().numpy()).all()
