"""What the zoo trains: a deterministic plan of runs in groups, the architecture families, model cards,
and the training of one planned group (``train_group``) or of many in worker processes.

A group is one architecture, one shape group of tasks, one batch size and train fraction; its runs
train together with ``zoo_training.train_stacked``. Besides plain MLPs and global-average-pooled CNNs,
a few percent of the runs are published shapes: "cnn-bn" (Conv -> BatchNorm -> ReLU -> MaxPool, x2,
Flatten -> Linear -> ReLU -> Linear) and "resnet" (a conv stem, identity residual blocks, global average
pooling, optionally BatchNorm). Every checkpoint is the eval-mode network with BatchNorm folded into the
convs (metadata column ``batchnorm`` says whether it had BatchNorm).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

import architecture as A
from tasks import TASKS, get_task, inputs_for_spec, load_task_data, shape_groups, train_size
from zoo_training import SGD_MOMENTUM, init_params, pad_rows, single_thread, train_stacked

log = logging.getLogger("weightzoo.zoo_plan")

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


DEFAULT_RUNS_PER_TASK = 6  # with 2 checkpoints per run: (6 - 1) * 2 = 10 same-task models from other runs (P@10 can be 1)


def runs_per_task_counts(num_runs: int, tasks: Sequence[str], seed: int = 0) -> dict[str, int]:
    """task -> runs: ``num_runs`` spread evenly over ``tasks`` (the remainder goes to a seeded choice of tasks)."""
    base, extra = divmod(num_runs, len(tasks))
    lucky = set(np.random.default_rng([seed, 10**6 + 1]).permutation(len(tasks))[:extra].tolist())
    return {t: base + (i in lucky) for i, t in enumerate(tasks)}


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), summing to ``total``."""
    w = np.asarray(weights, float)
    if total == 0 or w.sum() == 0:
        return [0] * len(w)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(int)
    out[np.argsort(-(exact - out), kind="stable")[: total - out.sum()]] += 1
    return out.tolist()


def plan_zoo(num_runs: int, seed: int = 0, group_size: int = 64, cnn_fraction: float = 0.1,
             card_task_fraction: float = 0.0, tasks: Sequence[str] | None = None,
             min_groups: int = 24, cnn_bn_fraction: float = 0.02, resnet_fraction: float = 0.02) -> list[GroupPlan]:
    """Deterministic plan of ``num_runs`` runs in groups (same args -> same plan on every machine).

    Every task gets the same number of runs (``runs_per_task_counts``; ``num_runs`` = runs per task x tasks
    gives exactly that many each), so every task has models from several runs. A group is one architecture and
    one shape group; a shape group's runs are shuffled and cut into groups. ``cnn_fraction`` of all runs are
    CNNs, on the 8x8 image tasks (in groups a quarter of the MLP group size, at least 4: they cost more per run,
    so smaller groups keep architectures varied and shards balanced); the rest are MLPs in groups of
    ``group_size``. MLP groups shrink (to no fewer than 8 runs) to make at least ``min_groups`` of them. Group
    order is shuffled so shards ``g % n == i`` get a similar mix. Tasks may be any task names (``get_task``).

    ``cnn_bn_fraction`` of the runs are "cnn-bn" nets (``cnn_bn_spec``: Conv3x3 -> BatchNorm -> ReLU ->
    MaxPool2, x2, Flatten -> Linear -> ReLU -> Linear; a quarter of those groups average-pool instead) and
    ``resnet_fraction`` "resnet" nets (``resnet_spec``: a stem and 1-2 identity residual blocks, global
    average pooling, a linear head, one block on 10x10 MNIST; half of the groups with BatchNorm after every
    conv), both on every image task (8x8 digits and 10x10 MNIST), in CNN-sized groups. Their runs come out of
    the MLP share. Each family's runs are spread over its shape groups in proportion to their runs.
    """
    task_names = [get_task(t).name for t in (tasks if tasks is not None else TASKS)]
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"tasks named twice: {sorted({t for t in task_names if task_names.count(t) > 1})}")
    for name, frac in (("cnn_fraction", cnn_fraction), ("cnn_bn_fraction", cnn_bn_fraction),
                       ("resnet_fraction", resnet_fraction)):
        if not 0 <= frac <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    specs = {n: get_task(n) for n in task_names}
    counts = runs_per_task_counts(num_runs, task_names, seed)
    groups_map = shape_groups(specs)
    sg_names = sorted(groups_map)
    sg_runs = np.array([sum(counts[t] for t in groups_map[g]) for g in sg_names])
    cnn_ok = np.array([all(specs[t].is_image and specs[t].num_features <= CNN_MAX_PIXELS for t in groups_map[g])
                       for g in sg_names])
    fam_ok = np.array([all(specs[t].is_image for t in groups_map[g]) for g in sg_names])  # digits and MNIST
    n_cnn = int(round(cnn_fraction * num_runs)) if (sg_runs * cnn_ok).sum() else 0
    n_bn = int(round(cnn_bn_fraction * num_runs)) if (sg_runs * fam_ok).sum() else 0
    n_res = int(round(resnet_fraction * num_runs)) if (sg_runs * fam_ok).sum() else 0
    if n_cnn > (sg_runs * cnn_ok).sum() or n_bn + n_res > (sg_runs * fam_ok).sum() - n_cnn:
        raise ValueError(f"cnn_fraction {cnn_fraction}, cnn_bn_fraction {cnn_bn_fraction}, resnet_fraction "
                         f"{resnet_fraction}: more CNN runs than the image tasks' {(sg_runs * fam_ok).sum()} runs")
    per_sg = {"cnn": _apportion(n_cnn, sg_runs * cnn_ok), "cnn-bn": _apportion(n_bn, sg_runs * fam_ok),
              "resnet": _apportion(n_res, sg_runs * fam_ok)}
    n_mlp = num_runs - n_cnn - n_bn - n_res
    mlp_size = max(1, min(group_size, max(8, math.ceil(n_mlp / max(1, min_groups)))))
    cnn_size = max(4, mlp_size // 4)

    def split(items: list, size: int) -> list[list]:  # items in near-equal groups of at most ``size``
        return [c.tolist() for c in np.array_split(np.array(items, dtype=object), math.ceil(len(items) / size))
                ] if items else []

    slots: list[tuple[str, str, list[str]]] = []  # (family, shape group, tasks of its runs)
    for si, g in enumerate(sg_names):
        runs = [t for t in groups_map[g] for _ in range(counts[t])]
        if sum(per_sg[f][si] for f in per_sg) > len(runs):
            raise ValueError(f"shape group {g}: {sum(per_sg[f][si] for f in per_sg)} CNN runs planned, it has "
                             f"{len(runs)} runs (lower cnn_fraction, cnn_bn_fraction or resnet_fraction)")
        runs = [runs[i] for i in np.random.default_rng([seed, 10**6 + 2, si]).permutation(len(runs))]
        for family in ("cnn", "cnn-bn", "resnet"):
            take, runs = runs[: per_sg[family][si]], runs[per_sg[family][si]:]
            slots += [(family, g, c) for c in split(take, cnn_size)]
        slots += [("mlp", g, c) for c in split(runs, mlp_size)]
    order = np.random.default_rng([seed, 10**6]).permutation(len(slots))
    plans: list[GroupPlan] = []
    run_index = 0
    for gi, k in enumerate(order):
        family, sg, members = slots[k]
        cnn = family != "mlp"
        rng = np.random.default_rng([seed, gi])
        t0 = specs[members[0]]
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
        min_n = min(int(round(frac * train_size(t))) for t in set(members))
        bs = int(min(BATCH_SIZES[rng.integers(len(BATCH_SIZES))], max(4, min_n // 2)))  # >= 2 steps per epoch
        plan = GroupPlan(gi, spec, sg, bs, frac, family=family, bn_layers=bn_layers)
        for task in members:
            adam = bool(rng.random() < 0.5)
            plan.runs.append(RunConfig(
                run_index=run_index, run_id=f"r{run_index:07d}", group_index=gi, task=task,
                seed=int(rng.integers(2**31 - 1)),
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
        t = get_task(run.task)
        text += f" Task: {t.name} ({t.description})."
    return text


def group_pool(plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Input pool (R, *input_shape), labels (R,), task -> (train rows, test rows) for the group's tasks."""
    Xs, Ys, rows, off = [], [], {}, 0
    for t in sorted({r.task for r in plan.runs}):
        Xtr, ytr, Xte, yte = load_task_data(t)
        Xs += [inputs_for_spec(plan.spec, Xtr), inputs_for_spec(plan.spec, Xte)]
        Ys += [ytr, yte]
        rows[t] = (torch.arange(off, off + len(ytr)), torch.arange(off + len(ytr), off + len(ytr) + len(yte)))
        off += len(ytr) + len(yte)
    return torch.cat(Xs), torch.cat(Ys), rows


def _train_group_worker(args: tuple) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """A group trained in a worker process. The weights go back as NumPy arrays, pickled by value: torch
    tensors would travel as shared-memory file descriptors, one per tensor, and a zoo of a few thousand
    models exhausts the parent's descriptor limit (``received 0 items of ancdata``)."""
    plan, epochs, ckpts = args
    with single_thread():
        rows, weights = train_group(plan, epochs, ckpts)
    return rows, {mid: {k: v.numpy() for k, v in sd.items()} for mid, sd in weights.items()}


def _from_worker(result: tuple[list[dict], dict[str, dict[str, np.ndarray]]]
                 ) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    rows, weights = result
    return rows, {mid: {k: torch.from_numpy(v) for k, v in sd.items()} for mid, sd in weights.items()}


def train_groups(plans: Sequence[GroupPlan], epochs: int, ckpts: Sequence[int], workers: int
                 ) -> Iterable[tuple[list[dict], dict[str, dict[str, torch.Tensor]]]]:
    """Train groups in order, in-process (workers <= 1) or in a pool of single-thread worker processes.

    Workers fork from a forkserver that has imported this module (torch) once: a spawned worker paid
    ~2 s of imports each. The forkserver is a fresh, single-threaded process, so forking it is safe
    (forking the caller, which may hold OpenMP or other threads, is not).
    """
    jobs = [(p, epochs, list(ckpts)) for p in plans]
    if workers <= 1 or len(plans) <= 1:
        for j in jobs:
            with single_thread():
                result = train_group(*j)
            yield result
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
                yield _from_worker(futures.pop(i).result())
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
    n_train = np.mean([train_size(r.task) for r in plan.runs]) * plan.train_fraction
    steps = epochs * max(1.0, n_train // plan.batch_size)
    return steps * (3e-4 + len(plan.runs) * plan.batch_size * macs * 6 / 4e10) * _FAMILY_COST[plan.family]


def train_group(plan: GroupPlan, epochs: int, checkpoint_epochs: Sequence[int]
                ) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    """Train one planned group; returns metadata rows and model_id -> state_dict, run-major, epoch-minor."""
    spec, runs = plan.spec, plan.runs
    X, Y, task_rows = group_pool(plan)
    train_rows, test_rows = [], []
    for r in runs:
        tr, te = task_rows[r.task]
        g = torch.Generator().manual_seed(r.seed + 1)  # the train subset of this run
        n = int(round(plan.train_fraction * len(tr)))
        train_rows.append(tr[torch.randperm(len(tr), generator=g)[:n]].sort().values)
        test_rows.append(te)
    te_pad, te_mask = pad_rows(test_rows)
    inits = [init_params(spec, r.seed, r.init_scale, plan.bn_layers) for r in runs]
    init = {k: torch.stack([i[k] for i in inits]) for k in inits[0]}
    res = train_stacked(
        spec, init, X, Y, train_rows, batch_size=plan.batch_size, epochs=epochs,
        lr=torch.tensor([r.lr for r in runs]), weight_decay=torch.tensor([r.weight_decay for r in runs]),
        use_adam=torch.tensor([r.optimizer == "adam" for r in runs]), batch_seeds=[r.seed + 2 for r in runs],
        checkpoint_epochs=checkpoint_epochs, eval_sets={"test": (te_pad, te_mask)}, bn_layers=plan.bn_layers)
    rows, weights = [], {}
    for m, r in enumerate(runs):
        t = get_task(r.task)
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
