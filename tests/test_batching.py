import numpy as np

from mlxft.data.batching import collate, iterate_batches, padding_fraction, widen
from mlxft.data.encode import Example
from mlxft.data.length_grouping import length_grouped_order


def make(lengths, scored=1):
    return [Example(list(range(3, 3 + n)), [0] * (n - scored) + [1] * scored, f"row{i}") for i, n in enumerate(lengths)]


def test_length_grouping_cuts_padding_against_file_order():
    rng = np.random.default_rng(0)
    examples = make(rng.integers(20, 400, size=512).tolist())
    grouped = list(iterate_batches(examples, 8, pad_id=0, seed=1))
    in_order = list(iterate_batches(examples, 8, pad_id=0, shuffle=False))
    assert padding_fraction(grouped) < 0.05 < 0.3 < padding_fraction(in_order)
    # every row is used exactly once per epoch
    assert sum(b.tokens for b in grouped) == sum(len(e) for e in examples)


def test_grouped_order_is_seeded_and_complete():
    lengths = list(range(100))
    a = length_grouped_order(lengths, 4, seed=3)
    assert a == length_grouped_order(lengths, 4, seed=3)
    assert a != length_grouped_order(lengths, 4, seed=4)
    assert sorted(i for batch in a for i in batch) == list(range(100))


def test_unshuffled_batches_keep_file_order():
    examples = make([5, 6, 7, 8, 9])
    batches = list(iterate_batches(examples, 2, pad_id=0, shuffle=False))
    assert [b.lengths.tolist() for b in batches] == [[5, 6], [7, 8], [9]]
    assert len(list(iterate_batches(examples, 2, pad_id=0, shuffle=False, drop_last=True))) == 2


def test_pad_to_multiple_and_dtypes():
    batch = collate(make([5, 3]), pad_id=9, pad_to_multiple=8)
    assert batch.input_ids.shape == (2, 8) and batch.input_ids.dtype == np.int32
    assert batch.input_ids[1].tolist() == [3, 4, 5, 9, 9, 9, 9, 9]
    assert batch.loss_mask[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_widening_a_tight_batch_equals_collating_to_the_multiple():
    examples = make([5, 3, 9])
    for multiple in (1, 4, 8, 16):
        wide, direct = widen(collate(examples, pad_id=7), pad_id=7, multiple=multiple), collate(examples, 7, multiple)
        assert wide.input_ids.shape[1] == -(-9 // multiple) * multiple
        for field in ("input_ids", "loss_mask", "lengths"):
            assert np.array_equal(getattr(wide, field), getattr(direct, field)), (multiple, field)
