"""Seeded train / validation / test splits and K-shot sampling.

Both are pure functions of (items, seed): the same call always gives the same rows, on any
machine, because they use NumPy's PCG64 generator and never Python's hash-randomised sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlxft.errors import UserError

DEFAULT_FRACTIONS = (0.85, 0.10, 0.05)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'85,10,5' or '0.85,0.1,0.05' -> (0.85, 0.1, 0.05)."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"split fractions '{text}' must be three numbers, like 0.85,0.1,0.05") from None
    if len(parts) != 3 or min(parts) < 0:
        raise UserError(f"split fractions '{text}' must be three non-negative numbers")
    total = sum(parts)
    if total <= 0:
        raise UserError(f"split fractions '{text}' add up to zero")
    return tuple(p / total for p in parts)  # percentages and fractions both work


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Rows per split: validation and test are rounded, train takes the rest.

    A non-zero fraction always gets at least one row when there are rows to spare, so a tiny
    data set still has something to validate on.
    """
    _, f_valid, f_test = fractions
    n_valid = round(n * f_valid)
    n_test = round(n * f_test)
    if f_valid > 0 and n_valid == 0 and n >= 3:
        n_valid = 1
    if f_test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    n_train = n - n_valid - n_test
    if n_train < 0:
        raise UserError(f"cannot split {n} rows into fractions {tuple(fractions)}")
    return n_train, n_valid, n_test


def split_items(items: Sequence, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0):
    """Shuffle with `seed`, then cut into (train, valid, test) lists."""
    n_train, n_valid, _ = split_sizes(len(items), fractions)
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    return (
        shuffled[:n_train],
        shuffled[n_train : n_train + n_valid],
        shuffled[n_train + n_valid :],
    )


def sample_k_shot(items: Sequence, k: int, seed: int = 0) -> list:
    """K rows drawn without replacement, as TALLRec's 16/64/256-shot runs do.

    The draw is a prefix of one seeded permutation, so with the same seed the 16-shot rows are
    inside the 64-shot rows: comparing K values changes only how much data there is.
    """
    if k <= 0:
        raise UserError(f"K-shot sampling needs K > 0, got {k}")
    if k > len(items):
        raise UserError(f"cannot sample {k} rows from {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))[:k]
    return [items[i] for i in order]
