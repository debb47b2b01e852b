"""Model merging and transfer (fine-tuning) protocols; sibling of evaluation.py.

Merging: two networks of one architecture trained on one task are averaged either naively or
after *weight matching* (Ainsworth et al., "Git Re-Basin", 2023): hidden neurons of model B are
permuted to best match model A, layer by layer, each step a linear assignment problem solved by
``scipy.optimize.linear_sum_assignment``. We measure accuracy and loss along the interpolation
path ``(1 - alpha) * A + alpha * B`` and the loss barrier, and compare the embedding of
interpolated weights with the interpolation of the embeddings.

Transfer: for a task, fine-tune the top-k models retrieved by embedding similarity and k random
compatible models with the same budget; report steps to a target accuracy and accuracy after the
budget.

Everything takes explicit arrays/(spec, state_dict) pairs; networks run through
``architecture.forward`` so MLPs and CNNs (conv -> GAP -> linear) are handled alike.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import architecture as A

StateDict = Mapping[str, torch.Tensor]
TaskData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # X_train, y_train, X_test, y_test


# --------------------------------------------------------------------------------------------
# permutations of hidden neurons
# --------------------------------------------------------------------------------------------
def _check_plain(spec: A.ArchitectureSpec, what: str) -> None:
    """Weight matching here permutes every hidden layer independently: wrong for residual blocks (coupled
    channels) and flatten heads (channel x position column blocks), so those specs are refused."""
    if spec.is_extended:
        raise ValueError(f"{what}: {spec.name or spec.arch_id} has pooling, a flatten head or residual shortcuts; "
                         "weight matching supports plain MLPs and GAP CNNs only")


def apply_permutation(spec: A.ArchitectureSpec, sd: StateDict, perms: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Permute hidden neurons: new neuron i of hidden layer l is old neuron ``perms[l][i]``.

    ``perms`` has one index array per hidden layer (layers 0..L-2). The function is unchanged:
    rows (and biases) of layer l and input columns of layer l+1 are permuted together; this also
    holds across the conv -> GAP -> linear boundary (a channel is one linear input).
    """
    _check_plain(spec, "apply_permutation")
    L = len(spec.layers)
    assert len(perms) == L - 1, f"{spec.name or 'spec'}: need {L - 1} permutations, got {len(perms)}"
    out = {k: v.clone() for k, v in sd.items()}
    for l, p in enumerate(perms):
        p = torch.as_tensor(np.asarray(p), dtype=torch.long)
        n = spec.layers[l].out_dim
        if sorted(p.tolist()) != list(range(n)):
            raise ValueError(f"perms[{l}] is not a permutation of {n} neurons (layer {l})")
        out[f"layers.{l}.weight"] = out[f"layers.{l}.weight"][p]
        out[f"layers.{l}.bias"] = out[f"layers.{l}.bias"][p]
        out[f"layers.{l + 1}.weight"] = out[f"layers.{l + 1}.weight"][:, p]
    return out


def _incoming(sd: StateDict, l: int) -> torch.Tensor:
    """Incoming weights + bias of layer l's neurons: (out, in * k * k + 1)."""
    w = sd[f"layers.{l}.weight"]
    return torch.cat([w.reshape(w.shape[0], -1), sd[f"layers.{l}.bias"][:, None]], 1).double()


def _outgoing(sd: StateDict, l: int) -> torch.Tensor:
    """Outgoing weights of layer l's neurons (= input slots of layer l+1): (out_l, out_{l+1} * k * k)."""
    w = sd[f"layers.{l + 1}.weight"]
    return w.transpose(0, 1).reshape(w.shape[1], -1).double()


def weight_matching(spec: A.ArchitectureSpec, sd_a: StateDict, sd_b: StateDict, max_iter: int = 100,
                    seed: int = 0) -> list[np.ndarray]:
    """Permutations of B's hidden neurons that maximise sum_l <W_l^A, P_l W_l^B P_{l-1}^T> (+ biases).

    First a forward pass layer by layer on incoming weights only (exact when B is a permuted copy
    of A: the inputs are fixed, so each layer's assignment is determined by the previous one),
    then coordinate ascent over layers in random order with incoming and outgoing weights, until
    no permutation changes. Returns one index array per hidden layer, for :func:`apply_permutation`.
    """
    _check_plain(spec, "weight_matching")
    spec.validate_state_dict(sd_a, "weight_matching: model A")
    spec.validate_state_dict(sd_b, "weight_matching: model B")
    n_hidden = len(spec.layers) - 1
    perms = [np.arange(spec.layers[l].out_dim) for l in range(n_hidden)]

    def cost(l: int, with_outgoing: bool) -> np.ndarray:
        bp = apply_permutation(spec, sd_b, perms)  # B under the current permutations
        # undo layer l's own permutation: the rows of the cost are A's neurons, columns B's originals
        inv = np.argsort(perms[l])
        c = _incoming(sd_a, l) @ _incoming(bp, l)[inv].T  # (n, n)
        if with_outgoing:
            c = c + _outgoing(sd_a, l) @ _outgoing(bp, l)[inv].T
        return c.numpy()

    for l in range(n_hidden):
        perms[l] = linear_sum_assignment(cost(l, with_outgoing=False), maximize=True)[1]
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for l in rng.permutation(n_hidden):
            new = linear_sum_assignment(cost(l, with_outgoing=True), maximize=True)[1]
            if not np.array_equal(new, perms[l]):
                perms[l], changed = new, True
        if not changed:
            break
    return perms


def align_to(spec: A.ArchitectureSpec, sd_a: StateDict, sd_b: StateDict, seed: int = 0) -> dict[str, torch.Tensor]:
    """B with its hidden neurons permuted to match A (same function as B)."""
    return apply_permutation(spec, sd_b, weight_matching(spec, sd_a, sd_b, seed=seed))


# --------------------------------------------------------------------------------------------
# interpolation paths
# --------------------------------------------------------------------------------------------
def interpolate(sd_a: StateDict, sd_b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * A + alpha * B, key by key."""
    assert set(sd_a) == set(sd_b), f"state dicts differ in keys: {sorted(set(sd_a) ^ set(sd_b))}"
    return {k: (1.0 - alpha) * sd_a[k] + alpha * sd_b[k] for k in sd_a}


@torch.no_grad()
def evaluate(spec: A.ArchitectureSpec, sd: StateDict, X: torch.Tensor, y: torch.Tensor,
             batch_size: int = 4096) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a network on (X, y)."""
    assert len(X) == len(y) and len(X) > 0, f"X ({len(X)}) and y ({len(y)}) must be non-empty and aligned"
    loss, correct = 0.0, 0
    for s in range(0, len(X), batch_size):
        logits = A.forward(spec, sd, X[s:s + batch_size])
        loss += F.cross_entropy(logits, y[s:s + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[s:s + batch_size]).sum().item()
    return {"acc": correct / len(X), "loss": loss / len(X)}


def interpolation_path(spec: A.ArchitectureSpec, sd_a: StateDict, sd_b: StateDict, X: torch.Tensor,
                       y: torch.Tensor, alphas: Sequence[float]) -> dict[str, list[float]]:
    """Accuracy and loss of (1 - alpha) A + alpha B for each alpha: {"alpha", "acc", "loss"}."""
    out: dict[str, list[float]] = {"alpha": [], "acc": [], "loss": []}
    for a in alphas:
        m = evaluate(spec, interpolate(sd_a, sd_b, float(a)), X, y)
        out["alpha"].append(float(a))
        out["acc"].append(m["acc"])
        out["loss"].append(m["loss"])
    return out


def loss_barrier(path: Mapping[str, Sequence[float]], key: str = "loss") -> float:
    """max_alpha [f(alpha) - ((1 - alpha) f(0) + alpha f(1))] over a path with alpha 0 and 1 at its ends.

    For key="acc" use :func:`accuracy_barrier` (the sign is reversed there)."""
    a, v = np.asarray(path["alpha"]), np.asarray(path[key])
    assert a[0] == 0.0 and a[-1] == 1.0, f"the path must start at alpha 0 and end at 1, got {a[0]}..{a[-1]}"
    return float(np.max(v - ((1 - a) * v[0] + a * v[-1])))


def accuracy_barrier(path: Mapping[str, Sequence[float]]) -> float:
    """max_alpha [linear interpolation of the end accuracies - acc(alpha)] (accuracy lost midway)."""
    a, v = np.asarray(path["alpha"]), np.asarray(path["acc"])
    assert a[0] == 0.0 and a[-1] == 1.0, f"the path must start at alpha 0 and end at 1, got {a[0]}..{a[-1]}"
    return float(np.max((1 - a) * v[0] + a * v[-1] - v))


def embedding_interpolation(embed_fn: Callable[[list], np.ndarray], spec: A.ArchitectureSpec, sd_a: StateDict,
                            sd_b: StateDict, alphas: Sequence[float]) -> dict[str, list[float]]:
    """Cosine(embed(interpolated weights), interpolation of the end embeddings) for each alpha.

    ``embed_fn``: list[(spec, sd)] -> (n, d). Returns {"alpha", "cosine"}; cosine 1 at the ends.
    """
    models = [(spec, interpolate(sd_a, sd_b, float(a))) for a in alphas]
    emb = np.asarray(embed_fn([(spec, dict(sd_a)), (spec, dict(sd_b))] + models), dtype=np.float64)
    assert emb.shape[0] == len(alphas) + 2 and emb.ndim == 2, f"embed_fn returned {emb.shape}"
    ea, eb, path = emb[0], emb[1], emb[2:]
    lin = np.stack([(1 - a) * ea + a * eb for a in alphas])
    cos = (path * lin).sum(1) / np.maximum(np.linalg.norm(path, axis=1) * np.linalg.norm(lin, axis=1), 1e-12)
    return {"alpha": [float(a) for a in alphas], "cosine": cos.tolist()}


def merge_pair(spec: A.ArchitectureSpec, sd_a: StateDict, sd_b: StateDict, X: torch.Tensor, y: torch.Tensor,
               alphas: Sequence[float] = tuple(np.linspace(0, 1, 11)),
               embed_fn: Callable[[list], np.ndarray] | None = None, seed: int = 0) -> dict[str, Any]:
    """Naive vs weight-matched averaging of two models of one architecture and task.

    Args:
        X, y: evaluation data of the task (its test split).
        alphas: interpolation coefficients, starting at 0 and ending at 1.
        embed_fn: optional; adds embedding-vs-weight interpolation consistency for both paths.
    Returns:
        {"naive": path, "aligned": path, "naive_loss_barrier", "aligned_loss_barrier",
         "naive_acc_barrier", "aligned_acc_barrier", "naive_mid_acc", "aligned_mid_acc" (alpha 0.5
         or the alpha nearest to it), and with embed_fn "naive_embedding"/"aligned_embedding"}.
    """
    alphas = [float(a) for a in alphas]
    sd_b_aligned = align_to(spec, sd_a, sd_b, seed)
    mid = int(np.argmin(np.abs(np.asarray(alphas) - 0.5)))
    out: dict[str, Any] = {}
    for name, b in (("naive", sd_b), ("aligned", sd_b_aligned)):
        path = interpolation_path(spec, sd_a, b, X, y, alphas)
        out[name] = path
        out[f"{name}_loss_barrier"] = loss_barrier(path)
        out[f"{name}_acc_barrier"] = accuracy_barrier(path)
        out[f"{name}_mid_acc"] = path["acc"][mid]
        if embed_fn is not None:
            out[f"{name}_embedding"] = embedding_interpolation(embed_fn, spec, sd_a, b, alphas)
    return out


def select_merge_pairs(metadata: Any, n_pairs: int, seed: int = 0, final_only: bool = True,
                       eligible: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Up to ``n_pairs`` (i, j) zoo rows with the same arch_id and task from different training runs.

    ``metadata``: table with columns arch_id, task, run_id (and is_final when ``final_only``).
    ``eligible``: optional (N,) bool mask of rows that may be paired (e.g. plain specs only).
    Groups are drawn at random (seeded), one pair per group first, so the pairs span architectures.
    """
    arch, task, run = (np.asarray(metadata[c]) for c in ("arch_id", "task", "run_id"))
    keep = np.array(metadata["is_final"], dtype=bool, copy=True) if final_only else np.ones(len(arch), bool)  # never a view of the table
    if eligible is not None:
        keep &= np.asarray(eligible, dtype=bool)
    rows = np.flatnonzero(keep)
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        groups.setdefault((arch[i], task[i]), []).append(int(i))
    rng = np.random.default_rng(seed)
    candidates = []
    for key in sorted(groups):
        members = groups[key]
        by_run: dict[Any, int] = {}
        for i in rng.permutation(members):
            by_run.setdefault(run[i], int(i))  # one checkpoint per run
        if len(by_run) >= 2:
            a, b = rng.choice(list(by_run.values()), size=2, replace=False)
            candidates.append((int(a), int(b)))
    order = rng.permutation(len(candidates))
    return [candidates[k] for k in order[:n_pairs]]


# --------------------------------------------------------------------------------------------
# transfer: fine-tune retrieved vs random compatible models
# --------------------------------------------------------------------------------------------
def compatible(spec: A.ArchitectureSpec, input_shape: Sequence[int], num_classes: int) -> bool:
    """A model can be fine-tuned on a task without surgery: same input shape and number of classes."""
    return tuple(spec.input_shape) == tuple(int(s) for s in input_shape) and spec.num_outputs == int(num_classes)


def fine_tune(spec: A.ArchitectureSpec, sd: StateDict, task_data: TaskData, steps: int, lr: float = 1e-3,
              batch_size: int = 64, eval_every: int = 10, target_acc: float | None = None, seed: int = 0,
              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Adam fine-tuning of all weights for ``steps`` minibatch steps; test accuracy every ``eval_every``.

    Returns {"curve": {"step", "acc"}, "final_acc", "steps_to_target" (first evaluated step with
    test accuracy >= target_acc, 0 if the start already is; None if never or no target)}.
    """
    X_tr, y_tr, X_te, y_te = task_data
    if tuple(spec.input_shape) != tuple(X_tr.shape[1:]) or tuple(X_tr.shape[1:]) != tuple(X_te.shape[1:]):
        raise ValueError(f"fine_tune: model {spec.name!r} takes input {spec.input_shape}, task data is "
                         f"{tuple(X_tr.shape[1:])} (train) / {tuple(X_te.shape[1:])} (test)")
    if spec.num_outputs <= int(max(y_tr.max(), y_te.max())):
        raise ValueError(f"fine_tune: model {spec.name!r} has {spec.num_outputs} outputs, the task has labels "
                         f"up to {int(max(y_tr.max(), y_te.max()))}")
    device = torch.device(device)
    net = A.build_model(spec, {k: v.detach().clone() for k, v in sd.items()}).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    X_tr, y_tr, X_te, y_te = (t.to(device) for t in (X_tr, y_tr, X_te, y_te))
    gen = torch.Generator().manual_seed(seed)
    curve: dict[str, list] = {"step": [], "acc": []}

    def record(step: int) -> float:
        net.eval()
        acc = evaluate(spec, dict(net.named_parameters()), X_te, y_te)["acc"]
        net.train()
        curve["step"].append(step)
        curve["acc"].append(acc)
        return acc

    reached = None
    acc = record(0)
    if target_acc is not None and acc >= target_acc:
        reached = 0
    for step in range(1, steps + 1):
        idx = torch.randint(len(X_tr), (min(batch_size, len(X_tr)),), generator=gen).to(device)
        opt.zero_grad()
        F.cross_entropy(net(X_tr[idx]), y_tr[idx]).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            acc = record(step)
            if reached is None and target_acc is not None and acc >= target_acc:
                reached = step
    return {"curve": curve, "final_acc": curve["acc"][-1], "steps_to_target": reached}


def _summarise(runs: list[dict], steps: int) -> dict[str, Any]:
    reached = [r["steps_to_target"] is not None for r in runs]
    censored = [r["steps_to_target"] if r["steps_to_target"] is not None else steps for r in runs]
    accs = [r["final_acc"] for r in runs]
    return {"steps_to_target": [r["steps_to_target"] for r in runs], "final_acc": accs,
            "mean_steps_to_target": float(np.mean(censored)), "frac_reached": float(np.mean(reached)),
            "mean_final_acc": float(np.mean(accs)), "std_final_acc": float(np.std(accs)),
            "mean_start_acc": float(np.mean([r["curve"]["acc"][0] for r in runs])),
            "curves": [r["curve"] for r in runs]}


def start_accuracy_scores(candidates: Sequence[tuple[A.ArchitectureSpec, StateDict]], X: torch.Tensor,
                          y: torch.Tensor, max_rows: int = 512) -> np.ndarray:
    """Each candidate's accuracy on the task's first ``max_rows`` training examples before fine-tuning (NaN where
    it does not fit the task): a retrieval ORACLE for ``transfer_protocol(scores=...)``: it reads the unseen task's
    labels, which no weight-space retrieval has: a strong reference for what ranking the zoo's models can give."""
    n_classes = int(y.max()) + 1  # of all the rows: the first ones may miss a class
    X, y = X[:max_rows], y[:max_rows]
    out = np.full(len(candidates), np.nan)
    for i, (spec, sd) in enumerate(candidates):
        if compatible(spec, X.shape[1:], n_classes):
            out[i] = evaluate(spec, sd, X, y)["acc"]
    return out


def step_ratio_summary(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate ``transfer_protocol`` results of several tasks (one retrieval method).

    ``mean_ratio`` / ``median_ratio``: over the tasks whose ratio is defined (see ``transfer_protocol``);
    ``pooled_ratio``: the same tasks' mean steps-to-target, retrieved summed over random summed (the fine-tuning
    compute a user saves over them); start accuracies (all tasks) show whether the retrieved models begin
    nearer the target than random ones.
    """
    defined = [r for r in results if r["step_ratio"] == r["step_ratio"]]
    ratios = [float(r["step_ratio"]) for r in defined]
    ret = sum(r["retrieved"]["mean_steps_to_target"] for r in defined)
    rnd = sum(r["random"]["mean_steps_to_target"] for r in defined)
    nan = float("nan")
    return {"n_tasks": len(results), "n_defined": len(ratios),
            "mean_ratio": float(np.mean(ratios)) if ratios else nan,
            "median_ratio": float(np.median(ratios)) if ratios else nan,
            "pooled_ratio": float(ret / rnd) if rnd > 0 else nan,
            **{f"start_acc_{arm}": float(np.mean([r[arm]["mean_start_acc"] for r in results])) if results else nan
               for arm in ("retrieved", "random")}}


def transfer_protocol(query_embedding: np.ndarray, candidate_embeddings: np.ndarray,
                      candidates: Sequence[tuple[A.ArchitectureSpec, StateDict]], task_data: TaskData,
                      k: int = 5, steps: int = 200, target_acc: float | None = None, lr: float = 1e-3,
                      batch_size: int = 64, eval_every: int = 10, seed: int = 0,
                      device: str | torch.device = "cpu", cache: dict | None = None,
                      scores: np.ndarray | None = None) -> dict[str, Any]:
    """Fine-tune the k candidates nearest to the query (cosine) and k random compatible ones.

    Args:
        query_embedding: (d,) embedding of a model trained on the task (not among the candidates).
        candidate_embeddings: (n, d), row i <-> candidates[i]; candidates should not include models
            trained on the task itself (that is the point of transfer to an unseen task).
        candidates: list of (spec, state_dict); only those compatible with the task data (input
            shape and number of classes) are considered, by both arms.
        task_data: (X_train, y_train, X_test, y_test) tensors of the task.
        steps / lr / batch_size / eval_every: the fixed fine-tuning budget (same for every model).
        target_acc: test accuracy that counts as reached.
        seed: random arm draw and minibatch order (each model i uses seed + i).
        cache: fine-tuning runs by (candidate, seed) to share between calls on the same task and budget (several
            retrieval methods: the random arm, the same for each, is then trained once).
        scores: (n,) a ranking instead of the embeddings (higher first; ``query_embedding`` and
            ``candidate_embeddings`` are then ignored and may be None), e.g. ``start_accuracy_scores``, an oracle.
    Returns:
        {"retrieved": summary, "random": summary, "retrieved_idx", "random_idx", "n_compatible",
         "step_ratio": mean steps-to-target retrieved / random (never-reached counted as ``steps``; NaN if
         the random arm's is 0 or no model of either arm reached the target: the budget says nothing then),
         "acc_gain": mean final acc retrieved - random}. Random draws are uniform
         over all compatible candidates, so they may overlap the retrieved ones.
    """
    if scores is None:
        q = np.asarray(query_embedding, np.float64).reshape(-1)
        C = np.asarray(candidate_embeddings, np.float64)
        assert C.ndim == 2 and C.shape == (len(candidates), q.shape[0]), \
            f"candidate_embeddings must be ({len(candidates)}, {q.shape[0]}), got {C.shape}"
    else:
        assert np.shape(scores) == (len(candidates),), f"scores must be ({len(candidates)},), got {np.shape(scores)}"
    X_tr, y_tr, X_te, y_te = task_data
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    ok = np.array([compatible(s, X_tr.shape[1:], n_classes) for s, _ in candidates])
    comp = np.flatnonzero(ok)
    if len(comp) < k:
        raise ValueError(f"transfer_protocol: only {len(comp)} candidates are compatible with the task "
                         f"(input {tuple(X_tr.shape[1:])}, {n_classes} classes); need k={k}")
    sims = (np.asarray(scores, np.float64)[comp] if scores is not None else
            (C[comp] @ q) / np.maximum(np.linalg.norm(C[comp], axis=1) * np.linalg.norm(q), 1e-12))
    retrieved = comp[np.argsort(-sims, kind="stable")[:k]]
    random_idx = np.random.default_rng(seed).choice(comp, size=k, replace=False)
    kw = dict(steps=steps, lr=lr, batch_size=batch_size, eval_every=eval_every, target_acc=target_acc, device=device)
    cache = {} if cache is None else cache
    arms = {}
    for arm, idx in (("retrieved", retrieved), ("random", random_idx)):
        for j, i in enumerate(idx):
            if (int(i), seed + j) not in cache:
                cache[int(i), seed + j] = fine_tune(*candidates[i], task_data, seed=seed + j, **kw)
        arms[arm] = _summarise([cache[int(i), seed + j] for j, i in enumerate(idx)], steps)
    r, b = arms["retrieved"]["mean_steps_to_target"], arms["random"]["mean_steps_to_target"]
    censored = arms["retrieved"]["frac_reached"] == 0 and arms["random"]["frac_reached"] == 0
    return {**arms, "retrieved_idx": retrieved.tolist(), "random_idx": random_idx.tolist(),
            "n_compatible": int(len(comp)), "step_ratio": float(r / b) if b > 0 and not censored else float("nan"),
            "acc_gain": arms["retrieved"]["mean_final_acc"] - arms["random"]["mean_final_acc"]}
