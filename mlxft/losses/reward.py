"""The reward model's loss, written once for any array module (`xp`: numpy, mlx.core, torch):
the Bradley-Terry loss on preference pairs, as TRL's RewardTrainer computes it,

    loss = −log σ(r(x, y_w) − r(x, y_l))  [+ c · (r(x, y_w) + r(x, y_l))²]

where c is reward.center_coefficient (TRL's center_rewards_coefficient; 0 by default), which keeps
rewards near zero. Metrics under TRL's names: accuracy (ties count half: 0.5 is chance), margin.
"""

from __future__ import annotations

from mlxft.losses.dpo import log_sigmoid, pair_accuracies

# What a step or an evaluation reports, as sums that add up across micro-batches and reports.
STATISTICS = ("pairs", "loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


def bradley_terry_losses(chosen, rejected, *, center_coefficient: float = 0.0, xp):
    """Per-pair losses from the scores of the chosen and rejected answers (same shape)."""
    losses = -log_sigmoid(chosen - rejected, xp)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def reward_objective(scores, center_coefficient: float, *, xp, detach):
    """(sum of the batch's pair losses, STATISTICS sums) from the scores [2B] of a pair batch's
    rows (chosen rows, then rejected); `detach` is the backend's stop-gradient."""
    b = scores.shape[0] // 2
    chosen, rejected = scores[:b], scores[b:]
    losses = bradley_terry_losses(chosen, rejected, center_coefficient=center_coefficient, xp=xp)
    c, r, lo = detach(chosen), detach(rejected), detach(losses)
    sums = xp.stack([xp.zeros_like(lo).sum() + b, lo.sum(), pair_accuracies(c, r, xp).sum(), (c - r).sum(), c.sum(), r.sum()])
    return losses.sum(), sums


def summarize(sums) -> dict:
    """{'loss', 'accuracy', 'margin', 'rewards/chosen', 'rewards/rejected'}: means over pairs."""
    total = dict(zip(STATISTICS, (float(v) for v in sums)))
    pairs = max(total.pop("pairs"), 1.0)
    return {name: value / pairs for name, value in total.items()}
