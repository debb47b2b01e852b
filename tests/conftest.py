"""Shared fixtures: small networks *really trained* on real data (sklearn digits).

Symmetry and round-trip tests run on these, one per architecture family, so the tests
exercise trained weights, not random ones.
"""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

import architecture as A


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def train_small(spec: A.ArchitectureSpec, X: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 60) -> dict:
    """Plain full-batch Adam training; returns a detached state_dict."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch models: one thread is faster, and immune to a busy machine
    try:
        return _train(spec, X, y, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(spec: A.ArchitectureSpec, X: torch.Tensor, y: torch.Tensor, epochs: int) -> dict:
    net = A.build_model(spec)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


FAMILY_SPECS = {
    "mlp1_relu": A.mlp_spec(64, [32], 10, "relu"),
    "mlp2_leaky": A.mlp_spec(64, [32, 16], 10, "leaky_relu"),
    "mlp3_tanh": A.mlp_spec(64, [24, 16, 12], 10, "tanh"),
    "mlp1_gelu": A.mlp_spec(64, [32], 10, "gelu"),
    "cnn2_relu_k3": A.cnn_spec((1, 8, 8), [8, 12], 3, 10, "relu"),
    "cnn3_tanh_k5": A.cnn_spec((1, 8, 8), [6, 8, 8], 5, 10, "tanh"),
    "cnn2_leaky_k3_hidden": A.cnn_spec((1, 8, 8), [8, 8], 3, 10, "leaky_relu", hidden=[16]),
}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny graphs: intra-op threads only add contention (up to 100x slower on a shared 2-core box).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    return _digits()


@pytest.fixture(scope="session")
def trained_models(digits_data) -> dict[str, tuple[A.ArchitectureSpec, dict]]:
    """name -> (spec, trained state_dict), one per architecture family; each reaches > 0.8 train acc."""
    X, y = digits_data
    out = {}
    for i, (name, spec) in enumerate(FAMILY_SPECS.items()):
        Xi = X.view(-1, 1, 8, 8) if spec.is_cnn else X
        sd = train_small(spec, Xi, y, seed=i, epochs=80 if spec.is_cnn else 60)
        acc = (A.forward(spec, sd, Xi).argmax(1) == y).float().mean().item()
        assert acc > 0.6, f"fixture model {name} did not train (acc {acc:.2f})"
        out[name] = (spec, sd)
    return out


@pytest.fixture(scope="session")
def model_inputs(digits_data):
    """spec -> a batch of real inputs of the right shape."""
    X, _ = digits_data

    def inputs(spec: A.ArchitectureSpec, n: int = 64) -> torch.Tensor:
        return X[:n].view(-1, 1, 8, 8) if spec.is_cnn else X[:n]

    return inputs


def assert_fused_matches_pyg(make_encoder, batch, name: str) -> dict:
    """Run ``make_encoder()`` twice on ``batch``, with the fused edge kernel and with the plain PyG path
    (``FactorizedEdgeConv.fused``), and assert equal embeddings and gradients. Returns the fused run's
    gradients {param name: grad} for further checks."""
    from encoder_blocks import FactorizedEdgeConv

    out = []
    for fused in (True, False):
        enc = make_encoder()
        for m in enc.modules():
            if isinstance(m, FactorizedEdgeConv):
                m.fused = fused
        z = enc(batch)
        enc.project(z).square().sum().backward()
        out.append((z.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}))
    (z1, g1), (z2, g2) = out
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name} grad of {n}: {m}")
    return g1


def assert_accuracy_of(logits: torch.Tensor, y: torch.Tensor, recorded: float, margin: float = 1e-4) -> None:
    """``recorded`` is the accuracy of ``logits`` (N, C) on labels y, computed by another code path: equal up to
    the rows whose top two logits lie within ``margin`` (relative), whose argmax float rounding may flip."""
    top2 = logits.detach().float().topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= margin * top2[:, 0].abs().clamp_min(1.0)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert abs(acc - recorded) <= near_tie.float().mean().item() + 1e-6, (acc, recorded, int(near_tie.sum()))
