import pytest

from mlxft.data.splits import parse_fractions, sample_k_shot, split_items, split_sizes
from mlxft.errors import UserError


def test_default_split_sizes():
    assert split_sizes(1000, (0.85, 0.10, 0.05)) == (850, 100, 50)
    assert split_sizes(10, (0.85, 0.10, 0.05)) == (8, 1, 1)  # rounding up to one row each


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(200))
    train, valid, test = split_items(items, (0.85, 0.10, 0.05), seed=7)
    assert (train, valid, test) == split_items(items, (0.85, 0.10, 0.05), seed=7)
    assert train != split_items(items, (0.85, 0.10, 0.05), seed=8)[0]
    assert sorted(train + valid + test) == items
    assert (len(train), len(valid), len(test)) == (170, 20, 10)
    assert train[:5] == [0, 43, 7, 144, 151]  # PCG64 pinned: same rows on every machine


def test_k_shot_is_seeded_and_nested():
    items = list(range(1000))
    k16, k64 = sample_k_shot(items, 16, seed=0), sample_k_shot(items, 64, seed=0)
    assert k16 == sample_k_shot(items, 16, seed=0)
    assert k16 == k64[:16] and len(set(k64)) == 64
    assert sample_k_shot(items, 16, seed=1) != k16
    with pytest.raises(UserError, match="cannot sample 2000 rows from 1000"):
        sample_k_shot(items, 2000)


def test_fractions_accept_percentages():
    assert parse_fractions("85,10,5") == pytest.approx((0.85, 0.10, 0.05))
    for bad in ("a,b,c", "0.5,0.5", "-1,1,1"):
        with pytest.raises(UserError):
            parse_fractions(bad)
