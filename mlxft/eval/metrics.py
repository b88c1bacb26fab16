"""Metrics as pure numpy functions, shared by both backends and by the data checks."""

from __future__ import annotations

import numpy as np


def roc_auc(scores, labels) -> float:
    """Mann-Whitney AUC; tied scores count one half. NaN when only one class is present."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
    ranks = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_report(probabilities, labels) -> dict:
    """AUC, accuracy at 0.5 and label balance for P(positive) scores."""
    probabilities, labels = np.asarray(probabilities, dtype=float), np.asarray(labels).astype(int)
    return {
        "auc": roc_auc(probabilities, labels),
        "accuracy": float(((probabilities >= 0.5) == (labels == 1)).mean()),
        "positive_rate": float(labels.mean()),
        "rows": int(len(labels)),
        "probabilities": probabilities.tolist(),
    }


class ValidationTally:
    """What a validation pass adds up, batch by batch, on any backend: the token-weighted answer
    loss and, with answer_ids (the Yes and No tokens), P(yes) against each row's label, read at the
    first answer position. A row whose answer starts with neither token has no label; then there is
    no AUC. With several ranks each tallies its share of the rows (`rows`: their positions among
    `total`), and result() adds the tallies up."""

    def __init__(self, answer_ids: list[int] | None, rows=None, total: int | None = None):
        self.answer_ids = answer_ids
        self.rows, self.total = rows, total
        self.loss_sum, self.tokens = 0.0, 0.0
        self.probabilities, self.labels = [], []

    def add(self, loss_sum: float, targets, yes_probability=None) -> None:
        """One batch: its loss sum, its scored targets, and (with answer_ids) P(yes) per row [B]."""
        self.loss_sum += loss_sum
        self.tokens += float(targets.weights.sum())
        if self.answer_ids is not None:
            first = targets.tokens[:, 0]
            yes, no = self.answer_ids
            self.labels.append(np.where(first == yes, 1, np.where(first == no, 0, -1)))
            self.probabilities.append(np.asarray(yes_probability))

    def result(self, world=None) -> dict:
        """{'loss', 'tokens'} and, when every row has a label, binary_report's metrics; over every
        rank's rows when given the world."""
        loss_sum, tokens = self.loss_sum, self.tokens
        probabilities = np.concatenate(self.probabilities) if self.probabilities else np.zeros(0)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        if world is not None and world.size > 1:
            loss_sum, tokens = (float(v) for v in world.all_sum([loss_sum, tokens]))
            if self.answer_ids is not None:  # gathered by adding arrays that are zero outside each rank's rows
                scattered = np.zeros((2, self.total), np.float32)
                scattered[:, self.rows] = probabilities, labels
                probabilities, labels = world.all_sum(scattered)
                labels = labels.round().astype(int)
        result = {"loss": loss_sum / max(tokens, 1.0), "tokens": int(tokens)}
        if self.answer_ids is not None and len(labels) and (labels >= 0).all():
            result.update(binary_report(probabilities, labels))
        return result
