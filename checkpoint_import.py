"""Checkpoints from the wild -> (ArchitectureSpec, state_dict) with ``layers.{i}.*`` keys.

Reads the common published shapes of small image/tabular classifiers, from Sequential-style or
nested-module state_dicts (``features.0.weight``, ``features.1.running_mean``, ``classifier.2.weight``,
``blocks.1.body.3.weight``):

* Conv2d (square, odd kernel, stride 1, 'same' padding) and Linear layers, with or without bias;
* BatchNorm1d/2d in eval mode, folded exactly into the conv/linear just before it
  (``fold_batchnorm``), affine or not; BN adds no layer and no node kind;
* parameter-free layers: activations, Dropout (the identity at inference), MaxPool/AvgPool
  (``LayerSpec.pool``), Flatten -> Linear heads (``LayerSpec.flatten``) or global average pooling;
* identity-shortcut residual blocks (``LayerSpec.residual_from``).

What the keys cannot tell comes from a sidecar JSON (``<file>.spec.json`` or ``spec.json`` in the
folder), all keys optional:

  ``activation``   "relu" (default, with a warning) or a list with one entry per hidden layer;
  ``input_shape``  [C, H, W] or [features]; a CNN without it is assumed 8x8 (with a warning);
  ``pool``         "max2" after every conv, or a list with one entry ("", "max2", "avg2", ...) per conv;
  ``residual``     [[s, j], ...]: the output of parametric layer s (-1: the input) is added to layer
                   j's pre-activation (layers counted in file order, BatchNorms not counted);
  ``bn_eps``       BatchNorm epsilon (not stored in state_dicts; default 1e-5, PyTorch's);
  ``order``        module prefixes (BatchNorms included) in forward order, for named modules in a
                   .safetensors file (see below);
  ``spec``         a whole ``ArchitectureSpec`` dict instead of the above;
  plus the zoo's metadata keys (task, dataset, lr, ...; ``data_prep.METADATA_COLUMNS``), returned as metadata.

Orders the keys cannot show are assumed to be the usual ones: Conv/Linear -> BatchNorm -> activation
-> pooling (max pooling commutes with the monotone relu/leaky_relu/tanh, so MaxPool -> ReLU reads the
same; average pooling before a nonlinearity, or a BatchNorm *after* the activation, would be read
wrongly: such files need a sidecar ``spec`` and BN-free weights).

Module order: natural key order where it is certain (numbered siblings ``features.2`` before
``features.10``, or one stem ``fc1``, ``fc2``); between named siblings (``conv1``/``bn1``,
``features``/``classifier``) the key order of a ``torch.save``d file (the registration order, with a
warning), or the sidecar ``order`` (needed for .safetensors, whose keys come back sorted). A
BatchNorm folds into the conv/linear right before it. Anything else is refused with one
``ValueError`` (``CheckpointError`` from ``read_checkpoint``) naming the first module that cannot be
placed and why. Loading never executes code: ``torch.load(weights_only=True)`` or safetensors.

Reading is bounded before anything is allocated (``ReadLimits``): the file size, the uncompressed sizes
in a ``.pt`` file's zip directory (a small file that inflates to gigabytes is refused unread) and the
shapes in a safetensors header are checked against caps on elements per tensor and per model; the
pre-1.6 (non-zip) ``torch.save`` format, whose sizes cannot be checked without reading, is not read.
A sidecar is read only if small, UTF-8 and shallow; every failure is a ``CheckpointError`` naming
the file and the cause in one line.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

import architecture as A

__all__ = ["CheckpointError", "CHECKPOINT_SUFFIXES", "fold_batchnorm", "infer_wild_spec", "read_tensors",
           "read_sidecar", "read_checkpoint", "SIDECAR_KEYS", "DEFAULT_BN_EPS"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")  # the files a folder of checkpoints is read from

DEFAULT_BN_EPS = 1e-5  # nn.BatchNorm default; the state_dict does not store eps
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
_META_KEYS = {"task", "dataset", "task_family", "optimizer", "lr", "weight_decay", "epoch", "seed", "test_acc",
              "train_acc"}
SIDECAR_KEYS = frozenset({"activation", "input_shape", "spec", "pool", "residual", "bn_eps", "order"} | _META_KEYS)
_BN_STATS = {"running_mean", "running_var", "num_batches_tracked"}


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded; ``file`` and ``cause`` say which and why (one line)."""

    def __init__(self, file: str | Path, cause: str):
        cause = " ".join(str(cause).split())
        super().__init__(f"{display_path(file)}: {cause}")
        self.file = str(file)
        self.cause = cause


def display_path(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: file-name bytes that are not UTF-8 are written ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ReadLimits:
    """Caps checked before a checkpoint's tensors are allocated (see the module docstring).

    Elements of any dtype count alike; 8 bytes per element (float64) bound the bytes a file may hold:
    ``8 * max_model_elements`` plus 64 MiB for everything else (pickle, zip records, optimizer state).
    """

    max_tensor_elements: int = 1 << 24  # 16.8M: 64 MiB of float32 in one tensor
    max_model_elements: int = 1 << 25  # 33.6M in the whole state_dict

    def __post_init__(self) -> None:
        if self.max_tensor_elements < 1 or self.max_model_elements < 1:
            raise ValueError(f"read limits must be >= 1, got {self}")

    @property
    def max_file_bytes(self) -> int:
        return 8 * self.max_model_elements + (64 << 20)


DEFAULT_LIMITS = ReadLimits()
MAX_SIDECAR_BYTES = 1 << 20  # a spec and metadata: kilobytes
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own cap


# --- reading files ------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_numel(path: Path, name: str, shape: Sequence[int], limits: ReadLimits) -> int:
    n = math.prod(int(d) for d in shape)
    if n > limits.max_tensor_elements:
        raise CheckpointError(path, f"tensor {name!r} of shape {tuple(shape)} has {n:,} elements, over the cap of "
                                    f"{limits.max_tensor_elements:,} per tensor (ReadLimits.max_tensor_elements)")
    return n


def _check_total(path: Path, total: int, limits: ReadLimits) -> None:
    if total > limits.max_model_elements:
        raise CheckpointError(path, f"{total:,} tensor elements in all, over the cap of {limits.max_model_elements:,} "
                                    f"per model (ReadLimits.max_model_elements)")


def _read_safetensors(path: Path, limits: ReadLimits) -> dict[str, Tensor]:
    """The header's shapes checked against ``limits`` first, then the tensors (read from memory: the
    safetensors library opens only UTF-8 paths)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 2 <= n <= min(_SAFETENSORS_MAX_HEADER, len(data) - 8):
        raise CheckpointError(path, f"not a readable safetensors file: header length {n:,} does not fit the "
                                    f"file of {len(data):,} bytes (truncated, corrupt or not safetensors)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(path, f"not a readable safetensors file: its header is not JSON ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a readable safetensors file: its header is not a JSON object")
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(path, f"not a readable safetensors file: tensor {name!r} has no valid shape")
        total += _check_numel(path, name, shape, limits)
    _check_total(path, total, limits)
    try:
        return load(data)
    except SafetensorError as e:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt): {e}") from e


def _check_zip_directory(path: Path, limits: ReadLimits) -> None:
    """Uncompressed sizes in a torch.save zip's directory against ``limits``, before anything is inflated."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, "refused unread: not a zip archive as torch.save writes (truncated or corrupt, "
                                    "not a PyTorch file, or the pre-1.6 format, whose sizes cannot be checked before "
                                    "reading; re-save such a file with a current torch.save)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable PyTorch checkpoint: its zip directory is corrupt ({e})") from e
    total = 0
    for info in infos:
        parts = info.filename.split("/")
        if parts[-1] == "data.pkl" and info.file_size > (64 << 20):
            raise CheckpointError(path, f"its pickle {info.filename!r} inflates to {_mib(info.file_size)}; a state_dict's "
                                        f"is kilobytes (not read)")
        if len(parts) >= 2 and parts[-2] == "data":  # one tensor storage
            if info.file_size > 8 * limits.max_tensor_elements:
                raise CheckpointError(path, f"storage {info.filename!r} inflates to {_mib(info.file_size)}, over "
                                            f"the cap of {limits.max_tensor_elements:,} elements per tensor (not read)")
            total += info.file_size
    if total > limits.max_file_bytes:
        raise CheckpointError(path, f"its tensors inflate to {_mib(total)}, over the cap of {_mib(limits.max_file_bytes)} "
                                    f"(ReadLimits.max_model_elements; not read)")


def read_tensors(path: str | Path, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, Tensor]:
    """Tensor dict of a .safetensors or .pt/.pth file (``torch.load(weights_only=True)``), CheckpointError otherwise.

    A training-script dict ``{"state_dict": sd, ...}`` (or ``model_state_dict``/``model``) is unwrapped.
    Sizes are checked against ``limits`` before tensors are allocated (module docstring).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "empty file")
    if size > limits.max_file_bytes:
        raise CheckpointError(path, f"file of {_mib(size)} is over the cap of {_mib(limits.max_file_bytes)} "
                                    f"(ReadLimits.max_model_elements; not read)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, limits)
    _check_zip_directory(path, limits)
    import pickle
    try:
        with warnings.catch_warnings(), open(path, "rb") as f:  # a file object: torch never sees the name's bytes
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses code and unknown globals
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise CheckpointError(path, f"refused by torch.load(weights_only=True), nothing was executed: {why}") from e
    except Exception as e:  # noqa: BLE001 -- torch.load on arbitrary bytes raises many types (IndexError, EOFError,
        # RuntimeError, RecursionError, ...); each is re-raised as this file's CheckpointError with its cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(path, f"not a readable PyTorch checkpoint (truncated or corrupt): "
                                    f"{type(e).__name__}: {first}") from e
    for key in _NESTED_STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(path, f"entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    # sizes as the tensors claim them (an expanded view can claim more than its storage holds)
    _check_total(path, sum(_check_numel(path, str(k), v.shape, limits) for k, v in obj.items()), limits)
    return dict(obj)


def sidecar_path(path: str | Path) -> Path | None:
    """The sidecar JSON of a checkpoint (``<file>.spec.json``, else ``spec.json`` beside it), or None.

    A symbolic link is returned as the link (dangling ones too): the caller decides whether to follow it."""
    path = Path(path)
    for side in (path.with_name(path.name + ".spec.json"), path.parent / "spec.json"):
        if side.is_symlink() or side.exists():
            return side
    return None


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON of a checkpoint (:func:`sidecar_path`), or {}. CheckpointError naming the sidecar
    if it is too large, not UTF-8, not JSON, nested too deeply or holds unknown keys."""
    path = Path(path)
    side = sidecar_path(path)
    if side is None:
        return {}
    where = f"sidecar {display_path(side.name)}"
    try:
        size = side.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise CheckpointError(path, f"{where} is {_mib(size)}, over the {_mib(MAX_SIDECAR_BYTES)} a sidecar may "
                                        f"hold (not read)")
        d = json.loads(side.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(path, f"{where} is not readable ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"{where} is not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"{where} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise CheckpointError(path, f"{where} is nested too deeply to be a spec") from e
    if not isinstance(d, dict):
        raise CheckpointError(path, f"{where} must hold a JSON object")
    if "layers" in d:  # a whole ArchitectureSpec
        d = {"spec": d}
    unknown = sorted(set(d) - SIDECAR_KEYS)
    if unknown:
        raise CheckpointError(path, f"{where} has unknown keys {unknown}; known: {sorted(SIDECAR_KEYS)}")
    return d


# --- BatchNorm folding ---------------------------------------------------------------------------------
def fold_batchnorm(weight: Tensor, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                   gamma: Tensor | None = None, beta: Tensor | None = None,
                   eps: float = DEFAULT_BN_EPS) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv/linear before it: returns (weight', bias') (float32).

    BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta with z = W x + b, so W' = s W (row-wise) and
    b' = s (b - mean) + beta with s = gamma / sqrt(var + eps). ``gamma``/``beta`` None: BN(affine=False).
    Computed in float64, so the folded layer matches the pair to float32 rounding.
    """
    out = weight.shape[0]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("gamma", gamma), ("beta", beta)):
        if t is not None and tuple(t.shape) != (out,):
            raise ValueError(f"BatchNorm {name} has shape {tuple(t.shape)}, the layer before it has {out} outputs")
    if bool((running_var < 0).any()):
        raise ValueError("BatchNorm running_var has negative entries")
    w, mean, var = weight.double(), running_mean.double(), running_var.double()
    b = bias.double() if bias is not None else torch.zeros(out, dtype=torch.float64)
    g = gamma.double() if gamma is not None else torch.ones(out, dtype=torch.float64)
    be = beta.double() if beta is not None else torch.zeros(out, dtype=torch.float64)
    s = g / torch.sqrt(var + eps)  # (out,)
    w2 = w * s.view(-1, *([1] * (w.dim() - 1)))
    b2 = (b - mean) * s + be
    return w2.float().contiguous(), b2.float().contiguous()


# --- architecture inference ----------------------------------------------------------------------------
def _natural_key(s: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t != ""]


@dataclass
class _Module:
    prefix: str
    params: dict[str, Tensor]

    @property
    def where(self) -> str:
        return f"module {self.prefix or '<root>'!r} ({', '.join(sorted(self.params))})"


@dataclass
class _Layer:
    prefix: str
    kind: str
    weight: Tensor
    bias: Tensor | None
    folded_bn: str = ""  # prefix of the BatchNorm folded into it


def _classify(m: _Module) -> str:
    """'linear' | 'conv2d' | 'bn'; ValueError naming the module for anything else."""
    names = set(m.params)
    if names & {"running_mean", "running_var"}:
        if not {"running_mean", "running_var"} <= names:
            raise ValueError(f"{m.where}: BatchNorm needs both running_mean and running_var")
        extra = names - _BN_STATS - {"weight", "bias"}
        if extra:
            raise ValueError(f"{m.where}: unexpected entries {sorted(extra)} beside BatchNorm statistics")
        if m.params["running_mean"].dim() != 1:
            raise ValueError(f"{m.where}: running_mean has {m.params['running_mean'].dim()} dims, BatchNorm has 1")
        return "bn"
    unknown = sorted(names - {"weight", "bias"})
    if unknown:
        key = f"{m.prefix}.{unknown[0]}" if m.prefix else unknown[0]
        raise ValueError(f"{m.where}: unsupported entry {key!r} (only Conv2d, Linear and BatchNorm parameters "
                         f"are supported: attention, embeddings, RNNs, ... are not)")
    if "weight" not in names:
        raise ValueError(f"{m.where}: a bias without a weight")
    w = m.params["weight"]
    if w.dim() == 1:
        raise ValueError(f"{m.where}: a normalization without running statistics (LayerNorm, GroupNorm, "
                         f"InstanceNorm or BatchNorm(track_running_stats=False)); it normalizes with statistics "
                         f"of each input, so it cannot be folded into the weights and is not supported")
    if w.dim() == 2:
        return "linear"
    if w.dim() == 4:
        kh, kw = w.shape[2:]
        if kh != kw or kh % 2 == 0:
            raise ValueError(f"{m.where}: conv kernel {kh}x{kw}; only square odd kernels (stride 1, 'same' "
                             f"padding) are supported")
        return "conv2d"
    raise ValueError(f"{m.where}: {m.prefix + '.' if m.prefix else ''}weight has {w.dim()} dims; unsupported layer "
                     f"(Conv1d/Conv3d/...; only Conv2d and Linear)")


def _ambiguous_siblings(prefixes: Sequence[str]) -> list[str] | None:
    """Sibling module names whose forward order natural sorting cannot tell (None if there are none).

    Natural order is trusted where siblings are numbered (``features.0``, ``features.10``) or share one
    stem (``fc1``, ``fc2``); ``conv1``/``bn1`` or ``features``/``classifier`` are not (alphabetical order
    would put ``bn1`` before ``conv1`` and ``classifier`` before ``features``).
    """
    children: dict[str, set[str]] = {}
    for p in prefixes:
        parts = p.split(".") if p else []
        for depth in range(len(parts)):
            children.setdefault(".".join(parts[:depth]), set()).add(parts[depth])
    for parent, names in sorted(children.items()):
        stems = {re.sub(r"\d+", "", n) for n in names}
        if len(names) > 1 and stems != {""} and len(stems) > 1:
            return sorted(f"{parent}.{n}" if parent else n for n in names)
    return None


def _module_order(mods: Mapping[str, "_Module"], side: Mapping[str, Any], file_order: bool
                  ) -> tuple[list[str], list[str]]:
    """Forward order of the modules (prefixes) and warnings; ValueError if it cannot be known."""
    if "order" in side:
        order = [str(p) for p in side["order"]]
        if sorted(order) != sorted(mods):
            raise ValueError(f"sidecar 'order' must list every module once: missing {sorted(set(mods) - set(order))}, "
                             f"unknown {sorted(set(order) - set(mods))}")
        return order, []
    ambiguous = _ambiguous_siblings(list(mods))
    if ambiguous is None:
        return sorted(mods, key=_natural_key), []
    if file_order:  # torch.save keeps the registration order, the forward order of Sequential-like modules
        return list(mods), [f"module order taken from the file's key order (named siblings {ambiguous[:4]})"]
    raise ValueError(f"the forward order of the named modules {ambiguous[:6]} cannot be read from a file that "
                     f"does not keep key order (safetensors sorts keys); give it in the sidecar 'order' "
                     f"(module prefixes, BatchNorms included), or use Sequential indices")


def _layers_from_state_dict(sd: Mapping[str, Tensor], side: Mapping[str, Any], file_order: bool
                            ) -> tuple[list[_Layer], list[str]]:
    """Parametric layers in forward order with their BatchNorms folded in, plus warnings."""
    eps = float(side.get("bn_eps", DEFAULT_BN_EPS))
    mods: dict[str, _Module] = {}
    for key, t in sd.items():
        prefix, _, name = key.rpartition(".")
        mods.setdefault(prefix, _Module(prefix, {})).params[name] = t
    layers: list[_Layer] = []
    order, warns = _module_order(mods, side, file_order)
    prev_was_bn = False
    for prefix in order:
        m = mods[prefix]
        kind = _classify(m)
        for name, t in m.params.items():
            key = f"{prefix}.{name}" if prefix else name
            target = f"BatchNorm folded into layers.{len(layers) - 1}" if kind == "bn" else f"layers.{len(layers)}.{name}"
            if name != "num_batches_tracked" and not torch.is_floating_point(t):
                raise ValueError(f"file key {key!r} -> {target} has dtype {t.dtype}, expected floating point")
            if name != "num_batches_tracked" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"file key {key!r} -> {target} contains NaN or Inf")
        if kind == "bn":
            if not layers:
                raise ValueError(f"{m.where}: a BatchNorm before any conv/linear layer cannot be folded "
                                 f"(normalize the inputs instead)")
            if prev_was_bn:
                raise ValueError(f"{m.where}: a second BatchNorm after {layers[-1].prefix!r} ("
                                 f"{layers[-1].folded_bn!r} is already folded into it)")
            last = layers[-1]
            n = last.weight.shape[0]
            if m.params["running_mean"].shape[0] != n:
                raise ValueError(f"{m.where}: normalizes {m.params['running_mean'].shape[0]} features but the "
                                 f"layer before it, {last.prefix!r}, has {n} outputs (a BatchNorm must follow its "
                                 f"conv/linear directly)")
            last.weight, last.bias = fold_batchnorm(last.weight, last.bias, m.params["running_mean"],
                                                    m.params["running_var"], m.params.get("weight"),
                                                    m.params.get("bias"), eps)
            last.folded_bn = prefix
            prev_was_bn = True
            continue
        prev_was_bn = False
        bias = m.params.get("bias")
        w = m.params["weight"]
        if bias is not None and tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"{m.where}: bias has shape {tuple(bias.shape)}, the weight needs ({w.shape[0]},)")
        layers.append(_Layer(prefix, kind, w, bias))
    if not layers:
        raise ValueError("no conv/linear layers in the state_dict")
    for layer in layers:
        if layer.bias is None:
            if not layer.folded_bn:
                warns.append(f"{layer.prefix} has no bias; zeros used")
            layer.bias = torch.zeros(layer.weight.shape[0])
    return layers, warns


def _per_layer(value: Any, n: int, what: str, default: Any) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"sidecar {what!r} must be a string or a list of {n} entries, got {value!r}")
    return list(value)


def infer_wild_spec(sd: Mapping[str, Tensor], sidecar: Mapping[str, Any] | None = None,
                    source: str = "state_dict", file_order: bool = True
                    ) -> tuple[A.ArchitectureSpec, dict[str, Tensor], list[str]]:
    """(spec, state_dict with ``layers.{i}.*`` keys (float32, BatchNorms folded), warnings).

    ``file_order``: the mapping's key order is the module registration order (a ``torch.save``d
    state_dict); then it decides between named siblings (``conv1``/``bn1``) that natural order cannot
    order. False for safetensors files (keys come back sorted): such files need the sidecar ``order``.
    Raises ValueError starting with ``source`` and naming the first module or layer that cannot be placed.
    """
    side = dict(sidecar or {})
    unknown = sorted(set(side) - SIDECAR_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown sidecar keys {unknown}; known: {sorted(SIDECAR_KEYS)}")
    try:
        return _infer(sd, side, file_order)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _infer(sd: Mapping[str, Tensor], side: dict, file_order: bool
           ) -> tuple[A.ArchitectureSpec, dict[str, Tensor], list[str]]:
    raw_layers, warns = _layers_from_state_dict(sd, side, file_order)
    out_sd: dict[str, Tensor] = {}
    for i, layer in enumerate(raw_layers):
        out_sd[f"layers.{i}.weight"] = layer.weight.float().contiguous()
        out_sd[f"layers.{i}.bias"] = layer.bias.float().contiguous()
    if "spec" in side:
        spec = A.ArchitectureSpec.from_dict(side["spec"])
        if len(spec.layers) != len(raw_layers):
            raise ValueError(f"sidecar spec has {len(spec.layers)} layers, the file has {len(raw_layers)} "
                             f"conv/linear layers ({[l.prefix for l in raw_layers]})")
        spec.validate_state_dict(out_sd, "state_dict (BatchNorms folded) vs sidecar spec")
        return spec, out_sd, warns

    L = len(raw_layers)
    n_conv = sum(l.kind == "conv2d" for l in raw_layers)
    acts = side.get("activation")
    if acts is None:
        warns.append("activation unknown (no sidecar); relu assumed")
    acts = _per_layer(acts, L - 1, "activation", "relu") + ["identity"]
    pools = _per_layer(side.get("pool"), n_conv, "pool", "")
    residual: dict[int, int] = {}
    for pair in side.get("residual", []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"sidecar 'residual' entries are [source, target] pairs, got {pair!r}")
        s, j = int(pair[0]), int(pair[1])
        if not 0 <= j < L or j in residual:
            raise ValueError(f"sidecar 'residual' target {j} is not a layer index (0..{L - 1}) or is used twice")
        residual[j] = s
    first = raw_layers[0]
    shape = side.get("input_shape")
    if first.kind == "conv2d":
        if shape is None:
            warns.append("CNN input size unknown (no sidecar input_shape); 8x8 assumed")
            shape = (first.weight.shape[1], 8, 8)
        if len(shape) != 3 or int(shape[0]) != first.weight.shape[1]:
            raise ValueError(f"input_shape {list(shape)} does not fit {first.prefix!r}, a conv with "
                             f"{first.weight.shape[1]} input channels (expected [C, H, W])")
        hw = (int(shape[1]), int(shape[2]))
    else:
        if shape is not None and tuple(int(s) for s in shape) != (first.weight.shape[1],):
            raise ValueError(f"input_shape {list(shape)} does not fit {first.prefix!r}, a linear layer with "
                             f"{first.weight.shape[1]} inputs")
        shape, hw = (first.weight.shape[1],), None

    specs: list[A.LayerSpec] = []
    conv_i = 0
    width = int(shape[0])
    for i, layer in enumerate(raw_layers):
        w = layer.weight
        n_out, n_in = int(w.shape[0]), int(w.shape[1])
        where = f"layer {i} ({layer.prefix!r}, {layer.kind} {n_in}->{n_out})"
        prev = raw_layers[i - 1].prefix if i else "the input"
        flatten = False
        if layer.kind == "conv2d":
            if specs and specs[-1].kind == "linear":
                raise ValueError(f"{where}: a conv after a linear layer cannot be placed")
            if n_in != width:
                raise ValueError(f"{where}: {layer.prefix}.weight takes {n_in} channels but {prev} gives {width}; "
                                 f"it cannot be placed in a chain (projection/downsample shortcuts are not supported)")
            pool = pools[conv_i]
            conv_i += 1
        else:
            pool = ""
            if hw is not None and (not specs or specs[-1].kind == "conv2d"):  # the conv -> linear junction
                h, wd = hw
                if n_in == width * h * wd and n_in != width:
                    flatten = True
                elif n_in != width:
                    raise ValueError(f"{where}: takes {n_in} inputs but the last conv gives {width} channels of "
                                     f"{h}x{wd} (global average pooling needs {width}, flatten {width * h * wd}); "
                                     f"set the sidecar 'input_shape'/'pool' if the map size is wrong")
            elif n_in != width:
                raise ValueError(f"{where}: {layer.prefix}.weight takes {n_in} inputs but {prev} gives {width}")
        try:
            spec_layer = A.LayerSpec(layer.kind, n_in, n_out, acts[i], int(w.shape[2]) if layer.kind == "conv2d" else 1,
                                     pool=pool or "", flatten=flatten, residual_from=residual.get(i))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        specs.append(spec_layer)
        width = n_out
        if layer.kind == "conv2d" and pool:
            k = A.parse_pool(pool)[1]
            hw = (hw[0] // k, hw[1] // k)
        if layer.kind == "linear":
            hw = None
    spec = A.ArchitectureSpec(tuple(int(s) for s in shape), tuple(specs))  # checks shortcuts, pools, flatten
    # the zoo's naming of plain specs, plus what the extensions and folded BatchNorms add
    name = f"{'cnn' if spec.is_cnn else 'mlp'}-" + "-".join(str(l.out_dim) for l in specs) + f"-{acts[0]}"
    tags = [t for t, on in (("bn", any(l.folded_bn for l in raw_layers)), ("pool", any(l.pool for l in specs)),
                            ("flat", any(l.flatten for l in specs)),
                            ("res", any(l.residual_from is not None for l in specs))) if on]
    spec = A.ArchitectureSpec(spec.input_shape, spec.layers, name + "".join(f"+{t}" for t in tags))
    spec.validate_state_dict(out_sd, "state_dict (BatchNorms folded)")
    return spec, out_sd, warns


def read_checkpoint(path: str | Path, limits: ReadLimits = DEFAULT_LIMITS
                    ) -> tuple[A.ArchitectureSpec, dict[str, Tensor], list[str], dict]:
    """(spec, state_dict, warnings, sidecar metadata) of one checkpoint file; ``CheckpointError`` otherwise.

    Reads Sequential-style and nested-module state_dicts (BatchNorm folded, pooling, flatten heads, shortcuts)
    and the zoo's own ``layers.{i}.*`` checkpoints; nothing in a file is executed.
    """
    path = Path(path)
    raw = read_tensors(path, limits)
    if not raw:
        raise CheckpointError(path, "empty state_dict (no tensors)")
    side = read_sidecar(path)
    try:
        spec, sd, warns = infer_wild_spec(raw, side, str(path), file_order=path.suffix != ".safetensors")
    except ValueError as e:
        msg, prefix = str(e), f"{path}: "
        raise CheckpointError(path, msg[len(prefix):] if msg.startswith(prefix) else msg) from e
    meta = {k: v for k, v in side.items() if k in _META_KEYS}
    return spec, sd, warns, meta
