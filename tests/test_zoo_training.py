"""Stacked (batched) zoo training equals the plain per-model loop (nn.Module + torch.optim), BatchNorm included.

Exactness is checked where it is deterministic, so it holds on any x86-64 CPU and thread count:

* whole runs (2 epochs; unequal epochs, so masked steps; Adam and SGD in one stack; BatchNorm with running
  statistics) in float64, where stacked and per-model training agree to ~1e-14 (measured, every family, up to
  8 epochs); the tolerance is 1e-9, while the weights move by ~0.1. In float32 two such trajectories cannot be
  compared across machines: rounding differences between grouped and single kernels (~1e-7) are amplified by
  training (Adam turns gradient noise near its eps into steps of ~lr), measured up to 3.5e-3 after two epochs,
  and by different amounts on another CPU's kernels;
* the float32 kernels the zoo trains with (grouped convolution in channels_last, batched linear layers,
  BatchNorm with per-model batch statistics) in one forward/backward: logits, gradients and running statistics
  equal the per-model modules' to float32 rounding (measured <= 7e-6 relative; tolerance 1e-4).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import architecture as A
import tasks as T
import zoo_plan as ZP
import zoo_training as ZT
from conftest import assert_accuracy_of

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # name -> (spec, conv layers followed by a BatchNorm)
    "mlp": (A.mlp_spec(64, [16, 12], 10, "tanh"), ()),  # plain MLPs train with the hand-written backward
    "mlp-relu": (A.mlp_spec(64, [20, 12], 10, "relu"), ()),
    "mlp-leaky_relu": (A.mlp_spec(64, [12, 20], 10, "leaky_relu"), ()),
    "mlp-gelu": (A.mlp_spec(64, [20], 10, "gelu"), ()),
    "cnn": (A.cnn_spec((1, 8, 8), [4, 6], 3, 10, "gelu"), ()),
    "cnn-bn-max": (ZP.cnn_bn_spec((1, 8, 8), (4, 6), 12, 10, "max2"), (0, 1)),
    "cnn-bn-avg": (ZP.cnn_bn_spec((1, 8, 8), (4, 6), 12, 10, "avg2"), (0, 1)),
    "resnet": (ZP.resnet_spec((1, 8, 8), 6, 2, 10), ()),
    "resnet-bn": (ZP.resnet_spec((1, 8, 8), 6, 1, 10), (0, 1, 2)),
    "resnet2-bn": (ZP.resnet_spec((1, 8, 8), 6, 2, 10), (0, 1, 2, 3, 4)),
}
M = 4
HP = dict(lr=torch.tensor([5e-3, 2e-2, 1e-2, 0.05]), weight_decay=torch.tensor([1e-4, 0.0, 1e-3, 1e-5]),
          use_adam=torch.tensor([True, False, True, False]))  # mixed optimizers in one stack
BATCH_SEEDS = [10, 11, 12, 13]
ROWS = (300, 220, 180, 260)  # unequal epochs (9, 6, 5, 8 steps): masked steps, for an Adam and an SGD model
FLOAT64_TOL = 1e-9


def _stack(spec: A.ArchitectureSpec, bn_layers, n_rows, dtype: torch.dtype):
    """Digits inputs in ``dtype``, labels, M per-model inits (and stacked), and each model's train rows."""
    Xtr, ytr, _, _ = T.load_task_data("digits")
    X = T.inputs_for_spec(spec, Xtr).to(dtype)
    inits = [ZT.init_params(spec, s, 0.7 + 0.3 * s, bn_layers) for s in range(M)]
    init = {k: torch.stack([i[k] for i in inits]) for k in inits[0]}
    g = torch.Generator().manual_seed(0)
    rows = [torch.randperm(len(X), generator=g)[:n] for n in n_rows]
    return X, ytr, inits, init, rows


def _reference(spec, bn_layers, init, X, y, rows, m: int, epochs: int) -> dict[str, torch.Tensor]:
    return ZT.train_single_reference(spec, init, X, y, rows, batch_size=32, epochs=epochs, lr=float(HP["lr"][m]),
                                     weight_decay=float(HP["weight_decay"][m]),
                                     optimizer="adam" if HP["use_adam"][m] else "sgd", batch_seed=BATCH_SEEDS[m],
                                     bn_layers=bn_layers)


def _max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_training_equals_per_model_reference_in_float64(case):
    spec, bn_layers = CASES[case]
    X, y, inits, init, rows = _stack(spec, bn_layers, ROWS, torch.float64)
    res = ZT.train_stacked(spec, init, X, y, rows, batch_size=32, epochs=2, batch_seeds=BATCH_SEEDS,
                           checkpoint_epochs=[1, 2], bn_layers=bn_layers, **HP)
    for m in range(M):
        for epoch in (1, 2):
            ref = _reference(spec, bn_layers, inits[m], X, y, rows[m], m, epoch)
            got = {k: v[m] for k, v in (res.bn_state[epoch] if bn_layers else res.params[epoch]).items()}
            assert got.keys() == ref.keys()
            d = _max_diff(got, ref)
            assert d < FLOAT64_TOL, f"{case} model {m} epoch {epoch}: {d:.2e} from the per-model reference"
        assert _max_diff(ref, {k: v.double() for k, v in inits[m].items()}) > 1e-2, "training did not move"
        # the stored weights are the eval-mode network: every BatchNorm folded into its conv
        folded = ZT.fold_bn_state(spec, got) if bn_layers else got
        for k in spec.param_shapes():
            torch.testing.assert_close(res.params[2][k][m], folded[k], rtol=0, atol=0)
    if bn_layers:  # the running statistics really moved, so folding is not the identity
        assert (res.bn_state[2][f"layers.{bn_layers[-1]}.bn_running_var"] - 1).abs().max() > 0.05
    # the recorded metrics are those of the stored weights, for every model of the stack
    for m in range(M):
        logits = A.forward(spec, {k: v[m] for k, v in res.params[2].items()}, X[rows[m]])
        assert_accuracy_of(logits, y[rows[m]], res.metrics[2]["train_acc"][m].item())
        loss = F.cross_entropy(logits, y[rows[m]]).item()
        assert abs(loss - res.metrics[2]["train_loss"][m].item()) < 1e-5 * max(1.0, loss)


def _module_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients of a SpecNet/BatchNormSpecNet under the stacked keys (``bns.{i}.weight`` ->
    ``layers.{i}.bn_weight``)."""
    out = {}
    for name, p in net.named_parameters():
        if name.startswith("bns."):
            _, i, what = name.split(".")
            name = f"layers.{i}.bn_{what}"
        out[name] = p.grad
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_forward_and_backward_equal_per_model_modules_in_float32(case):
    spec, bn_layers = CASES[case]
    X, y, inits, init, rows = _stack(spec, bn_layers, [32] * M, torch.float32)
    keys = list(spec.param_shapes()) + ZT.bn_param_names(bn_layers)
    params = [init[k].clone().requires_grad_(True) for k in keys]
    bn = ZT.StackedBatchNorm.fresh(spec, bn_layers, M) if bn_layers else None
    logits = ZT.stacked_forward(spec, params, torch.stack([X[r] for r in rows]), bn, training=True)  # (M, B, C)
    loss = sum(F.cross_entropy(logits[m], y[rows[m]]) for m in range(M))
    grads = dict(zip(keys, torch.autograd.grad(loss, params)))
    for m in range(M):
        net = ZT.BatchNormSpecNet(spec, bn_layers, inits[m]) if bn_layers else A.build_model(spec, inits[m])
        out = net.train()(X[rows[m]])
        F.cross_entropy(out, y[rows[m]]).backward()
        scale = out.abs().max().item()
        torch.testing.assert_close(logits[m], out, rtol=0, atol=1e-4 * scale, msg=lambda s: f"{case} {m}: {s}")
        ref = _module_grads(net)
        for k in keys:
            if k not in ref:  # the bias of a conv before a BatchNorm: none in the module, exactly zero when stacked
                assert torch.count_nonzero(grads[k][m]) == 0, k
                continue
            tol = 1e-4 * ref[k].abs().max().item()
            torch.testing.assert_close(grads[k][m], ref[k], rtol=0, atol=tol, msg=lambda s: f"{case} {m} {k}: {s}")
        for j, i in enumerate(bn.layers if bn else ()):
            mod = net.bns[str(i)]
            torch.testing.assert_close(bn.running_mean[j][m], mod.running_mean, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(bn.running_var[j][m], mod.running_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["cnn-bn-max", "resnet2-bn"])
def test_folded_checkpoint_computes_the_batchnorm_network_in_eval_mode(case):
    spec, bn_layers = CASES[case]
    X, y, _, init, rows = _stack(spec, bn_layers, (300, 220, 300, 180), torch.float32)
    res = ZT.train_stacked(spec, init, X, y, rows, batch_size=32, epochs=6, batch_seeds=BATCH_SEEDS,
                           checkpoint_epochs=[6], bn_layers=bn_layers, **HP)
    _, _, Xte, yte = T.load_task_data("digits")
    for m in range(M):
        net = ZT.BatchNormSpecNet(spec, bn_layers, {k: v[m] for k, v in res.bn_state[6].items()})
        stored = {k: v[m] for k, v in res.params[6].items()}
        with torch.no_grad():
            out_bn = net.eval()(Xte)
            out_train_mode = net.train()(Xte)  # batch statistics (this also moves the running ones: last)
        out_folded = A.forward(spec, stored, Xte)
        assert not torch.allclose(out_bn, out_train_mode, atol=1e-2), "eval-mode BN equals batch statistics"
        assert torch.allclose(out_folded, out_bn, atol=1e-4, rtol=1e-4), (out_folded - out_bn).abs().max()
        acc = (out_bn.argmax(1) == yte).float().mean().item()
        assert_accuracy_of(out_folded, yte, acc)
        # trained (measured 0.31-0.81 test accuracy): a bound at twice chance, far from where rounding moves it
        assert acc > 0.2, f"{case} model {m} did not train (test acc {acc:.2f}; chance 0.1)"


def test_narrow_linear_equals_the_plain_product_with_its_gradients_in_float64():
    """Layers with < NARROW_OUT outputs multiply with the outputs as rows and have their own backward: it passes
    autograd's finite-difference check and equals the plain batched product's gradients, for a contiguous and a
    strided upstream gradient (the cross-entropy hands a transposed one)."""
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
               for s in ((3, 5, 7), (3, 2, 7), (3, 2)))  # h (M, B, in), W (M, out, in), b (M, out)
    assert 2 < ZT.NARROW_OUT
    assert torch.autograd.gradcheck(ZT._NarrowLinear.apply, (h, w, b))
    out = ZT._NarrowLinear.apply(h, w, b)
    ref = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (M, B, out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for up in (torch.randn(3, 5, 2, dtype=torch.float64, generator=g),
               torch.randn(2, 3, 5, dtype=torch.float64, generator=g).permute(1, 2, 0)):
        got = torch.autograd.grad(ZT._NarrowLinear.apply(h, w, b), (h, w, b), up)
        want = torch.autograd.grad(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)), (h, w, b), up)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(A.ACTIVATIONS))
def test_hand_written_mlp_backward_equals_autograd_and_the_per_model_modules(activation):
    """Plain MLPs train with ``_plain_mlp_grad`` (no autograd; tanh as 2 sigmoid(2h) - 1): its flat gradient equals
    autograd's through ``stacked_forward`` in float64 (to 1e-12 relative) and the per-model modules' in float32 (to
    1e-4 relative, the float32 kernel test's bound), for wide (>= NARROW_OUT) and narrow layers."""
    spec = A.mlp_spec(64, [20, 12], 10, activation)
    assert ZT.is_plain_mlp(spec) and not ZT.is_plain_mlp(CASES["cnn"][0]) and not ZT.is_plain_mlp(CASES["resnet"][0])
    assert 12 < ZT.NARROW_OUT <= 20
    keys = list(spec.param_shapes())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        X, y, inits, init, rows = _stack(spec, (), [32] * M, dtype)
        fp = ZT._FlatParams(spec, init, keys, torch.arange(M), dtype)
        x, labels = torch.stack([X[r] for r in rows]), torch.cat([y[r] for r in rows])
        got = ZT._plain_mlp_grad(spec, fp.views(fp.flat), x, labels, torch.full((1, M * 32), -1.0, dtype=dtype))
        assert got.shape == fp.flat.shape
        if dtype == torch.float64:
            leaf = fp.flat.clone().requires_grad_(True)
            logits = ZT.stacked_forward(spec, fp.views(leaf), x)
            (want,) = torch.autograd.grad(sum(F.cross_entropy(logits[m], y[rows[m]]) for m in range(M)), leaf)
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
            continue
        grads = dict(zip(keys, fp.views(got)))
        for m in range(M):
            net = A.build_model(spec, inits[m])
            F.cross_entropy(net(X[rows[m]]), y[rows[m]]).backward()
            for k, ref in _module_grads(net).items():
                torch.testing.assert_close(grads[k][m], ref, rtol=0, atol=tol * ref.abs().max().item(),
                                           msg=lambda s: f"{activation} {m} {k}: {s}")


def test_epoch_batches_are_each_models_own_shuffle():
    """Model m's batches are the first n_m // bs * bs entries of its generator's randperm(n_m), in order; the rest is
    padding (inactive steps), whatever the other models' sizes."""
    n_train, bs = [70, 33, 101], 16
    idx, active = ZT.epoch_batches([torch.Generator().manual_seed(s) for s in (1, 2, 3)], n_train, bs)
    assert idx.shape == (3, 101 // bs, bs) and active.tolist() == [[s < n // bs for s in range(6)] for n in n_train]
    for m, (n, seed) in enumerate(zip(n_train, (1, 2, 3))):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        k = n // bs
        assert torch.equal(idx[m, :k].reshape(-1), perm[: k * bs])
        assert (idx[m, k:] == 0).all()
