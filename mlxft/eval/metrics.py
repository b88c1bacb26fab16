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
