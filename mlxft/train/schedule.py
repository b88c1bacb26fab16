"""Learning-rate schedules as pure functions of the step, shared by both backends."""

from __future__ import annotations

import math

from mlxft.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(step: int, *, peak: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine", minimum: float = 0.0) -> float:
    """The rate for optimizer step `step` (0-based): linear warmup from peak/warmup to peak,
    then cosine or linear decay to `minimum` at `total_steps`, or constant."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return minimum + (peak - minimum) * (1.0 - progress)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))
