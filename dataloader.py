"""Datasets, splits, positive pairs and (distributed) samplers over cached neuron graphs.

The contrastive loop consumes ``(view1, view2, meta)`` batches. This module builds them:

* :func:`draw_split` draws one evaluation seed's split: a whole task kind held out (unseen_kinds),
  per shape group test-unseen tasks (reported, never read by any choice) and val-unseen tasks (model
  selection), and :func:`split_by_run` splits the seen tasks by *training run* (several checkpoints of
  one run never straddle two splits). :func:`selection_subset` is all training and selection may read.
* :class:`PositivePairs` picks, for every anchor model, the model its second view comes from,
  according to the *view recipe* (:data:`VIEW_RECIPES`):

  ==========  ===================================================  ==================
  recipe      positive of model i                                  views
  ==========  ===================================================  ==================
  symmetry    i itself                                             permute/rescale/sign
  noise       i itself                                             noise/dropout/prune
  checkpoint  another checkpoint of i's training run               + noise (if given)
  seed        another run, same task+arch+hyperparameters+epoch,   + noise (if given)
              different seed (falls back to same task+arch)
  supcon      another run of the same task (weakly supervised:     + noise (if given)
              the loss also treats every same-task model as a
              positive)
  ==========  ===================================================  ==================

  For an exactly invariant encoder (ModelEmbedder on canonical graphs) the two "symmetry"
  views encode to the *same* embedding, so the positive term is constant and the loss only
  pushes models apart (uniformity, no alignment): nothing about function is taught. It is
  kept as the control the research question needs; for a non-invariant encoder it teaches
  the invariance.

* :class:`ContrastivePairDataset` yields ``(view1, view2, meta)`` for a key ``(epoch, i)``;
  views and partners are drawn from a generator seeded by ``(seed, epoch, i)`` only, so data
  order and views are reproducible and a resumed run continues exactly.
* :class:`ShardedSampler` shuffles with ``(seed, epoch)`` and shards ``rank::world_size`` like
  ``torch.utils.data.DistributedSampler`` (the global batch ``b * world_size`` holds the same
  models as a single process's batch of that size).

Views can be PyG ``Data`` (GNN encoders) or tensors (flat-weight encoders, via ``transform``);
:func:`collate_pairs` batches either.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch_geometric.data import Batch, Data

VIEW_RECIPES: tuple[str, ...] = ("symmetry", "noise", "checkpoint", "seed", "supcon")
# recipes that use no label: the purely self-supervised ones
SELF_SUPERVISED_RECIPES: tuple[str, ...] = ("symmetry", "noise", "checkpoint", "seed")
# hyperparameter columns that define "the same configuration" for the seed recipe
CONFIG_COLUMNS: tuple[str, ...] = ("task", "arch_id", "lr", "weight_decay", "init_scale", "optimizer",
                                   "batch_size", "train_fraction")

ViewFn = Callable[[Data, torch.Generator], Data]


def _require_columns(meta_df: pd.DataFrame, cols: Sequence[str], who: str) -> None:
    missing = [c for c in cols if c not in meta_df.columns]
    if missing:
        raise ValueError(f"{who}: zoo metadata lacks column(s) {missing}; has {list(meta_df.columns)}")


def check_recipe(recipe: str) -> str:
    """Return ``recipe`` or raise naming the known ones."""
    if recipe not in VIEW_RECIPES:
        raise ValueError(f"unknown view recipe {recipe!r}; choose one of {VIEW_RECIPES}")
    return recipe


def item_generators(seed: int, epoch: int, index: int) -> tuple[torch.Generator, np.random.Generator]:
    """Generators (torch, numpy) that depend only on (seed, epoch, index)."""
    ss = np.random.SeedSequence([int(seed), int(epoch), int(index)])
    s_torch, s_np = ss.generate_state(2, dtype=np.uint64)
    g = torch.Generator()
    g.manual_seed(int(s_torch) & 0x7FFF_FFFF_FFFF_FFFF)
    return g, np.random.default_rng(int(s_np))


# --------------------------------------------------------------------------- splits
def task_kinds(task: str) -> tuple[str, ...]:
    """The kinds a registry task belongs to (the unseen_kinds protocol holds out every task of one kind).

    The one place the split reads task kinds (``tasks.TaskSpec.kinds``): a composed task is in every kind
    it uses.
    """
    from tasks import get_task

    try:
        return get_task(task).kinds
    except (KeyError, ValueError) as e:
        raise KeyError(f"task {task!r} is neither in the task registry nor a task name of its grammar ({e}): its "
                       f"kind is unknown; pass kinds_of to draw_split for other tasks, or unseen_kind='' to hold out "
                       f"no kind") from e


def eligible_unseen_kinds(tasks: Sequence[str], kinds_of: Callable[[str], Sequence[str]],
                          max_fraction: float) -> list[str]:
    """Kinds that can be held out whole: at least 2 of ``tasks`` and at most ``max_fraction`` of them
    (holding out a larger kind would take most of the training data with it). Sorted."""
    count: dict[str, int] = {}
    for t in tasks:
        for k in set(kinds_of(t)):
            count[k] = count.get(k, 0) + 1
    return sorted(k for k, n in count.items() if 2 <= n <= max_fraction * len(tasks))


def select_unseen_tasks(meta_df: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int,
                        exclude: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(test-unseen, val-unseen) tasks: per shape group of n tasks (``exclude`` left out of the count),
    ``round(test_fraction * n)`` test-unseen tasks (at least one) and ``round(val_fraction * n)``
    val-unseen ones (at least one when the fraction is > 0), never more than n - 2 in all: the encoders
    still train on every group. Groups of fewer than 3 tasks hold none out; test-unseen is served first."""
    for name, f in (("test-unseen", test_fraction), ("val-unseen", val_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} task fraction must be in [0, 1), got {f}")
    _require_columns(meta_df, ["task", "shape_group"], "select_unseen_tasks")
    rng = np.random.default_rng(seed)
    test: list[str] = []
    val: list[str] = []
    kept = meta_df[~meta_df["task"].isin(list(exclude))]
    for _, tasks in sorted(kept.groupby("shape_group")["task"].unique().items()):
        tasks = sorted(tasks)
        room = len(tasks) - 2
        if room < 1 or test_fraction == 0:
            continue
        n_test = min(room, max(1, int(round(test_fraction * len(tasks)))))
        n_val = min(room - n_test, max(1, int(round(val_fraction * len(tasks))))) if val_fraction > 0 else 0
        drawn = rng.choice(tasks, size=n_test + n_val, replace=False).tolist()
        test += drawn[:n_test]
        val += drawn[n_test:]
    return sorted(test), sorted(val)


def select_heldout_tasks(meta_df: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """Test-unseen tasks only (no val-unseen draw): see :func:`select_unseen_tasks`."""
    return select_unseen_tasks(meta_df, fraction, 0.0, seed)[0]


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Split:
    """Zoo row indices of one evaluation seed's split.

    Seen (training) tasks: their runs split into ``train`` / ``val`` / ``test``. Held out of training:
    ``val_unseen`` (every model of ``val_unseen_tasks``; model selection reads them), ``test_unseen``
    (``test_unseen_tasks``; reported, never read by any choice) and ``unseen_kind`` (every task of one
    kind, ``kind``; reported as the unseen_kinds protocol, never read by any choice).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_unseen: np.ndarray
    val_unseen: np.ndarray = field(default_factory=lambda: _EMPTY)
    unseen_kind: np.ndarray = field(default_factory=lambda: _EMPTY)
    test_unseen_tasks: tuple[str, ...] = ()
    val_unseen_tasks: tuple[str, ...] = ()
    unseen_kind_tasks: tuple[str, ...] = ()
    kind: str = ""  # the kind held out whole ("" = none)

    @property
    def heldout_tasks(self) -> tuple[str, ...]:
        """Every task held out of training (no label of theirs may enter it)."""
        return tuple(sorted(set(self.test_unseen_tasks) | set(self.val_unseen_tasks) | set(self.unseen_kind_tasks)))

    @property
    def heldout(self) -> np.ndarray:
        """Rows of every held-out task."""
        return np.sort(np.concatenate([self.test_unseen, self.val_unseen, self.unseen_kind]))

    @property
    def selection_rows(self) -> np.ndarray:
        """The rows training and every choice (recipe, epoch) may read: train, val and val-unseen."""
        return np.sort(np.concatenate([self.train, self.val, self.val_unseen]))

    @property
    def query_sets(self) -> dict[str, np.ndarray]:
        """The test-time query rows of each headline protocol (``evaluation.retrieval_protocols``)."""
        return {"seen_tasks": self.test, "unseen_tasks": self.test_unseen, "unseen_kinds": self.unseen_kind}

    def summary(self) -> dict[str, Any]:
        """JSON-able: the held-out tasks and kind, and the size of every part."""
        return {"test_unseen_tasks": list(self.test_unseen_tasks), "val_unseen_tasks": list(self.val_unseen_tasks),
                "unseen_kind": self.kind, "unseen_kind_tasks": list(self.unseen_kind_tasks),
                **{f"n_{k}": int(len(getattr(self, k)))
                   for k in ("train", "val", "test", "val_unseen", "test_unseen", "unseen_kind")}}


def split_by_run(meta_df: pd.DataFrame, val_fraction: float, test_fraction: float,
                 heldout_tasks: Sequence[str] = (), seed: int = 0, *, val_unseen_tasks: Sequence[str] = (),
                 unseen_kind_tasks: Sequence[str] = (), kind: str = "") -> Split:
    """Split zoo rows by training run, per task; held-out tasks go whole to their part.

    ``heldout_tasks`` are the test-unseen tasks; ``val_unseen_tasks`` and ``unseen_kind_tasks`` (the
    tasks of ``kind``) are held out too. Within each seen task the runs are shuffled (``seed``) and
    ``round(fraction * n_runs)`` go to val and test (at least one run always stays in train). All
    checkpoints of a run share its split; this is asserted.
    """
    _require_columns(meta_df, ["run_id", "task"], "split_by_run")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got val={val_fraction} test={test_fraction}")
    tasks_of_run = meta_df.groupby("run_id")["task"].nunique()
    if (tasks_of_run > 1).any():
        raise ValueError(f"runs with several tasks in the metadata: {tasks_of_run[tasks_of_run > 1].index[:5].tolist()}")
    parts = {"test_unseen": set(heldout_tasks), "val_unseen": set(val_unseen_tasks),
             "unseen_kind": set(unseen_kind_tasks)}
    unknown = set().union(*parts.values()) - set(meta_df["task"])
    if unknown:
        raise ValueError(f"held-out tasks {sorted(unknown)} are not in the zoo (tasks: {sorted(meta_df['task'].unique())})")
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if parts[a] & parts[b]:
                raise ValueError(f"tasks {sorted(parts[a] & parts[b])} are both {a} and {b}")
    rng = np.random.default_rng(seed)
    task = meta_df["task"].to_numpy()
    run = meta_df["run_id"].to_numpy()
    part_of_task = {t: p for p, ts in parts.items() for t in ts}
    run_split: dict[str, str] = {}
    for t in sorted(set(task) - set(part_of_task)):
        runs = np.array(sorted(set(run[task == t])))
        runs = runs[rng.permutation(len(runs))]
        n_val = int(round(val_fraction * len(runs)))
        n_test = int(round(test_fraction * len(runs)))
        while n_val + n_test >= len(runs) and (n_val or n_test):  # keep a training run
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        for i, r in enumerate(runs):
            run_split[r] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    where = np.array([part_of_task.get(t) or run_split[r] for r, t in zip(run, task)])
    out = {k: np.flatnonzero(where == k) for k in ("train", "val", "test", *names)}
    # no run in two splits; no held-out task outside its part
    seen: dict[str, str] = {}
    for k, idx in out.items():
        for r in set(run[idx]):
            assert seen.setdefault(r, k) == k, f"run {r} is in splits {seen[r]} and {k}"
    for k in ("train", "val", "test"):
        assert not np.isin(task[out[k]], list(part_of_task)).any(), f"a held-out task leaked into {k}"
    return Split(out["train"], out["val"], out["test"], out["test_unseen"], out["val_unseen"], out["unseen_kind"],
                 tuple(sorted(parts["test_unseen"])), tuple(sorted(parts["val_unseen"])),
                 tuple(sorted(parts["unseen_kind"])), kind)


def draw_split(meta_df: pd.DataFrame, seed: int, *, val_fraction: float, test_fraction: float,
               test_unseen_fraction: float, val_unseen_fraction: float, unseen_kind: str = "auto",
               kind_max_fraction: float = 0.34,
               kinds_of: Callable[[str], Sequence[str]] = task_kinds) -> Split:
    """One evaluation seed's split (the same for every method; each seed draws its own).

    1. ``unseen_kind``: every task of one kind is held out of training. ``"auto"`` draws the kind
       (``seed``) among :func:`eligible_unseen_kinds` (none eligible: no kind held out); ``""`` holds
       out none; any other value names the kind.
    2. Of the other tasks, per shape group, test-unseen and val-unseen tasks (:func:`select_unseen_tasks`).
    3. The remaining (seen) tasks' runs: train / val / test by run (:func:`split_by_run`).
    """
    _require_columns(meta_df, ["task", "shape_group", "run_id"], "draw_split")
    tasks = sorted(meta_df["task"].unique())
    rng = np.random.default_rng([seed, 14])  # the kind draw; independent of the task draws below
    if unseen_kind == "auto":
        eligible = eligible_unseen_kinds(tasks, kinds_of, kind_max_fraction)
        unseen_kind = str(rng.choice(eligible)) if eligible else ""
    kind_tasks = [t for t in tasks if unseen_kind and unseen_kind in kinds_of(t)]
    if unseen_kind and not kind_tasks:
        raise ValueError(f"unseen kind {unseen_kind!r}: no task of the zoo has that kind")
    test_unseen, val_unseen = select_unseen_tasks(meta_df, test_unseen_fraction, val_unseen_fraction, seed,
                                                  exclude=kind_tasks)
    return split_by_run(meta_df, val_fraction, test_fraction, test_unseen, seed, val_unseen_tasks=val_unseen,
                        unseen_kind_tasks=kind_tasks, kind=unseen_kind)


def selection_subset(graphs: Sequence[Any], meta_df: pd.DataFrame, split: Split
                     ) -> tuple[list[Any], pd.DataFrame, Split]:
    """What training and every choice made with it (view recipe, best epoch) may read: the graphs and
    metadata of ``split.selection_rows`` only (train, val, val-unseen), re-indexed from 0, and the split
    in those positions. Test runs, test-unseen and unseen-kind models are not in it, so selection code
    cannot read them."""
    rows = split.selection_rows
    pos = {int(r): i for i, r in enumerate(rows)}

    def remap(idx: np.ndarray) -> np.ndarray:
        return np.array([pos[int(r)] for r in idx], dtype=np.int64)

    sub = Split(remap(split.train), remap(split.val), _EMPTY, _EMPTY, remap(split.val_unseen), _EMPTY,
                val_unseen_tasks=split.val_unseen_tasks)
    return [graphs[int(r)] for r in rows], meta_df.iloc[rows].reset_index(drop=True), sub


# --------------------------------------------------------------------------- positives
class PositivePairs:
    """For each anchor (a position in ``indices``) the candidate positions of its positive.

    ``sample(pos, rng)`` draws one. Anchors without any candidate for the recipe use
    themselves (two views of one model); their count is ``n_self`` (callers log it).
    """

    def __init__(self, meta_df: pd.DataFrame, indices: Sequence[int], recipe: str):
        check_recipe(recipe)
        self.recipe = recipe
        idx = np.asarray(indices, dtype=np.int64)
        sub = meta_df.iloc[idx].reset_index(drop=True)
        n = len(sub)
        self.group = np.full(n, -1, dtype=np.int64)  # -1: the anchor is its own positive
        self.members: list[np.ndarray] = []
        self.run = np.zeros(n, dtype=np.int64)
        self.exclude_same_run = recipe in ("seed", "supcon")
        if recipe in ("symmetry", "noise"):
            self.n_self = n
            return
        _require_columns(sub, ["run_id", "task"], f"view recipe {recipe!r}")
        self.run = pd.factorize(sub["run_id"])[0].astype(np.int64)
        if recipe == "checkpoint":
            levels = [["run_id"]]
        elif recipe == "supcon":
            levels = [["task"]]
        else:  # seed: same configuration (and epoch) with another seed, else same task + architecture
            _require_columns(sub, list(CONFIG_COLUMNS) + ["epoch"], "view recipe 'seed'")
            levels = [list(CONFIG_COLUMNS) + ["epoch"], list(CONFIG_COLUMNS), ["task", "arch_id"]]
        for cols in levels:
            todo = np.flatnonzero(self.group < 0)
            if len(todo) == 0:
                break
            keys = sub.iloc[todo][cols].astype(str).agg("\x1f".join, axis=1).to_numpy()
            for key in np.unique(keys):
                mem = todo[keys == key]
                # with >= 2 runs in the group every member has a partner of another run
                ok = len(np.unique(self.run[mem])) > 1 if self.exclude_same_run else len(mem) > 1
                if ok:
                    self.members.append(mem)
                    self.group[mem] = len(self.members) - 1
        self.n_self = int((self.group < 0).sum())

    def sample(self, pos: int, rng: np.random.Generator) -> int:
        """Position of the positive of anchor ``pos``."""
        g = self.group[pos]
        if g < 0:
            return pos
        mem = self.members[g]
        cand = mem[self.run[mem] != self.run[pos]] if self.exclude_same_run else mem[mem != pos]
        return int(cand[rng.integers(len(cand))])


# --------------------------------------------------------------------------- datasets
class TaskVocab:
    """Task name <-> integer label over the *training* tasks only (held-out tasks have no label)."""

    def __init__(self, tasks: Sequence[str], heldout_tasks: Sequence[str] = ()):
        leak = set(tasks) & set(heldout_tasks)
        assert not leak, f"held-out tasks {sorted(leak)} must not get training labels"
        self.tasks = sorted(set(tasks))
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.heldout_tasks = tuple(sorted(heldout_tasks))

    def __len__(self) -> int:
        return len(self.tasks)

    def encode(self, tasks: Sequence[str]) -> np.ndarray:
        bad = sorted(set(tasks) - set(self.index))
        if bad:
            raise ValueError(f"tasks {bad} have no training label (held out or unseen in training): "
                             f"their labels must never enter training")
        return np.array([self.index[t] for t in tasks], dtype=np.int64)


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


class ContrastivePairDataset(Dataset):
    """``(view1, view2, meta)`` for anchor position i of ``indices``; key ``(epoch, i)`` or ``i``.

    Args:
        graphs: cached neuron graphs, one per zoo row (``WeightToGraph.convert_model_to_graphs``).
        meta_df: the zoo metadata (row j <-> graphs[j]).
        indices: zoo rows of this dataset (a split).
        recipe: one of :data:`VIEW_RECIPES`.
        view_fn: ``(data, generator) -> data`` applied to each view (see :func:`make_view_fn`);
            None leaves graphs unchanged.
        seed: views and partners depend only on (seed, epoch, i).
        task_vocab: training-task labels; a model of a task outside it is an error.
        transform: optional ``data -> input`` after the view (e.g. flatten for flat-weight encoders).

    meta holds ``index`` (zoo row), ``task`` (vocab label), ``family`` (task-family code),
    ``test_acc`` (nan when absent).
    """

    def __init__(self, graphs: Sequence[Data], meta_df: pd.DataFrame, indices: Sequence[int], recipe: str,
                 view_fn: ViewFn | None, seed: int, task_vocab: TaskVocab,
                 transform: Callable[[Data], Any] | None = None):
        if len(graphs) != len(meta_df):
            raise ValueError(f"{len(graphs)} graphs but {len(meta_df)} metadata rows; graphs must be one per zoo row")
        _require_columns(meta_df, ["task"], "ContrastivePairDataset")
        self.graphs, self.indices = graphs, np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError("ContrastivePairDataset: empty split")
        self.recipe, self.view_fn, self.seed, self.transform = check_recipe(recipe), view_fn, int(seed), transform
        sub = meta_df.iloc[self.indices]
        self.task_vocab = task_vocab
        self.task = task_vocab.encode(sub["task"].tolist())  # raises on held-out/unseen tasks
        fam = sub["task_family"] if "task_family" in sub else sub["task"]
        self.families = sorted(set(meta_df["task_family"] if "task_family" in meta_df else meta_df["task"]))
        self.family = np.array([self.families.index(f) for f in fam], dtype=np.int64)
        self.test_acc = (sub["test_acc"].to_numpy(np.float32) if "test_acc" in sub
                         else np.full(len(sub), np.nan, np.float32))
        self.pairs = PositivePairs(meta_df, self.indices, recipe)

    def __len__(self) -> int:
        return len(self.indices)

    def _view(self, pos: int, g: torch.Generator) -> Any:
        d = self.graphs[int(self.indices[pos])]
        if self.view_fn is not None:
            d = self.view_fn(d, g)
        return self.transform(d) if self.transform is not None else d

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any, dict[str, Any]]:
        epoch, pos = _key(key)
        g, rng = item_generators(self.seed, epoch, pos)
        partner = self.pairs.sample(pos, rng)
        v1, v2 = self._view(pos, g), self._view(partner, g)
        meta = {"index": int(self.indices[pos]), "task": int(self.task[pos]), "family": int(self.family[pos]),
                "test_acc": float(self.test_acc[pos])}
        return v1, v2, meta


class GraphDataset(Dataset):
    """Plain (no view) inputs for embedding: item ``(input, position)``; key ``i`` or ``(epoch, i)``."""

    def __init__(self, graphs: Sequence[Data], indices: Sequence[int] | None = None,
                 transform: Callable[[Data], Any] | None = None):
        self.graphs = graphs
        self.indices = np.arange(len(graphs)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        _, pos = _key(key)
        d = self.graphs[int(self.indices[pos])]
        return (self.transform(d) if self.transform is not None else d), pos


def collate_views(views: Sequence[Any]) -> Any:
    """PyG graphs -> ``Batch``; tensors -> stacked tensor (B, ...)."""
    first = views[0]
    if isinstance(first, Data):
        return Batch.from_data_list(list(views))
    if isinstance(first, torch.Tensor):
        return torch.stack(list(views))
    raise TypeError(f"cannot batch views of type {type(first).__name__}; expected torch_geometric Data or Tensor")


def collate_pairs(items: Sequence[tuple[Any, Any, Mapping[str, Any]]]) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """List of ``(view1, view2, meta)`` -> ``(batch1, batch2, {key: (B,) tensor})``."""
    v1, v2, metas = zip(*items)
    meta = {k: torch.tensor([m[k] for m in metas]) for k in metas[0]}
    return collate_views(v1), collate_views(v2), meta


def collate_embed(items: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """List of ``(input, position)`` -> ``(batch, positions (B,))``."""
    xs, pos = zip(*items)
    return collate_views(xs), torch.tensor(pos, dtype=torch.long)


# --------------------------------------------------------------------------- sampler
class ShardedSampler(Sampler):
    """Deterministic (seed, epoch) shuffle, sharded ``rank::world_size``; yields ``(epoch, i)`` keys.

    tail: "drop" (every rank gets ``n // world_size`` items; training), "pad" (wrap around to
    equal shards, as DistributedSampler) or "none" (uneven shards, every item exactly once;
    embedding). Call ``set_epoch(e)`` before each epoch, as with DistributedSampler.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 tail: str = "drop"):
        if tail not in ("drop", "pad", "none"):
            raise ValueError(f"tail must be drop|pad|none, got {tail!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n, self.shuffle, self.seed, self.rank, self.world_size, self.tail = n, shuffle, seed, rank, world_size, tail
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        return torch.randperm(self.n, generator=g).numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        if self.tail == "drop":
            order = order[: self.n // self.world_size * self.world_size]
        elif self.tail == "pad":
            total = -(-self.n // self.world_size) * self.world_size
            order = np.resize(order, total)
        for i in order[self.rank::self.world_size]:
            yield self.epoch, int(i)

    def __len__(self) -> int:
        if self.tail == "drop":
            return self.n // self.world_size
        if self.tail == "pad":
            return -(-self.n // self.world_size)
        return len(range(self.rank, self.n, self.world_size))


class GroupedBatchSampler(Sampler):
    """Global batches drawn within one group (e.g. ``shape_group``), deterministic in (seed, epoch), sharded.

    In a mixed batch most negatives differ in input/output sizes and are told apart by node counts
    alone; within one shape group every negative has to be separated by what the network computes.
    Each epoch shuffles every group's members, cuts them into global batches of ``batch_size`` (a
    group's tail shorter than a batch is dropped, unless the group has no full batch: then its members,
    rounded down to a multiple of ``world_size``, form one smaller batch, if at least 2 per rank), and
    shuffles the batches; rank r gets positions ``r::world_size`` of each global batch, as
    ``(epoch, i)`` keys. Call ``set_epoch(e)`` before each epoch.
    """

    def __init__(self, groups: Sequence, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 2 or batch_size % world_size:
            raise ValueError(f"batch_size must be >= 2 and divisible by world size {world_size}, got {batch_size}")
        _, self.group = np.unique(np.asarray(groups), return_inverse=True)
        self.batch_size, self.seed, self.rank, self.world_size, self.shuffle = batch_size, seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for g in range(int(self.group.max()) + 1 if len(self.group) else 0):
            members = np.flatnonzero(self.group == g)
            if self.shuffle:
                members = rng.permutation(members)
            n_full = len(members) // self.batch_size
            if n_full:
                out += list(members[: n_full * self.batch_size].reshape(n_full, self.batch_size))
            elif len(members) // self.world_size >= 2:
                out.append(members[: len(members) // self.world_size * self.world_size])
        return [out[i] for i in rng.permutation(len(out))] if self.shuffle else out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self._batches():
            yield [(self.epoch, int(i)) for i in b[self.rank::self.world_size]]

    def __len__(self) -> int:
        return len(self._batches())


# --------------------------------------------------------------------------- views
def make_view_fn(recipe: str, augmenter: Any | None, canonical: bool = True, pair_views: str = "perturb"
                 ) -> ViewFn | None:
    """The per-view transform of a recipe, at graph level (``SymmetryAugmenter.augment_graph``).

    * "symmetry": exact symmetries only (a copy of ``augmenter`` with noise, edge dropout and
      pruning switched off): hidden-node permutation, plus rescaling/sign flips when the graphs
      are not canonical (``canonical=False``). On canonical graphs rescaling and sign flips are
      removed exactly by canonicalization, and an exactly invariant encoder maps both views to
      the *same* embedding: the control recipe.
    * "noise": ``augmenter.augment_graph`` as configured (weight noise, edge dropout, pruning,
      and the symmetries).
    * "checkpoint" / "seed" / "supcon": the same perturbations when an augmenter is given and
      ``pair_views`` is "perturb", its exact symmetries only with "symmetry" (function-preserving
      views), else None (graphs unchanged; the positive pair is two different networks).
    """
    check_recipe(recipe)
    if pair_views not in ("perturb", "symmetry"):
        raise ValueError(f"pair_views must be perturb|symmetry, got {pair_views!r}")
    if augmenter is None:
        if recipe in ("symmetry", "noise"):
            raise ValueError(f"view recipe {recipe!r} needs a SymmetryAugmenter")
        return None
    aug = augmenter
    if recipe == "symmetry" or (recipe not in ("symmetry", "noise") and pair_views == "symmetry"):
        aug = dataclasses.replace(augmenter, noise_std=0.0, edge_dropout=0.0, prune_fraction=0.0)

    def view(data: Data, gen: torch.Generator) -> Data:
        return aug.augment_graph(data, gen, canonical=canonical)

    return view


# --------------------------------------------------------------------------- loaders
@dataclass(frozen=True)
class ValidationSet:
    """The validation protocol: the test protocol on validation data (``evaluation.validation_retrieval``).

    Database: ``rows`` (train, val and val-unseen models), each query searched within its shape group,
    other checkpoints of its run removed. Queries: val runs of seen tasks and val-unseen models.
    """

    loader: DataLoader  # (graphs, positions) over ``rows`` in order, sharded for ``embed``
    rows: np.ndarray  # (D,) zoo rows of the database
    task: np.ndarray  # (D,) labels of ``rows``
    shape_group: np.ndarray  # (D,)
    run_id: np.ndarray  # (D,)
    seen_queries: np.ndarray  # positions in ``rows`` of the val runs of seen tasks
    unseen_queries: np.ndarray  # positions in ``rows`` of the val-unseen models


@dataclass
class Loaders:
    """Everything the training loop and the validation metric need."""

    train: DataLoader  # (view1, view2, meta) batches, per-rank batch = batch_size // world_size
    val: DataLoader | None  # same over the validation runs of seen tasks (validation loss)
    validation: ValidationSet | None  # the validation retrieval protocol (None: no validation rows)
    task_vocab: TaskVocab
    info: dict[str, Any] = field(default_factory=dict)  # sizes, partner statistics (for the log/results)


def embed_loader(graphs: Sequence[Data], indices: Sequence[int] | None, batch_size: int, rank: int = 0,
                 world_size: int = 1, transform: Callable[[Data], Any] | None = None,
                 num_workers: int = 0) -> DataLoader:
    """Loader of ``(batch, positions)`` over ``graphs[indices]`` in order, sharded for ``embed``."""
    ds = GraphDataset(graphs, indices, transform)
    sampler = ShardedSampler(len(ds), shuffle=False, rank=rank, world_size=world_size, tail="none")
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_embed, num_workers=num_workers)


def build_loaders(graphs: Sequence[Data], meta_df: pd.DataFrame, split: Split, recipe: str, batch_size: int,
                  view_fn: ViewFn | None, seed: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                  transform: Callable[[Data], Any] | None = None, batch_within: str = "") -> Loaders:
    """Train/val pair loaders and the validation protocol's data (:class:`ValidationSet`).

    ``batch_size`` is the *global* batch (graphs per step over all ranks); each rank loads
    ``batch_size // world_size`` (must divide). Training drops the incomplete last batch (in-batch
    negatives need full batches, and DDP needs equal batches on every rank). ``batch_within`` names a
    metadata column (e.g. "shape_group"): every batch is then drawn within one of its values
    (:class:`GroupedBatchSampler`); "" draws batches from the whole split.
    """
    check_recipe(recipe)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {batch_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
    local_bs = batch_size // world_size
    if len(split.train) < batch_size:
        raise ValueError(f"the training split has {len(split.train)} models, fewer than one batch of {batch_size}")
    task = meta_df["task"].to_numpy()
    vocab = TaskVocab(sorted(set(task[split.train])), split.heldout_tasks)

    if batch_within:
        _require_columns(meta_df, [batch_within], "batch_within")

    def pair_loader(idx: np.ndarray, shuffle: bool, tail: str) -> DataLoader:
        ds = ContrastivePairDataset(graphs, meta_df, idx, recipe, view_fn, seed, vocab, transform)
        if batch_within:
            bs = GroupedBatchSampler(meta_df[batch_within].to_numpy()[idx], batch_size, seed, rank, world_size, shuffle)
            return DataLoader(ds, batch_sampler=bs, collate_fn=collate_pairs, num_workers=num_workers)
        sampler = ShardedSampler(len(ds), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, tail=tail)
        return DataLoader(ds, batch_size=local_bs, sampler=sampler, collate_fn=collate_pairs,
                          num_workers=num_workers, drop_last=tail == "drop")

    train = pair_loader(split.train, True, "drop")
    val_idx = split.val
    if len(val_idx):
        unseen = sorted(set(task[val_idx]) - set(vocab.tasks))
        if unseen:  # a task with all its runs in val: drop from val rather than leak labels
            raise ValueError(f"validation tasks {unseen} have no training run; lower val_fraction")
    # validation loss: full batches only when the split allows one; else a single (smaller) batch
    val = None
    if len(val_idx) >= 2 * world_size:
        val = pair_loader(val_idx, False, "drop" if len(val_idx) >= batch_size else "pad")
    validation = None
    if len(val_idx) or len(split.val_unseen):
        _require_columns(meta_df, ["shape_group", "run_id"], "the validation protocol")
        rows = split.selection_rows
        validation = ValidationSet(
            embed_loader(graphs, rows, local_bs, rank, world_size, transform, num_workers), rows, task[rows],
            meta_df["shape_group"].to_numpy()[rows], meta_df["run_id"].to_numpy()[rows],
            np.flatnonzero(np.isin(rows, val_idx)), np.flatnonzero(np.isin(rows, split.val_unseen)))
    info = {"recipe": recipe, "n_train": int(len(split.train)), "n_val": int(len(val_idx)),
            "n_val_unseen": int(len(split.val_unseen)), "n_train_tasks": len(vocab),
            "train_anchors_without_partner": train.dataset.pairs.n_self,
            "global_batch_size": batch_size, "world_size": world_size, "batch_within": batch_within or "whole split"}
    return Loaders(train, val, validation, vocab, info)
