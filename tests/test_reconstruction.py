"""Weight reconstruction (hyper-representations): seed 004's views, the decoder and its loss, rebuilt networks."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import architecture as A
import contrastive_learning as C
import dataloader as D
import reconstruction as R
from config import TrainConfig
from conftest import train_small
from ddp_worker import FlatMLP, make_toy_zoo
from gnn_encoder import build_encoder
from runtime import single_process
from symmetry import SymmetryAugmenter, permute_graph
from weight_to_graph import WeightToGraph
from zoo_plan import cnn_bn_spec, resnet_spec

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = WeightToGraph()  # canonical, max_kernel 5


def _flat(spec: A.ArchitectureSpec, sd: dict) -> torch.Tensor:
    return torch.cat([sd[k].reshape(-1) for k in spec.param_shapes()])


def _weights(g, x: torch.Tensor, edge_attr: torch.Tensor):
    """Graph ``g`` holding other weights (same structure)."""
    out = copy.copy(g)
    out.x, out.edge_attr = x, edge_attr
    return out


@pytest.fixture(scope="module")
def extended_models(digits_data) -> dict:
    """A flatten-head CNN with max pooling and a residual CNN, trained on digits (the zoo's published shapes)."""
    X, y = digits_data
    Xi = X.view(-1, 1, 8, 8)
    specs = {"cnn_bn_flat": cnn_bn_spec((1, 8, 8), (4, 8), 16, 10), "resnet": resnet_spec((1, 8, 8), 4, 1, 10)}
    return {name: (spec, train_small(spec, Xi, y, seed=7, epochs=40)) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def all_models(trained_models, extended_models) -> dict:
    return {**trained_models, **extended_models}


# ----------------------------------------------------------------------------- seed 004's views
def test_symmetry_views_move_the_targets_with_the_weights(trained_models, model_inputs):
    spec, sd = trained_models["mlp3_tanh"]
    g = R.attach_targets(CONV.to_graph(spec, sd))
    aug = SymmetryAugmenter(permute=True, rescale=True, sign_flip=True, noise_std=0.1, erase_fraction=0.1)
    v = aug.augment_graph(g, torch.Generator().manual_seed(3), canonical=False)
    X = model_inputs(spec)
    target = CONV.to_state_dict(_weights(v, v.target_x, v.target_edge_attr))[1]
    want = A.forward(spec, CONV.to_state_dict(g)[1], X)
    torch.testing.assert_close(A.forward(spec, target, X), want, atol=1e-4, rtol=1e-4)  # the clean network
    assert not torch.equal(v.target_x, g.x), "the permutation moved the targets"
    assert not torch.allclose(A.forward(spec, CONV.to_state_dict(v)[1], X), want, atol=1e-3), "the input is perturbed"


# ----------------------------------------------------------------------------- decoder output -> networks
def _encoder(name: str) -> torch.nn.Module:
    """A small encoder by name; "weightnet_row_codes": WeightNet with address-coded tokens."""
    torch.manual_seed(0)
    kw = {"row_codes": True} if name == "weightnet_row_codes" else {}
    return build_encoder(name.replace("_row_codes", ""), hidden_dim=16, global_dim=16, projection_dim=8,
                         message_passing_steps=1, edge_dim=CONV.edge_dim, **kw)


@pytest.mark.parametrize("name", ["mlp1_relu", "mlp3_tanh", "mlp1_gelu", "cnn2_relu_k3", "cnn3_tanh_k5",
                                  "cnn2_leaky_k3_hidden", "cnn_bn_flat", "resnet"])
def test_exact_decoder_output_rebuilds_the_original_network(all_models, model_inputs, name):
    """The decoder's targets fed through decoded_weights and the inverse converter give back the network."""
    spec, sd = all_models[name]
    g = R.attach_targets(CONV.to_graph(spec, sd))
    batch = Batch.from_data_list([g, g])  # two graphs: the per-graph segments are exercised
    enc = _encoder("weightnet")
    _, f = enc.node_states(batch)
    t = R.standardized_targets(batch, f)
    oracle_w, oracle_node = t.w, torch.stack([t.b, t.log_scale[:, 0], t.log_scale[:, 1]], dim=1)
    x, ea = R.decoded_weights(oracle_w, oracle_node, batch, f)
    rebuilt = CONV.to_state_dict(_weights(g, x[:g.num_nodes], ea[:g.num_edges]))[1]
    X = model_inputs(spec)
    torch.testing.assert_close(A.forward(spec, rebuilt, X), A.forward(spec, sd, X), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("encoder", ["weightnet_row_codes", "gnn"])
def test_decoder_output_rebuilds_a_network_that_computes_what_it_says(all_models, model_inputs, encoder):
    """A trained model through encoder + decoder (a few steps of training on the real objective): the rebuilt
    networks have the spec's shapes, no weight outside the kernel windows (masking), exactly the decoded weights,
    and the quality report's R^2 and accuracies are those of these networks."""
    names = ["mlp2_leaky", "cnn2_relu_k3", "cnn_bn_flat", "resnet"]
    graphs = [CONV.to_graph(*all_models[n][:2], model_idx=i) for i, n in enumerate(names)]
    enc = _encoder(encoder)
    obj = R.Reconstruction.for_encoder(enc, hidden_dim=16)
    batch = Batch.from_data_list([R.attach_targets(g) for g in graphs])
    opt = torch.optim.Adam([*enc.parameters(), *obj.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = obj(enc, batch)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # the objective trains

    recons = R.reconstruct(enc, obj, graphs, torch.device("cpu"), batch_size=3)
    raw = WeightToGraph(canonicalize=False)
    flats = []
    for name, g, r in zip(names, graphs, recons):
        spec, sd_r = CONV.to_state_dict(r)  # raises on a nonzero weight outside a kernel window
        assert {k: tuple(v.shape) for k, v in sd_r.items()} == spec.param_shapes()
        mask, residual = R.weight_layout(g.spec_json, CONV.max_kernel)
        assert torch.count_nonzero(r.edge_attr[~mask]) == int(residual.sum()), "padding is zero, shortcuts identity"
        again = raw.to_graph(spec, sd_r)  # the rebuilt network holds exactly the decoded weights
        assert torch.equal(again.x, r.x) and torch.equal(again.edge_attr, r.edge_attr), name
        flats.append((_flat(spec, CONV.to_state_dict(g)[1]).double(), _flat(spec, sd_r).double()))
    X, y = model_inputs(A.mlp_spec(64, [1], 10, "relu"), 200), torch.arange(200) % 10
    inputs = [X.view(-1, *all_models[n][0].input_shape) for n in names]
    q = R.reconstruction_quality(graphs, recons, CONV, lambda i: (inputs[i], y))
    for i, (w, w_hat) in enumerate(flats):
        assert q["r2"][i] == pytest.approx(1 - ((w - w_hat) ** 2).sum().item() / ((w - w.mean()) ** 2).sum().item())
        spec, sd_r = CONV.to_state_dict(recons[i])
        acc = (A.forward(spec, sd_r, inputs[i]).argmax(1) == y).double().mean().item()
        assert q["acc_reconstructed"][i] == pytest.approx(acc)
    assert q["mean_acc_drop"] == pytest.approx(np.mean(q["acc_original"]) - np.mean(q["acc_reconstructed"]))


def test_part_quality_scores_each_part_against_its_own_targets(all_models, monkeypatch):
    """The diagnosis per part: a decoder that outputs the targets scores R^2 1 and log-scale MSE 0 on every part;
    one that outputs zero weights (but true biases) scores R^2 <= 0 on both weight parts and 1 on the biases."""
    graphs = [CONV.to_graph(*all_models[n][:2]) for n in ("mlp2_leaky", "cnn2_relu_k3", "resnet")]
    enc = _encoder("weightnet_row_codes")
    obj = R.Reconstruction.for_encoder(enc, hidden_dim=16)

    def oracle(zero_weights: bool):
        def decode(encoder, batch):
            h, f = encoder.node_states(batch)
            t = R.standardized_targets(batch, f)
            node = torch.stack([t.b, t.log_scale[:, 0], t.log_scale[:, 1]], dim=1)
            return encoder.readout(h, f), torch.zeros_like(t.w) if zero_weights else t.w, node, f
        return decode

    monkeypatch.setattr(obj, "decode", oracle(False))
    exact = R.part_quality(enc, obj, graphs, torch.device("cpu"), batch_size=2)
    assert exact == pytest.approx({"w_first": 1.0, "w_later": 1.0, "bias": 1.0, "log_scale_mse": 0.0}, abs=1e-6)
    monkeypatch.setattr(obj, "decode", oracle(True))
    zero = R.part_quality(enc, obj, graphs, torch.device("cpu"), batch_size=2)
    assert zero["w_first"] <= 0 and zero["w_later"] <= 0 and zero["bias"] == pytest.approx(1.0)


def test_summarized_flatten_heads_are_refused():
    spec = cnn_bn_spec((1, 28, 28), (4, 8), 16, 10)  # 7x7 blocks: summarized under K = 5, not invertible
    with pytest.raises(ValueError, match="7x7 flatten blocks"):
        R.weight_layout(spec.to_json(), 5)


@pytest.mark.parametrize("encoder,invariant", [("weightnet", True), ("weightnet_row_codes", True), ("gnn", True),
                                               ("nonequivariant_gnn", False)])
def test_permutation_is_a_no_op_for_equivariant_encoders_only(trained_models, encoder, invariant):
    """Why seed 004's permutation view is drawn for nonequivariant_gnn only: one forward pass on a trained model
    and its permuted copy (targets permuted with it) gives the same embedding and loss for gnn and weightnet."""
    spec, sd = trained_models["mlp2_leaky"]
    g = R.attach_targets(CONV.to_graph(spec, sd))
    p = permute_graph(g, torch.Generator().manual_seed(5))
    enc = _encoder(encoder).eval()
    obj = R.Reconstruction.for_encoder(enc, hidden_dim=16).eval()
    with torch.no_grad():
        (z1, l1), (z2, l2) = obj(enc, Batch.from_data_list([g])), obj(enc, Batch.from_data_list([p]))
    same = torch.allclose(z1, z2, atol=1e-5, rtol=1e-4) and abs(l1.item() - l2.item()) <= 1e-5 * max(1.0, l1.item())
    assert same == invariant, (z1 - z2).abs().max()


# ----------------------------------------------------------------------------- in the training loop
def test_learner_objective_is_the_beta_mix(trained_models):
    spec, sd = trained_models["mlp1_relu"]
    graphs = [CONV.to_graph(spec, A.build_model(spec, sd).state_dict())] * 2
    batch = Batch.from_data_list([R.attach_targets(g) for g in graphs])
    meta = {"task": torch.zeros(2, dtype=torch.long), "family": torch.zeros(2, dtype=torch.long)}
    enc = _encoder("weightnet")
    obj = R.Reconstruction.for_encoder(enc, 16)
    out = C.ContrastiveLearner(enc, C.NTXentLoss(), reconstruction=obj, recon_beta=0.25)(batch, batch, meta)
    assert out["rec"].item() > 0
    assert out["loss"].item() == pytest.approx(0.75 * out["con"].item() + 0.25 * out["rec"].item(), rel=1e-6)
    plain = C.ContrastiveLearner(enc, C.NTXentLoss())(batch, batch, meta)
    assert plain["loss"].item() == pytest.approx(out["con"].item(), rel=1e-6) and plain["rec"].item() == 0
    for kw in ({"recon_beta": 0.5}, {"reconstruction": obj}, {"reconstruction": obj, "recon_beta": 1.5}):
        with pytest.raises(ValueError, match="recon_beta"):
            C.ContrastiveLearner(enc, C.NTXentLoss(), **kw)


def test_fit_contrastive_adds_reconstruction_with_beta():
    graphs, meta = make_toy_zoo(n_tasks=3, runs_per_task=6, ckpts=2, seed=2)
    split = D.split_by_run(meta, 0.0, 0.0, seed=0)
    view_fn = D.make_view_fn("noise", SymmetryAugmenter(permute=False, noise_std=0.05, edge_dropout=0.0,
                                                        erase_fraction=0.1))
    make = lambda: build_encoder("weightnet", hidden_dim=16, global_dim=16, projection_dim=8,  # noqa: E731
                                 message_passing_steps=1, edge_dim=1)
    fits = {}
    for beta in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        train = dataclasses.replace(TrainConfig(), batch_size=8, recon_beta=beta, decoder_dim=16)
        fits[beta] = C.fit_contrastive(make(), graphs, meta, split, "noise", train, single_process("cpu"), seed=0,
                                       epochs=2, view_fn=view_fn)
    assert fits[0.0].reconstruction is None and fits[0.0].history["train_rec_loss"] == [0.0, 0.0]
    for beta in (0.5, 1.0):
        h = fits[beta].history
        assert fits[beta].reconstruction is not None and min(h["train_rec_loss"]) > 0
        assert h["train_loss"][0] == pytest.approx((1 - beta) * h["train_con_loss"][0] + beta * h["train_rec_loss"][0])
    with pytest.raises(ValueError, match="graph encoder"):
        C.fit_contrastive(FlatMLP(10), graphs, meta, split, "noise", dataclasses.replace(train, recon_beta=0.5),
                          single_process("cpu"), seed=0, epochs=1, view_fn=view_fn, transform=lambda d: d.x.view(1, -1))


# ----------------------------------------------------------------------------- the stage and its report
@pytest.fixture(scope="module")
def hyperreps_run(tmp_path_factory):
    """The hyperreps stage on a tiny real zoo (betas 0 and 1, one epoch each), evaluated and rendered."""
    import evaluation as E
    import hyperreps as H
    import stages as S
    from config import config_from_dict
    from data_prep import ModelZooDataset
    from report import RunRecorder, render_markdown

    d = tmp_path_factory.mktemp("hyperreps")
    tasks = ["digits", "digits_perm_a", "digits_rot90", "digits_parity", "iris", "iris_perm"]
    zoo = ModelZooDataset.create_synthetic_model_zoo(None, num_models=36, epochs=4, checkpoints_per_run=2, seed=5,
                                                     group_size=6, cnn_fraction=0.2, tasks=tasks)
    graphs = CONV.convert_model_to_graphs(zoo)
    cfg = config_from_dict({
        "encoder": {"hidden_dim": 16, "global_dim": 16, "projection_dim": 8, "message_passing_steps": 1},
        "train": {"batch_size": 8, "val_fraction": 0.0, "test_fraction": 0.25},
        "eval": {"probes": ["ridge"], "property_targets": ["test_acc", "epoch", "log_lr"], "within_task_min_models": 2},
        "recon": {"hyperreps": True, "hyperreps_betas": [0.0, 1.0], "hyperreps_epochs": 1, "hyperreps_hidden_dim": 16}})
    rec = RunRecorder(d, {}, write=False)
    split = S.make_splits(cfg, zoo, rec)[S.eval_seeds(cfg)[0]]
    methods = H.train_hyperreps(cfg, zoo, graphs, split, 0, single_process("cpu"), d / "checkpoints", rec)
    statnn = S.baseline_embeddings(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, methods=["statnn"])),
                                   zoo, split, 0, rec)
    per_seed = {m: [S.evaluate_method(cfg, zoo, split, emb, 0)] for m, emb in {**methods.embeddings,
                                                                              **statnn.embeddings}.items()}
    rec.results["methods"] = {m: E.aggregate_seeds(v) for m, v in per_seed.items()}
    return zoo, split, methods, rec.results, render_markdown(rec.results)


def test_hyperreps_stage_trains_every_beta_and_measures_reconstruction(hyperreps_run):
    zoo, split, methods, results, _ = hyperreps_run
    names = ["weightnet [hyperreps untrained]", "weightnet [hyperreps beta=0]", "weightnet [hyperreps beta=1]"]
    assert list(methods.embeddings) == names
    assert all(e.shape == (len(zoo), 16) for e in methods.embeddings.values())
    h = results["hyperreps"]
    assert set(h["reconstruction"]) == {names[2]}, "beta 0 has no decoder"
    q = h["reconstruction"][names[2]]
    query = np.concatenate(list(split.query_sets.values()))
    assert len(split.heldout) and not np.isin(query, split.selection_rows).any()
    assert h["n_query_models"] == len(query) and q["n_models"]["mean"] == len(query)
    # the originals rebuilt through the inverse converter score their recorded test accuracy (canonical form
    # computes the same function; near-tied logits aside)
    recorded = zoo.metadata["test_acc"].to_numpy()[query].mean()
    assert q["mean_acc_original"]["mean"] == pytest.approx(recorded, abs=0.01)
    assert -1.0 < q["mean_r2"]["mean"] < 1.0 and 0.0 <= q["mean_acc_reconstructed"]["mean"] <= 1.0
    assert results["training"][names[1]]["0"]["train_rec_loss"] == [0.0]
    assert results["training"][names[2]]["0"]["train_rec_loss"][0] > 0


def test_hyperreps_report_section_equals_json(hyperreps_run):
    from report import fmt

    *_, results, md = hyperreps_run
    section = md.split("## Hyper-representations")[1]
    table = section.split("### Property prediction")[1].split("###")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    header = rows[0]
    assert header[0] == "method" and "epoch tau" in header and "log_lr R2" in header
    body = {r[0]: r for r in rows[2:] if r[0] in results["methods"]}
    assert {"weightnet [hyperreps untrained]", "weightnet [hyperreps beta=0]", "weightnet [hyperreps beta=1]",
            "statnn", "shape_only"} == set(body)
    for m, row in body.items():
        for col, cell in zip(header[1:], row[1:]):
            target, kind = col.split(" ", 1)
            key = {"R2": "R2", "tau": "within_kendall", "tau final": "within_kendall_final"}[kind]
            props = results["methods"][m]["properties"][target]["ridge"]
            assert cell == (fmt(props[key]) if key in props else "—"), (m, col)
    q = results["hyperreps"]["reconstruction"]["weightnet [hyperreps beta=1]"]
    verdict = "meets" if q["mean_r2"]["mean"] >= 0.9 else "misses"
    assert f"reconstruction R2 {q['mean_r2']['mean']:.3f} ({verdict} the 0.9 target)" in section
    assert "Epoch and log_lr prediction (R2)" in section and "Epoch and log_lr prediction (tau)" in section
