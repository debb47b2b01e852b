"""Stacked (batched) training of many small networks of one architecture, and its per-model reference.

Models of one architecture train together as stacked tensors (bmm for linear layers, grouped
convolution for conv layers), each with its own init, hyperparameters, train rows and batch order,
so that model m follows the trajectory it would follow alone (``train_single_reference``: nn.Module +
torch.optim on the same batches). Plain MLPs step with a hand-written backward (``_plain_mlp_grad``), the
other families through autograd.

BatchNorm (after conv layers, ``bn_layers``) trains in training mode inside the stacked layout
(per-model, per-channel batch statistics of the grouped map; running statistics as nn.BatchNorm2d);
checkpoints hold the eval-mode network with every BatchNorm folded into its conv (``fold_bn_state``),
a plain ``ArchitectureSpec`` network that ``architecture.forward`` computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import architecture as A
from checkpoint_import import fold_batchnorm

SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
BN_MOMENTUM = 0.1  # nn.BatchNorm2d defaults: the zoo's BatchNorm trains like the module
BN_EPS = 1e-5
# Linear layers with fewer outputs run as (M, out, B) = W @ h^T: MKL's batched gemm is 3-7x faster (forward and
# weight gradient, measured on digits MLP heads with 2-10 outputs) with the few outputs as rows than as columns.
NARROW_OUT = 16


def bn_param_names(bn_layers: Sequence[int]) -> list[str]:
    """Trained BatchNorm parameters of the layers in ``bn_layers``: ``layers.{i}.bn_weight``/``bn_bias`` (gamma/beta)."""
    return [f"layers.{i}.{n}" for i in bn_layers for n in ("bn_weight", "bn_bias")]


def check_bn_layers(spec: A.ArchitectureSpec, bn_layers: Sequence[int]) -> tuple[int, ...]:
    """``bn_layers`` as a sorted tuple; ValueError unless each is a hidden conv layer of ``spec``."""
    out = tuple(sorted(set(int(i) for i in bn_layers)))
    for i in out:
        if not 0 <= i < len(spec.layers) or spec.layers[i].kind != "conv2d":
            raise ValueError(f"BatchNorm after layer {i} of {spec.name or spec.arch_id}: only conv layers take a "
                             f"BatchNorm (BatchNorm2d between the conv and its activation)")
    return out


def init_params(spec: A.ArchitectureSpec, seed: int, init_scale: float = 1.0,
                bn_layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """PyTorch's default Linear/Conv2d init (weights and biases uniform in +-1/sqrt(fan_in)) times ``init_scale``.

    With ``bn_layers``, also the BatchNorm gamma (ones) and beta (zeros) of those conv layers (``bn_param_names``),
    whose conv biases are zero (see ``stacked_forward``).
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for i, layer in enumerate(spec.layers):
        wshape = layer.weight_shape()
        bound = init_scale / math.sqrt(int(np.prod(wshape[1:])))
        out[f"layers.{i}.weight"] = (torch.rand(wshape, generator=g) * 2 - 1) * bound
        out[f"layers.{i}.bias"] = (torch.rand(layer.out_dim, generator=g) * 2 - 1) * bound
    for i in check_bn_layers(spec, bn_layers):
        out[f"layers.{i}.bias"] = torch.zeros(spec.layers[i].out_dim)  # a conv before a BatchNorm has no bias
        out[f"layers.{i}.bn_weight"] = torch.ones(spec.layers[i].out_dim)
        out[f"layers.{i}.bn_bias"] = torch.zeros(spec.layers[i].out_dim)
    return out


@dataclass
class StackedBatchNorm:
    """Running statistics of the BatchNorms of M stacked models (gamma/beta are trained params, see
    ``stacked_forward``): ``running_mean[k]``/``running_var[k]`` (M, C) for conv layer ``layers[k]``."""

    layers: tuple[int, ...]
    running_mean: list[torch.Tensor]
    running_var: list[torch.Tensor]
    momentum: float = BN_MOMENTUM
    eps: float = BN_EPS

    @classmethod
    def fresh(cls, spec: A.ArchitectureSpec, bn_layers: Sequence[int], num_models: int,
              dtype: torch.dtype = torch.float32) -> "StackedBatchNorm":
        """Statistics as nn.BatchNorm2d starts them: mean 0, variance 1."""
        layers = check_bn_layers(spec, bn_layers)
        return cls(layers, [torch.zeros(num_models, spec.layers[i].out_dim, dtype=dtype) for i in layers],
                   [torch.ones(num_models, spec.layers[i].out_dim, dtype=dtype) for i in layers])

    def rows(self, lo: int, hi: int) -> "StackedBatchNorm":
        """The statistics of models lo:hi, as views (updates reach these)."""
        return StackedBatchNorm(self.layers, [t[lo:hi] for t in self.running_mean],
                                [t[lo:hi] for t in self.running_var], self.momentum, self.eps)

    def state(self, params: Sequence[torch.Tensor], spec: A.ArchitectureSpec, models: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """Unfolded state (weights, biases, ``bn_weight``/``bn_bias``/``bn_running_mean``/``bn_running_var``),
        each (M, ...), for the given stacked ``params`` (as ``stacked_forward`` takes them); ``models`` reorders M."""
        names = list(spec.param_shapes()) + bn_param_names(self.layers)
        out = dict(zip(names, params))
        for i, rm, rv in zip(self.layers, self.running_mean, self.running_var):
            out[f"layers.{i}.bn_running_mean"], out[f"layers.{i}.bn_running_var"] = rm, rv
        return {k: (v if models is None else v[models]).detach().clone() for k, v in out.items()}


def fold_bn_state(spec: A.ArchitectureSpec, state: Mapping[str, torch.Tensor], eps: float = BN_EPS
                  ) -> dict[str, torch.Tensor]:
    """Fold the eval-mode BatchNorms of an unfolded state (``StackedBatchNorm.state`` keys, one model or a
    leading model dim) into their convs -> a plain state_dict of ``spec`` (``checkpoint_import.fold_batchnorm``,
    float32 precision, returned in the state's dtype)."""
    out = {k: state[k] for k in spec.param_shapes()}
    for i in range(len(spec.layers)):
        if f"layers.{i}.bn_weight" not in state:
            continue
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        bn = [state[f"layers.{i}.bn_{n}"] for n in ("running_mean", "running_var", "weight", "bias")]
        if w.dim() == 4:  # one model
            folded = [fold_batchnorm(w, b, *bn, eps=eps)]
        else:
            folded = [fold_batchnorm(w[m], b[m], *(t[m] for t in bn), eps=eps) for m in range(len(w))]
        for j, name in enumerate(("weight", "bias")):
            t = torch.stack([f[j] for f in folded]) if w.dim() == 5 else folded[0][j]
            out[f"layers.{i}.{name}"] = t.to(w.dtype)
    return out


def stacked_forward(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], x: torch.Tensor,
                    bn: StackedBatchNorm | None = None, training: bool = False) -> torch.Tensor:
    """Forward of M stacked models of one spec (the same function as ``architecture.forward`` per model).

    Per layer: conv/linear, [BatchNorm], + shortcut (``residual_from``), activation, pooling (``pool``);
    a ``flatten`` layer reads the conv map channel-major (as ``nn.Flatten``), other linears after
    convs read its global average.

    Args:
        params: [W_0, b_0, W_1, b_1, ...], each with a leading model dim M; with ``bn``, followed by
            gamma, beta (M, C) of each BatchNorm layer in ``bn.layers`` order (``bn_param_names``).
        x: (M, B, *spec.input_shape), a different batch per model.
        bn: BatchNorm after the conv layers ``bn.layers`` (None: none). ``training``: batch statistics
            (per model and channel: the grouped map keeps models apart) and running statistics updated in
            place (momentum, unbiased variance: as nn.BatchNorm2d); otherwise the running statistics normalise.
    Returns:
        logits (M, B, num_outputs).
    """
    M, B = x.shape[:2]
    L = len(spec.layers)
    bn_at = {i: k for k, i in enumerate(bn.layers)} if bn is not None else {}
    if bn is not None and len(params) != 2 * L + 2 * len(bn.layers):
        raise ValueError(f"stacked_forward: {len(params)} params for {L} layers and {len(bn.layers)} BatchNorms")
    # conv maps live as (B, M*C, H, W): one grouped conv (and one BatchNorm) runs all models
    # channels_last: oneDNN's grouped convolution with a few channels per group is ~6x faster (forward +
    # backward) in NHWC than in NCHW here; reshape/mean below read the logical (NCHW) order either way
    h = (x.transpose(0, 1).reshape(B, M * spec.input_shape[0], *x.shape[-2:]).contiguous(
        memory_format=torch.channels_last) if spec.is_cnn else x)
    sources = A.shortcut_sources(spec)
    saved = {-1: h} if -1 in sources else {}
    for i, layer in enumerate(spec.layers):
        w, b = params[2 * i], params[2 * i + 1]
        if layer.kind == "conv2d":
            if i in bn_at:
                # a conv before a BatchNorm has no bias (as published Conv-BN blocks): BN cancels it, and its
                # float-noise gradient would be blown up by Adam. The slot stays in params (zero, exactly zero grad).
                b = b * 0
            h = F.conv2d(h, w.reshape(M * layer.out_dim, layer.in_dim, layer.kernel_size, layer.kernel_size),
                         b.reshape(-1), padding=layer.kernel_size // 2, groups=M)
        else:
            if h.dim() == 4:  # (B, M*C, H, W) -> (M, B, C*H*W) channel-major per model, or GAP -> (M, B, C)
                h = (h.reshape(B, M, -1) if layer.flatten else h.mean(dim=(2, 3)).view(B, M, -1)).transpose(0, 1)
            if layer.out_dim < NARROW_OUT:
                h = _NarrowLinear.apply(h, w, b)  # (M, B, out)
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (M, B, out)
        if i in bn_at:
            h = _stacked_batch_norm(h, bn, bn_at[i], params[2 * L + 2 * bn_at[i]], params[2 * L + 2 * bn_at[i] + 1],
                                    training)
        h = A.finish_layer(h, i, layer, saved, sources)
    return h


class _NarrowLinear(torch.autograd.Function):
    """Stacked linear layer with few outputs, h (M, B, in) -> (M, B, out) (``NARROW_OUT``): the products run with
    the outputs as rows, W @ h^T and delta^T @ h, and the input gradient delta @ W comes out contiguous (autograd
    of the transposed product would hand the next activation's backward a strided gradient, 10x slower)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        return torch.baddbmm(b.unsqueeze(2), w, h.transpose(1, 2)).transpose(1, 2)  # (M, out, B) read as (M, B, out)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        h, w = ctx.saved_tensors
        gh = torch.bmm(g, w) if ctx.needs_input_grad[0] else None  # (M, B, in)
        return gh, torch.bmm(g.transpose(1, 2), h), g.sum(1)  # (M, out, in), (M, out)


def is_plain_mlp(spec: A.ArchitectureSpec) -> bool:
    """Linear layers only, no shortcut, no pooling: ``train_stacked`` runs its hand-written backward."""
    return all(layer.kind == "linear" and layer.residual_from is None and not layer.pool for layer in spec.layers)


def _train_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """The activation in the stacked training step. tanh is computed as 2 sigmoid(2h) - 1 (equal to float rounding:
    <= 2e-7 absolute in float32, 4e-16 in float64): torch.tanh's CPU kernel is ~6x slower than sigmoid's here, and
    it was 12% of a tanh MLP group's training. Checkpoint metrics and ``architecture.forward`` use torch.tanh."""
    if name == "tanh":
        return torch.sigmoid_(h.mul(2)).mul_(2).sub_(1)
    return A.apply_activation(h, name)


def _activation_backward(name: str, d: torch.Tensor, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(pre-activation) from d(loss)/d(activation output): the kernels autograd runs for each activation."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(d, out, 0)
    if name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(d, pre, A.LEAKY_RELU_SLOPE, False)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(d, out)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(d, pre)
    if name == "identity":
        return d
    raise ValueError(f"no backward for activation {name!r}")


def _plain_mlp_grad(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    minus_one: torch.Tensor) -> torch.Tensor:
    """Forward and backward of M stacked plain MLPs (``is_plain_mlp``) by hand: the flat gradient (M, P) of the sum of
    the models' mean cross-entropies, in ``_FlatParams`` layout. The products are those of ``stacked_forward`` and its
    autograd backward (same kernels, same operand layouts); without autograd's graph a small MLP's step is ~15% cheaper.

    Args: params: ``_FlatParams.views`` of the models' rows; x (M, B, in); y (M * B,) labels.
    """
    pre, outs, h = [], [x], x
    for i, layer in enumerate(spec.layers):
        w, b = params[2 * i], params[2 * i + 1]
        if layer.out_dim < NARROW_OUT:  # (M, out, B) read as (M, B, out), as _NarrowLinear
            z = torch.baddbmm(b.unsqueeze(2), w, h.transpose(1, 2)).transpose(1, 2)
        else:
            z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        h = _train_activation(z, layer.activation)
        pre.append(z), outs.append(h)
    d = _cross_entropy_grad(h, y, minus_one)
    grads: list[torch.Tensor] = [d] * (2 * len(spec.layers))
    for i in range(len(spec.layers) - 1, -1, -1):
        d = _activation_backward(spec.layers[i].activation, d, pre[i], outs[i + 1])
        # weight gradient in the layout the flat params hold it: (M, out, in) for narrow layers, else (M, in, out)
        gw = (torch.bmm(d.transpose(1, 2), outs[i]) if spec.layers[i].out_dim < NARROW_OUT
              else torch.bmm(outs[i].transpose(1, 2), d))
        grads[2 * i], grads[2 * i + 1] = gw.flatten(1), d.sum(1)
        if i:
            d = torch.bmm(d, params[2 * i])  # (M, B, in)
    return torch.cat(grads, 1)


def _stacked_batch_norm(h: torch.Tensor, bn: StackedBatchNorm, k: int, gamma: torch.Tensor, beta: torch.Tensor,
                        training: bool) -> torch.Tensor:
    """BatchNorm of the grouped map h (B, M*C, H, W); gamma/beta (M, C); updates bn's k-th statistics in training."""
    rm, rv = bn.running_mean[k], bn.running_var[k]  # (M, C)
    if not training:
        return F.batch_norm(h, rm.view(-1), rv.view(-1), gamma.reshape(-1), beta.reshape(-1), False, bn.momentum,
                            bn.eps)
    # F.batch_norm updates copies (autograd keeps them for backward), copied back (rm, rv may be row views)
    new_rm, new_rv = rm.clone(), rv.clone()
    out = F.batch_norm(h, new_rm.view(-1), new_rv.view(-1), gamma.reshape(-1), beta.reshape(-1), True, bn.momentum,
                       bn.eps)
    rm.copy_(new_rm), rv.copy_(new_rv)
    return out


def epoch_batches(generators: Sequence[torch.Generator], n_train: Sequence[int], batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of batch indices per model (shuffled by its own generator, last partial batch dropped).

    Returns:
        idx (M, S, batch_size) positions into each model's train subset (0 where inactive),
        active (M, S) bool; model m has n_train[m] // batch_size steps.
    """
    steps = torch.tensor([n // batch_size for n in n_train])
    perms = [torch.randperm(n, generator=g)[: s * batch_size] for g, n, s in zip(generators, n_train, steps.tolist())]
    S = int(steps.max())
    idx = torch.nn.utils.rnn.pad_sequence(perms, batch_first=True).view(len(n_train), S, batch_size)  # zero-padded
    return idx, torch.arange(S) < steps[:, None]


@dataclass
class StackedTrainResult:
    """Checkpoints of M stacked models: epoch -> params (name -> (M, ...)) and metrics (name -> (M,))."""

    params: dict[int, dict[str, torch.Tensor]]  # plain spec weights (BatchNorm folded, eval mode)
    metrics: dict[int, dict[str, torch.Tensor]]  # of those (folded) weights
    bn_state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # unfolded, BN models only


@torch.no_grad()
def stacked_evaluate(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
                     rows: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean accuracy and cross-entropy of each stacked model on its own rows.

    Args:
        X: (R, *input_shape) pool of inputs; Y: (R,) labels.
        rows: (M, N) row indices per model (padded); mask: (M, N) bool, valid rows.
    Returns: acc (M,), loss (M,).
    """
    M, N = rows.shape
    per_elem = int(np.prod(X.shape[1:]))
    n_chunk = max(1, chunk // max(1, M * per_elem))  # bound the (M, n, D) gather
    correct = torch.zeros(M)
    loss = torch.zeros(M)
    for s in range(0, N, n_chunk):
        r, mk = rows[:, s:s + n_chunk].reshape(-1), mask[:, s:s + n_chunk].float()  # (M*n,), (M, n)
        logits = stacked_forward(spec, params, X.index_select(0, r).view(*mk.shape, *X.shape[1:]))  # (M, n, C)
        # cross-entropy = logsumexp - logit[y] in (C, M*n) layout: reductions over 2-10 classes are slow along
        # the last dim on CPU
        lt, y = logits.permute(2, 0, 1).reshape(logits.shape[2], -1).contiguous(), Y.index_select(0, r)
        mx = lt.amax(0)
        ce = (lt - mx).exp_().sum(0).log_().add_(mx).sub_(lt.gather(0, y.view(1, -1)).view(-1))
        loss += (ce.view_as(mk) * mk).sum(1)
        correct += ((lt.argmax(0) == y).view_as(mk).float() * mk).sum(1)  # (argmax too is slow along the last dim)
    n = mask.sum(1).clamp(min=1).float()
    return correct / n, loss / n


class single_thread:
    """Run torch ops on one thread inside the block (tiny stacked ops lose to thread sync; parallelism
    comes from worker processes instead), restoring the previous setting after."""

    def __enter__(self) -> None:
        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self._n)


class _FlatParams:
    """The params of M stacked models as ONE leaf (M, P), row m = model m.

    A step takes per-tensor views of a row range (split, whose backward is one cat), so autograd gives one
    (rows, P) gradient and the optimizer is a handful of ops with (M, 1) factors. Weights are held in the layout their
    gradient comes in, so it lands in the flat gradient without a strided transpose copy (it was ~15% of a
    small MLP's step): linear weights transposed, (M, in, out), for bmm(h^T, delta), except those of narrow
    layers (< ``NARROW_OUT`` outputs: ``stacked_forward`` multiplies W @ h^T), held (M, out, in).
    """

    def __init__(self, spec: A.ArchitectureSpec, init: Mapping[str, torch.Tensor], keys: Sequence[str],
                 order: torch.Tensor, dtype: torch.dtype):
        self.keys = list(keys)
        self.linear_w = {f"layers.{i}.weight" for i, layer in enumerate(spec.layers)  # held transposed
                         if layer.kind == "linear" and layer.out_dim >= NARROW_OUT}
        self.shapes = [tuple(init[k].shape[1:]) for k in self.keys]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.flat = torch.cat([(init[k].transpose(1, 2) if k in self.linear_w else init[k]).detach().to(dtype)[order]
                               .reshape(len(order), -1) for k in self.keys], 1)

    def views(self, t: torch.Tensor) -> list[torch.Tensor]:
        """(M, P) -> [(M, *shape)] views, in ``keys`` order."""
        M = len(t)
        return [v.view(M, s[1], s[0]).transpose(1, 2) if k in self.linear_w else v.view(M, *s)
                for k, v, s in zip(self.keys, t.split(self.sizes, 1), self.shapes)]


class _StackedOptimizer:
    """Per-model Adam (betas (0.9, 0.999), eps 1e-8, bias corrections in float64 as torch.optim) on the first
    ``na`` rows of the flat params and SGD with momentum 0.9 on the others, coupled weight decay (as torch.optim),
    each model with its own learning rate and weight decay, updating a row range of the flat params in place.

    Model m takes ``steps_per_epoch[m]`` steps an epoch, the first ones of it: at step s of an epoch the models
    stepping are those with more than s steps. ``start_epoch`` computes every Adam factor of the epoch at once.
    """

    def __init__(self, flat: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, na: int,
                 steps_per_epoch: np.ndarray):
        self.dtype, self.na = flat.dtype, na
        self.wd = weight_decay.view(-1, 1)  # (M, 1)
        self.lr_adam, self.lr_sgd = lr[:na].double().numpy(), lr[na:].view(-1, 1)
        self.m1, self.m2 = torch.zeros_like(flat[:na]), torch.zeros_like(flat[:na])  # Adam moments (na, P)
        self.den_buf = torch.empty_like(self.m2)
        self.mom = torch.zeros_like(flat[na:])  # SGD momentum (M - na, P)
        self.steps_per_epoch = np.asarray(steps_per_epoch[:na], np.int64)
        self.done = np.zeros(na, np.int64)  # per-model Adam steps of the past epochs
        self.eps_fac = self.inv_scale = torch.zeros(na, 0, dtype=self.dtype)
        self._rows: tuple[int, int] | None = None
        self._views: tuple = ()

    def start_epoch(self) -> None:
        """The Adam factors of every step s of the coming epoch, (na, S) in the params' dtype, from the step counts
        t = done + s + 1 in float64 as torch.optim: lr * (m1/bc1) / (sqrt(m2)/sqrt(bc2) + eps) is computed as
        m1 / (sqrt(m2) * inv_scale + eps_fac), inv_scale = bc1 / (lr sqrt(bc2)), eps_fac = eps sqrt(bc2) inv_scale."""
        b1, b2 = ADAM_BETAS
        t = self.done[:, None] + np.arange(1, int(self.steps_per_epoch.max(initial=0)) + 1)[None, :]  # (na, S)
        bc1, bc2_sqrt = 1 - b1 ** t, np.sqrt(1 - b2 ** t)
        inv_scale = bc1 / (self.lr_adam[:, None] * bc2_sqrt)
        self.inv_scale = torch.from_numpy(inv_scale).to(self.dtype)
        self.eps_fac = torch.from_numpy(ADAM_EPS * bc2_sqrt * inv_scale).to(self.dtype)
        self.done += self.steps_per_epoch

    def _row_views(self, flat: torch.Tensor, lo: int, hi: int) -> tuple:
        """Views of rows lo:hi of the params and state (the range changes only when some models' epoch ends)."""
        if self._rows != (lo, hi):
            na = self.na
            a = slice(lo, min(hi, na))
            s0 = max(lo, na)
            self._rows, self._views = (lo, hi), (
                flat[lo:hi], self.wd[lo:hi], self.m1[a], self.m2[a], flat[a], self.den_buf[a],
                self.mom[s0 - na: hi - na], flat[s0:hi], self.lr_sgd[s0 - na: hi - na])
        return self._views

    @torch.no_grad()
    def step(self, flat: torch.Tensor, g: torch.Tensor, lo: int, hi: int, s: int) -> None:
        """Step s of the epoch for the models in rows lo:hi from their gradient g (hi - lo, P) (overwritten); other
        rows (models whose epoch is over) are not touched. ``flat`` is the same tensor at every step."""
        na, b1, b2 = self.na, *ADAM_BETAS
        rows, wd, m1, m2, p, den, mom, p_sgd, lr_sgd = self._row_views(flat, lo, hi)
        g.addcmul_(rows, wd)  # coupled weight decay, as torch.optim
        if lo < na:
            ga = g[: min(hi, na) - lo]
            m2.mul_(b2).addcmul_(ga, ga, value=1 - b2)
            m1.lerp_(ga, 1 - b1)
            torch.sqrt(m2, out=den)  # three passes over (rows, P), no temporaries
            a = slice(lo, min(hi, na))
            torch.addcmul(self.eps_fac[a, s:s + 1], den, self.inv_scale[a, s:s + 1], out=den)
            p.addcdiv_(m1, den, value=-1.0)
        if hi > na:
            torch.add(g[max(lo, na) - lo:], mom, alpha=SGD_MOMENTUM, out=mom)
            p_sgd.addcmul_(mom, lr_sgd, value=-1.0)


def _cross_entropy_grad(logits: torch.Tensor, y: torch.Tensor, minus_one: torch.Tensor) -> torch.Tensor:
    """d(sum over models of each model's mean cross-entropy)/d logits (M, B, C) = (softmax - onehot) / B, so model
    m's gradient is its own. In (C, M*B) layout, as reductions over 2-10 classes are slow along the last dim."""
    with torch.no_grad():
        M, B, C = logits.shape
        if logits.transpose(1, 2).is_contiguous():  # a narrow layer's (M, C, B) product: softmax over its dim 1
            lt = logits.detach().transpose(1, 2)
            dl = (lt - lt.amax(1, keepdim=True)).exp_()
            dl.div_(dl.sum(1, keepdim=True)).scatter_add_(1, y.view(M, 1, B), minus_one.view(M, 1, B)).div_(B)
            return dl.transpose(1, 2)
        lt = torch.empty(C, M * B, dtype=logits.dtype)  # a copy in either logits layout (it is changed in place)
        lt.view(C, M, B).copy_(logits.detach().permute(2, 0, 1))
        dl = lt.sub_(lt.amax(0)).exp_()
        dl.div_(dl.sum(0)).scatter_add_(0, y.view(1, -1), minus_one).div_(logits.shape[1])
    return dl.t().view_as(logits)


@torch.no_grad()
def _checkpoint(spec: A.ArchitectureSpec, params: Sequence[torch.Tensor], bn: StackedBatchNorm | None,
                X: torch.Tensor, Y: torch.Tensor, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                inv: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(params, metrics, unfolded BatchNorm state) of the stored network, rows back in the caller's model order
    (``inv``): eval mode, every BatchNorm folded into its conv; metrics ``{set}_acc``/``{set}_loss`` per eval set."""
    bn_state, eval_params = {}, params
    if bn is not None:
        unfolded = bn.state(params, spec)
        bn_state = {k: v[inv] for k, v in unfolded.items()}
        eval_params = list(fold_bn_state(spec, unfolded).values())
    metrics = {}
    for name, (rows, mask) in sets.items():
        acc, ls = stacked_evaluate(spec, eval_params, X, Y, rows, mask)
        metrics[f"{name}_acc"], metrics[f"{name}_loss"] = acc[inv], ls[inv]
    stored = {k: p[inv].detach().clone() for k, p in zip(spec.param_shapes(), eval_params)}
    return stored, metrics, bn_state


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model row lists -> (M, N) padded rows and their (M, N) bool mask."""
    pad = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    mask = torch.zeros(pad.shape, dtype=torch.bool)
    for m, r in enumerate(rows):
        pad[m, : len(r)], mask[m, : len(r)] = r, True
    return pad, mask


def train_stacked(
    spec: A.ArchitectureSpec,
    init: Mapping[str, torch.Tensor],
    X: torch.Tensor,
    Y: torch.Tensor,
    train_rows: Sequence[torch.Tensor],
    *,
    batch_size: int,
    epochs: int,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    use_adam: torch.Tensor,
    batch_seeds: Sequence[int],
    checkpoint_epochs: Iterable[int] = (),
    eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    bn_layers: Sequence[int] = (),
) -> StackedTrainResult:
    """Train M models of one architecture together, each on its own rows of a shared input pool.

    Runs on one thread (tiny stacked ops lose to thread synchronisation; use worker processes for cores).

    Every model has its own init (``init[k][m]``), train rows, batch order (a generator seeded with
    ``batch_seeds[m]``), learning rate, weight decay (coupled L2, as torch.optim) and optimizer
    (Adam with betas (0.9, 0.999), eps 1e-8, or SGD with momentum 0.9), so model m follows the
    trajectory it would follow alone (``train_single_reference``; equal up to float rounding).
    Params and optimizer state are kept in X's dtype (float32 for the zoo; float64 to test exactness).

    Args:
        init: param name -> (M, *shape).
        X: (R, *spec.input_shape) input pool; Y: (R,) labels (rows of different tasks may share inputs).
        train_rows: per model, a LongTensor of its training rows in the pool.
        lr, weight_decay: (M,) float; use_adam: (M,) bool.
        checkpoint_epochs: epochs (1-based) after which params and metrics are recorded.
        eval_sets: name -> (rows (M, N), mask (M, N)) evaluated at checkpoints besides "train".
        bn_layers: conv layers followed by a BatchNorm2d (trained in training mode, gamma/beta from
            ``init`` under ``bn_param_names``); checkpoints store and evaluate the eval-mode network with
            every BatchNorm folded into its conv (``fold_bn_state``), the unfolded state in ``bn_state``.
    """
    M, dtype = len(train_rows), X.dtype
    # Adam models first (each optimizer updates one contiguous block of rows in place), Adam by steps per epoch
    # ascending, then SGD descending: the models still in their epoch at any step are one contiguous range of rows
    # around the boundary, trained as a slice (models of small tasks are not carried through masked steps)
    adam = use_adam.bool().numpy()
    steps = np.array([len(r) // batch_size for r in train_rows])
    order = torch.from_numpy(np.lexsort((np.where(adam, steps, -steps), ~adam)))
    inv = torch.argsort(order)
    bn = StackedBatchNorm.fresh(spec, bn_layers, M, dtype) if bn_layers else None  # running stats, in `order`
    fp = _FlatParams(spec, init, list(spec.param_shapes()) + bn_param_names(bn.layers if bn else ()), order, dtype)
    flat = fp.flat
    params = fp.views(flat)  # views: they follow the in-place updates of flat
    na = int(adam.sum())
    steps_o = steps[order.numpy()]
    opt = _StackedOptimizer(flat, lr.to(dtype)[order], weight_decay.to(dtype)[order], na, steps_o)
    rows_pad, rows_mask = pad_rows([train_rows[i] for i in order.tolist()])
    sets = {"train": (rows_pad, rows_mask), **{k: (r[order], mk[order]) for k, (r, mk) in (eval_sets or {}).items()}}
    n_train = rows_mask.sum(1).tolist()
    gens = [torch.Generator().manual_seed(int(batch_seeds[i])) for i in order.tolist()]
    ckpts = sorted(set(int(e) for e in checkpoint_epochs))
    result = StackedTrainResult({}, {})
    minus_one = torch.full((1, M * batch_size), -1.0, dtype=dtype)
    # rows lo:hi step at step s: the Adam models (ascending) with more than s steps end the Adam block, the SGD
    # models (descending) with more than s steps start the SGD block
    bounds = [(na - int((steps_o[:na] > s).sum()), na + int((steps_o[na:] > s).sum())) for s in range(steps.max())]
    plain, rows_viewed, row_params = bn is None and is_plain_mlp(spec), None, []
    with single_thread():
        for epoch in range(1, epochs + 1):
            idx, _ = epoch_batches(gens, n_train, batch_size)  # (M, S, bs)
            opt.start_epoch()
            rows_epoch = torch.gather(rows_pad, 1, idx.flatten(1)).view(M, -1, batch_size)  # pool rows, (M, S, bs)
            for s, (lo, hi) in enumerate(bounds):
                r = rows_epoch[lo:hi, s].reshape(-1)  # ((hi - lo) * bs,)
                x = X.index_select(0, r).view(hi - lo, batch_size, *X.shape[1:])  # (4x faster than X[r])
                if plain:
                    if (lo, hi) != rows_viewed:  # the row range changes only when some models' epoch ends
                        rows_viewed, row_params = (lo, hi), fp.views(flat[lo:hi])
                    g = _plain_mlp_grad(spec, row_params, x, Y.index_select(0, r), minus_one[:, : len(r)])
                else:
                    leaf = flat[lo:hi].detach().requires_grad_(True)  # shares flat's storage
                    logits = stacked_forward(spec, fp.views(leaf), x, bn.rows(lo, hi) if bn else None, True)
                    dl = _cross_entropy_grad(logits, Y.index_select(0, r), minus_one[:, : len(r)])
                    (g,) = torch.autograd.grad(logits, leaf, dl)  # (hi - lo, P)
                opt.step(flat, g, lo, hi, s)
            if epoch in ckpts:
                result.params[epoch], result.metrics[epoch], bn_state = _checkpoint(spec, params, bn, X, Y, sets, inv)
                if bn is not None:
                    result.bn_state[epoch] = bn_state
    return result


def train_single_reference(
    spec: A.ArchitectureSpec, init: Mapping[str, torch.Tensor], X: torch.Tensor, Y: torch.Tensor,
    train_rows: torch.Tensor, *, batch_size: int, epochs: int, lr: float, weight_decay: float, optimizer: str,
    batch_seed: int, bn_layers: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """The plain per-model loop: nn.Module + torch.optim, the same batches as ``train_stacked``, in X's dtype.

    Used to test that stacked training is exact, and as the per-model baseline of the benchmark.
    Without ``bn_layers`` returns the trained state_dict of ``spec``; with them, the unfolded state of a
    ``BatchNormSpecNet`` (keys as ``StackedTrainResult.bn_state``; fold it with ``fold_bn_state``).
    """
    net = BatchNormSpecNet(spec, bn_layers) if bn_layers else A.build_model(spec)
    net.to(X.dtype)
    if bn_layers:
        net.load_state(init)
    else:
        spec.validate_state_dict(init)
        net.load_state_dict(dict(init))
    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    g = torch.Generator().manual_seed(int(batch_seed))
    net.train()
    with single_thread():
        for _ in range(epochs):
            idx, active = epoch_batches([g], [len(train_rows)], batch_size)
            for s in range(int(active.sum())):
                r = train_rows[idx[0, s]]
                opt.zero_grad()
                F.cross_entropy(net(X[r]), Y[r]).backward()
                opt.step()
    if bn_layers:
        return net.state()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class BatchNormSpecNet(torch.nn.Module):
    """A spec's network with ``nn.BatchNorm2d`` after the conv layers ``bn_layers`` (Conv -> BN -> [+ shortcut]
    -> act -> [pool]): the training-time form of the zoo's BatchNorm models, built from torch modules.

    It is the independent reference for stacked BatchNorm training, and ``eval()`` + ``folded_state_dict()``
    give the plain spec network that the zoo stores (the same function, tested). ``state``/``load_state`` use
    the keys of ``StackedTrainResult.bn_state`` (``layers.{i}.weight``/``bias``/``bn_weight``/``bn_bias``/
    ``bn_running_mean``/``bn_running_var``).
    """

    def __init__(self, spec: A.ArchitectureSpec, bn_layers: Sequence[int], state: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec, self.bn_layers = spec, check_bn_layers(spec, bn_layers)
        self.layers = A.SpecNet(spec).layers  # nn.Linear / nn.Conv2d(padding=k//2) per spec layer
        for i in self.bn_layers:  # a conv before a BatchNorm has no bias (stacked_forward)
            c = self.layers[i]
            self.layers[i] = torch.nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding, bias=False)
        self.bns = torch.nn.ModuleDict({str(i): torch.nn.BatchNorm2d(spec.layers[i].out_dim, eps=BN_EPS,
                                                                     momentum=BN_MOMENTUM) for i in self.bn_layers})
        if state is not None:
            self.load_state(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *spec.input_shape) -> logits (B, num_outputs)."""
        sources = A.shortcut_sources(self.spec)
        saved = {-1: x}
        h = x
        for i, (layer, mod) in enumerate(zip(self.spec.layers, self.layers)):
            if layer.kind == "linear" and h.dim() == 4:  # nn.Flatten (channel-major) or global average pooling
                h = h.flatten(1) if layer.flatten else h.mean((2, 3))
            if h.dim() == 4:  # convs in NHWC as in stacked_forward: NCHW kernels round differently, and a BatchNorm
                h = h.contiguous(memory_format=torch.channels_last)  # run can amplify that to 1e-3 in 2 epochs
            h = mod(h)
            if str(i) in self.bns:
                h = self.bns[str(i)](h)
            h = A.finish_layer(h, i, layer, saved, sources)
        return h

    def state(self) -> dict[str, torch.Tensor]:
        """Unfolded weights, BatchNorm parameters and running statistics (detached copies)."""
        out = {k: v.detach().clone() for k, v in self.layers.state_dict(prefix="layers.").items()}
        for i in self.bn_layers:
            m = self.bns[str(i)]
            out[f"layers.{i}.bias"] = torch.zeros(self.spec.layers[i].out_dim)
            out.update({f"layers.{i}.bn_weight": m.weight.detach().clone(), f"layers.{i}.bn_bias": m.bias.detach().clone(),
                        f"layers.{i}.bn_running_mean": m.running_mean.clone(),
                        f"layers.{i}.bn_running_var": m.running_var.clone()})
        return out

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights and BatchNorm gamma/beta (and the running statistics when ``state`` has them)."""
        for i in self.bn_layers:
            if bool(state[f"layers.{i}.bias"].any()):
                raise ValueError(f"BatchNormSpecNet: layer {i} is followed by a BatchNorm and has no bias, but "
                                 f"layers.{i}.bias is nonzero")
        self.layers.load_state_dict({k[len("layers."):]: state[k] for k in self.spec.param_shapes()
                                     if int(k.split(".")[1]) not in self.bn_layers or k.endswith(".weight")})
        with torch.no_grad():
            for i in self.bn_layers:
                m = self.bns[str(i)]
                m.weight.copy_(state[f"layers.{i}.bn_weight"])
                m.bias.copy_(state[f"layers.{i}.bn_bias"])
                if f"layers.{i}.bn_running_mean" in state:
                    m.running_mean.copy_(state[f"layers.{i}.bn_running_mean"])
                    m.running_var.copy_(state[f"layers.{i}.bn_running_var"])

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The eval-mode network as a plain state_dict of ``spec`` (every BatchNorm folded into its conv)."""
        return fold_bn_state(self.spec, self.state())
