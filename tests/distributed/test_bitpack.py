"""Bit-packed signs: exact round trips, eight signs to a byte, sgn(0) = +1."""

from __future__ import annotations

import pytest
import torch

from optimlab.distributed.bitpack import pack_signs, packed_size, unpack_signs


@pytest.mark.parametrize("d", [1, 7, 8, 9, 64, 1001])
def test_round_trip_and_size(d: int) -> None:
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(d))
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(d)) == (3, -(-d // 8))
    assert packed.numel() * packed.element_size() * 8 < 3 * (d + 8)  # one bit per sign, padding below a byte
    assert torch.equal(unpack_signs(packed, d, torch.bool), x >= 0)
    assert torch.equal(unpack_signs(packed, d, torch.float64), torch.where(x >= 0, 1.0, -1.0).double())


def test_bit_order_and_zero_is_positive() -> None:
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, -2.0, -2.0, -2.0, -2.0, -5.0, float("nan")])
    packed = pack_signs(x)
    # least significant bit first: +, -, +(0), +(-0), then four -: 0b00001101; then -, NaN (-), six + of padding
    assert packed.tolist() == [0b00001101, 0b11111100]
    assert unpack_signs(packed, 10).tolist() == [1, -1, 1, 1, -1, -1, -1, -1, -1, -1]


def test_every_byte() -> None:
    bits = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # byte b's bits, least significant first
    assert torch.equal(pack_signs(bits).squeeze(-1), torch.arange(256).to(torch.uint8))
    assert torch.equal(unpack_signs(torch.arange(256).to(torch.uint8).unsqueeze(-1), 8, torch.bool), bits)


def test_bool_input_and_bad_input() -> None:
    bits = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(unpack_signs(pack_signs(bits), 3, torch.bool), bits)
    with pytest.raises(TypeError, match="uint8"):
        unpack_signs(torch.zeros(2, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_signs(torch.zeros(3, dtype=torch.uint8), 9)
