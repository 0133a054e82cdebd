"""Fast kernels equal their references exactly."""

from __future__ import annotations

import pytest
import torch

from mixprec.formats import QuantSpec, qparams_from_tensor, quantize
from mixprec.kernels import MAX_REDUCTION, int8_matmul, int8_matmul_reference, quantize_per_token_symmetric


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (1, 784, 64), (5, 13, 9), (33, 63, 17), (256, 784, 64), (8, 1000, 130)])
def test_int8_matmul_accumulators_equal_int64_reference(m: int, k: int, n: int) -> None:
    generator = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    a[0] = -128  # extremes: the largest products
    w[0] = -128
    w[-1] = 127
    assert torch.equal(int8_matmul(a, w.t()), int8_matmul_reference(a, w.t()))
    assert int(int8_matmul(a, w.t())[0, 0]) == k * 128 * 128


def test_int8_matmul_refuses_bad_operands() -> None:
    with pytest.raises(ValueError, match="int8 operands"):
        int8_matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8))
    too_long = MAX_REDUCTION + 1
    with pytest.raises(ValueError, match="exceeds"):
        int8_matmul(torch.zeros(1, too_long, dtype=torch.int8), torch.zeros(too_long, 1, dtype=torch.int8))


def test_per_token_quantization_equals_the_general_rule_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 300, generator=generator) * torch.logspace(-3, 3, 64).unsqueeze(1)
    x[5] = 0.0
    q, scale = quantize_per_token_symmetric(x)
    qp = qparams_from_tensor(x, QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel", axis=0))
    assert torch.equal(q, quantize(x, qp))
    assert torch.equal(scale.squeeze(1), qp.scale)
