"""Reference embeddings and the protocols they pass: what a number means next to chance and next to oracles.

* :data:`REFERENCE_METHODS` (chance, constant) and :func:`reference_embeddings`: scored by the same code as every
  method, so each protocol's chance level is measured, not assumed;
* :data:`PROPERTY_ORACLES` and :func:`property_oracle_embeddings`: metadata the weights do not give (training-set
  accuracy, the recipe, the test loss), scored as embeddings to say how predictable a property is at all;
* :func:`trivial_passes`: where a method that reads no function (constant, shapes only) scores >= 0.85.

``evaluation`` re-exports these names.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

REFERENCE_METHODS: dict[str, str] = {
    "random (chance)": "Gaussian random embedding (16 dims, drawn per seed): the chance level of each protocol, "
                       "measured with the same code",
    "constant": "every model the same embedding: ties broken in a random order, so it passes only what a "
                "protocol gives away",
}
TRIVIAL_METHODS: tuple[str, ...] = ("constant", "shape_only")  # an honest protocol is not passed by these
TRIVIAL_THRESHOLD = 0.85
_SCORE = re.compile(r"^(P@\d+|R@\d+|F1@\d+|mAP|MRR|purity|ARI|NMI|R2|spearman|kendall|within_\w+|"
                    r"val_(seen_|unseen_)?P@\d+)$")


def reference_embeddings(n: int, seed: int) -> dict[str, np.ndarray]:
    """The embeddings of ``REFERENCE_METHODS`` for a zoo of ``n`` models: {name: (n, 16) float32}."""
    return {"random (chance)": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32),
            "constant": np.ones((n, 16), np.float32)}


# Oracles of the property tables: each reads metadata that an embedding of the weights does not see. They say how
# much of a target (above all the within-task rank of test accuracy) is predictable at all in this zoo.
PROPERTY_ORACLES: dict[str, str] = {
    "train_acc [oracle: training-set accuracy]": "the model's accuracy on its own training set (labelled training "
                                                  "data; metadata column train_acc)",
    "recipe [oracle: training hyperparameters]": "the training recipe from the metadata: log10 lr, optimizer, log10 "
                                                  "weight decay, train fraction, log training-set size, batch size, "
                                                  "log parameter count, architecture family, checkpoint epoch",
    "test_loss [oracle: test-set loss]": "the model's cross-entropy on the task's test set (the target's own data)",
}


def property_oracle_embeddings(metadata: Any) -> dict[str, np.ndarray]:
    """The embeddings of ``PROPERTY_ORACLES`` (metadata columns as features): {label: (n, d) float32}. Every
    protocol scores them like any method; the report lists them as oracles, never as baselines."""
    col = lambda c: np.asarray(metadata[c])  # noqa: E731
    fam = col("arch_family").astype(str)
    recipe = np.stack([np.log10(col("lr").astype(float)), (col("optimizer").astype(str) == "adam").astype(float),
                       np.log10(col("weight_decay").astype(float) + 1e-8), col("train_fraction").astype(float),
                       np.log(col("n_train").astype(float)), np.log(col("batch_size").astype(float)),
                       np.log(col("num_params").astype(float)), col("epoch").astype(float),
                       *[(fam == f).astype(float) for f in sorted(set(fam))]], 1)
    labels = list(PROPERTY_ORACLES)
    return {labels[0]: col("train_acc").astype(np.float32)[:, None],
            labels[1]: recipe.astype(np.float32),
            labels[2]: col("test_loss").astype(np.float32)[:, None]}


def trivial_passes(per_seed: Mapping[str, Sequence[Mapping[str, Any] | None]], methods: Sequence[str] = TRIVIAL_METHODS,
                   threshold: float = TRIVIAL_THRESHOLD) -> dict[str, list[dict[str, Any]]]:
    """Where a method that reads no function (a constant embedding, shapes only) scores >= ``threshold``.

    Args:
        per_seed: {method: [one :func:`evaluate_embeddings` result per seed (None: that seed failed)]}.
    Returns:
        {section path, e.g. "retrieval/full_zoo" or "properties/test_acc/ridge": [{"method", "metric",
        "max" (over seeds), "seeds" (how many reach the threshold), "n" (seeds)}]}: every score metric
        (precision, recall, mAP, MRR, clustering scores, R2 and rank correlations) of any seed at or above it.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        runs = [r for r in per_seed.get(method, []) if r is not None]
        hits: dict[tuple[str, str], list[float]] = {}
        for r in runs:
            for path, value in _score_leaves(r, ()):
                hits.setdefault(path, []).append(value)
        for (section, metric), vals in hits.items():
            passing = [v for v in vals if v >= threshold]
            if passing:
                found.setdefault(section, []).append({"method": method, "metric": metric, "max": float(max(vals)),
                                                      "seeds": len(passing), "n": len(runs)})
    return found


def _score_leaves(d: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, str], float]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _score_leaves(v, path + (k,))
        elif _SCORE.match(k) and isinstance(v, (int, float)) and not np.isnan(v):
            yield ("/".join(path), k), float(v)
