"""Examples -> padded numpy batches, grouped by length so little compute is spent on padding.

A batch is `input_ids [B, T] int32`, `loss_mask [B, T] int32`, `lengths [B] int32`: one example
a row, or with packing (mlxft.data.packing) several, told apart by `segment_ids [B, T] int32`.

mlx-lm's "sort by length" sorts on a length that is always 1 (25% padding seen on real data);
here batches are drawn from length-sorted windows, and the padding fraction is reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mlxft.data.encode import Example, PreferenceExample
from mlxft.data.length_grouping import length_grouped_order
from mlxft.data.packing import PackedRow, segment_ids_of


@dataclass
class Batch:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    segment_ids: np.ndarray | None = None  # packed rows: which example each token belongs to (0: padding)

    @property
    def tokens(self) -> int:
        """Every non-padding token: what tokens/s counts."""
        return int(self.lengths.sum())

    @property
    def supervised_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.input_ids.size


def widen(batch: Batch, pad_id: int, multiple: int) -> Batch:
    """The batch with its width rounded up to a multiple, as collate would have padded it."""
    width = batch.input_ids.shape[1]
    extra = -(-width // multiple) * multiple - width
    if extra == 0:
        return batch

    def pad(array, value):
        return np.pad(array, ((0, 0), (0, extra)), constant_values=value)

    segment_ids = None if batch.segment_ids is None else pad(batch.segment_ids, 0)
    return Batch(pad(batch.input_ids, pad_id), pad(batch.loss_mask, 0), batch.lengths, segment_ids)


def collate(examples: Sequence[Example | PackedRow], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    """Right-pad to the longest example (rounded up to a multiple); pads never carry loss. Packed
    rows get their segment ids."""
    longest = max(len(e) for e in examples)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(examples), width), dtype=np.int32)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = example.input_ids
        loss_mask[row, :n] = example.loss_mask
    lengths = np.array([len(e) for e in examples], dtype=np.int32)
    packed = isinstance(examples[0], PackedRow)
    return Batch(input_ids, loss_mask, lengths, segment_ids_of(examples, width) if packed else None)


def iterate_batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    pad_to_multiple: int = 1,
) -> Iterator[Batch]:
    """One epoch of batches. Without shuffle (evaluation) rows keep their order, so results line
    up with the input file."""
    if shuffle:
        groups = length_grouped_order([len(e) for e in examples], batch_size, seed)
    else:
        groups = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    for group in groups:
        if drop_last and len(group) < batch_size:
            continue
        yield collate([examples[i] for i in group], pad_id, pad_to_multiple)


@dataclass
class PairBatch:
    """Preference pairs as one batch of 2B rows, so chosen and rejected run in one forward:
    rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected (answers scored only)."""

    batch: Batch
    index: np.ndarray  # [B] int: the pairs' positions in the example list

    @property
    def pairs(self) -> int:
        return len(self.index)

    @property
    def tokens(self) -> int:
        return self.batch.tokens


def collate_pairs(pairs: Sequence[PreferenceExample], index: Sequence[int], pad_id: int, pad_to_multiple: int = 1) -> PairBatch:
    chosen, rejected = zip(*(p.as_examples() for p in pairs))
    return PairBatch(collate(chosen + rejected, pad_id, pad_to_multiple), np.asarray(index, dtype=np.int64))


def iterate_pair_batches(
    pairs: Sequence[PreferenceExample],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    pad_to_multiple: int = 1,
) -> Iterator[PairBatch]:
    """One epoch of pair batches (batch_size pairs each), length-grouped like iterate_batches."""
    if shuffle:
        groups = length_grouped_order([len(p) for p in pairs], batch_size, seed)
    else:
        groups = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    for group in groups:
        yield collate_pairs([pairs[i] for i in group], group, pad_id, pad_to_multiple)


def padding_fraction(batches: Sequence[Batch]) -> float:
    padded = sum(b.input_ids.size for b in batches)
    return 1.0 - sum(b.tokens for b in batches) / padded if padded else 0.0


@dataclass
class Targets:
    """Where a batch is scored, so a backend runs the LM head only there.

    With completion-only loss a TALLRec row has ~3 scored tokens out of ~150; computing logits
    over the vocabulary at every position would spend most of the head's work on nothing.
    `positions[b, k]` is the input position whose output predicts `tokens[b, k]`; `weights`
    is 1 for real targets and 0 for the padding that evens out rows.
    """

    positions: np.ndarray  # [B, K] int32, into input_ids[:, :-1]
    tokens: np.ndarray  # [B, K] int32
    weights: np.ndarray  # [B, K] float32


def scored_targets(batch: Batch, pad_to_multiple: int = 4) -> Targets:
    mask = batch.loss_mask[:, 1:].astype(bool)  # target t is predicted at position t - 1
    counts = mask.sum(axis=1)
    k = max(1, -(-int(counts.max()) // pad_to_multiple) * pad_to_multiple)
    positions = np.zeros((len(mask), k), dtype=np.int32)
    tokens = np.zeros((len(mask), k), dtype=np.int32)
    weights = np.zeros((len(mask), k), dtype=np.float32)
    for row in range(len(mask)):
        where = np.flatnonzero(mask[row])
        positions[row, : len(where)] = where
        tokens[row, : len(where)] = batch.input_ids[row, where + 1]
        weights[row, : len(where)] = 1.0
    return Targets(positions, tokens, weights)
