"""Architecture spec: the one description of a network that every stage reads.

A spec is a frozen dataclass (JSON-serialisable) listing the parametric layers of a
feed-forward network in order. The zoo trainer, the graph converter and its inverse,
the baselines and the checkpoint loader all read the same spec, so a network is never
described twice.

Supported family (the zoo's):
  * MLP:  input (features,) -> Linear -> act -> ... -> Linear (logits)
  * CNN:  input (C, H, W) -> Conv2d(k, padding=k//2) -> act -> ... -> global average
          pooling -> Linear -> act -> ... -> Linear (logits)

Extensions for checkpoints from the wild (``LayerSpec`` fields that are omitted from
``to_dict``/``arch_id`` at their defaults, so the zoo's specs and ids are unchanged):
  * ``pool="max2"``/``"avg2"`` (any ``max{k}``/``avg{k}``): k x k pooling, stride k, after a conv
    layer's activation (Conv -> [BN folded] -> act -> Pool);
  * ``flatten=True`` on the first linear layer: its input is the flattened (C, H, W) map
    (channel-major, as ``nn.Flatten``) instead of global average pooling;
  * ``residual_from=s``: the output of layer s (-1: the network input) is added to this
    layer's pre-activation (an identity shortcut, ResNet style).
BatchNorm (eval mode) has no spec entry: it is folded into the preceding conv/linear
(``checkpoint_import.fold_batchnorm``); Dropout is the identity at inference.

State-dict keys are ``layers.{i}.weight`` / ``layers.{i}.bias`` for parametric layer i.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Activation ids are stable: they are stored in graphs and metadata.
ACTIVATIONS: dict[str, int] = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "gelu": 4}
LEAKY_RELU_SLOPE = 0.01
# Activations for which a positive per-neuron rescaling is an exact symmetry.
POSITIVE_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})
# Activations for which a per-neuron sign flip is an exact symmetry (odd functions).
ODD = frozenset({"tanh", "identity"})
LAYER_KINDS = ("linear", "conv2d")
_POOL_RE = re.compile(r"^(max|avg)([1-9][0-9]*)$")


def parse_pool(pool: str) -> tuple[str, int] | None:
    """``"max2"`` -> ("max", 2); ``""`` -> None. ValueError on anything else."""
    if pool == "":
        return None
    m = _POOL_RE.match(pool)
    if m is None or int(m.group(2)) < 2:
        raise ValueError(f"unknown pool {pool!r}; supported: '' or 'max{{k}}'/'avg{{k}}' with k >= 2 (e.g. 'max2')")
    return m.group(1), int(m.group(2))


def apply_pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """k x k max/average pooling with stride k (floor mode, as nn.MaxPool2d(k)/nn.AvgPool2d(k))."""
    parsed = parse_pool(pool)
    if parsed is None:
        return x
    op, k = parsed
    return F.max_pool2d(x, k) if op == "max" else F.avg_pool2d(x, k)


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the named activation (one of ACTIVATIONS)."""
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, LEAKY_RELU_SLOPE)
    if name == "tanh":
        return torch.tanh(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class LayerSpec:
    """One parametric layer followed by its activation."""

    kind: str  # "linear" or "conv2d"
    in_dim: int  # input features (linear) or input channels (conv)
    out_dim: int  # output features (linear) or output channels (conv)
    activation: str  # applied after the layer; "identity" for the logits layer
    kernel_size: int = 1  # square conv kernel side; 1 for linear
    # --- extensions (omitted from to_dict at their defaults, see the module docstring) ---
    pool: str = ""  # "max{k}"/"avg{k}": pooling after the activation (conv layers only)
    flatten: bool = False  # first linear after convs: input is the flattened (C, H, W) map, in_dim = C*H*W
    residual_from: int | None = None  # add layer s's output (-1: network input) before the activation

    def __post_init__(self) -> None:
        parse_pool(self.pool)  # raises on an unknown pool
        if self.pool and self.kind != "conv2d":
            raise ValueError(f"pooling ({self.pool!r}) is only supported after conv layers, not {self.kind}")
        if self.flatten and self.kind != "linear":
            raise ValueError("flatten=True marks the first linear layer after convs; got a conv layer")
        if self.residual_from is not None and self.residual_from < -1:
            raise ValueError(f"residual_from must be -1 (network input) or a layer index, got {self.residual_from}")
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; supported: {LAYER_KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        if self.in_dim < 1 or self.out_dim < 1 or self.kernel_size < 1:
            raise ValueError(f"layer dims must be positive, got {self}")
        if self.kind == "linear" and self.kernel_size != 1:
            raise ValueError(f"a linear layer has kernel_size 1, got {self.kernel_size}")
        if self.kind == "conv2d" and self.kernel_size % 2 == 0:
            raise ValueError(f"conv kernels must be odd ('same' padding), got {self.kernel_size}")

    def to_dict(self) -> dict:
        """Plain dict; the extension fields are left out at their defaults (keeps old arch_ids)."""
        d = asdict(self)
        for k, default in _LAYER_EXTENSION_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return d

    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_dim, self.in_dim)
        return (self.out_dim, self.in_dim, self.kernel_size, self.kernel_size)


_LAYER_EXTENSION_DEFAULTS = {"pool": "", "flatten": False, "residual_from": None}


@dataclass(frozen=True)
class ArchitectureSpec:
    """A feed-forward network: input shape plus its parametric layers in order."""

    input_shape: tuple[int, ...]  # (features,) for MLPs, (C, H, W) for CNNs
    layers: tuple[LayerSpec, ...]
    name: str = field(default="", compare=False)  # human label, e.g. "mlp-64-32-10"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("an architecture needs at least one layer")
        first = self.layers[0]
        if first.kind == "conv2d" and len(self.input_shape) != 3:
            raise ValueError(f"a CNN needs input_shape (C, H, W), got {self.input_shape}")
        if first.kind == "linear" and len(self.input_shape) != 1:
            raise ValueError(f"an MLP needs input_shape (features,), got {self.input_shape}")
        if first.in_dim != self.input_shape[0]:
            raise ValueError(f"layer 0 expects {first.in_dim} inputs but input_shape is {self.input_shape}")
        seen_linear = False
        if first.flatten:
            raise ValueError("layer 0: flatten=True needs a conv layer before it (feed an MLP flattened inputs)")
        sizes = self.spatial_sizes()  # raises if pooling shrinks a map to nothing
        for i, (a, b) in enumerate(zip(self.layers, self.layers[1:])):
            if b.flatten:
                if a.kind != "conv2d":
                    raise ValueError(f"layer {i + 1}: flatten=True needs a conv layer before it, layer {i} is {a.kind}")
                h, w = sizes[i]
                if b.in_dim != a.out_dim * h * w:
                    raise ValueError(f"layer {i + 1} (flatten) expects {b.in_dim} inputs but layer {i} gives "
                                     f"{a.out_dim} channels x {h}x{w} = {a.out_dim * h * w}")
                continue
            if a.out_dim != b.in_dim:
                raise ValueError(f"layer {i} outputs {a.out_dim} but layer {i + 1} expects {b.in_dim}")
        for i, layer in enumerate(self.layers):
            if layer.kind == "linear":
                seen_linear = True
            elif seen_linear:
                raise ValueError(f"layer {i}: conv after linear is not supported")
        if self.layers[-1].kind != "linear":
            raise ValueError("the last layer must be linear (the classifier head)")
        self._check_residuals(sizes)

    def _check_residuals(self, sizes: list[tuple[int, int] | None]) -> None:
        """Identity shortcuts need the same kind, width and spatial size at both ends."""
        L = len(self.layers)
        for j, layer in enumerate(self.layers):
            s = layer.residual_from
            if s is None:
                continue
            where = f"layer {j} (residual_from={s})"
            if j == L - 1:
                raise ValueError(f"{where}: a shortcut into the output layer is not supported")
            if s >= j:
                raise ValueError(f"{where}: the shortcut source must be an earlier layer (or -1, the input)")
            if layer.flatten:
                raise ValueError(f"{where}: a shortcut into a flatten layer is not supported")
            src_kind = ("conv2d" if self.is_cnn else "linear") if s == -1 else self.layers[s].kind
            src_width = self.input_shape[0] if s == -1 else self.layers[s].out_dim
            src_size = (tuple(self.input_shape[1:]) if self.is_cnn else None) if s == -1 else sizes[s]
            if src_kind != layer.kind:
                raise ValueError(f"{where}: adds a {src_kind} output to a {layer.kind} layer")
            if src_width != layer.out_dim:
                raise ValueError(f"{where}: identity shortcut needs equal widths, source has {src_width}, "
                                 f"layer has {layer.out_dim} (projection shortcuts are not supported)")
            pre_pool = self._pre_pool_size(j, sizes)
            if src_size != pre_pool:
                raise ValueError(f"{where}: source map {src_size} differs from the layer's map {pre_pool} "
                                 f"(a pooling between them; strided/projection shortcuts are not supported)")

    def _pre_pool_size(self, j: int, sizes: list[tuple[int, int] | None]) -> tuple[int, int] | None:
        if self.layers[j].kind != "conv2d":
            return None
        return tuple(self.input_shape[1:]) if j == 0 else sizes[j - 1]  # 'same' conv keeps the size

    def spatial_sizes(self) -> list[tuple[int, int] | None]:
        """(H, W) of each layer's output map after its pooling; None for linear layers."""
        out: list[tuple[int, int] | None] = []
        hw = tuple(self.input_shape[1:]) if len(self.input_shape) == 3 else None
        for i, layer in enumerate(self.layers):
            if layer.kind != "conv2d" or hw is None:  # (a conv without a map is refused by __post_init__)
                out.append(None)
                continue
            parsed = parse_pool(layer.pool)
            if parsed is not None:
                k = parsed[1]
                hw = (hw[0] // k, hw[1] // k)
                if min(hw) < 1:
                    raise ValueError(f"layer {i}: pooling {layer.pool!r} shrinks the map to {hw}")
            out.append(hw)
        return out

    def edge_window(self, i: int) -> tuple[int, int]:
        """(kh, kw) of one neuron-graph edge of layer i: the conv kernel, (H, W) for a flatten layer
        (one edge per (output neuron, input channel) carries the channel's H x W block of columns), or (1, 1)."""
        layer = self.layers[i]
        if layer.kind == "conv2d":
            return layer.kernel_size, layer.kernel_size
        if layer.flatten:
            return self.spatial_sizes()[i - 1]  # type: ignore[return-value]
        return 1, 1

    def graph_in_dim(self, i: int) -> int:
        """Input neurons of layer i in the neuron graph (channels for a flatten layer, else in_dim)."""
        layer = self.layers[i]
        if layer.flatten:
            return self.layers[i - 1].out_dim
        return layer.in_dim

    @property
    def is_extended(self) -> bool:
        """True if any layer uses pooling, a flatten head or a shortcut (not the zoo's plain family)."""
        return any(layer.to_dict().keys() - {"kind", "in_dim", "out_dim", "activation", "kernel_size"}
                   for layer in self.layers)

    def residual_groups(self) -> list[tuple[int, ...]]:
        """Sets of layers whose output channels are coupled by identity shortcuts (sorted, size >= 2).

        Channel c of every member is added into channel c of another member, so they must be permuted
        (and rescaled / sign-flipped) together. -1 stands for the network input (then the group has no
        freedom at all).
        """
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent.setdefault(a, a) != a:
                a = parent[a]
            return a

        for j, layer in enumerate(self.layers):
            if layer.residual_from is not None:
                ra, rb = find(layer.residual_from), find(j)
                parent[max(ra, rb)] = min(ra, rb)
        groups: dict[int, list[int]] = {}
        for a in parent:
            groups.setdefault(find(a), []).append(a)
        return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)

    # --- derived facts -------------------------------------------------------
    @property
    def is_cnn(self) -> bool:
        return self.layers[0].kind == "conv2d"

    @property
    def num_inputs(self) -> int:
        """Input neurons in the neuron graph: features (MLP) or channels (CNN)."""
        return self.input_shape[0]

    @property
    def num_outputs(self) -> int:
        return self.layers[-1].out_dim

    @property
    def num_conv(self) -> int:
        return sum(layer.kind == "conv2d" for layer in self.layers)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(layer.out_dim for layer in self.layers[:-1])

    @property
    def family(self) -> str:
        """Coarse family label, e.g. 'mlp-2h' or 'cnn-3c'."""
        if self.is_cnn:
            if any(layer.residual_from is not None for layer in self.layers):
                return f"rescnn-{self.num_conv}c"
            return f"cnn-{self.num_conv}c" + ("-flat" if any(layer.flatten for layer in self.layers) else "")
        if any(layer.residual_from is not None for layer in self.layers):
            return f"resmlp-{len(self.layers) - 1}h"
        return f"mlp-{len(self.layers) - 1}h"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, layer in enumerate(self.layers):
            shapes[f"layers.{i}.weight"] = layer.weight_shape()
            shapes[f"layers.{i}.bias"] = (layer.out_dim,)
        return shapes

    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes().values())

    # --- serialisation -------------------------------------------------------
    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "layers": [l.to_dict() for l in self.layers], "name": self.name}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ArchitectureSpec":
        unknown = set(d) - {"input_shape", "layers", "name"}
        if unknown:
            raise ValueError(f"unknown keys in architecture spec: {sorted(unknown)}")
        try:
            layers = tuple(LayerSpec(**layer) for layer in d["layers"])
        except TypeError as e:
            raise ValueError(f"bad layer entry in architecture spec: {e}") from e
        return cls(input_shape=tuple(d["input_shape"]), layers=layers, name=d.get("name", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ArchitectureSpec":
        return cls.from_dict(json.loads(s))

    @property
    def arch_id(self) -> str:
        """Stable short id of the structure (the name does not enter it)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    # --- checks --------------------------------------------------------------
    def validate_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Raise ValueError naming ``source`` and the offending key if ``sd`` does not fit."""
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(sd))
        extra = sorted(set(sd) - set(expected))
        if missing or extra:
            raise ValueError(f"{source}: keys do not match the spec (missing {missing}, unexpected {extra})")
        for key, shape in expected.items():
            t = sd[key]
            if tuple(t.shape) != shape:
                raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, the spec needs {shape}")
            if not torch.is_floating_point(t):
                raise ValueError(f"{source}: {key} has dtype {t.dtype}, expected floating point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{source}: {key} contains NaN or Inf")


def mlp_spec(n_in: int, hidden: Sequence[int], n_out: int, activation: str) -> ArchitectureSpec:
    dims = [n_in, *hidden, n_out]
    layers = tuple(
        LayerSpec("linear", a, b, activation if i < len(dims) - 2 else "identity")
        for i, (a, b) in enumerate(zip(dims, dims[1:]))
    )
    name = "mlp-" + "-".join(str(d) for d in dims) + f"-{activation}"
    return ArchitectureSpec((n_in,), layers, name)


def cnn_spec(
    input_shape: Sequence[int], channels: Sequence[int], kernel_size: int, n_out: int, activation: str,
    hidden: Sequence[int] = (),
) -> ArchitectureSpec:
    """Conv layers (same padding) -> global average pooling -> optional hidden linears -> logits."""
    c_in = int(input_shape[0])
    layers = []
    for c in channels:
        layers.append(LayerSpec("conv2d", c_in, c, activation, kernel_size))
        c_in = c
    dims = [c_in, *hidden, n_out]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(LayerSpec("linear", a, b, activation if i < len(dims) - 2 else "identity"))
    name = f"cnn-{'-'.join(map(str, channels))}-k{kernel_size}-{activation}"
    return ArchitectureSpec(tuple(input_shape), tuple(layers), name)


def shortcut_sources(spec: ArchitectureSpec) -> set[int]:
    """Layers whose output (after activation and pooling; -1: the input) a later shortcut adds."""
    return {layer.residual_from for layer in spec.layers if layer.residual_from is not None}


def finish_layer(h: torch.Tensor, i: int, layer: LayerSpec, saved: dict[int, torch.Tensor], sources: set[int]
                 ) -> torch.Tensor:
    """Layer ``i`` after its conv/linear (and BatchNorm): + shortcut (``residual_from``), activation, pooling;
    the result is kept in ``saved`` when it is one of ``sources`` (:func:`shortcut_sources`)."""
    if layer.residual_from is not None:
        h = h + saved[layer.residual_from]
    h = apply_activation(h, layer.activation)
    if layer.pool:
        h = apply_pool(h, layer.pool)
    if i in sources:
        saved[i] = h
    return h


def forward_layers(spec: ArchitectureSpec, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Functional forward pass keeping every layer's output: ``x`` (B, *input_shape) -> one tensor per layer,
    (B, C, H, W) for conv layers and (B, out) for linear ones, each after its shortcut, activation and pooling;
    the last is the logits (B, num_outputs). Probes read the hidden layers' responses here.
    """
    sources = shortcut_sources(spec)
    saved = {-1: x} if -1 in sources else {}  # outputs that a later shortcut adds
    h, outs = x, []
    for i, layer in enumerate(spec.layers):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        if layer.kind == "conv2d":
            h = F.conv2d(h, w, b, padding=layer.kernel_size // 2)
        else:
            if h.dim() == 4:  # flatten (channel-major), or global average pooling, joins convs to linears
                h = h.flatten(1) if layer.flatten else h.mean(dim=(2, 3))
            h = F.linear(h, w, b)
        h = finish_layer(h, i, layer, saved, sources)
        outs.append(h)
    return outs


def forward(spec: ArchitectureSpec, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Functional forward pass: ``x`` (B, *input_shape) -> logits (B, num_outputs).

    Per layer: conv/linear, + shortcut (``residual_from``), activation, pooling (``pool``).
    """
    return forward_layers(spec, params, x)[-1]


class SpecNet(nn.Module):
    """An ``nn.Module`` built from a spec; its state_dict keys match ``spec.param_shapes()``."""

    def __init__(self, spec: ArchitectureSpec):
        super().__init__()
        self.spec = spec
        mods = []
        for layer in spec.layers:
            if layer.kind == "linear":
                mods.append(nn.Linear(layer.in_dim, layer.out_dim))
            else:
                mods.append(nn.Conv2d(layer.in_dim, layer.out_dim, layer.kernel_size, padding=layer.kernel_size // 2))
        self.layers = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.spec, dict(self.named_parameters()), x)


def build_model(spec: ArchitectureSpec, state_dict: Mapping[str, torch.Tensor] | None = None) -> SpecNet:
    """Instantiate a network for ``spec``, optionally loading (validated) weights."""
    net = SpecNet(spec)
    if state_dict is not None:
        spec.validate_state_dict(state_dict)
        net.load_state_dict(dict(state_dict))
    return net
