import math

import pytest

from mlxft.train.schedule import learning_rate


def test_warmup_then_cosine_to_the_minimum():
    lr = [learning_rate(s, peak=1.0, total_steps=10, warmup_steps=2, minimum=0.1) for s in range(11)]
    assert lr[0] == 0.5 and lr[1] == 1.0 and lr[2] == 1.0
    assert lr[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))


def test_linear_and_constant():
    assert learning_rate(5, peak=2.0, total_steps=10, schedule="linear") == pytest.approx(1.0)
    assert learning_rate(9, peak=2.0, total_steps=10, schedule="constant", warmup_steps=3) == 2.0
