"""Architecture spec: the one description of a network that every stage reads.

A spec is a frozen dataclass (JSON-serialisable) listing the parametric layers of a
feed-forward network in order. The zoo trainer, the graph converter and its inverse,
the baselines and the checkpoint loader all read the same spec, so a network is never
described twice.

Supported family (the zoo's):
  * MLP:  input (features,) -> Linear -> act -> ... -> Linear (logits)
  * CNN:  input (C, H, W) -> Conv2d(k, padding=k//2) -> act -> ... -> global average
          pooling -> Linear -> act -> ... -> Linear (logits)

State-dict keys are ``layers.{i}.weight`` / ``layers.{i}.bias`` for parametric layer i.
"""
from __future__ import annotations

import hashlib
import json
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

    def __post_init__(self) -> None:
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

    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_dim, self.in_dim)
        return (self.out_dim, self.in_dim, self.kernel_size, self.kernel_size)


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
        for i, (a, b) in enumerate(zip(self.layers, self.layers[1:])):
            if a.out_dim != b.in_dim:
                raise ValueError(f"layer {i} outputs {a.out_dim} but layer {i + 1} expects {b.in_dim}")
        for i, layer in enumerate(self.layers):
            if layer.kind == "linear":
                seen_linear = True
            elif seen_linear:
                raise ValueError(f"layer {i}: conv after linear is not supported")
        if self.layers[-1].kind != "linear":
            raise ValueError("the last layer must be linear (the classifier head)")

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
            return f"cnn-{self.num_conv}c"
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
        return {"input_shape": list(self.input_shape), "layers": [asdict(l) for l in self.layers], "name": self.name}

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


def forward(spec: ArchitectureSpec, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Functional forward pass: ``x`` (B, *input_shape) -> logits (B, num_outputs)."""
    h = x
    for i, layer in enumerate(spec.layers):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        if layer.kind == "conv2d":
            h = F.conv2d(h, w, b, padding=layer.kernel_size // 2)
        else:
            if h.dim() == 4:  # global average pooling joins conv channels to the first linear
                h = h.mean(dim=(2, 3))
            h = F.linear(h, w, b)
        h = apply_activation(h, layer.activation)
    return h


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
