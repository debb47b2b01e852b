"""The zoo's families of published shapes: Conv-BN-ReLU-MaxPool CNNs with a flatten head ("cnn-bn") and
small ResNet-style CNNs ("resnet", with and without BatchNorm).

Stacked (batched) training equals per-model torch training, BatchNorm included; the stored checkpoints
(BatchNorm folded, eval mode) compute what the BatchNorm network computes; zoo models of each family
convert to neuron graphs and back; the GNN embedding of a trained residual model is invariant to
channel permutations coupled across its shortcuts; and the encoders tell max from average pooling.
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
import zoo_plan as ZP
import zoo_training as ZT
from symmetry import permute_hidden, rescale_hidden
from weight_to_graph import WeightToGraph

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_dim=32, global_dim=48, projection_dim=16, message_passing_steps=2, dropout=0.0)
TASKS = ["digits", "digits_parity"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)


FAMILY_CASES = {  # name -> (spec, BatchNorm layers)
    "cnn-bn-max": (ZP.cnn_bn_spec((1, 8, 8), (4, 6), 12, 10, "max2"), (0, 1)),
    "cnn-bn-avg": (ZP.cnn_bn_spec((1, 8, 8), (4, 6), 12, 10, "avg2"), (0, 1)),
    "resnet-bn": (ZP.resnet_spec((1, 8, 8), 6, 1, 10), (0, 1, 2)),
    "resnet": (ZP.resnet_spec((1, 8, 8), 6, 2, 10), ()),
    "resnet2-bn": (ZP.resnet_spec((1, 8, 8), 6, 2, 10), (0, 1, 2, 3, 4)),
}
# Stacked == reference is checked where training is not chaotic. With BatchNorm after all 5 convs of a two-block
# net, Adam is: changing its lr by 2e-10 (relative) moves the reference's own weights by 1e-3 after 2 epochs
# (Adam's first steps are +-lr for coordinates whose gradient is rounding noise), so float rounding differences
# between the stacked and the per-model loop are amplified the same way; that case is compared with SGD only.


def _stacked_run(spec, bn_layers, epochs: int, sgd_only: bool = False):
    Xtr, ytr, _, _ = T.load_task_data("digits")
    X = T.inputs_for_spec(spec, Xtr)
    inits = [ZT.init_params(spec, s, 0.7 + 0.3 * s, bn_layers) for s in range(4)]
    init = {k: torch.stack([i[k] for i in inits]) for k in inits[0]}
    g = torch.Generator().manual_seed(0)
    rows = [torch.randperm(len(X), generator=g)[:n] for n in (300, 220, 300, 180)]  # unequal epochs: masked steps
    hp = dict(lr=torch.tensor([5e-3, 2e-2, 1e-2, 0.05]), weight_decay=torch.tensor([1e-4, 0.0, 1e-3, 1e-5]),
              use_adam=torch.tensor([True, False, True, False]))  # mixed optimizers in one stack
    if sgd_only:
        hp.update(lr=torch.tensor([0.03, 2e-2, 0.01, 0.05]), use_adam=torch.zeros(4, dtype=torch.bool))
    res = ZT.train_stacked(spec, init, X, ytr, rows, batch_size=32, epochs=epochs, batch_seeds=[10, 11, 12, 13],
                          checkpoint_epochs=[1, epochs], bn_layers=bn_layers, **hp)
    return X, ytr, rows, inits, hp, res


def _max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_stacked_training_equals_per_model_reference(case):
    spec, bn_layers = FAMILY_CASES[case]
    X, y, rows, inits, hp, res = _stacked_run(spec, bn_layers, epochs=2, sgd_only=case == "resnet2-bn")
    for m in range(4):
        def alone(epochs, init=inits[m]):
            return ZT.train_single_reference(spec, init, X, y, rows[m], batch_size=32, epochs=epochs,
                                             lr=float(hp["lr"][m]), weight_decay=float(hp["weight_decay"][m]),
                                             optimizer="adam" if hp["use_adam"][m] else "sgd", batch_seed=10 + m,
                                             bn_layers=bn_layers)

        state = (lambda e: {k: v[m] for k, v in (res.bn_state[e] if bn_layers else res.params[e]).items()})
        ref = alone(2)
        assert set(state(2)) == set(ref)
        # after one epoch (masked steps included) every family agrees to 1e-5
        assert _max_diff(state(1), alone(1)) < 1e-5, f"{case} model {m} epoch 1"
        # after two, float rounding (grouped vs single conv kernels) can be amplified by the run itself: then the
        # stacked result must lie no further from the reference than the reference moves for a 1e-6 change of
        # its init (measured: resnet2-bn model 3, 4.5e-5 vs 9.6e-4; everything else < 3e-6)
        d = _max_diff(state(2), ref)
        if d >= 1e-5:
            g = torch.Generator().manual_seed(0)
            nudged = {k: v + 1e-6 * torch.randn(v.shape, generator=g) if k.endswith("weight") else v
                      for k, v in inits[m].items()}
            sensitivity = _max_diff(alone(2, nudged), ref)
            assert d < sensitivity, f"{case} model {m}: {d:.2e} from the reference, which moves {sensitivity:.2e}"
        folded = ZT.fold_bn_state(spec, state(2)) if bn_layers else state(2)  # the stored weights are the fold
        for k in spec.param_shapes():
            assert torch.allclose(res.params[2][k][m], folded[k], atol=1e-6, rtol=1e-6), f"{case} model {m} {k} folded"
        assert not torch.allclose(ref["layers.1.weight"], inits[m]["layers.1.weight"]), "training did not move"
    if bn_layers:  # the running statistics really moved (so folding is not the identity) ...
        rv = res.bn_state[2][f"layers.{bn_layers[-1]}.bn_running_var"]
        assert (rv - 1).abs().max() > 0.05
        # ... and the model whose epoch ended first kept them unchanged through the masked steps (checked above)
    # the recorded metrics are those of the stored (folded, eval-mode) weights, for every model of the stack
    for m in range(4):
        acc = A.forward(spec, {k: v[m] for k, v in res.params[2].items()}, X[rows[m]]).argmax(1) == y[rows[m]]
        assert abs(acc.float().mean().item() - res.metrics[2]["train_acc"][m].item()) < 1e-6


@pytest.mark.parametrize("case", ["cnn-bn-max", "resnet2-bn"])
def test_folded_checkpoint_computes_the_batchnorm_network_in_eval_mode(case):
    spec, bn_layers = FAMILY_CASES[case]
    X, y, rows, _, _, res = _stacked_run(spec, bn_layers, epochs=6)
    _, _, Xte, yte = T.load_task_data("digits")
    for m in range(4):
        net = ZT.BatchNormSpecNet(spec, bn_layers, {k: v[m] for k, v in res.bn_state[6].items()})
        stored = {k: v[m] for k, v in res.params[6].items()}
        with torch.no_grad():
            out_bn = net.eval()(Xte)
            out_train_mode = net.train()(Xte)  # batch statistics (this also moves the running ones: last)
        out_folded = A.forward(spec, stored, Xte)
        assert not torch.allclose(out_bn, out_train_mode, atol=1e-2), "eval-mode BN equals batch statistics"
        assert torch.allclose(out_folded, out_bn, atol=1e-4, rtol=1e-4), (out_folded - out_bn).abs().max()
        assert torch.equal(out_folded.argmax(1), out_bn.argmax(1))
        acc = (out_bn.argmax(1) == yte).float().mean().item()
        assert acc > 0.3, f"{case} model {m} did not train (test acc {acc:.2f})"


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
        acc = (A.forward(model.spec, model.state_dict, T.inputs_for_spec(model.spec, Xte)).argmax(1) == yte)
        assert abs(acc.float().mean().item() - model.meta["test_acc"]) < 1e-6
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
