"""Packing for SFT (`data.packing`): several short examples share one row of data.cutoff tokens,
and each attends only to itself.

Length-grouped batches (mlxft.data.batching) already keep padding low when a batch can be filled
with rows of one length; packing also helps when lengths vary a lot or batches are small, and it
turns many short rows into few full ones (fewer, wider products).

A packed row keeps its examples apart in two ways, so its loss is the loss of the same examples
unpacked (tests/test_packing.py checks it on both backends, with the plain causal mask as the
negative control):
- `segment_ids [B, T]` number each example of a row 1, 2, ... (0 is padding), and the attention
  mask (block_mask) lets a token see only the earlier tokens of its own example;
- the first token of every example is not scored: the output before it belongs to the previous
  example, and unpacked that token is never a target either.

Positions: PyTorch takes per-token positions, so each example starts at 0 (segment_positions),
as with TRL's packing. mlx-lm's models take one offset per forward, so on MLX the examples keep
their positions in the row; with rotary embeddings attention sees only the distance between two
tokens, which is the same either way (equal up to float rounding). That is why packing on MLX is
limited to rotary families (mlxft.backends.mlx.model.can_pack).

Bins are filled best-fit decreasing (as TRL's default "bfd" strategy): longest first, each into the
row with the least room left that still fits it. The result depends only on the examples, so a
resumed run packs the same rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlxft.data.encode import Example
from mlxft.data.length_grouping import length_grouped_order


@dataclass
class PackedRow:
    """Examples laid end to end; `lengths` are theirs, in row order."""

    input_ids: list[int]
    loss_mask: list[int]
    lengths: tuple[int, ...]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[Example], width: int) -> list[PackedRow]:
    """The examples packed into rows of at most `width` tokens (best-fit decreasing); an example
    longer than `width` gets a row of its own."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the best fit is the first that fits
    for i in order:
        n = len(examples[i])
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            bins.append([i])
            left, b = width - n, len(bins) - 1
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, b))
    return [packed_row([examples[i] for i in members]) for members in bins]


def packed_row(examples: Sequence[Example]) -> PackedRow:
    input_ids, loss_mask = [], []
    for example in examples:
        input_ids += example.input_ids
        loss_mask += [0] + list(example.loss_mask[1:])  # its first token would be predicted by the previous example
    origin = examples[0].origin + (f" (+{len(examples) - 1} packed)" if len(examples) > 1 else "")
    return PackedRow(input_ids, loss_mask, tuple(len(e) for e in examples), origin)


def segment_ids_of(rows: Sequence[PackedRow], width: int) -> np.ndarray:
    """[B, width] int32: 1, 2, ... for each row's examples, 0 for the padding after them."""
    ids = np.zeros((len(rows), width), dtype=np.int32)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = np.repeat(np.arange(1, len(row.lengths) + 1, dtype=np.int32), row.lengths)
    return ids


def block_mask(segment_ids: np.ndarray) -> np.ndarray:
    """[B, 1, T, T] bool, True where a query may attend: earlier tokens of its own example. Padding
    (segment 0) sees the padding before it and itself, so no row of the softmax is empty."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    t = segment_ids.shape[1]
    return same & np.tril(np.ones((t, t), dtype=bool))[None, None]


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """[B, T] int32: each token's position within its own example (padding counts on from its
    segment's start, like any segment)."""
    t = segment_ids.shape[1]
    index = np.arange(t, dtype=np.int32)[None].repeat(len(segment_ids), axis=0)
    starts = np.concatenate([np.ones((len(segment_ids), 1), dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_of = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - start_of).astype(np.int32)


def padding_fraction_of(lengths: Sequence[int], batch_size: int, seed: int, pad_to_multiple: int) -> float:
    """The padding of one epoch of length-grouped batches of rows this long, each batch padded to
    its longest row rounded up to `pad_to_multiple` (what the trainers run)."""

    padded = real = 0
    for group in length_grouped_order(lengths, batch_size, seed):
        longest = max(lengths[i] for i in group)
        padded += len(group) * -(-longest // pad_to_multiple) * pad_to_multiple
        real += sum(lengths[i] for i in group)
    return 1.0 - real / padded if padded else 0.0


def describe_packing(examples: Sequence[Example], rows: Sequence[PackedRow], width: int, batch_size: int,
                     pad_to_multiple: int) -> str:
    """One line: rows before and after, and the padding of an epoch's batches either way."""
    before = padding_fraction_of([len(e) for e in examples], batch_size, 0, pad_to_multiple)
    after = padding_fraction_of([len(r) for r in rows], batch_size, 0, pad_to_multiple)
    per_row = len(examples) / max(len(rows), 1)
    return (f"packing: {len(examples)} examples into {len(rows)} rows of up to {width} tokens ({per_row:.1f} a row; "
            f"train.batch_size counts rows, so a step trains on ~{per_row:.0f}x the tokens it would unpacked); "
            f"padding {before:.0%} -> {after:.0%}")
