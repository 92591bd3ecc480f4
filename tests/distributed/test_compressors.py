"""Compressors: the wire format is what is counted, decoding inverts it, Top-K's contraction, rand-k's unbiasedness
and variance (statistical), the scaled sign's closed form and bit packing, resumable randomness, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.distributed.compressors import (
    COMPRESSORS,
    Identity,
    RandK,
    ScaledSign,
    TopK,
    make_compressor,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = (TopK(0.1), TopK(0.37), RandK(0.2), RandK(0.2, scaled=False), ScaledSign(), Identity())


def _wire_bytes(wire) -> int:
    return sum(t.numel() * t.element_size() for t in wire)


@pytest.mark.parametrize("comp", ALL, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 64, 1001])
def test_wire_bytes_are_the_wire_tensors(comp, dtype, d) -> None:
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(dtype)
    wire, ctx = comp.encode(x, torch.Generator().manual_seed(0))
    assert _wire_bytes(wire) == comp.wire_bytes(d, dtype)
    y = comp.decode(wire, ctx, d)
    assert y.shape == x.shape and y.dtype == dtype


def test_formats() -> None:
    d = 1000
    assert TopK(0.1).wire_bytes(d) == 100 * (4 + 4)  # fp32 values + int32 indices
    assert RandK(0.1).wire_bytes(d) == 100 * 4  # values only: indices from the shared seed
    assert ScaledSign().wire_bytes(d) == 125 + 4  # 8 signs a byte + one fp32 scale
    assert ScaledSign().wire_bytes(1001) == 126 + 4
    assert Identity().wire_bytes(d) == 4000
    wire, _ = TopK(0.1).encode(torch.randn(d))
    assert wire[1].dtype == torch.int32
    wire, _ = ScaledSign().encode(torch.randn(d))
    assert wire[0].dtype == torch.uint8 and wire[0].numel() == 125 and wire[1].numel() == 1


def test_topk_keeps_the_largest_and_contracts() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 200, generator=gen, dtype=torch.float64)
    comp = TopK(0.1)
    y = comp.compress(x)
    k = comp.k(200)
    assert k == 20 and comp.delta(200) == 0.1
    assert torch.equal((y != 0).sum(-1), torch.full((50,), k))
    kept = y.abs().masked_fill(y == 0, math.inf).amin(-1)
    dropped = x.abs().masked_fill(y != 0, 0).amax(-1)
    assert (kept >= dropped).all()
    assert torch.equal(y[y != 0], x[y != 0])
    err = (y - x).pow(2).sum(-1)
    assert (err <= (1 - comp.delta(200)) * x.pow(2).sum(-1)).all()
    # rows compress independently: batched equals row by row
    assert torch.equal(y, torch.stack([comp.compress(row) for row in x]))


def test_k_rounding_bounds() -> None:
    assert TopK(1e-9).k(10) == 1 and TopK(1.0).k(10) == 10 and TopK(0.5).k(1) == 1


def test_randk_is_unbiased_with_the_stated_variance() -> None:
    d, draws = 20, 20000
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    comp = RandK(0.25)
    ys = torch.stack([comp.compress(x, gen) for _ in range(draws)])
    # each coordinate's sample mean within 5 standard errors of x_i (y_i is x_i d/k w.p. k/d, else 0)
    sd = x.abs() * math.sqrt(d / comp.k(d) - 1)
    assert ((ys.mean(0) - x).abs() <= 5 * sd / math.sqrt(draws)).all()
    omega = d / comp.k(d) - 1
    err = (ys - x).pow(2).sum(-1).mean() / x.pow(2).sum()
    assert err.item() == pytest.approx(omega, rel=0.05)
    assert comp.delta(d) is None


def test_unscaled_randk_contracts_in_expectation() -> None:
    d = 20
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    comp = RandK(0.25, scaled=False)
    ys = torch.stack([comp.compress(x, gen) for _ in range(20000)])
    err = (ys - x).pow(2).sum(-1).mean() / x.pow(2).sum()
    assert err.item() == pytest.approx(1 - comp.delta(d), rel=0.03)


def test_randk_shares_coordinates_across_rows_and_resumes_from_the_generator() -> None:
    x = torch.randn(3, 40)
    gen = torch.Generator().manual_seed(5)
    comp = RandK(0.1)
    comp.compress(x, gen)
    saved = gen.get_state()
    a = comp.compress(x, gen)
    gen2 = torch.Generator()
    gen2.set_state(saved)
    assert torch.equal(comp.compress(x, gen2), a)
    support = a != 0
    assert torch.equal(support[0], support[1]) and torch.equal(support[0], support[2])


def test_scaled_sign_closed_form_and_contraction() -> None:
    x = torch.randn(6, 37, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x[0, :5] = 0.0
    y = ScaledSign().compress(x)
    scale = x.abs().sum(-1, keepdim=True) / 37
    expected = torch.where(x >= 0, scale, -scale)  # sign(0) = +1
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    err = (y - x).pow(2).sum(-1)
    closed = x.pow(2).sum(-1) - x.abs().sum(-1).pow(2) / 37  # ‖x‖² − ‖x‖₁²/d
    torch.testing.assert_close(err, closed)
    assert (err <= (1 - ScaledSign().delta(37)) * x.pow(2).sum(-1) + 1e-12).all()


@pytest.mark.parametrize("d", [1, 8, 9, 100])
def test_sign_wire_round_trip(d) -> None:
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(d))
    wire, ctx = ScaledSign().encode(x)
    assert wire[0].dtype == torch.uint8 and wire[0].shape == (3, -(-d // 8))
    y = ScaledSign().decode(wire, ctx, d)
    assert torch.equal(y > 0, x >= 0)


@pytest.mark.parametrize("comp", ALL, ids=repr)
def test_decode_sum_is_the_sum_of_decoded_messages(comp) -> None:
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    wire, ctx = comp.encode(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(comp.decode_sum(wire, ctx, 30), comp.decode(wire, ctx, 30).sum(0))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_bad_ratio(ratio) -> None:
    for cls in (TopK, RandK):
        with pytest.raises(ValueError, match="Invalid ratio"):
            cls(ratio)


def test_make_compressor() -> None:
    assert isinstance(make_compressor("topk", 0.1), TopK)
    assert isinstance(make_compressor("sign", 0.1), ScaledSign)
    comp = RandK(0.3)
    assert make_compressor(comp, 0.1) is comp
    assert set(COMPRESSORS) == {"topk", "randk", "sign", "identity"}
    with pytest.raises(ValueError, match="Invalid compressor: 'top-k'"):
        make_compressor("top-k", 0.1)
