"""Per-sample gradients against a loop of single-example backward passes, and the facility's contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimlab.per_sample import flatten_per_sample, per_sample_grads, per_sample_grads_and_losses

BATCH = 6


def mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def convnet(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 3 * 3, 4),
    ).to(dtype)  # fmt: skip


def data(model_name: str, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    shape = (BATCH, 5) if model_name == "mlp" else (BATCH, 2, 8, 8)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randint(0, 3, (BATCH,), generator=gen)


def looped(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one backward pass per example."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


LOSSES = {
    "cross_entropy_mean": lambda out, y: F.cross_entropy(out, y),
    "cross_entropy_sum": lambda out, y: F.cross_entropy(out, y, reduction="sum"),
    "squared_error_sum": lambda out, y: (out - y.to(out.dtype)[:, None]).square().sum(),
}


@pytest.mark.parametrize(
    "model_name, loss_name",
    [("mlp", name) for name in sorted(LOSSES)] + [("conv", "cross_entropy_mean"), ("conv", "squared_error_sum")],
)
def test_equal_to_a_loop_of_single_example_backward_passes(model_name, loss_name) -> None:
    model, loss_fn = (mlp if model_name == "mlp" else convnet)(), LOSSES[loss_name]
    x, y = data(model_name)
    grads = per_sample_grads(model, loss_fn, x, y)
    expected = looped(model, loss_fn, x, y)
    assert list(grads) == list(expected)
    for name, g in grads.items():
        assert g.shape == (BATCH, *dict(model.named_parameters())[name].shape)
        torch.testing.assert_close(g, expected[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduction, combine", [("mean", torch.mean), ("sum", torch.sum)])
def test_per_sample_gradients_combine_to_the_batch_gradient(reduction, combine) -> None:
    model = mlp()
    x, y = data("mlp")
    grads, losses = per_sample_grads_and_losses(model, lambda o, t: F.cross_entropy(o, t, reduction=reduction), x, y)
    batch_loss = F.cross_entropy(model(x), y, reduction=reduction)
    batch_loss.backward()
    torch.testing.assert_close(combine(losses, dim=0), batch_loss.detach(), rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(combine(grads[name], dim=0), p.grad, rtol=1e-10, atol=1e-12)


def test_float32_chunks_and_the_model_left_untouched() -> None:
    model = convnet(torch.float32)
    x, y = data("conv", torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = per_sample_grads(model, F.cross_entropy, x, y)
    chunked = per_sample_grads(model, F.cross_entropy, x, y, chunk_size=4)
    reference = looped(model, F.cross_entropy, x, y)
    for name, g in whole.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(chunked[name], g, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_frozen_parameters_tuple_inputs_and_no_targets() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(4, 2).double()
            self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64))

        def forward(self, u, v):
            return self.scale * self.a(u) * self.b(v)

    model = TwoInputs()
    model.b.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    grads = per_sample_grads(model, lambda out: out.square().sum(), (u, v))
    assert set(grads) == {"a.weight", "a.bias", "b.bias"}
    for i in range(5):
        model.zero_grad()
        model(u[i : i + 1], v[i : i + 1]).square().sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-12, atol=1e-12)


def test_flatten_per_sample_concatenates_in_order() -> None:
    grads = per_sample_grads(mlp(), F.cross_entropy, *data("mlp"))
    flat = flatten_per_sample(grads)
    assert flat.shape == (BATCH, sum(p[0].numel() for p in grads.values()))
    first = grads["0.weight"]
    torch.testing.assert_close(flat[:, : first[0].numel()], first.reshape(BATCH, -1), rtol=0, atol=0)


def test_batch_norm_in_training_mode_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = data("mlp")
    with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode.*model\.eval\(\)"):
        per_sample_grads(model, F.cross_entropy, x, y)
    model.eval()  # with running statistics every example is independent again
    grads = per_sample_grads(model, F.cross_entropy, x, y)
    expected = looped(model, F.cross_entropy, x, y)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-10, atol=1e-10)


def test_invalid_calls_say_what_is_wrong() -> None:
    model = mlp()
    x, y = data("mlp")
    with pytest.raises(ValueError, match="scalar"):
        per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    with pytest.raises(ValueError, match="same batch size"):
        per_sample_grads(model, F.cross_entropy, x, y[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(model, F.cross_entropy, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="randomness"):
        per_sample_grads(model, F.cross_entropy, x, y, randomness="sometimes")
    with pytest.raises(TypeError, match="nn.Module"):
        per_sample_grads(lambda t: t, F.cross_entropy, x, y)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        per_sample_grads(model, F.cross_entropy, x, y)
