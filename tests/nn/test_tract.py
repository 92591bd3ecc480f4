"""TrAct: the closed form against dense solves, the paper's limits, and the plain layer everywhere else."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optimlab
from optimlab.nn import TrAct, tract, tract_weight_grad

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only synchronise


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_tract(x: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """Gᵀ X (XᵀX/b + λI)⁻¹ by a dense LU solve of the formula as written, in float64."""
    x, g = x.double(), g.double()
    a = x.T @ x / x.shape[0] + lam * torch.eye(x.shape[1], dtype=F64)
    return torch.linalg.solve(a.T, (g.T @ x).T).T


def patches_by_loops(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]):
    """Rows of input patches, ordered (image, output position), each flattened as (channel, kernel offsets)."""
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    spatial = x.shape[2:]
    out = [(s - k) // st + 1 for s, k, st in zip(spatial, kernel, stride)]
    rows = []
    for img in x:
        for pos in torch.cartesian_prod(*[torch.arange(o) for o in out]).reshape(-1, len(out)):
            index = [slice(None)] + [slice(p * st, p * st + k) for p, st, k in zip(pos.tolist(), stride, kernel)]
            rows.append(img[tuple(index)].reshape(-1))
    return torch.stack(rows)


# -- the closed form ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("b", "n", "m"), [(40, 7, 5), (7, 40, 5), (12, 12, 3)], ids=["direct", "woodbury", "square"])
@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_matches_a_dense_solve_in_float64(b, n, m, lam):
    x = torch.randn(b, n, generator=gen(1), dtype=F64) * torch.logspace(-1, 1, n, dtype=F64)  # unequal scales
    g = torch.randn(b, m, generator=gen(2), dtype=F64)
    expected = dense_tract(x, g, lam)
    # normwise, as a solve is accurate: both errors are below cond(A)·eps ≈ 1e-11 here
    assert (tract_weight_grad(x, g, lam) - expected).norm() <= 1e-10 * expected.norm()


def test_direct_and_woodbury_branches_agree():
    from optimlab.nn.tract import _direct, _woodbury

    for b, n in [(40, 7), (7, 40), (16, 16)]:
        x = torch.randn(b, n, generator=gen(b), dtype=F64)
        g = torch.randn(b, 4, generator=gen(n), dtype=F64)
        torch.testing.assert_close(_direct(g.T @ x, x, 0.1), _woodbury(g, x, 0.1), rtol=1e-10, atol=1e-12)


def test_large_lambda_recovers_the_plain_gradient_at_rate_one_over_lambda():
    # λ∇W = P (I + A/λ)⁻¹ = P − P A/λ + O(λ⁻²), with P = GᵀX and A = XᵀX/b
    x = torch.randn(50, 6, generator=gen(3), dtype=F64)
    g = torch.randn(50, 4, generator=gen(4), dtype=F64)
    plain, a = g.T @ x, x.T @ x / 50
    for lam in (1e2, 1e3, 1e4):
        scaled = lam * tract_weight_grad(x, g, lam)
        first_order = lam * (scaled - plain)  # → −P A
        rel = (first_order + plain @ a).norm() / (plain @ a).norm()
        assert rel < 10 / lam, (lam, rel)
    torch.testing.assert_close(1e8 * tract_weight_grad(x, g, 1e8), plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lam", [0.01, 0.1, 3.0])
def test_whitened_inputs_give_plain_gradient_over_one_plus_lambda(lam):
    # XᵀX/b = I exactly (orthonormal columns scaled by √b): the direct branch
    q, _ = torch.linalg.qr(torch.randn(64, 9, generator=gen(5), dtype=F64))
    x, g = q * 8.0, torch.randn(64, 3, generator=gen(6), dtype=F64)
    torch.testing.assert_close(tract_weight_grad(x, g, lam), g.T @ x / (1 + lam), rtol=1e-12, atol=1e-13)
    # XXᵀ/b = I (orthonormal rows scaled by √b), b < n: the Woodbury branch, Gᵀ(I + λI)⁻¹X
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=gen(7), dtype=F64))
    x, g = q.T * 5**0.5, torch.randn(5, 3, generator=gen(8), dtype=F64)
    torch.testing.assert_close(tract_weight_grad(x, g, lam), g.T @ x / (1 + lam), rtol=1e-12, atol=1e-13)


def test_bfloat16_inputs_are_solved_in_float32():
    x = torch.randn(64, 6, generator=gen(9)).bfloat16()
    g = torch.randn(64, 3, generator=gen(10)).bfloat16()
    out = tract_weight_grad(x, g, 0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_tract(x, g, 0.1), rtol=1e-2, atol=1e-3)  # one bf16 rounding


# -- the layer ----------------------------------------------------------------------------------------------
def _grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(upstream)
    return out.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (24, 6)),
    "linear-3d": (lambda: nn.Linear(6, 4), (3, 5, 6)),
    "linear-nobias-woodbury": (lambda: nn.Linear(30, 4, bias=False), (5, 30)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 8)),
    "conv2d-woodbury": (lambda: nn.Conv2d(3, 4, 5, stride=(1, 2), padding=(0, 2)), (1, 3, 6, 7)),
    "conv2d-same": (lambda: nn.Conv2d(2, 3, 3, padding="same", bias=False), (2, 2, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(1, 6, 5, stride=2, padding=1), (8, 1, 40)),
    "conv1d-woodbury": (lambda: nn.Conv1d(4, 3, 7, stride=3), (1, 4, 13)),
}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", list(LAYERS))
def test_output_input_and_bias_gradients_are_the_plain_layers(case, dtype):
    make, shape = LAYERS[case]
    torch.manual_seed(0)
    plain = make().to(dtype)
    wrapped = TrAct(copy.deepcopy(plain))
    x = torch.randn(shape, generator=gen(11), dtype=dtype)
    upstream = torch.randn(plain(x).shape, generator=gen(12), dtype=dtype)
    out_p, gx_p, gw_p, gb_p = _grads(plain, x, upstream)
    out_t, gx_t, gw_t, gb_t = _grads(wrapped, x, upstream)
    assert torch.equal(out_t, out_p)
    assert torch.equal(gx_t, gx_p)
    assert (gb_t is None and gb_p is None) or torch.equal(gb_t, gb_p)
    assert gw_t.shape == gw_p.shape and not torch.allclose(gw_t, gw_p)


@pytest.mark.parametrize("case", list(LAYERS))
def test_weight_gradient_is_the_closed_form_on_the_patches(case):
    """Conv = linear on the input patches (built here by explicit slicing), rows ordered (image, position)."""
    make, shape = LAYERS[case]
    torch.manual_seed(0)
    layer = TrAct(make().double(), lam=0.3)
    x = torch.randn(shape, generator=gen(13), dtype=F64)
    upstream = torch.randn(layer(x).shape, generator=gen(14), dtype=F64)
    layer(x).backward(upstream)
    if isinstance(layer.unwrap(), nn.Linear):
        rows_x, rows_g = x.reshape(-1, shape[-1]), upstream.reshape(-1, upstream.shape[-1])
    else:
        rows_x = patches_by_loops(x, layer.weight.shape[2:], layer.stride, layer.padding)
        rows_g = upstream.flatten(2).transpose(1, 2).reshape(-1, upstream.shape[1])
    expected = dense_tract(rows_x, rows_g, 0.3).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_unbatched_conv_input():
    torch.manual_seed(0)
    plain = nn.Conv2d(2, 3, 3).double()
    wrapped = TrAct(copy.deepcopy(plain))
    x = torch.randn(2, 6, 6, generator=gen(15), dtype=F64)
    wrapped(x).sum().backward()
    layer_batched = TrAct(copy.deepcopy(plain))
    layer_batched(x.unsqueeze(0)).sum().backward()
    assert wrapped(x).shape == plain(x).shape
    torch.testing.assert_close(wrapped.weight.grad, layer_batched.weight.grad, rtol=0, atol=0)


def test_channels_last_gives_the_same_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 7, 7, generator=gen(26), dtype=F64)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = TrAct(copy.deepcopy(conv).to(memory_format=fmt))
        layer(x.to(memory_format=fmt)).square().sum().backward()
        grads.append(layer.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_functional_form_equals_the_module():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 8, 8, generator=gen(16), dtype=F64)
    w = conv.weight.detach().clone().requires_grad_(True)
    tract(x, w, conv.bias, lam=0.2, stride=2, padding=1).sum().backward()
    TrAct(conv, lam=0.2)(x).sum().backward()
    assert torch.equal(w.grad, conv.weight.grad)


def test_shares_the_layers_parameters_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    keys, params = list(model.state_dict()), list(model.parameters())
    conv = model[0]
    wrapper = TrAct.wrap(model, "0", lam=0.05)
    assert model[0] is wrapper and wrapper.lam == 0.05
    assert list(model.state_dict()) == keys  # old checkpoints still load
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert wrapper.weight is conv.weight and wrapper.bias is conv.bias
    assert wrapper.unwrap() is conv
    model.load_state_dict(torch.load(_saved(model.state_dict()), weights_only=True))


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_deepcopy_and_pickle_keep_the_wrapper_consistent():
    wrapper = TrAct(nn.Linear(3, 2), lam=0.5)
    for clone in (copy.deepcopy(wrapper), torch.load(_saved(wrapper), weights_only=False)):
        assert clone.lam == 0.5 and clone.unwrap().weight is clone.weight
        x = torch.randn(4, 3, generator=gen(17))
        assert torch.equal(clone(x), wrapper(x))


def test_lambda_is_settable_and_changes_the_gradient():
    layer = TrAct(nn.Linear(4, 2).double(), lam=0.1)
    x = torch.randn(16, 4, generator=gen(18), dtype=F64)
    layer(x).sum().backward()
    first, layer.weight.grad = layer.weight.grad, None
    layer.lam = 10.0
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, dense_tract(x, torch.ones(16, 2, dtype=F64), 10.0))
    assert not torch.allclose(first, layer.weight.grad)


def test_no_grad_and_frozen_weight_run_the_plain_layer():
    layer = TrAct(nn.Linear(4, 2))
    x = torch.randn(3, 4, generator=gen(19))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.unwrap()(x))
    layer.weight.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def test_bfloat16_layer():
    torch.manual_seed(0)
    layer = TrAct(nn.Conv2d(3, 4, 3).bfloat16())
    x = torch.randn(2, 3, 6, 6, generator=gen(20)).bfloat16()
    upstream = torch.randn(2, 4, 4, 4, generator=gen(21)).bfloat16()
    layer(x).backward(upstream)
    assert layer.weight.grad.dtype == torch.bfloat16
    rows_x = patches_by_loops(x.double(), (3, 3), (1, 1), (0, 0))
    rows_g = upstream.double().flatten(2).transpose(1, 2).reshape(-1, 4)
    expected = dense_tract(rows_x, rows_g, 0.1).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=2e-2, atol=1e-2)


def test_autocast_runs_the_layer_in_low_precision_like_the_plain_one():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4)
    wrapped = TrAct(copy.deepcopy(plain))
    x = torch.randn(32, 8, generator=gen(22))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, out_t = plain(x), wrapped(x)
    assert out_t.dtype == out_p.dtype == torch.bfloat16 and torch.equal(out_t, out_p)
    out_t.float().sum().backward()
    assert wrapped.weight.grad.dtype == torch.float32
    expected = dense_tract(x.bfloat16(), torch.ones(32, 4), 0.1)
    torch.testing.assert_close(wrapped.weight.grad.double(), expected, rtol=1e-5, atol=1e-6)  # solved in float32


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer", [nn.Conv3d(1, 1, 1), nn.ConvTranspose2d(1, 1, 1), nn.Embedding(3, 2), nn.Sequential(nn.Linear(2, 2))]
)
def test_wrong_layer_type_is_a_type_error(layer):
    with pytest.raises(TypeError, match=r"nn\.Linear, nn\.Conv1d or nn\.Conv2d"):
        TrAct(layer)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv2d(2, 2, 3, dilation=2), "dilation"),
        (nn.Conv2d(2, 2, 3, groups=2), "groups"),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(2, 2, 2, padding="same"), "odd kernel"),
    ],
)
def test_unsupported_convolutions_say_so(layer, match):
    with pytest.raises(NotImplementedError, match=match):
        TrAct(layer)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("inf"), float("nan"), "0.1"])
def test_invalid_lambda_names_the_argument_and_range(lam):
    with pytest.raises(ValueError, match="Invalid lam"):
        TrAct(nn.Linear(2, 2), lam=lam)
    with pytest.raises(ValueError, match="Invalid lam"):
        tract(torch.randn(1, 2), torch.randn(2, 2), lam=lam)
    with pytest.raises(ValueError, match="Invalid lam.*0 < lam"):  # was NaN (lam 0, NaN) or a wrong matrix (< 0)
        tract_weight_grad(torch.randn(5, 3), torch.randn(5, 2), lam)
    with pytest.raises(ValueError, match="Invalid lam.*0 < lam"):  # the Woodbury branch (b < n) too
        tract_weight_grad(torch.randn(2, 3), torch.randn(2, 2), lam)
    layer = TrAct(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="0 < lam"):
        layer.lam = lam
    assert layer.lam == 0.1


def test_uninitialized_lazy_layer_is_refused():
    with pytest.raises(ValueError, match="forward pass"):
        TrAct(nn.LazyLinear(3))


def test_registry_entry():
    info = optimlab.get("tract")
    assert info.kind == "layer" and info.cls is optimlab.TrAct and info.defaults == {"lam": 0.1}
    with pytest.raises(TypeError, match="layer"):
        optimlab.create("tract", nn.Linear(2, 2))


# -- training -----------------------------------------------------------------------------------------------
def test_removes_the_input_scaling_from_first_layer_training():
    """Least squares through one linear layer with inputs scaled over two decades: plain SGD at its largest
    stable step size barely moves the small-scale directions; TrAct + SGD reaches the optimum, each direction
    of the error shrinking by λ/(σ + λ) per step at lr 1, σ its eigenvalue of XᵀX/b."""
    scales = torch.logspace(-1, 1, 6, dtype=F64)  # XᵀX/b has eigenvalues from about 1e-2 to 1e2
    x = torch.randn(256, 6, generator=gen(23), dtype=F64) * scales
    w_star = torch.randn(3, 6, generator=gen(24), dtype=F64)
    y = x @ w_star.T

    def train(layer: nn.Module, lr: float) -> float:
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        for _ in range(60):
            opt.zero_grad()
            F.mse_loss(layer(x), y, reduction="sum").div(2 * 256).backward()
            opt.step()
        return (layer.weight.detach() - w_star).norm().item() / w_star.norm().item()

    plain = nn.Linear(6, 3, bias=False).double()
    nn.init.zeros_(plain.weight)
    tracted = TrAct(copy.deepcopy(plain), lam=1e-3)
    assert train(tracted, lr=1.0) < 1e-6
    assert train(plain, lr=1.9 / scales[-1].item() ** 2) > 0.1  # lr just below 2/σ_max: stable, but slow


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, optimlab.Lion])
def test_small_cnn_trains_with_any_optimizer(optimizer):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 12, generator=gen(25))
    y = (x[:, 0, :6].sum(1) > x[:, 0, 6:].sum(1)).long()
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(96, 2))
    TrAct.wrap(model, "0")
    lr = {torch.optim.SGD: 0.1, torch.optim.Adam: 1e-2, optimlab.Lion: 3e-3}[optimizer]
    opt = optimizer(model.parameters(), lr=lr)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.25 * first
