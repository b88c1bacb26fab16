"""Batches of rows of similar length, in a seeded order: what keeps padding low for plain
batches (batching.py) and packed rows (packing.py) alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, window: int = 16) -> list[list[int]]:
    """Batches of indices with similar lengths, in a seeded random order.

    Shuffle, cut into windows of `window` batches, sort each window by length and cut it into
    batches, then shuffle the batches: close to fully sorted padding, while every epoch still
    sees different neighbours and no length order in time.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [[int(i) for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
