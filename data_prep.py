"""The model zoo: storage (safetensors shards + metadata), loading and validation, generation, and the zoo CLI.

A zoo is a set of *really trained* small networks (MLPs on every task, CNNs on the image
tasks) with one metadata row per checkpoint. What is trained is planned in ``zoo_plan``
(runs, groups, architecture families, model cards), trained by ``zoo_training`` (stacked
batched training), on the tasks of ``tasks``.

    zoo = ModelZooDataset.create_synthetic_model_zoo("zoo/small", tasks=task_subset(48), epochs=30)
    zoo = ModelZooDataset.load("zoo/small")
    zoo, errors = ModelZooDataset.from_checkpoints("my_checkpoints/")

    python data_prep.py generate --out zoo/small --small                         # 48 tasks x 6 runs x 2 checkpoints
    python data_prep.py generate --out zoo/default --workers 2                   # every task: ~3,700 checkpoints
    python data_prep.py generate --out zoo/part0 --zoo_scale 9 --shard 0/8       # ~33k checkpoints, on 8 machines
    python data_prep.py merge --out zoo/big zoo/part0 ... zoo/part7
    python data_prep.py info zoo/big

On disk a zoo directory holds ``zoo.json`` (format, version = content hash, generation
args, shard list), ``metadata.csv`` (row i <-> model i), ``specs.json`` (arch_id ->
ArchitectureSpec) and ``weights-XXXXX.safetensors`` shards with keys ``{model_id}/{param}``.

``TASKS``, ``TaskSpec`` and ``load_task_data`` are re-exported from ``tasks`` for notebooks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file as st_save_file

import architecture as A
from checkpoint_folder import scan_checkpoints
from checkpoint_import import CheckpointError, read_checkpoint
from tasks import TASKS, TaskSpec, canonical_name, load_task_data, registry_hash, task_subset
from zoo_plan import DEFAULT_RUNS_PER_TASK, checkpoint_schedule, plan_zoo, train_groups

__all__ = ["ModelZooDataset", "ZooModel", "ZooError", "METADATA_COLUMNS", "read_manifest", "merge_zoos",
           "summarize", "main", "TASKS", "TaskSpec", "load_task_data"]

log = logging.getLogger("weightzoo.data_prep")

ZOO_FORMAT = "weightzoo-zoo"
ZOO_FORMAT_VERSION = 1
DEFAULT_ZOO_EPOCHS = 30
DEFAULT_CHECKPOINTS_PER_RUN = 2
DEFAULT_MIN_GROUPS = 24
SMALL_ZOO_TASKS = 48  # --small: 3 tasks of each of the 14 shape groups, 4 of the 6 largest

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
        num_models: int | None = None,
        epochs: int = DEFAULT_ZOO_EPOCHS,
        checkpoints_per_run: int = DEFAULT_CHECKPOINTS_PER_RUN,
        card_task_fraction: float = 0.0,
        seed: int = 0,
        group_size: int = 64,
        cnn_fraction: float = 0.1,
        tasks: Sequence[str] | None = None,
        min_groups: int = DEFAULT_MIN_GROUPS,
        shard: tuple[int, int] | None = None,
        cnn_bn_fraction: float = 0.02,
        resnet_fraction: float = 0.02,
        reuse: bool = True,
        workers: int = 1,
        progress: bool = False,
        runs_per_task: int | None = None,
    ) -> "ModelZooDataset":
        """Train a zoo (really trained on real data) and save it.

        ("synthetic" = generated here.) Every task (all of ``TASKS`` unless ``tasks`` names some) gets
        ``runs_per_task`` training runs (default ``DEFAULT_RUNS_PER_TASK``), or, with ``num_models``, about
        ``num_models`` checkpoints in ceil(num_models / checkpoints per run) runs spread evenly over the tasks.
        Every run records its checkpoints (early to final epoch). With ``reuse``, a zoo already in
        ``out_dir`` made with the same generation args is loaded instead. ``shard=(i, n)``
        trains only the groups g with g % n == i (merge the n parts with ``merge_zoos``).
        ``out_dir=None`` keeps the zoo in memory. ``workers`` > 1 trains groups in that many
        single-threaded worker processes (one per core); the result does not depend on it.
        """
        ckpts = checkpoint_schedule(epochs, checkpoints_per_run)
        task_names = sorted(canonical_name(t) for t in (tasks if tasks is not None else TASKS))
        if num_models is not None and runs_per_task is not None:
            raise ValueError("give num_models or runs_per_task, not both")
        if num_models is None:
            runs_per_task = DEFAULT_RUNS_PER_TASK if runs_per_task is None else runs_per_task
            if runs_per_task < 1:
                raise ValueError(f"runs_per_task must be >= 1, got {runs_per_task}")
            num_runs = runs_per_task * len(task_names)
        else:
            num_runs = math.ceil(num_models / len(ckpts))
        gen_args = dict(num_runs=int(num_runs), epochs=int(epochs), checkpoints_per_run=int(checkpoints_per_run),
                        card_task_fraction=float(card_task_fraction), seed=int(seed), group_size=int(group_size),
                        cnn_fraction=float(cnn_fraction), tasks=task_names if tasks is not None else None,
                        min_groups=int(min_groups), cnn_bn_fraction=float(cnn_bn_fraction),
                        resnet_fraction=float(resnet_fraction), task_registry=registry_hash(task_names),
                        format_version=ZOO_FORMAT_VERSION)
        shard_str = f"{shard[0]}/{shard[1]}" if shard is not None else None
        if out_dir is not None and reuse and (Path(out_dir) / "zoo.json").exists():
            manifest = read_manifest(Path(out_dir))
            if manifest.get("generation_args") == gen_args and manifest.get("shard") == shard_str:
                log.info("reusing zoo in %s (same generation args)", out_dir)
                return cls.load(out_dir)
            log.warning("zoo in %s was made with other args; regenerating it", out_dir)
        plans = plan_zoo(num_runs, seed, group_size, cnn_fraction, card_task_fraction, task_names, min_groups,
                         cnn_bn_fraction, resnet_fraction)
        if shard is not None:
            i, n = shard
            if not 0 <= i < n:
                raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
            plans = [p for p in plans if p.group_index % n == i]
        rows, weights, specs = [], {}, {}
        t0 = time.time()
        for k, (plan, (r, w)) in enumerate(zip(plans, train_groups(plans, epochs, ckpts, workers))):
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
    def from_checkpoints(cls, folder: str | Path, recursive: bool = True, follow_symlinks: bool = False
                         ) -> tuple["ModelZooDataset", list["CheckpointError"]]:
        """Load every .safetensors/.pt/.pth file under ``folder`` (nothing in a file is executed).

        Files are found as the model database finds them (``checkpoint_folder.scan_checkpoints``): links are
        not followed unless ``follow_symlinks`` (and then only links that stay inside ``folder``); a link,
        dangling link or unreadable folder is reported, not loaded. Returns the zoo of the files that load and
        one ``CheckpointError`` per file that does not.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a directory")
        files, problems = scan_checkpoints(folder, follow_symlinks)
        if not recursive:
            files = [p for p in files if p.parent == folder]
            problems = [e for e in problems if Path(e.source).parent == folder]
        rows, weights, specs = [], {}, {}
        errors = [CheckpointError(e.source, e.cause) for e in problems]
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
    from config import ZooConfig

    z = ZooConfig()  # the experiment's defaults: a zoo made here with default flags is the one run_experiment reuses
    p = argparse.ArgumentParser(description="weightzoo model zoo: generate (train), merge shards, inspect")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="train a zoo (or one shard of it)")
    g.add_argument("--out", required=True, help="zoo directory")
    g.add_argument("--runs_per_task", type=int, default=z.runs_per_task, help="training runs of every task")
    g.add_argument("--zoo_scale", type=int, default=z.zoo_scale,
                   help="multiplies the runs per task (9: ~33k checkpoints of all tasks; shard it with --shard)")
    g.add_argument("--num_models", type=int, default=None,
                   help="instead of runs per task: about this many checkpoints, spread evenly over the tasks")
    g.add_argument("--num_tasks", type=int, default=None, help="only this many tasks, spread over every shape group")
    g.add_argument("--small", action="store_true", help=f"small zoo preset ({SMALL_ZOO_TASKS} tasks)")
    g.add_argument("--epochs", type=int, default=z.zoo_epochs, help="training epochs per run")
    g.add_argument("--checkpoints_per_run", type=int, default=z.checkpoints_per_run,
                   help="checkpoints per run")
    g.add_argument("--card_task_fraction", type=float, default=z.card_task_fraction,
                   help="fraction of model cards naming the task (> 0: the metadata baselines become partial oracles)")
    g.add_argument("--seed", type=int, default=z.zoo_seed, help="zoo seed")
    g.add_argument("--cnn_fraction", type=float, default=z.cnn_fraction,
                   help="fraction of runs that are CNNs (8x8 image tasks)")
    g.add_argument("--cnn_bn_fraction", type=float, default=z.cnn_bn_fraction,
                   help="fraction of runs that are Conv-BN-ReLU-MaxPool CNNs with a flatten head (image tasks)")
    g.add_argument("--resnet_fraction", type=float, default=z.resnet_fraction,
                   help="fraction of runs that are small ResNet-style CNNs (identity residual blocks; image tasks)")
    g.add_argument("--shard", default=None, help="i/n: train only shard i of n (default: RANK/WORLD_SIZE if set)")
    g.add_argument("--tasks", default=None, help="comma-separated task names (default: all of TASKS)")
    g.add_argument("--group_size", type=int, default=z.zoo_group_size,
                   help="runs trained together as one stacked batch")
    g.add_argument("--min_groups", type=int, default=DEFAULT_MIN_GROUPS, help="shrink groups (>= 8 runs) to get this many")
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
        if a.tasks and (a.num_tasks or a.small):
            p.error("--tasks names the tasks; --num_tasks and --small choose them: give one")
        n_tasks = a.num_tasks or (SMALL_ZOO_TASKS if a.small else None)
        tasks = a.tasks.split(",") if a.tasks else (task_subset(n_tasks) if n_tasks else None)
        t = time.time()
        zoo = ModelZooDataset.create_synthetic_model_zoo(
            a.out, a.num_models, a.epochs, a.checkpoints_per_run, a.card_task_fraction, a.seed, group_size=a.group_size,
            min_groups=a.min_groups, cnn_fraction=a.cnn_fraction, tasks=tasks,
            cnn_bn_fraction=a.cnn_bn_fraction, resnet_fraction=a.resnet_fraction,
            shard=_parse_shard(a.shard), reuse=not a.no_reuse, workers=a.workers, progress=True,
            runs_per_task=None if a.num_models is not None else a.runs_per_task * a.zoo_scale)
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

