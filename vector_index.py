"""The vector half of the model database: a FAISS index of L2-normalised embeddings under int64 ids.

``VectorIndex`` holds the vectors behind an ``IndexIDMap2`` (ids chosen by the caller: the ``fid``
keys of the SQLite catalogue, see ``catalogue.py``) and answers cosine-similarity searches (inner
product of unit vectors).

* Kinds: ``flat`` (exact ``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, M=32, efSearch tuned to a
  target recall@10), ``ivf`` (``IndexIVFFlat``, nprobe tuned the same way) and ``auto`` (exact
  below ``auto_threshold`` vectors, then moved once to HNSW). An approximate kind starts exact and
  is built when enough vectors are there (HNSW at once, IVF once it has enough training vectors),
  so :meth:`add` never needs a rebuild by the caller.
* :meth:`remove` drops ids: in place for the exact index; HNSW and IVF cannot remove ids in FAISS
  (IVF under an ``IndexIDMap2`` would misnumber), so they are rebuilt from the remaining vectors.
* :meth:`state` / :meth:`from_state` + :meth:`write` / :meth:`read` persist it (the composition in
  ``retrieval.ModelIndex`` writes them into its atomic version folders).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("retrieval")

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
_EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def unit_rows(x: np.ndarray, dim: int, ids_for_errors: Any = None) -> np.ndarray:
    """(n, dim) float32 rows scaled to unit length; ValueError for a wrong shape, NaN/Inf or a zero row.

    ``ids_for_errors(positions) -> names`` names the offending rows in the message.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"embeddings must be (n, {dim}), got {x.shape}")
    name = ids_for_errors or (lambda pos: [int(p) for p in pos])
    finite = np.isfinite(x).all(1)
    if not finite.all():
        raise ValueError(f"non-finite embeddings for models {name(np.where(~finite)[0][:5])}")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"zero embedding for models {name(np.where(norms == 0)[0][:5])}")
    return x / norms[:, None]  # cosine similarity = inner product of unit vectors


class VectorIndex:
    """Unit vectors under int64 ids, searched by inner product (see the module docstring).

    Args:
        dim: embedding size.
        index_type: ``auto | flat | hnsw | ivf``.
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width. 80, not FAISS's 40: on clustered data (200k
            64-d vectors in 200 low-rank clusters) 40 needed efSearch 64 for recall@10 0.955, 80 gives
            0.986 at efSearch 32 for 1.4x the build time.
        ef_search: HNSW query beam width (retuned by :meth:`tune` when the HNSW index is built).
        nlist: IVF cells (default ``4*sqrt(n)`` at training time); nprobe starts at 16.
        auto_threshold: with ``auto``, the vector count at which the exact index moves to HNSW.
        target_recall: recall@10 that :meth:`tune` aims for.
    """

    def __init__(self, dim: int, index_type: str = "auto", hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 64, nlist: int | None = None, auto_threshold: int = 100_000,
                 target_recall: float = 0.95):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.index_type = index_type
        self.params: dict[str, Any] = dict(
            hnsw_m=int(hnsw_m), ef_construction=int(ef_construction), ef_search=int(ef_search), nlist=nlist,
            nprobe=16, auto_threshold=int(auto_threshold), target_recall=float(target_recall), tune_margin=0.02,
            retune_growth=1.25)
        self.kind = "flat"  # the concrete index now held (an approximate kind starts exact)
        self.faiss_index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.tuning: dict = {}

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    # ------------------------------------------------------------------ vectors
    def ids(self) -> np.ndarray:
        """The ids held, (n,) int64, in FAISS storage order."""
        return faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)

    def reconstruct(self, vid: int) -> np.ndarray:
        """The stored unit vector of one id, (d,)."""
        return self.faiss_index.reconstruct(int(vid))

    def reconstruct_batch(self, vids: np.ndarray) -> np.ndarray:
        """The stored unit vectors of ids, (n, d)."""
        return self.faiss_index.reconstruct_batch(np.asarray(vids, dtype=np.int64))

    def _all_vectors(self) -> np.ndarray:
        return self.faiss_index.index.reconstruct_n(0, len(self))  # (n, d) in storage order

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add unit rows (n, d) under ``ids``; when the size calls for another kind, move to it once (ids kept)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        target = self._target_kind(len(self) + len(x))
        if target != self.kind:
            if len(self):
                x, ids = np.concatenate([self._all_vectors(), x]), np.concatenate([self.ids(), ids])
            self.faiss_index = self._new_index(target, x)  # IVF trains on every vector seen so far
            self.kind = target
        self.faiss_index.add_with_ids(x, ids)

    def retune_after_growth(self) -> None:
        """Tune again once the index grew by ``retune_growth`` since the last tuning (recall at a fixed setting drops)."""
        if self.kind != "flat" and len(self) >= self.params["retune_growth"] * self.params.get("tuned_at", 0):
            self.tune()

    def remove(self, ids: np.ndarray) -> None:
        """Drop ``ids`` (unknown ids are an error). The exact index removes in place; HNSW/IVF are rebuilt."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        held = self.ids()
        missing = np.setdiff1d(ids, held)
        if len(missing):
            raise KeyError(f"vector ids {missing[:5].tolist()} are not in the index")
        if self.kind == "flat":
            self.faiss_index.remove_ids(ids)
            return
        keep = ~np.isin(held, ids)
        x, kept = self._all_vectors()[keep], held[keep]
        log.info("rebuilding the %s index without %d removed vectors (%d remain)", self.kind, len(ids), len(kept))
        self.kind = self._target_kind(len(kept))
        self.faiss_index = self._new_index(self.kind, x)
        self.faiss_index.add_with_ids(np.ascontiguousarray(x), kept)
        self.tune()

    # ------------------------------------------------------------------ index kinds
    def _target_kind(self, n: int) -> str:
        """The index kind for ``n`` vectors (approximate kinds start exact; see the module docstring)."""
        if self.index_type == "hnsw" or (self.index_type == "auto" and n >= self.params["auto_threshold"]):
            return "hnsw"
        if self.index_type == "ivf" and n >= self._ivf_min_train():
            return "ivf"
        return "flat"

    def _nlist(self, n: int) -> int:
        return int(self.params["nlist"] or max(1, int(4 * math.sqrt(n))))

    def _ivf_min_train(self) -> int:
        # FAISS wants ~39 training points per centroid; with the default nlist=4*sqrt(n) this holds
        # from n ~ 25k, so smaller IVF indexes stay exact (and exact is fast there).
        nlist = self.params["nlist"]
        return 39 * nlist if nlist else 25_000

    def _new_index(self, kind: str, train: np.ndarray) -> faiss.IndexIDMap2:
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params["ef_construction"]
            inner.hnsw.efSearch = self.params["ef_search"]
        else:
            nlist = self._nlist(len(train))
            self.params["nlist_used"] = nlist
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(train)
            inner.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct for query-by-model-id (IDMap2 maps ids to positions)
            inner.nprobe = self.params["nprobe"]
        return faiss.IndexIDMap2(inner)

    def _inner(self) -> Any:
        return faiss.downcast_index(self.faiss_index.index)

    def retune_if_grown(self) -> None:
        """Tune again if vectors were added since the last tuning (approximate kinds only)."""
        if self.kind != "flat" and self.params.get("tuned_at") != len(self):
            self.tune()

    def tune(self, k: int = 10, n_queries: int = 200, seed: int = 0) -> dict:
        """Raise HNSW efSearch / IVF nprobe until recall@k vs exact search reaches the target.

        Leave-one-out: the queries are indexed vectors and each query's own id is dropped from
        both result lists, so recall is measured on its k true neighbours (a new point relates
        to the data as an indexed point relates to the others). Measured here this overstates
        the recall of fresh queries by up to ~0.03 at small efSearch, so the target is
        ``target_recall + tune_margin``. Returns (and stores in ``.tuning``) every setting tried.
        """
        self.params["tuned_at"] = len(self)
        if self.kind == "flat" or len(self) <= k + 1:
            self.tuning = {"kind": self.kind, "exact": self.kind == "flat", "n": len(self)}
            return self.tuning
        rng = np.random.default_rng(seed)
        ids = self.ids()
        qi = rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)
        q = self.reconstruct_batch(ids[qi])  # (q, d) unit rows
        if self.kind == "hnsw":  # HNSW keeps its vectors in an IndexFlat: search it exactly, no copy
            exact = faiss.downcast_index(self._inner().storage)
        else:
            exact = faiss.IndexFlatIP(self.dim)
            exact.add(self._all_vectors())
        _, gt = exact.search(q, k + 1)
        own = ids[qi]
        truth = [set([j for j in row if j != o][:k]) for row, o in zip(ids[gt], own)]
        goal = min(1.0, self.params["target_recall"] + self.params.get("tune_margin", 0.02))
        steps = list(_EF_STEPS)
        if self.kind == "ivf":
            steps = [s for s in _NPROBE_STEPS if s <= self.params["nlist_used"]]
        trials = {}
        chosen = steps[-1]
        for s in steps:
            self.set_search_param(s)
            _, got = self.faiss_index.search(q, k + 1)
            rec = float(np.mean([len(set([j for j in row if j != o and j >= 0][:k]) & t) / k
                                 for row, o, t in zip(got, own, truth)]))
            trials[s] = rec
            if rec >= goal:
                chosen = s
                break
        self.set_search_param(chosen)
        name = "ef_search" if self.kind == "hnsw" else "nprobe"
        self.params[name] = chosen
        self.tuning = {"kind": self.kind, "param": name, "value": chosen, "recall_at_k": trials[chosen],
                       "k": k, "trials": {str(a): b for a, b in trials.items()}, "n_queries": len(qi), "n": len(self)}
        if trials[chosen] < goal:
            log.warning("tune: leave-one-out recall@%d %.3f below %.2f at the largest %s=%d", k, trials[chosen],
                        goal, name, chosen)
        return self.tuning

    def set_search_param(self, value: int) -> None:
        """HNSW efSearch or IVF nprobe (nothing for the exact index)."""
        inner = self._inner()
        if self.kind == "hnsw":
            inner.hnsw.efSearch = int(value)
        elif self.kind == "ivf":
            inner.nprobe = int(value)

    # ------------------------------------------------------------------ search
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search of (n, d) embeddings (normalised here) -> (similarities, ids), each (n, k); id -1 = none."""
        q = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self.faiss_index.search(q, k)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """JSON-able settings (kind, parameters, tuning) for a manifest; :meth:`from_state` reads them."""
        return {"dim": self.dim, "index_type": self.index_type, "kind": self.kind, "params": dict(self.params),
                "tuning": self.tuning}

    def write(self, path: str) -> None:
        """The FAISS index to ``path``."""
        faiss.write_index(self.faiss_index, str(path))

    @classmethod
    def read(cls, path: str, state: dict) -> "VectorIndex":
        """An index written by :meth:`write` with the :meth:`state` saved beside it."""
        self = cls(state["dim"], index_type=state["index_type"])
        self.params.update(state["params"])
        self.kind, self.tuning = state["kind"], state["tuning"]
        self.faiss_index = faiss.read_index(str(path))
        if not isinstance(self.faiss_index, faiss.IndexIDMap2):
            raise ValueError(f"{path}: expected an IndexIDMap2, got {type(self.faiss_index).__name__}")
        if self.faiss_index.d != self.dim:
            raise ValueError(f"{path}: holds {self.faiss_index.d}-d vectors, the manifest says {self.dim}")
        self.set_search_param(self.params["ef_search"] if self.kind == "hnsw" else self.params["nprobe"])
        return self
