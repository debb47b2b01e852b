"""Datasets, splits, positive pairs and (distributed) samplers over cached neuron graphs.

The contrastive loop consumes ``(view1, view2, meta)`` batches. This module builds them:

* :func:`split_by_run` splits the zoo by *training run* (several checkpoints of one run never
  straddle two splits) and removes held-out tasks entirely from train/val/test (they are kept
  for zero-shot evaluation only).
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
def select_heldout_tasks(meta_df: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """Hold out ``round(fraction * n)`` of the n tasks of every shape group (at least one, never
    more than n - 2; groups with fewer than 3 tasks keep all theirs), so the unseen-task protocol
    has queries in every shape group and the encoders still train on every group."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout task fraction must be in [0, 1), got {fraction}")
    _require_columns(meta_df, ["task", "shape_group"], "select_heldout_tasks")
    rng = np.random.default_rng(seed)
    held: list[str] = []
    for _, tasks in sorted(meta_df.groupby("shape_group")["task"].unique().items()):
        tasks = sorted(tasks)
        if len(tasks) < 3 or fraction == 0:
            continue
        n = min(len(tasks) - 2, max(1, int(round(fraction * len(tasks)))))
        held += rng.choice(tasks, size=n, replace=False).tolist()
    return sorted(held)


@dataclass(frozen=True)
class Split:
    """Zoo row indices of each split. ``heldout`` holds every model of ``heldout_tasks``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    heldout: np.ndarray
    heldout_tasks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (sizes and held-out tasks; indices as lists)."""
        return {"heldout_tasks": list(self.heldout_tasks),
                **{k: getattr(self, k).tolist() for k in ("train", "val", "test", "heldout")}}


def split_by_run(meta_df: pd.DataFrame, val_fraction: float, test_fraction: float,
                 heldout_tasks: Sequence[str] = (), seed: int = 0) -> Split:
    """Split zoo rows by training run, per task; held-out tasks go entirely to ``heldout``.

    Within each seen task the runs are shuffled (``seed``) and ``round(fraction * n_runs)`` go to
    val and test (at least one run always stays in train). All checkpoints of a run share its
    split; this is asserted.
    """
    _require_columns(meta_df, ["run_id", "task"], "split_by_run")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got val={val_fraction} test={test_fraction}")
    tasks_of_run = meta_df.groupby("run_id")["task"].nunique()
    if (tasks_of_run > 1).any():
        raise ValueError(f"runs with several tasks in the metadata: {tasks_of_run[tasks_of_run > 1].index[:5].tolist()}")
    unknown = set(heldout_tasks) - set(meta_df["task"])
    if unknown:
        raise ValueError(f"held-out tasks {sorted(unknown)} are not in the zoo (tasks: {sorted(meta_df['task'].unique())})")
    rng = np.random.default_rng(seed)
    task = meta_df["task"].to_numpy()
    run = meta_df["run_id"].to_numpy()
    heldout_mask = np.isin(task, list(heldout_tasks))
    run_split: dict[str, str] = {}
    for t in sorted(set(task[~heldout_mask])):
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
    where = np.array(["heldout" if h else run_split[r] for r, h in zip(run, heldout_mask)])
    out = {k: np.flatnonzero(where == k) for k in ("train", "val", "test", "heldout")}
    # no run in two splits; no held-out task outside "heldout"
    seen: dict[str, str] = {}
    for k, idx in out.items():
        for r in set(run[idx]):
            assert seen.setdefault(r, k) == k, f"run {r} is in splits {seen[r]} and {k}"
    for k in ("train", "val", "test"):
        assert not np.isin(task[out[k]], list(heldout_tasks)).any(), f"a held-out task leaked into {k}"
    return Split(out["train"], out["val"], out["test"], out["heldout"], tuple(sorted(heldout_tasks)))


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


# --------------------------------------------------------------------------- views
def make_view_fn(recipe: str, augmenter: Any | None, canonical: bool = True) -> ViewFn | None:
    """The per-view transform of a recipe, at graph level (``SymmetryAugmenter.augment_graph``).

    * "symmetry": exact symmetries only (a copy of ``augmenter`` with noise, edge dropout and
      pruning switched off): hidden-node permutation, plus rescaling/sign flips when the graphs
      are not canonical (``canonical=False``). On canonical graphs rescaling and sign flips are
      removed exactly by canonicalization, and an exactly invariant encoder maps both views to
      the *same* embedding: the control recipe.
    * "noise": ``augmenter.augment_graph`` as configured (weight noise, edge dropout, pruning,
      and the symmetries).
    * "checkpoint" / "seed" / "supcon": the same perturbations when an augmenter is given, else
      None (graphs unchanged; the positive pair is two different networks).
    """
    check_recipe(recipe)
    if augmenter is None:
        if recipe in ("symmetry", "noise"):
            raise ValueError(f"view recipe {recipe!r} needs a SymmetryAugmenter")
        return None
    aug = augmenter
    if recipe == "symmetry":
        aug = dataclasses.replace(augmenter, noise_std=0.0, edge_dropout=0.0, prune_fraction=0.0)

    def view(data: Data, gen: torch.Generator) -> Data:
        return aug.augment_graph(data, gen, canonical=canonical)

    return view


# --------------------------------------------------------------------------- loaders
@dataclass
class Loaders:
    """Everything the training loop and the validation metric need."""

    train: DataLoader  # (view1, view2, meta) batches, per-rank batch = batch_size // world_size
    val: DataLoader | None  # same over the validation split (validation loss)
    val_embed: DataLoader | None  # (graphs, positions) over the validation split, for retrieval
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
                  transform: Callable[[Data], Any] | None = None) -> Loaders:
    """Train/val pair loaders and the validation embedding loader.

    ``batch_size`` is the *global* batch (graphs per step over all ranks); each rank loads
    ``batch_size // world_size`` (must divide). Training drops the incomplete last batch (in-batch
    negatives need full batches, and DDP needs equal batches on every rank).
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

    def pair_loader(idx: np.ndarray, shuffle: bool, tail: str) -> DataLoader:
        ds = ContrastivePairDataset(graphs, meta_df, idx, recipe, view_fn, seed, vocab, transform)
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
    val_embed = embed_loader(graphs, val_idx, local_bs, rank, world_size, transform, num_workers) if len(val_idx) else None
    info = {"recipe": recipe, "n_train": int(len(split.train)), "n_val": int(len(val_idx)),
            "n_train_tasks": len(vocab), "train_anchors_without_partner": train.dataset.pairs.n_self,
            "global_batch_size": batch_size, "world_size": world_size}
    return Loaders(train, val, val_embed, vocab, info)
