"""A batch's rows in passes of at most N rows (online RL's rl.completions_per_pass), one forward and
backward each: framework-free, so that both backends' steps cut them the same way.
"""

from __future__ import annotations


def row_passes(rows: int, per_pass: int | None) -> list[slice]:
    """A rollout's rows in passes of at most `per_pass` (rl.completions_per_pass; None: one pass).
    The policy objective is a sum over rows, so the passes' gradient and statistic sums add up to
    the single pass's; only the memory of the activations shrinks."""
    per_pass = per_pass or rows
    return [slice(start, min(start + per_pass, rows)) for start in range(0, rows, per_pass)]


def split_passes(row_arrays: tuple, carried, no_carried, passes: list[slice]) -> list[tuple]:
    """The trainer's inputs of each pass: every array sliced to the pass's rows, and the rollout's
    reward sums (`carried`) in the first pass only, so that they are counted once."""
    return [(*(a[rows] for a in row_arrays), carried if i == 0 else no_carried) for i, rows in enumerate(passes)]
